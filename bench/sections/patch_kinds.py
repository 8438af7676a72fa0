"""Every training-free patch kind, and `--patch auto`, at SmolLM2's stress cut (layers 20..24): held-out perplexity on
12 x 512 windows per corpus that no fit or choice saw, from one 64 x 512 calibration sample."""

from linearpatch.common.reporting import values_table

from ..harness import BLOCK, Claim, evaluation_windows, per_corpus, perplexities

TITLE = "Patch kinds at the stress cut (SmolLM2, about 8 minutes on 2 CPU cores)"
DEFAULT = False
KINDS = ("none", "hadamard", "diag", "scalar", "lstsq")
HADAMARD_OVER_PLAIN = 1.8  # plain pruning's perplexity over the Hadamard patch's, at least


def run(device: str, quick: bool) -> dict:
    from linearpatch.integration.data import token_windows
    from linearpatch.integration.measurement.calibration import calibrate
    from linearpatch.integration.models import load_model
    from linearpatch.integration.pruning import prune

    model, tokenizer = load_model("smollm2-135m", device=device)
    calibration = token_windows("wikipedia-calibration", tokenizer, 8 if quick else 64, 512, seed=0)
    statistics = calibrate(model, calibration, distances=(1, 5), regression_blocks=[(20, 25)], progress=False)
    evaluation = evaluation_windows(tokenizer, 2 if quick else 12)
    perplexity = {}
    for kind in KINDS:
        pruned, _ = prune(model, tokenizer, layers=BLOCK, patch=kind, statistics=statistics, progress=False)
        perplexity[kind] = perplexities(pruned, evaluation)
    # `--patch auto` holds out the last eighth of the same sample, fits every variant on the rest, keeps the best.
    pruned, report = prune(model, tokenizer, layers=BLOCK, patch="auto", calibration=calibration, progress=False)
    (choice,) = report.patch_choices
    auto = dict(
        perplexity=perplexities(pruned, evaluation),
        chosen=choice["label"],
        heldout_scores=choice["scores"],
        holdout_windows=report.holdout["num_windows"],
        search_seconds=report.holdout["search_seconds"],
        prune_seconds=report.seconds,
    )
    return dict(calibration=calibration.describe(), perplexity=perplexity, auto=auto)


def markdown(v: dict) -> list[str]:
    auto = v["auto"]
    calibration = v["calibration"]
    lines = [
        f"**Patch kinds** (SmolLM2, layers 20..24 removed; calibration {calibration['num_windows']} x "
        f"{calibration['seq_len']}, held-out perplexity on 12 x 512 windows)",
        "",
        *values_table({**v["perplexity"], f"auto: {auto['chosen']}": auto["perplexity"]}, "patch", 1).splitlines(),
    ]
    scores = ", ".join(f"{label} {score:.1f}" for label, score in auto["heldout_scores"].items())
    lines += [
        "",
        f"`--patch auto` ({calibration['num_windows'] - auto['holdout_windows']} windows fit, "
        f"{auto['holdout_windows']} held out) scored: {scores}; the search took {auto['search_seconds']:.0f} s of a "
        f"{auto['prune_seconds']:.0f} s prune.",
        "",
    ]
    return lines


def checks(v: dict) -> list[Claim]:
    perplexity, auto = v["perplexity"], v["auto"]["perplexity"]
    corpora = list(perplexity["none"])
    gain = {c: perplexity["none"][c] / perplexity["hadamard"][c] for c in corpora}
    best_fixed = {c: min(perplexity[kind][c] for kind in KINDS) for c in corpora}
    return [
        Claim(
            f"the Hadamard patch beats plain pruning at least {HADAMARD_OVER_PLAIN}x at the stress cut",
            all(value >= HADAMARD_OVER_PLAIN for value in gain.values()),
            per_corpus(gain, 2),
        ),
        Claim(
            "unrotated channel scales (diag) are worse than the Hadamard patch",
            all(perplexity["diag"][c] > perplexity["hadamard"][c] for c in corpora),
            "diag " + per_corpus(perplexity["diag"], 1) + "; hadamard " + per_corpus(perplexity["hadamard"], 1),
        ),
        Claim(
            "--patch auto is no worse than the best fixed kind at the stress cut",
            all(auto[c] <= best_fixed[c] for c in corpora),
            "auto " + per_corpus(auto, 1) + "; best fixed " + per_corpus(best_fixed, 1),
        ),
    ]
