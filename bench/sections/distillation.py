"""One distillation step with only the patch trainable against a full forward+backward; the teacher cache's size."""

from ..harness import BLOCK, Claim, PeakRss, interleaved

TITLE = "Distillation step (SmolLM2)"
DEFAULT = True


def run(device: str, quick: bool) -> dict:
    import torch

    import linearpatch
    from linearpatch.integration.distillation.teacher_cache import index_dtype
    from linearpatch.integration.distillation.trainer import get_patch_peft_model, top_k_kl_loss
    from linearpatch.integration.models import load_model

    model, _ = load_model("smollm2-135m", device=device)
    seq_len = 128 if quick else 256
    ids = torch.randint(3, 49152, (1, seq_len), device=device)
    teacher_values = torch.log_softmax(torch.randn(1, seq_len, 100, device=device), -1)
    teacher_indices = torch.randint(0, 49152, (1, seq_len, 100), device=device)

    patch_only = get_patch_peft_model(linearpatch.prune_layers(model, BLOCK, copy=True)).train()
    full = linearpatch.prune_layers(model, BLOCK, copy=True).train()

    def step(student):
        logits = student(input_ids=ids, use_cache=False).logits
        top_k_kl_loss(logits, teacher_values, teacher_indices).backward()
        student.zero_grad(set_to_none=True)

    # Memory first, on a fresh process state: the patch-only step, then what a full backward adds on top of it.
    with PeakRss() as patch_rss:
        step(patch_only)
    with PeakRss() as full_rss:
        step(full)
    times = interleaved({"patch_only": lambda: step(patch_only), "full": lambda: step(full)}, 3, device)
    value_bytes, index_bytes = 2, torch.iinfo(index_dtype(49152)).bits // 8
    return dict(
        seq_len=seq_len,
        step_seconds=times,
        step_ratio_patch_only_over_full=times["patch_only"] / times["full"],
        step_memory_growth_mib={"patch_only": patch_rss.growth, "full": full_rss.growth},
        cache_bytes_per_token=100 * (value_bytes + index_bytes),
        full_vocabulary_bytes_per_token=49152 * value_bytes,
        cache_ratio=100 * (value_bytes + index_bytes) / (49152 * value_bytes),
    )


def markdown(d: dict) -> list[str]:
    return [
        f"**Distillation step** (SmolLM2, {d['seq_len']} tokens)",
        "",
        f"- patch-only step {d['step_seconds']['patch_only']:.2f} s vs full forward+backward "
        f"{d['step_seconds']['full']:.2f} s: ratio {d['step_ratio_patch_only_over_full']:.2f}",
        "- memory a step adds (peak RSS over the level before it; patch-only measured first): "
        + ", ".join(f"{k} {v:.0f} MiB" for k, v in d["step_memory_growth_mib"].items()),
        f"- teacher cache {d['cache_bytes_per_token']} bytes/token vs full vocabulary "
        f"{d['full_vocabulary_bytes_per_token']} ({100 * d['cache_ratio']:.2f}%)",
        "",
    ]


def checks(d: dict) -> list[Claim]:
    growth = d["step_memory_growth_mib"]
    return [
        Claim(
            "a patch-only step takes at most 0.6x the time of a full forward+backward",
            d["step_ratio_patch_only_over_full"] <= 0.6,
            f"ratio {d['step_ratio_patch_only_over_full']:.2f}",
        ),
        Claim(
            "a patch-only step adds at most half the memory of a full one",
            growth["patch_only"] <= 0.5 * growth["full"],
            f"patch-only {growth['patch_only']:.0f} MiB, full {growth['full']:.0f} MiB",
        ),
        Claim(
            "the top-K teacher cache is under 1% of full-vocabulary targets",
            d["cache_ratio"] < 0.01,
            f"{100 * d['cache_ratio']:.2f}%",
        ),
    ]
