"""The layering that keeps each concept in one room (issue #10): modeling/ is what a checkpoint ships, hub_tools/
never reaches into integration/, and cli.py only parses, calls and prints."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def imported_modules(path: Path) -> set[str]:
    """Absolute modules a file imports anywhere (top level or inside functions); relative imports excluded."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "modeling").glob("*.py")), ids=lambda p: p.name)
def test_modeling_imports_only_torch_transformers_and_itself(path):
    # huggingface_hub is transformers' own dependency (its config dataclasses use `strict` from it).
    allowed = {"torch", "transformers", "huggingface_hub"}
    foreign = {m for m in imported_modules(path) if m.split(".")[0] not in allowed | STDLIB}
    assert not foreign, f"{path.name} imports {foreign}"


@pytest.mark.parametrize("folder", ["hub_tools", "common"])
def test_hub_tools_and_common_never_import_integration(folder):
    for path in (ROOT / folder).glob("*.py"):
        modules = imported_modules(path)
        assert not [m for m in modules if m.startswith("linearpatch.integration")], path.name
        if folder == "common":
            assert not [m for m in modules if m.startswith("linearpatch.hub_tools")], path.name


def test_cli_holds_no_training_saving_or_evaluation_logic():
    tree = ast.parse((ROOT / "cli.py").read_text())
    forbidden = {
        "save_pretrained",
        "from_pretrained",
        "train",
        "merge_and_unload",
        "write_text",
        "mkdir",
        "rename",
        "simple_evaluate",
        "chunked_perplexity",
        "calibrate",
        "prune_layers",
        "load_model",
    }
    called = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            called.add(function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", ""))
    assert not called & forbidden, called & forbidden
    entry_points = {
        "prune_checkpoint",
        "parse_layers",
        "distill_checkpoint",
        "compare_models",
        "plot_checkpoint",
        "export_checkpoint",
        "serve",
        "push_to_hub",
        "pull",
    }
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("linearpatch."):
            imported |= {alias.name for alias in node.names}
    choices = {"CALIBRATION", "DISTILLATION", "FIGURES", "PERPLEXITY", "TASK_LIMIT", "DEFAULT_CANDIDATES", "FOLDS"}
    choices |= {"DEFAULT_TASKS", "PATCH_CHOICES", "SELECTION_METRICS", "METRIC_SCORES"}
    assert imported <= entry_points | choices | {"LinearPatchError", "ledger"}, imported - entry_points - choices


def test_importing_modeling_pulls_in_nothing_else():
    code = (
        "import sys, linearpatch.modeling, linearpatch\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('peft', 'lm_eval', 'datasets', 'matplotlib')\n"
        "         or m.startswith(('linearpatch.integration', 'linearpatch.hub_tools', 'linearpatch.cli'))]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_package_data_and_packages_exist():
    import tomllib

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in settings["package-dir"].items():
        assert (ROOT / folder / "__init__.py").exists(), package
    for package, patterns in settings.get("package-data", {}).items():
        folder = ROOT / settings["package-dir"][package]
        assert all(list(folder.glob(pattern)) for pattern in patterns), (package, patterns)
