"""One guarantee, over every command: bad input is refused in one line that names the problem and the fix, before any
model is loaded, and nothing is written. Each row is `(argv, fragments of the message)`; `{dense}` is the tiny dense
model, `{pruned}` the tiny LinearPatch checkpoint, `{output}` a path that must still not exist afterwards."""

import pytest

from linearpatch.cli import main

QUICK = ["--num-samples", "4", "--seq-len", "32"]
REFUSALS = [
    # prune: options that contradict each other or the model
    (["prune", "{dense}", "--layers", "2-3", "--metric", "cosine"], ["--layers names them"]),
    (["prune", "{dense}", "--layers", "2-3", "--metric", "loss"], ["--layers names them", "--patch auto"]),
    (["prune", "{dense}", "--num-layers", "2", "--patch", "hadamard", "--holdout", "2"], ["nothing is held out"]),
    (["prune", "{dense}", "--target-ppl-ratio", "0.9"], ["is not above 1"]),
    (["prune", "{dense}", "--num-layers", "2", "--base-model", "not-a-repo"], ["not a Hub repo id"]),
    (["prune", "{dense}", "--layers", "2-x"], ["Cannot read layers", "'20-24'"]),
    (["prune", "{dense}", "--num-layers", "6"], ["Cannot prune 6 of 6 layers", "1..5"]),
    (["prune", "{pruned}", "--num-layers", "1"], ["already pruned", "prune its dense model instead"]),
    (["prune", "{missing}", "--num-layers", "1"], ["not found", "Check the path"]),
    # distill: a recipe that cannot train, options that exclude each other, a model that is not a checkpoint
    (["distill", "{pruned}", "--teacher", "{dense}", "--temperature", "0"], ["--temperature 0.0 must be above 0"]),
    (["distill", "{pruned}", "--teacher", "{dense}", "--lr", "0"], ["--lr 0.0 must be above 0"]),
    (["distill", "{pruned}", "--teacher", "{dense}", "--lr=-1e-4"], ["--lr -0.0001 must be above 0"]),
    (["distill", "{pruned}", "--teacher", "{dense}", "--epochs", "0"], ["trains for zero steps", "--max-steps"]),
    (
        ["distill", "{pruned}", "--teacher", "{dense}", "--export", "--adapter-only"],
        ["--adapter-only writes only an adapter", "choose one"],
    ),
    (["distill", "{dense}", "--teacher", "{dense}"], ["not a LinearPatch checkpoint", "linearpatch prune"]),
    # export, eval, report, serve, push, pull
    (["export", "{dense}"], ["not a LinearPatch checkpoint", "linearpatch prune"]),
    (["eval", "{pruned}", "--baseline", "{dense}", "--limit", "-5"], ["--limit -5", "0: all"]),
    (["eval", "{pruned}", "--baseline", "{dense}", "--tasks", "wiki_next_sentense"], ["Unknown lm-eval task(s)"]),
    (["report", "{dense}"], ["not a LinearPatch checkpoint"]),
    (["serve", "{missing}"], ["is not a model folder", "pass a checkpoint folder"]),
    (["push", "{pruned}", "org/name"], ["offline mode is on"]),
    (["pull", "org/name"], ["not in the local HF cache"]),
]
# Commands that write an output folder get one, which must not exist afterwards.
WRITES = {"prune", "distill", "export"}


@pytest.mark.parametrize(("argv", "fragments"), REFUSALS, ids=lambda value: " ".join(value)[:60])
def test_bad_input_is_one_line_before_any_work(
    argv, fragments, tiny_checkpoint, tiny_pruned, tmp_path, capsys, monkeypatch
):
    import linearpatch.integration.distillation.job as distill_job
    import linearpatch.integration.evaluation.opening as opening
    import linearpatch.integration.models as models
    import linearpatch.integration.pruning.plan as pruning_plan

    def no_work(*args, **kwargs):
        pytest.fail("a model was loaded (or run) before the input was refused")

    for module, name in [
        (models, "load_model"),
        (opening, "load_model"),
        (opening, "layerwise_model"),
        (pruning_plan, "calibrate"),
    ]:
        monkeypatch.setattr(module, name, no_work)
    monkeypatch.setattr(distill_job, "build_cache_in_subprocess", no_work)
    output = tmp_path / "output"
    names = dict(dense=tiny_checkpoint, pruned=tiny_pruned, missing=tmp_path / "missing", output=output)
    arguments = [part.format(**names) for part in argv]
    if argv[0] in WRITES:
        arguments += [*QUICK, "--output", str(output)]
    code = main(arguments)
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith(f"linearpatch {argv[0]}: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_command_has_a_refusal():
    from linearpatch.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if hasattr(action, "choices") and action.choices).choices
    assert set(commands) == {argv[0] for argv, _ in REFUSALS}
