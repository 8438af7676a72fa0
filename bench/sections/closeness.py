"""How close each stage brings a pruned SmolLM2 to the dense model, not only to the text: plain pruning, the patch
(`--patch auto`), and the patch distilled on the corpus and on the teacher's own text (`--data generated`), at the
stress cut (layers 20..24) and at five layers chosen by the default metric. Every command at its CLI defaults (the
two distillations take the same steps, from one teacher cache root), then one `linearpatch eval` of every model
against the dense one: perplexity, KL, top-1/top-10 agreement, greedy generation agreement and the offline tasks."""

from linearpatch.common.reporting import markdown_table

from ..harness import BLOCK, Claim, compare_side_by_side, timed

TITLE = "Closeness to the dense model (SmolLM2, about 50 minutes on 2 CPU cores)"
DEFAULT = False
STRESS = "20..24"
CUTS = {STRESS: dict(layers=BLOCK), "n=5": dict(num_layers=5)}
TASKS = ("wiki_next_sentence", "wiki_last_word")  # the offline tasks SmolLM2 does above chance
TASK_LIMIT = 60  # documents per task, as the tasks section (eval's CPU default is 100): 7 minutes for nine models


def run(device: str, quick: bool) -> dict:
    import tempfile
    from pathlib import Path

    from linearpatch.integration.distillation import distill_checkpoint
    from linearpatch.integration.distillation.generated import GENERATED
    from linearpatch.integration.pruning import prune_checkpoint
    from linearpatch.integration.requests import DistillRequest

    calibration = dict(num_samples=8, seq_len=128) if quick else {}
    training = dict(num_samples=4, seq_len=64) if quick else {}
    evaluation = dict(perplexity_windows=2, seq_len=128, generation_prompts=2) if quick else {}
    corpus = DistillRequest.__dataclass_fields__["data"].default
    seconds, steps, paths, pruned = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)

        for cut, which in CUTS.items():
            for stage, patch in (("plain", "none"), ("patched", "auto")):
                path = paths[f"{cut} {stage}"] = root / f"{cut} {stage}"
                report = timed(
                    seconds,
                    f"prune {cut} {stage}",
                    prune_checkpoint,
                    "smollm2-135m",
                    path,
                    patch=patch,
                    eval_windows=0,
                    progress=False,
                    **which,
                    **calibration,
                )
                pruned[f"{cut} {stage}"] = report.pruned_layers
            for data in (corpus, GENERATED):
                name = f"{cut} distilled {'generated' if data == GENERATED else 'corpus'}"
                paths[name] = root / name
                report = timed(
                    seconds,
                    f"distill {name}",
                    distill_checkpoint,
                    str(paths[f"{cut} patched"]),
                    "smollm2-135m",
                    paths[name],
                    data=data,
                    cache_dir=root / "teacher-cache",  # the teacher's text is written once, for both cuts
                    **training,
                )
                steps[name] = report.steps
        rows, settings = timed(
            seconds,
            "eval",
            compare_side_by_side,
            paths,
            "smollm2-135m",
            tasks=TASKS,
            limit=8 if quick else TASK_LIMIT,
            device=device,
            **evaluation,
        )
    return dict(
        models={name: _figures(row) for name, row in rows.items()},
        pruned_layers=pruned,
        settings=settings,
        default_data=corpus,
        steps=steps,
        seconds=seconds,
    )


def _figures(row: dict) -> dict:
    return {key: row.get(key) for key in ("perplexity", "closeness", "generation", "tasks")}


def _mean(model: dict, figure: str) -> float:
    """A closeness figure (`kl`, `top1`, `top10`) of `model`, the mean over the evaluation corpora."""
    values = [figures[figure] for figures in model["closeness"].values()]
    return sum(values) / len(values)


