"""wsss: weakly supervised semantic segmentation with class-specific token masking (ICCV 2025).

One import name for everything the project installs (pyproject maps the repo's folders into it):
``wsss.models`` (nn.Modules, registered with timm on import), ``wsss.lib`` (the library the stages
share), ``wsss.tasks`` (one module per DVC stage), ``wsss.tools`` (CLI, importers, predict, ablations,
report, diagnostics), ``wsss.pipelines`` (Prefect flows) and ``wsss.benchmarks``.
"""
