"""The layering that keeps each concept in one room (issues #10, #21): the package's import graph, built from the code,
has no circle and no arrow from a lower layer to a higher one; modeling/ is what a checkpoint ships, hub_tools/ never
reaches into integration/, and cli.py only parses, calls and prints."""

import ast
import subprocess
import sys
from collections.abc import Iterable
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


# The layers, lowest first (README, Layout). A module imports from its own layer and the ones below it, never above;
# every module of the package is placed here, so a new one is placed on purpose. A name ending in `.*` is a package
# and every module in it; any other name is that module alone.
LAYERS = {
    "common": ["linearpatch.common.*"],
    "modeling": ["linearpatch.modeling.*"],
    # What a command is asked to do: its options, their choices and defaults (importable without torch).
    "options": [
        "linearpatch.integration.choices",
        "linearpatch.integration.defaults",
        "linearpatch.integration.options",
        "linearpatch.integration.requests",
        "linearpatch.integration.service_requests",
    ],
    # Weight I/O: shards, model inputs opened once, models (the embedded one included), the patch adapter,
    # layer-by-layer running.
    "weights": [
        "linearpatch.integration.shards",
        "linearpatch.integration.adapter",
        "linearpatch.integration.embedded",
        "linearpatch.integration.resolution",
        "linearpatch.integration.models",
        "linearpatch.integration.layerwise",
    ],
    # Text, and the checks every job opens with.
    "loading": [
        "linearpatch.integration.data",
        "linearpatch.integration.opening",
        "linearpatch.integration.llama_cpp",
    ],
    "measurement": ["linearpatch.integration.measurement.*"],
    "operations": [
        "linearpatch.integration.pruning.patches",
        "linearpatch.integration.pruning.selection",
        "linearpatch.integration.pruning.search",
        "linearpatch.integration.pruning.cuts",
        "linearpatch.integration.pruning.streaming",
        "linearpatch.integration.distillation.teacher_cache",
        "linearpatch.integration.distillation.generated",
        "linearpatch.integration.distillation.trainer",
        "linearpatch.integration.distillation.streamed",
        "linearpatch.integration.evaluation.tasks",
        "linearpatch.integration.export.folding",
        "linearpatch.integration.export.fitting",
        "linearpatch.integration.export.scoring",
        "linearpatch.integration.export.stock",
        "linearpatch.integration.export.gguf",
    ],
    # A stage's plan and report: what it decides, and what it returns.
    "plans": [
        "linearpatch.integration.pruning.plan",
        "linearpatch.integration.pruning.report",
        "linearpatch.integration.distillation.plan",
        "linearpatch.integration.distillation.report",
        "linearpatch.integration.export.plan",
        "linearpatch.integration.export.report",
        "linearpatch.integration.evaluation.opening",
    ],
    "jobs": [
        "linearpatch.integration.pruning.job",
        "linearpatch.integration.distillation.job",
        "linearpatch.integration.distillation.folded",
        "linearpatch.integration.evaluation.comparison",
        "linearpatch.integration.evaluation.figures",
        "linearpatch.integration.export.job",
        "linearpatch.integration.serving.engine",
        "linearpatch.hub_tools.*",
    ],
    # The public faces: the command line, and the package folders that re-export their rooms' API.
    "interface": [
        "linearpatch",
        "linearpatch.cli",
        "linearpatch.integration",
        "linearpatch.integration.pruning",
        "linearpatch.integration.distillation",
        "linearpatch.integration.evaluation",
        "linearpatch.integration.export",
        "linearpatch.integration.serving",
    ],
}
SKIPPED = {".venv", ".venv-serving", "tests", "bench", "examples", "build", "docs", "site"}


def package_modules() -> dict[str, Path]:
    """`linearpatch.x.y` -> file, for every module of the installed package (the repository root is `linearpatch`)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if SKIPPED & set(parts) or any(part.startswith(".") for part in parts):
            continue
        name = ".".join(("linearpatch", *parts)).removesuffix(".__init__")
        modules[name] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in the file (a function-level import is an arrow too).
    `from a import b` points at `a.b` when that is a module, else at `a`; a module's own parent packages are not
    arrows (Python imports them first whatever the code says)."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        ancestors = {name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1)}
        graph[name] = {owner(t) for t in targets if t.startswith("linearpatch")} - {None, name} - ancestors
    return graph


def layer_of(name: str) -> int:
    """The index of `name`'s layer in `LAYERS`; -1 when it is not placed."""
    for index, entries in enumerate(LAYERS.values()):
        for entry in entries:
            package = entry.removesuffix(".*")
            if name == package or (entry.endswith(".*") and name.startswith(package + ".")):
                return index
    return -1


