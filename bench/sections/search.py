"""Choosing by outcome on SmolLM2, every perplexity on 12 x 512 evaluation windows per corpus that no choice saw:

- `five_layers`: the cosine block with every single kind against `--metric loss`, `--patch auto` and both, with the
  time of each against the cosine/hadamard default (each a whole `prune` at the CPU default of 32 x 512 windows);
- `target`: `--target-ppl-ratio 1.6`: the depth chosen, its held-out and evaluation perplexity ratios, the curve.

(The stress cut's `--patch auto` is in `patch_kinds`.)
"""

import time

from linearpatch.common.reporting import markdown_table

from ..harness import Claim, evaluation_windows, per_corpus, perplexities

TITLE = "Choosing by outcome (SmolLM2, about 30 minutes on 2 CPU cores)"
DEFAULT = False
KINDS = ("none", "hadamard", "diag", "scalar", "lstsq")
TARGET = 1.6
MIN_DEPTH = 4  # layers the target search removes within TARGET, at least (plain and hadamard reach 3)
EVALUATION_SLACK = 1.15  # evaluation text may exceed the held-out target by this factor


def run(device: str, quick: bool) -> dict:
    from linearpatch.integration.data import token_windows
    from linearpatch.integration.measurement.calibration import calibrate
    from linearpatch.integration.models import load_model
    from linearpatch.integration.pruning import prune

    model, tokenizer = load_model("smollm2-135m", device=device)
    evaluation = evaluation_windows(tokenizer, 2 if quick else 12)

    def timed_prune(**kwargs):
        started = time.perf_counter()
        pruned, report = prune(model, tokenizer, progress=False, **kwargs)
        return pruned, report, time.perf_counter() - started

    dense = perplexities(model, evaluation)
    calibration = token_windows("wikipedia-calibration", tokenizer, 8 if quick else 32, 512, seed=0)
    statistics = calibrate(model, calibration, distances=(1, 5), progress=False)
    five = {}
    for kind in KINDS:
        pruned, report = prune(
            model, tokenizer, num_layers=5, patch=kind, calibration=calibration, statistics=statistics, progress=False
        )
        five[f"cosine+{kind}"] = dict(perplexities(pruned, evaluation), layers=report.pruned_layers)
    seconds = {}
    for name, kwargs in {
        "cosine+hadamard": dict(patch="hadamard"),
        "loss+hadamard": dict(metric="loss"),
        "cosine+auto": dict(patch="auto"),
        "loss+auto": dict(metric="loss", patch="auto"),
    }.items():
        pruned, report, seconds[name] = timed_prune(num_layers=5, calibration=calibration, **kwargs)
        if name != "cosine+hadamard":
            five[name] = dict(perplexities(pruned, evaluation), layers=report.pruned_layers, patch=report.patch_kind)

    pruned, report, took = timed_prune(target_ppl_ratio=TARGET, calibration=calibration)
    chosen = perplexities(pruned, evaluation)
    return dict(
        dense=dense,
        five_layers=dict(
            perplexity=five,
            seconds=seconds,
            time_ratio={name: value / seconds["cosine+hadamard"] for name, value in seconds.items()},
        ),
        target=dict(
            target=TARGET,
            num_layers=len(report.pruned_layers),
            layers=report.pruned_layers,
            patch=report.patch_kind,
            heldout_ratio=report.depth_curve[len(report.pruned_layers) - 1]["ratio"],
            evaluation_ratio={corpus: chosen[corpus] / dense[corpus] for corpus in chosen},
            curve=report.depth_curve,
            seconds=took,
            time_ratio=took / seconds["cosine+hadamard"],
        ),
    )


def markdown(v: dict) -> list[str]:
    corpora = list(v["dense"])

    def row(name: str, values: dict) -> list[str]:
        extra = ", ".join(f"{key} {values[key]}" for key in ("layers", "patch", "chosen") if key in values)
        return [name, *(f"{values[c]:.1f}" for c in corpora), extra]

    five = v["five_layers"]
    target = v["target"]
    return [
        "**Choosing by outcome** (SmolLM2; perplexity on 12 x 512 evaluation windows per corpus, unseen by any "
        "choice)",
        "",
        "Five layers, calibration 32 x 512 (loss and auto: 28 to fit, 4 held out):",
        "",
        *markdown_table(
            ["model", *corpora, "choice"],
            [row("dense", v["dense"]), *(row(name, values) for name, values in five["perplexity"].items())],
        ).splitlines(),
        "",
        *markdown_table(
            ["prune time over cosine+hadamard", *five["time_ratio"]],
            [["ratio", *(f"{value:.2f}" for value in five["time_ratio"].values())]],
        ).splitlines(),
        "",
        f"`--target-ppl-ratio {target['target']}` chose {target['num_layers']} layers {target['layers']} "
        f"({target['patch']}): held-out ratio {target['heldout_ratio']:.3f}, evaluation ratio "
        + ", ".join(f"{c} {r:.3f}" for c, r in target["evaluation_ratio"].items())
        + f"; {target['time_ratio']:.1f}x the time of the default prune.",
        "",
        *markdown_table(
            ["layers removed", "plain", "hadamard", "chosen", "chosen block, patch"],
            [
                [
                    p["num_layers"],
                    f"{p['plain_ratio']:.3f}",
                    f"{p['fixed_ratio']:.3f}",
                    f"{p['ratio']:.3f}",
                    f"{p['layers'][0]}-{p['layers'][1]}, {p['patch']}",
                ]
                for p in target["curve"]
            ],
        ).splitlines(),
        "",
    ]


def checks(v: dict) -> list[Claim]:
    five, target = v["five_layers"]["perplexity"], v["target"]
    corpora = list(v["dense"])
    loss_auto = {c: five["loss+auto"][c] for c in corpora}
    best_single = {c: min(five[f"cosine+{kind}"][c] for kind in KINDS) for c in corpora}
    limit = EVALUATION_SLACK * target["target"]
    return [
        Claim(
            "--metric loss --patch auto is no worse than the cosine block with any single kind (5 layers)",
            all(loss_auto[c] <= best_single[c] for c in corpora),
            "loss+auto " + per_corpus(loss_auto, 1) + "; best cosine+kind " + per_corpus(best_single, 1),
        ),
        Claim(
            f"--target-ppl-ratio {target['target']} removes at least {MIN_DEPTH} layers within the target on the "
            "held-out windows",
            target["num_layers"] >= MIN_DEPTH and target["heldout_ratio"] <= target["target"],
            f"{target['num_layers']} layers, held-out ratio {target['heldout_ratio']:.3f}",
        ),
        Claim(
            f"the target's cut stays within {EVALUATION_SLACK}x the target on evaluation text",
            all(ratio <= limit for ratio in target["evaluation_ratio"].values()),
            per_corpus(target["evaluation_ratio"]) + f" (limit {limit:.2f})",
        ),
    ]
