"""The bench's claims (issue #20): quality and cost claims about SmolLM2 are measured by `python -m bench`, not by the
test suite, and `python -m bench --check` fails naming the claim when a result breaks it. Here: every claim holds on
the recorded results, and each one fails on a copy of them broken on purpose."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import check
from bench.sections import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
WIKI, NEWS = "wikipedia-eval", "lee-news"


def _located(result, path: str | tuple[str, ...]):
    """The container and key that `path` names in a section's result: a dotted path (list indices as numbers), or
    a tuple of keys for keys that hold dots themselves (`models["20..24 patched"]`)."""
    *parents, last = path.split(".") if isinstance(path, str) else path
    target = result
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    return target, int(last) if isinstance(target, list) else last


def _set(path: str | tuple[str, ...], value):
    """A breaker that sets the one value at `path` (see [`_located`])."""

    def breaker(result):
        target, key = _located(result, path)
        target[key] = value

    return breaker


def _scale(path: str | tuple[str, ...], factor: float):
    def breaker(result):
        target, key = _located(result, path)
        target[key] *= factor

    return breaker


# (section, words from the claim's name) -> a change to the section's recorded result that breaks only that claim.
BREAKERS = {
    ("inference", "under 2% of the forward time"): _set("1.patch_time_share", 0.05),
    ("inference", "prefills within 10%"): _set("0.prefill_ratio_patched_over_plain", 1.3),
    ("calibration", "as fast as a plain no-grad forward"): _set("speed_ratio", 0.5),
    ("calibration", "memory at fixed tokens"): _set("peak_rss_ratio_1024_over_512", 1.9),
    ("distillation", "takes at most 0.6x the time"): _set("step_ratio_patch_only_over_full", 0.9),
    ("distillation", "adds at most half the memory"): _set("step_memory_growth_mib.patch_only", 900.0),
    ("distillation", "under 1% of full-vocabulary"): _set("cache_ratio", 0.05),
    ("checkpoint", "adds at most 1%"): _scale("bytes.patched", 1.05),
    ("checkpoint", "loads within 1.5x"): _set("load_ratio_patched_over_plain_llama", 2.5),
    ("quality", "distillation lowers the held-out perplexity"): _scale(f"perplexity_distilled.{NEWS}", 1.6),
    ("patch_kinds", "Hadamard patch beats plain pruning"): _scale(f"perplexity.hadamard.{NEWS}", 1.5),
    ("patch_kinds", "unrotated channel scales"): _set(f"perplexity.diag.{WIKI}", 100.0),
    ("patch_kinds", "--patch auto is no worse"): _set(f"auto.perplexity.{WIKI}", 1000.0),
    ("search", "--metric loss --patch auto"): _set(f"five_layers.perplexity.loss+auto.{NEWS}", 500.0),
    ("search", "removes at least"): _set("target.num_layers", 2),
    ("search", "on evaluation text"): _set(f"target.evaluation_ratio.{WIKI}", 2.5),
    ("export", "training-free export of a --patch hadamard"): _set(f"ratios.hadamard export over patched.{NEWS}", 1.3),
    ("export", "training-free export of a --patch auto"): _set(f"ratios.auto export over patched.{WIKI}", 1.6),
    ("export", "--export of a --patch hadamard"): _set(
        f"ratios.hadamard distilled export over distilled patch.{WIKI}", 1.2
    ),
    ("export", "--export of a --patch auto"): _set(f"ratios.auto distilled export over distilled patch.{NEWS}", 1.2),
    ("export", "beats plain pruning"): _set(f"perplexity.hadamard export.{WIKI}", 1e4),
    ("closeness", "at 20..24, the patched model is closer"): _set(
        ("models", "20..24 patched", "closeness", NEWS, "kl"), 10.0
    ),
    ("closeness", "at 20..24, the patched model agrees"): _set(
        ("models", "20..24 plain", "closeness", WIKI, "top1"), 1.0
    ),
    ("closeness", "at n=5, the patched model is closer"): _set(
        ("models", "n=5 patched", "closeness", WIKI, "kl"), 10.0
    ),
    ("closeness", "at n=5, the patched model agrees"): _set(
        ("models", "n=5 patched", "closeness", NEWS, "top10"), 0.0
    ),
    ("closeness", "greedy continuations"): _set(("models", "20..24 patched", "generation", "identical_tokens"), 0.0),
    ("closeness", "default data"): _set(("models", "n=5 distilled corpus", "closeness", NEWS, "kl"), 10.0),
    ("gguf", "at 20..24 the patched GGUF beats"): _set(("files", "20..24 patched", "0", "perplexity", NEWS), 1e4),
    ("gguf", "at n=5 the patched GGUF beats"): _set(("files", "n=5 plain", "2", "perplexity", WIKI), 1.0),
    ("gguf", "lower than llama-quantize --prune-layers"): _set(
        ("files", "20..24 llama-quantize --prune-layers", "1", "perplexity", WIKI), 60.0
    ),
    ("gguf", "for dense and the plain cut"): _scale(("files", "dense", "1", "perplexity", WIKI), 1.06),
    ("gguf", "for the folded exports"): _scale(("files", "n=5 distilled", "1", "perplexity", NEWS), 1.1),
    ("gguf", "the stock export's perplexity"): _scale(("stock", "20..24 patched", WIKI), 0.8),
    ("gguf", "more than 10% slower"): _scale(("files", "20..24 plain", "0", "generation_tps"), 0.7),
    ("serving", "at least 0.7x as fast"): _set("ratios.patched_over_plain_same_backend", 0.5),
    ("sequential", "at most 0.5x the memory"): _set("rss_ratio_streaming_over_load_prune_save", 0.8),
    ("sequential", "writes the in-memory tensors"): _set("largest_tensor_difference.sequential", 0.01),
    ("tasks", "dense SmolLM2 scores at least"): _set("scores.dense.acc_norm", 0.3),
    ("tasks", "separates dense from plain"): _set("scores.plain.acc_norm", 0.5),
    ("scale", "peak at most"): _set("steps.eval_pruned.peak_rss_mib", 7000.0),
    ("scale", "best matmul FLOP/s"): _set("calibration.share_of_best_matmul", 0.3),
    ("scale", "read once per pass"): _scale("steps.prune_hadamard.weights_read_bytes", 1.5),
    ("scale", "student fits"): _scale("steps.distill.peak_rss_mib", 2.0),
}


def _auto_just_above_plain(run: str):
    """Breaks only "the default (auto) is no worse than plain": auto a hair above plain, the Hadamard row equal to
    plain (so auto stays within 1.01x of the better of the two, and Hadamard no worse than plain)."""

    def breaker(result):
        figures = result["runs"][run]["figures"]
        plain = figures["plain"]["perplexity"][WIKI]
        figures["hadamard"]["perplexity"][WIKI] = plain
        figures["auto"]["perplexity"][WIKI] = plain * 1.001

    return breaker


# real_models: five claims per model and cut, each broken at its own figure (the default row is `auto`).
for _run in ("smollm2-135m 1/6", "smollm2-135m stress", "gemma3-270m 1/6", "gemma3-270m stress"):
    _default, _distilled = ("runs", _run, "figures", "auto"), ("runs", _run, "figures", "distilled")
    BREAKERS |= {
        ("real_models", f"{_run}: the default patch ("): _auto_just_above_plain(_run),
        ("real_models", f"{_run}: distilling the default"): _set((*_distilled, "perplexity", NEWS), 1e9),
        ("real_models", f"{_run}: the Hadamard patch"): _set(
            ("runs", _run, "figures", "hadamard", "perplexity", NEWS), 1e9
        ),
        ("real_models", f"{_run}: --patch auto is within"): _set(
            ("runs", _run, "figures", "hadamard", "perplexity", WIKI), 1.0
        ),
        ("real_models", f"{_run}: the default patch's prune"): _scale(("runs", _run, "seconds", "auto"), 10.0),
    }


def _matching(section: str, words: str, names: list[str]) -> int:
    found = [index for index, name in enumerate(names) if words in name]
    assert len(found) == 1, (section, words, names)
    return found[0]


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_recorded_result_holds_its_claims_and_every_claim_has_a_breaker(section):
    assert section in RECORDED, f"bench/results/latest.json has no {section!r}: run `python -m bench --check`"
    claims = SECTIONS[section].checks(RECORDED[section])
    assert claims, f"{section} makes no claim"
    assert [claim.name for claim in claims if not claim.holds] == []
    covered = sorted(_matching(section, words, [c.name for c in claims]) for s, words in BREAKERS if s == section)
    assert covered == list(range(len(claims))), f"every claim of {section} needs exactly one breaker in BREAKERS"


@pytest.mark.parametrize("section, words", list(BREAKERS))
def test_each_claim_fails_on_a_result_that_breaks_it(section, words):
    result = copy.deepcopy(RECORDED[section])
    BREAKERS[section, words](result)
    claims = SECTIONS[section].checks(result)
    broken = _matching(section, words, [claim.name for claim in claims])
    assert [index for index, claim in enumerate(claims) if not claim.holds] == [broken]


def test_check_exits_1_and_names_the_broken_claim(tmp_path):
    results = copy.deepcopy(RECORDED)
    BREAKERS["patch_kinds", "Hadamard patch beats plain pruning"](results["patch_kinds"])
    (tmp_path / "latest.json").write_text(json.dumps(results))
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--check", "--recorded", "--output", str(tmp_path / "latest")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 claim(s) no longer hold: patch_kinds: the Hadamard patch beats plain pruning" in run.stderr
    assert "PASS search:" in run.stdout  # the others are still judged and shown
    holds = subprocess.run(
        [sys.executable, "-m", "bench", "--check", "--recorded", "--sections", "search", "export"]
        + ["--output", str(ROOT / "bench" / "results" / "latest")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert holds.returncode == 0 and "all 8 claims hold" in holds.stdout, holds.stdout + holds.stderr


def test_check_refuses_a_section_without_a_result():
    # A section that was never run is not a claim that holds.
    with pytest.raises(SystemExit, match="no recorded result for quality"):
        check({"machine": "x"}, ["quality"])


def test_check_leaves_the_opt_in_scale_section_to_make_bench_scale():
    from bench.sections import CHECKED_SECTIONS

    assert set(SECTIONS) - set(CHECKED_SECTIONS) == {"scale"}
    assert "bench --check --sections scale" in (ROOT / "Makefile").read_text()