def circles(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, Iterable[str]]) -> list[str]:
    names = list(LAYERS)
    return [
        f"{source} ({names[layer_of(source)]}) imports {target} ({names[layer_of(target)]})"
        for source, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(source)
    ]


def rooms(graph: dict[str, Iterable[str]]) -> dict[str, set[str]]:
    """The graph between the rooms of integration/ (pruning, distillation, evaluation, measurement, models, ...) and
    the top-level folders: a circle between two rooms is a circle even when no two modules form one."""

    def room(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:3]) if parts[1:2] == ["integration"] else ".".join(parts[:2])

    merged: dict[str, set[str]] = {}
    for source, targets in graph.items():
        merged.setdefault(room(source), set()).update(room(t) for t in targets if room(t) != room(source))
    return merged


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in package_modules() if layer_of(name) < 0)
    assert not unplaced, f"place {unplaced} in LAYERS (and the README's Layout)"
    assert layer_of("linearpatch.integration.new_room") == -1 and layer_of("linearpatch.modeling.new") == 1


def test_the_import_graph_has_no_circle():
    graph = import_graph(package_modules())
    assert not circles(graph), circles(graph)
    room_graph = rooms(graph)
    assert not circles(room_graph), circles(room_graph)


def test_no_module_imports_from_a_higher_layer():
    assert not upward_imports(import_graph(package_modules()))


def test_the_checks_find_a_planted_circle_and_upward_import():
    # The old arrows of issue #21: models sent adapter folders to distillation's adapter, which loaded models back;
    # evaluation's figures took `calibrate` from pruning, which imports evaluation.
    planted = {
        "linearpatch.integration.models": {"linearpatch.integration.distillation.job"},
        "linearpatch.integration.distillation.job": {"linearpatch.integration.models"},
        "linearpatch.integration.evaluation.figures": {"linearpatch.integration.pruning.patches"},
        "linearpatch.integration.pruning.patches": {"linearpatch.integration.evaluation.figures"},
    }
    assert len(circles(planted)) == 2
    assert len(upward_imports(planted)) == 2  # loading -> jobs, operations -> jobs
    assert circles(rooms(planted))
    real = import_graph(package_modules())
    assert "linearpatch.integration.adapter" in real["linearpatch.integration.models"]  # arrows are found at all
    assert "linearpatch.integration.measurement.figures" in real["linearpatch.integration.evaluation.figures"]


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
        "evaluate_checkpoints",
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
    requests = {"requests"}  # the requests module: every command's flags are generated from its request's fields
    allowed = entry_points | choices | requests | {"LinearPatchError", "first_line", "ledger"}
    assert imported <= allowed, imported - allowed


