"""The package's shape: one import name, stages that import only the library, honest dvc.yaml deps."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from wsss.tasks.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "lib", "tasks", "tools", "pipelines", "research")
STAGE_MODULES = {stage.name: f"wsss.tasks.{stage.module}" for stage in STAGES}  # dvc.yaml stage -> its module


def module_file(name: str) -> Path | None:
    """Repo file of a ``wsss.*`` module or package (None: not one of ours)."""
    parts = name.split(".")
    if parts[0] != "wsss":
        return None
    base = REPO.joinpath(*parts[1:])
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """Every ``wsss.*`` module a file imports, at top level or inside functions (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("wsss")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wsss"):
            found.add(node.module)
            # `from wsss.lib import tracking` imports the module wsss.lib.tracking
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def closure(module: str) -> set[Path]:
    """Repo files that importing ``module`` executes (its packages' __init__ files included), transitively."""
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
            path = module_file(".".join(parts[:end]))
            if path is not None and path not in files:
                files.add(path)
                todo += sorted(imported_modules(path))
    return files


def code_deps(stage: dict) -> set[Path]:
    return {REPO / d for d in stage["deps"] if str(d).endswith(".py")}


def test_dvc_code_deps_are_exactly_the_stage_modules_import_closure():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_MODULES)
    for stage, module in STAGE_MODULES.items():
        expected = {p.relative_to(REPO).as_posix() for p in closure(module)}
        listed = {p.relative_to(REPO).as_posix() for p in code_deps(stages[stage])}
        assert listed == expected, f"{stage}: missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"


def test_dvc_yaml_runs_the_stage_table():
    """dvc.yaml's stages are the table's (wsss.tasks.stages), in its order, each running its command with its
    params; the CLI offers every command and the flow runs every stage."""
    from wsss.pipelines.wsss import STAGES as FLOW_STAGES
    from wsss.tools.cli import build_parser

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [stage.name for stage in STAGES]
    for stage in STAGES:
        assert stages[stage.name]["cmd"] == " ".join(["wsss", stage.command, *stage.options]), stage.name
        assert tuple(stages[stage.name].get("params", ())) == stage.params, stage.name
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {stage.command for stage in STAGES} <= set(commands)
    assert ("data.dvc", *stages) == FLOW_STAGES


def test_no_stage_imports_another_stage_and_nothing_imports_upward():
    """models/ imports nothing of the app; lib/ nothing above it; a stage only lib/ and models/."""
    allowed = {
        "models": {"models"},
        "lib": {"models", "lib"},
        "tasks": {"models", "lib"},
    }
    for package, may_import in allowed.items():
        for path in sorted((REPO / package).glob("*.py")):
            for name in imported_modules(path):
                layer = name.split(".")[1] if name.count(".") else ""
                assert layer in may_import, f"{path.relative_to(REPO)} imports {name}"


def test_the_product_never_imports_the_research_bench():
    """research/ imports the product; nothing of the product (models, lib, tasks, tools, pipelines) imports it."""
    for package in ("models", "lib", "tasks", "tools", "pipelines"):
        for path in sorted((REPO / package).glob("*.py")):
            found = [name for name in imported_modules(path) if name.startswith("wsss.research")]
            assert not found, f"{path.relative_to(REPO)} imports {found[0]}"


def test_no_private_names_imported_across_modules():
    for package in (*PACKAGES, "tests"):
        for path in sorted((REPO / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wsss"):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path.relative_to(REPO)} imports {private} from {node.module}"


def test_one_ignore_index():
    code = [p for package in PACKAGES for p in (REPO / package).glob("*.py")]
    definitions = [p for p in code if "\nIGNORE_INDEX = " in p.read_text()]
    assert [p.relative_to(REPO).as_posix() for p in definitions] == ["lib/metrics.py"]


@pytest.mark.slow
def test_wheel_installs_one_top_level_package(tmp_path: Path):
    """`pip install .`: site-packages gets `wsss` and its dist-info, no top-level models/tasks/..."""
    wheel_dir = tmp_path / "wheel"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO)]
    built = subprocess.run(pip, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    import zipfile

    (wheel,) = wheel_dir.glob("wsss-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"wsss", next(t for t in tops if t.endswith(".dist-info"))}, tops


def user_project(root: Path) -> Path:
    """A user's project with top-level ``models`` and ``tasks`` packages of its own (a common layout)."""
    for name in ("models", "tasks"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("USERS_OWN = True\n")
    return root


def test_timm_registry_works_beside_a_users_own_models_and_tasks_packages(tmp_path: Path):
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import models, tasks
        assert models.USERS_OWN and tasks.USERS_OWN
        import timm
        import wsss.models
        model = timm.create_model("wsss_vit_tiny_patch8", num_classes=3, img_size=32)
        assert type(model).__module__ == "wsss.models.token_masking_vit", type(model).__module__
        print("ok")
        """
    )
    project = user_project(tmp_path)
    result = subprocess.run([sys.executable, "-c", script, str(project)], cwd=project, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
