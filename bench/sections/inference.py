"""Inference cost of dense, plain-pruned and patched models, measured side by side against the FLOP count."""

from functools import partial

from linearpatch.common.reporting import markdown_table

from ..harness import BLOCK, Claim, interleaved, median_time, sync

TITLE = "Inference speed (SmolLM2 and a random C=2048 Llama)"
DEFAULT = True


def _layer_macs(config) -> int:
    """Multiply-accumulates per token of one decoder layer's matrices (attention scores excluded)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter


def _patch_time_share(model, input_ids, device: str, repeats: int) -> float:
    """Measured fraction of forward time spent inside LinearPatch modules (timed with hooks)."""
    import time

    import torch

    from linearpatch.modeling import LinearPatch

    spent = []

    def before(module, args):
        sync(device)
        module._started = time.perf_counter()

    def after(module, args, output):
        sync(device)
        spent.append(time.perf_counter() - module._started)

    patches = [m for m in model.modules() if isinstance(m, LinearPatch)]
    handles = [h for m in patches for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        totals = []
        with torch.no_grad():
            model(input_ids, use_cache=False)
            spent.clear()
            for _ in range(repeats):
                totals.append(median_time(lambda: model(input_ids, use_cache=False), 1, device))
    finally:
        for handle in handles:
            handle.remove()
    return sum(spent) / sum(totals)


def _prefill(model, input_ids) -> None:
    model(input_ids, use_cache=False)


def _decode(model, prompt, steps: int) -> None:
    model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)


def run(device: str, quick: bool) -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import linearpatch
    from linearpatch.integration.models import load_model

    rows = []
    smol, _ = load_model("smollm2-135m", device=device)
    shapes = [("SmolLM2-135M", smol, BLOCK)]
    big_config = LlamaConfig(
        vocab_size=8192,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    shapes.append(("random Llama C=2048, 16 layers", LlamaForCausalLM(big_config).to(device).eval(), [8, 9, 10, 11]))
    prefill_tokens = 128 if quick else 256
    for name, dense, block in shapes:
        config = dense.config
        patch = torch.eye(config.hidden_size) + 0.01 * torch.randn(config.hidden_size, config.hidden_size)
        plain = linearpatch.prune_layers(dense, block, add_patches=False)
        patched = linearpatch.prune_layers(dense, block, patches=[patch])
        input_ids = torch.randint(3, config.vocab_size, (1, prefill_tokens), device=device)
        models = {"dense": dense, "plain": plain, "patched": patched}
        decode_steps = 16 if quick else 32
        with torch.no_grad():
            prefill = interleaved(
                {k: partial(_prefill, m, input_ids) for k, m in models.items()}, 5 if quick else 9, device
            )
            decode = interleaved(
                {k: partial(_decode, m, input_ids[:, :16], decode_steps) for k, m in models.items()},
                3 if quick else 5,
                device,
            )
        kept = config.num_hidden_layers - len(block)
        layer, head = _layer_macs(config), config.hidden_size * config.vocab_size
        theory_dense = config.num_hidden_layers * layer + head
        theory_plain = kept * layer + head
        patch_macs = config.hidden_size**2
        share = _patch_time_share(patched, input_ids, device, 5)
        rows.append(
            dict(
                model=name,
                prefill_tokens_per_s={k: prefill_tokens / v for k, v in prefill.items()},
                decode_ms_per_token={k: 1000 * v / decode_steps for k, v in decode.items()},
                prefill_ratio_plain_over_dense=prefill["plain"] / prefill["dense"],
                theory_plain_over_dense=theory_plain / theory_dense,
                prefill_ratio_patched_over_plain=prefill["patched"] / prefill["plain"],
                decode_ratio_patched_over_plain=decode["patched"] / decode["plain"],
                theory_patched_over_plain=(theory_plain + patch_macs) / theory_plain,
                patch_time_share=share,
                patch_flop_share=patch_macs / (theory_plain + patch_macs),
            )
        )
    return rows


def markdown(result: list[dict]) -> list[str]:
    lines = []
    for row in result:
        columns = ("dense", "plain", "patched")
        theory_patch = f"{row['theory_patched_over_plain']:.4f}"
        lines += [
            f"**Inference, {row['model']}** (dense / plain pruned / LinearPatch)",
            "",
            *markdown_table(
                ["metric", *columns],
                [
                    ["prefill tokens/s", *(f"{row['prefill_tokens_per_s'][k]:.0f}" for k in columns)],
                    ["decode ms/token", *(f"{row['decode_ms_per_token'][k]:.2f}" for k in columns)],
                ],
            ).splitlines(),
            "",
            *markdown_table(
                ["ratio", "measured", "theoretical (FLOPs)"],
                [
                    [
                        "prefill time plain / dense",
                        f"{row['prefill_ratio_plain_over_dense']:.3f}",
                        f"{row['theory_plain_over_dense']:.3f}",
                    ],
                    ["prefill time patched / plain", f"{row['prefill_ratio_patched_over_plain']:.3f}", theory_patch],
                    ["decode time patched / plain", f"{row['decode_ratio_patched_over_plain']:.3f}", theory_patch],
                    [
                        "patch share of forward time",
                        f"{row['patch_time_share']:.4f}",
                        f"{row['patch_flop_share']:.4f}",
                    ],
                ],
            ).splitlines(),
            "",
        ]
    return lines


def checks(result: list[dict]) -> list[Claim]:
    share = {row["model"]: row["patch_time_share"] for row in result}
    prefill = {row["model"]: row["prefill_ratio_patched_over_plain"] for row in result}
    return [
        Claim(
            "the patch takes under 2% of the forward time (hook-timed)",
            all(value < 0.02 for value in share.values()),
            ", ".join(f"{name} {value:.4f}" for name, value in share.items()),
        ),
        Claim(
            "a patched model prefills within 10% of the plain pruned model's time",
            all(value <= 1.10 for value in prefill.values()),
            ", ".join(f"{name} {value:.3f}" for name, value in prefill.items()),
        ),
    ]
