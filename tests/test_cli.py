"""Every CLI command, run as a user types it (in-process through `main`, and once through the console script)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from linearpatch.cli import main


def test_console_script_help():
    # The console script installed next to this interpreter (the venv's bin/), as a user would run it.
    script = Path(sys.executable).parent / "linearpatch"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("prune",):
        assert command in result.stdout


def test_prune_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "pruned"
    code = main(
        [
            "prune",
            str(tiny_checkpoint),
            "--num-layers",
            "2",
            "--num-samples",
            "4",
            "--seq-len",
            "32",
            "--output",
            str(output),
            "--eval-windows",
            "2",
            "--eval-seq-len",
            "32",
            "--plots",
        ]
    )
    assert code == 0
    report = json.loads((output / "linearpatch_report.json").read_text())
    assert report["metric"] == "cosine" and len(report["pruned_layers"]) == 2
    assert set(map(int, report["candidate_scores"])) == set(range(5))
    # The default patch (auto) fits on 3 of the 4 windows and scores its candidates on the fourth.
    assert report["calibration"]["num_windows"] == 3 and report["calibration"]["seq_len"] == 32
    assert report["holdout"]["num_windows"] == 1 and report["patch"] == "auto"
    assert set(report["evaluation"]) == {"dense", "pruned"}
    assert (output / "tokenizer.json").exists() and (output / "modeling_linearpatch.py").exists()
    plots = json.loads((output / "linearpatch_plots.json").read_text())
    assert plots["cosine_heatmap"]["pruned_layers"] == report["pruned_layers"]
    assert (output / "layer_magnitudes.png").stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.pruned_layers == report["pruned_layers"]
    captured = capsys.readouterr()
    assert "Pruned layers" in captured.out
    assert "calibration" in captured.err and "layer magnitudes" in captured.err  # --plots shows its progress


def test_prune_refuses_to_overwrite_and_bad_layers(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    assert main(["prune", str(tiny_checkpoint), "--layers", "2-3", "--output", str(output)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "precious"
    assert (
        main(["prune", str(tiny_checkpoint), "--layers", "2-9", "--patch", "none", "--output", str(tmp_path / "x")])
        == 2
    )
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert (
        main(
            [
                "prune",
                str(tiny_checkpoint),
                "--layers",
                "2-3",
                "--patch",
                "none",
                "--output",
                str(output),
                "--overwrite",
            ]
        )
        == 0
    )
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


REQUESTS = {
    "prune": "PruneRequest",
    "distill": "DistillRequest",
    "eval": "EvalRequest",
    "export": "ExportRequest",
    "report": "ReportRequest",
    "serve": "ServeRequest",
    "push": "PushRequest",
    "pull": "PullRequest",
}
# The smallest command line of each, and the request fields it sets.
MINIMAL = {
    "prune": (["prune", "m", "--num-layers", "2", "--output", "o"], dict(model="m", output="o", num_layers=2)),
    "distill": (["distill", "c", "--teacher", "t", "--output", "o"], dict(checkpoint="c", teacher="t", output="o")),
    "eval": (["eval", "a", "b", "--baseline", "d"], dict(models=["a", "b"], baseline="d")),
    "export": (["export", "c", "--output", "o"], dict(checkpoint="c", output="o")),
    "report": (["report", "c"], dict(checkpoint="c")),
    "serve": (["serve", "c"], dict(checkpoint="c")),
    "push": (["push", "f", "org/x"], dict(folder="f", repo_id="org/x")),
    "pull": (["pull", "org/x"], dict(repo_id="org/x")),
}


def _as_lists(values: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


@pytest.mark.parametrize("command", list(REQUESTS))
def test_each_command_maps_its_flags_onto_its_request_and_restates_no_default(command):
    """Issue #21: a command's options and defaults live in its request; every field but `progress` (Python only) has
    a flag, every flag's default is the field's, and the smallest command line asks for the request's defaults."""
    import dataclasses

    import linearpatch.integration.requests as requests
    from linearpatch.cli import build_parser, request_from

    request_class = getattr(requests, REQUESTS[command])
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {action.dest: action for action in subparsers.choices[command]._actions}
    all_fields = {field.name: field for field in dataclasses.fields(request_class)}
    python_only = {name for name, field in all_fields.items() if field.metadata.get("cli") is False}
    assert python_only <= {"progress", "extra"}  # progress bars; serve's options for vllm
    assert set(actions) - {"help"} == set(all_fields) - python_only  # one argument per field, no hand-kept flag
    for name, action in actions.items():
        default = all_fields[name].default if name in all_fields else dataclasses.MISSING
        if action.option_strings and default is not dataclasses.MISSING:
            assert action.default == (list(default) if isinstance(default, tuple) else default), name
    argv, given = MINIMAL[command]
    args = parser.parse_args(argv)
    made = request_from(args, request_class)
    assert _as_lists(made.options()) == _as_lists(request_class(**given).options())


@pytest.mark.parametrize("command", ["top", "prune", "distill", "eval", "report", "export", "serve", "push", "pull"])
def test_help_keeps_every_flag_default_and_choice(command):
    """Issue #31: the parser generated from the requests prints every command's `--help` as the hand-kept parser of
    the last landing did (tests/fixtures/help/, at 200 columns): every flag, default, choice and meaning."""
    import os
    import subprocess
    import sys

    expected = (Path(__file__).parent / "fixtures" / "help" / f"{command}.txt").read_text()
    argv = [sys.executable, "-m", "linearpatch.cli", *([] if command == "top" else [command]), "--help"]
    shown = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"), check=True)
    assert shown.stdout == expected
