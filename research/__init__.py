"""The research bench beside the product: the ablation grid (``ablations.yaml``), its report, the attention-map
diagnostics and the speed benchmarks, run by ``wsss-research`` (and the Prefect flow ``wsss/ablations``). It
imports the product; the product never imports it (``tests/test_layout.py``)."""