def test_importing_modeling_or_the_teacher_child_pulls_in_nothing_else():
    # The teacher-cache child that every `distill` starts runs the teacher only: not the Trainer's imports.
    code = (
        "import sys, linearpatch.modeling, linearpatch\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('peft', 'lm_eval', 'datasets', 'matplotlib')\n"
        "         or m.startswith(('linearpatch.integration', 'linearpatch.hub_tools', 'linearpatch.cli'))]\n"
        "print(heavy)\n"
        "from linearpatch.integration.distillation.teacher_cache import run_child\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('peft', 'lm_eval', 'datasets', 'pandas')\n"
        "       or m.endswith(('distillation.trainer', 'distillation.job'))])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "[]"]


def test_package_data_and_packages_exist():
    import tomllib

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in settings["package-dir"].items():
        assert (ROOT / folder / "__init__.py").exists(), package
    for package, patterns in settings.get("package-data", {}).items():
        folder = ROOT / settings["package-dir"][package]
        assert all(list(folder.glob(pattern)) for pattern in patterns), (package, patterns)


# The stages of integration/ (one room each) and the sibling imports declared between them: `distill --export`
# trains the export's fold maps from its plan; `report` draws closeness by cut with pruning's held-out scorer of cuts
# (`pruning/cuts.py`), the same scoring `--metric loss` chooses by.
STAGES = ("pruning", "distillation", "evaluation", "export")
DECLARED_STAGE_EDGES = {("distillation", "export"), ("evaluation", "pruning")}


def stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if parts[1:2] == ["integration"] and len(parts) > 2 and parts[2] in STAGES else None


def sibling_stage_imports(graph: dict[str, Iterable[str]]) -> list[str]:
    return [
        f"{source} imports {target}"
        for source, targets in graph.items()
        for target in targets
        if stage_of(source)
        and stage_of(target)
        and stage_of(source) != stage_of(target)
        and (stage_of(source), stage_of(target)) not in DECLARED_STAGE_EDGES
        and layer_of(source) < LAYERS_INDEX["interface"]
    ]


LAYERS_INDEX = {name: index for index, name in enumerate(LAYERS)}


def test_stages_import_no_sibling_stage_but_declared_edges():
    graph = import_graph(package_modules())
    assert not sibling_stage_imports(graph), sibling_stage_imports(graph)
    planted = {"linearpatch.integration.pruning.job": {"linearpatch.integration.evaluation.figures"}}
    assert sibling_stage_imports(planted)  # the check finds one
    assert not sibling_stage_imports(
        {"linearpatch.integration.distillation.job": {"linearpatch.integration.export.plan"}}
    )


def test_command_options_sit_below_weight_io():
    # The options (requests, choices, defaults) import no weight I/O: `linearpatch --help` needs neither torch nor
    # safetensors, and a request is checked before any model is opened.
    graph = import_graph(package_modules())
    options = [name for name in graph if layer_of(name) == LAYERS_INDEX["options"]]
    assert {"linearpatch.integration.requests", "linearpatch.integration.defaults"} <= set(options)
    for name in options:
        assert all(layer_of(target) < LAYERS_INDEX["options"] or target in options for target in graph[name]), name
    assert LAYERS_INDEX["options"] < LAYERS_INDEX["weights"] < LAYERS_INDEX["loading"]


def parameter_counts(path: Path) -> dict[str, list[str]]:
    """`file:function` -> its parameter names (`self` and `cls` left out; `*args`, `**kwargs` count as one each)."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = node.args
            names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
            names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
            found[f"{path.relative_to(ROOT)}:{node.name}"] = [n for n in names if n not in ("self", "cls")]
    return found


def integration_functions() -> dict[str, list[str]]:
    found = {}
    for path in sorted((ROOT / "integration").rglob("*.py")):
        found |= parameter_counts(path)
    return found


def test_no_integration_function_takes_more_than_eight_parameters():
    wide = {name: len(names) for name, names in integration_functions().items() if len(names) > 8}
    assert not wide, f"pass a request or a small dataclass instead: {wide}"


# Option names many functions share by nature (where a model runs, how it is stored): not a restated request.
GENERIC_OPTIONS = {"model", "checkpoint", "output", "device", "dtype", "progress", "overwrite", "seed", "windows"}


def restated_requests(functions: dict[str, list[str]]) -> list[str]:
    """Functions whose parameters restate four or more (non-generic) fields of one request: the job should take it."""
    import dataclasses

    from linearpatch.integration import requests

    found = []
    for request in (requests.PruneRequest, requests.DistillRequest, requests.EvalRequest, requests.ExportRequest):
        fields = {field.name for field in dataclasses.fields(request)} - GENERIC_OPTIONS
        found += [
            f"{name} restates {sorted(set(names) & fields)} of {request.__name__}"
            for name, names in functions.items()
            if len(set(names) & fields) >= 4
        ]
    return found


def test_no_job_restates_a_request():
    assert not restated_requests(integration_functions())
    # The old spread job of `linearpatch export` is found.
    old = {"integration/export.py:_export_checkpoint_job": ["fold", "dense", "calibration", "num_samples", "seq_len"]}
    assert restated_requests(old)


def test_the_package_has_no_file_over_450_lines():
    long = {
        str(path.relative_to(ROOT)): count
        for path in ROOT.rglob("*.py")
        if not SKIPPED & set(path.relative_to(ROOT).parts) and not path.relative_to(ROOT).parts[0].startswith(".")
        if (count := len(path.read_text().splitlines())) > 450
    }
    assert not long, long


def test_integration_has_no_loose_file_of_a_stage():
    # Loose modules of integration/ are the shared floors (options, weight I/O, loading); every stage (prune, distill,
    # eval and report, export, serve) is a folder of its own.
    loose = {path.stem for path in (ROOT / "integration").glob("*.py")} - {"__init__"}
    shared = {"choices", "defaults", "options", "requests", "service_requests", "shards", "adapter", "embedded"}
    shared |= {"models", "layerwise"}
    shared |= {"resolution"}  # what a model input is, opened once (`ModelRef`)
    # llama_cpp: the tools `make gguf` builds, shared by export (--gguf) and serve (a .gguf).
    assert loose == shared | {"data", "opening", "llama_cpp"}, loose
    assert {path.name for path in (ROOT / "integration").iterdir() if (path / "__init__.py").exists()} == {
        "measurement",
        *STAGES,
        "serving",
    }
