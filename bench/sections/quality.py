"""Distillation quality: SmolLM2 with layers 20..24 removed, distilled on Wikipedia windows disjoint from the
evaluation articles, against the training-free Hadamard patch on held-out text."""

import time

from linearpatch.common.reporting import markdown_table

from ..harness import BLOCK, Claim, evaluation_windows, per_corpus, perplexities

TITLE = "Distillation quality (SmolLM2, about 13 minutes on 2 CPU cores)"
DEFAULT = False
IMPROVEMENT = 1.5  # the distilled patch's held-out perplexity is at least this many times lower


def run(device: str, quick: bool, windows: int = 300, seq_len: int = 512, lr: float = 3e-4) -> dict:
    import tempfile
    from pathlib import Path

    import linearpatch
    from linearpatch.integration.data import token_windows
    from linearpatch.integration.distillation.teacher_cache import build_teacher_cache
    from linearpatch.integration.distillation.trainer import distill
    from linearpatch.integration.models import load_model

    if quick:
        windows, seq_len = 8, 128
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", device=device)
    calibration = token_windows("wikipedia-calibration", tokenizer, 64, 512, seed=0)
    patched, _ = linearpatch.prune(
        model, tokenizer, layers=BLOCK, patch="hadamard", calibration=calibration, progress=False
    )
    evaluation = evaluation_windows(tokenizer, 2 if quick else 16)
    before = perplexities(patched, evaluation)
    train = token_windows("wikipedia-calibration", tokenizer, windows, seq_len, seed=1)
    with tempfile.TemporaryDirectory() as scratch:
        cache_started = time.perf_counter()
        cache = build_teacher_cache(model, train.input_ids, Path(scratch) / "cache", top_k=100, progress=False)
        cache_seconds = time.perf_counter() - cache_started
        del model
        train_started = time.perf_counter()
        trained = distill(patched, cache, Path(scratch) / "run", learning_rate=lr, disable_tqdm=True, logging_steps=50)
        train_seconds = time.perf_counter() - train_started
    after = perplexities(trained.merge_and_unload(), evaluation)
    return dict(
        budget=dict(windows=windows, seq_len=seq_len, top_k=100, lr=lr, epochs=1, batch_size=1),
        teacher_cache_seconds=cache_seconds,
        training_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        perplexity_training_free=before,
        perplexity_distilled=after,
        improvement={c: before[c] / after[c] for c in before},
    )


def markdown(q: dict) -> list[str]:
    b = q["budget"]
    lines = [
        "**Distillation quality** (SmolLM2, layers 20..24 removed; held-out perplexity, 16 x 512 tokens)",
        "",
        f"Budget: {b['windows']} windows x {b['seq_len']} tokens, top-{b['top_k']}, lr {b['lr']}, 1 epoch; "
        f"teacher cache {q['teacher_cache_seconds'] / 60:.1f} min + training {q['training_seconds'] / 60:.1f} min "
        f"(total {q['total_seconds'] / 60:.1f} min)",
        "",
        *markdown_table(
            ["corpus", "training-free hadamard", "distilled", "improvement"],
            [
                [
                    corpus,
                    f"{value:.2f}",
                    f"{q['perplexity_distilled'][corpus]:.2f}",
                    f"{q['improvement'][corpus]:.2f}x",
                ]
                for corpus, value in q["perplexity_training_free"].items()
            ],
        ).splitlines(),
    ]
    return [*lines, ""]


def checks(q: dict) -> list[Claim]:
    improvement = {c: q["perplexity_training_free"][c] / q["perplexity_distilled"][c] for c in q["improvement"]}
    return [
        Claim(
            f"distillation lowers the held-out perplexity of the Hadamard patch at least {IMPROVEMENT}x",
            all(value >= IMPROVEMENT for value in improvement.values()),
            per_corpus(improvement, 2),
        )
    ]