def markdown(v: dict) -> list[str]:
    models, settings = v["models"], v["settings"]
    corpora = list(models["dense"]["perplexity"])
    header = ["cut", "model", *(f"PPL {c}" for c in corpora), *(f"KL {c}" for c in corpora), "top-1 %", "top-10 %"]
    header += [
        "gen prefix",
        "gen same %",
        *(f"{task} acc_norm" if task == "wiki_next_sentence" else f"{task} acc" for task in TASKS),
    ]
    rows = []
    for name, model in models.items():
        cut, stage = ("-", "dense") if name == "dense" else name.split(" ", 1)
        span = "" if name == "dense" else _span(v["pruned_layers"][f"{cut} plain"])
        cells = [cut if span in ("", cut) else f"{cut} ({span})", stage]
        cells += [f"{model['perplexity'][c]:.2f}" for c in corpora]
        if model["closeness"]:
            cells += [f"{model['closeness'][c]['kl']:.3f}" for c in corpora]
            cells += [f"{100 * _mean(model, key):.1f}" for key in ("top1", "top10")]
            cells += [
                f"{model['generation']['identical_prefix']:.1f}",
                f"{100 * model['generation']['identical_tokens']:.1f}",
            ]
        else:
            cells += ["-"] * (len(corpora) + 4)
        cells += [f"{100 * _task_score(model, task):.1f}" for task in TASKS]
        rows.append(cells)
    return [
        "**Closeness to the dense model** (SmolLM2; every command at its defaults; `eval` on "
        f"{settings['perplexity_windows']} x {settings['seq_len']} held-out tokens per corpus, "
        f"{settings['generation_prompts']} prompts continued for "
        f"{settings['generation_tokens']} greedy tokens, {settings['limit']} documents per task)",
        "",
        *markdown_table(header, rows).splitlines(),
        "",
        f"`distill`'s default data is `{v['default_data']}`; the distillations took "
        f"{', '.join(sorted({str(count) for count in v['steps'].values()}))} steps.",
        "",
    ]


def _span(layers: list[int]) -> str:
    return (
        f"{layers[0]}..{layers[-1]}"
        if layers == list(range(layers[0], layers[-1] + 1))
        else ",".join(map(str, layers))
    )


def _task_score(model: dict, task: str) -> float:
    metrics = model["tasks"][task]
    return metrics["acc_norm"] if "acc_norm" in metrics else metrics["acc"]


def checks(v: dict) -> list[Claim]:
    models = v["models"]
    corpora = list(models["dense"]["perplexity"])
    claims = []
    for cut in CUTS:
        plain, patched = models[f"{cut} plain"], models[f"{cut} patched"]
        claims.append(
            Claim(
                f"at {cut}, the patched model is closer to dense than plain pruning by KL on every corpus",
                all(patched["closeness"][c]["kl"] < plain["closeness"][c]["kl"] for c in corpora),
                "patched "
                + ", ".join(f"{c} {patched['closeness'][c]['kl']:.3f}" for c in corpora)
                + "; plain "
                + ", ".join(f"{c} {plain['closeness'][c]['kl']:.3f}" for c in corpora),
            )
        )
        agreement = {
            name: (_mean(model, "top1"), _mean(model, "top10"))
            for name, model in (("patched", patched), ("plain", plain))
        }
        claims.append(
            Claim(
                f"at {cut}, the patched model agrees with dense more than plain pruning (top-1 and top-10, "
                "teacher-forced)",
                all(p > q for p, q in zip(agreement["patched"], agreement["plain"], strict=True)),
                "; ".join(
                    f"{name} top-1 {100 * a[0]:.1f}%, top-10 {100 * a[1]:.1f}%" for name, a in agreement.items()
                ),
            )
        )
    # Greedy generation agreement is claimed at the stress cut only: a few prompts cannot resolve the small gap of a
    # cut that leaves the model close to dense (n=5), while the teacher-forced figures above count every token.
    generation = {name: models[f"{STRESS} {name}"]["generation"]["identical_tokens"] for name in ("patched", "plain")}
    claims.append(
        Claim(
            f"at {STRESS}, the patched model's greedy continuations share more tokens with dense than plain's",
            generation["patched"] > generation["plain"],
            ", ".join(f"{name} {100 * share:.1f}%" for name, share in generation.items()),
        )
    )
    default = "corpus" if v["default_data"] != "generated" else "generated"
    other = "generated" if default == "corpus" else "corpus"
    kl = {
        data: sum(_mean(models[f"{cut} distilled {data}"], "kl") for cut in CUTS) / len(CUTS)
        for data in (default, other)
    }
    claims.append(
        Claim(
            f"distill's default data ({default}) distills at least as close to dense as {other} text (KL, mean over "
            "the corpora and both cuts, the same steps)",
            kl[default] <= kl[other],
            f"{default} {kl[default]:.4f}, {other} {kl[other]:.4f}",
        )
    )
    return claims
