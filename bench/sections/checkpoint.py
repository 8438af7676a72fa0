"""The saved checkpoint: its size against the dense model, its load time against a plain Llama of the same size."""

from ..harness import BLOCK, Claim, interleaved

TITLE = "Checkpoint size and load time (SmolLM2)"
DEFAULT = True


def run(device: str, quick: bool) -> dict:
    import tempfile
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    import linearpatch
    from linearpatch.integration.models import load_model
    from linearpatch.modeling import prune_state_dict

    model, _ = load_model("smollm2-135m")
    patched = linearpatch.prune_layers(model, BLOCK)
    plain_state = prune_state_dict(model.state_dict(), BLOCK, model.config.num_hidden_layers)
    kept = model.config.num_hidden_layers - len(BLOCK)
    plain = LlamaForCausalLM(LlamaConfig.from_dict({**model.config.to_dict(), "num_hidden_layers": kept}))
    plain.load_state_dict(plain_state, strict=False)
    with tempfile.TemporaryDirectory() as scratch:
        paths = {name: Path(scratch) / name for name in ("dense", "patched", "plain_llama")}
        model.save_pretrained(paths["dense"])
        patched.save_pretrained(paths["patched"])
        plain.save_pretrained(paths["plain_llama"])
        sizes = {name: (path / "model.safetensors").stat().st_size for name, path in paths.items()}
        loads = interleaved(
            {
                "patched": lambda: linearpatch.LinearPatchForCausalLM.from_pretrained(paths["patched"]),
                "plain_llama": lambda: LlamaForCausalLM.from_pretrained(paths["plain_llama"]),
            },
            3 if quick else 5,
            "cpu",
        )
    return dict(
        bytes=sizes,
        size_ratio_patched_over_dense=sizes["patched"] / sizes["dense"],
        load_seconds=loads,
        load_ratio_patched_over_plain_llama=loads["patched"] / loads["plain_llama"],
    )


def markdown(k: dict) -> list[str]:
    return [
        "**Checkpoint** (SmolLM2, layers 20..24 removed)",
        "",
        f"- size: patched {k['bytes']['patched'] / 2**20:.1f} MiB vs dense {k['bytes']['dense'] / 2**20:.1f} MiB "
        f"(ratio {k['size_ratio_patched_over_dense']:.3f})",
        f"- load: patched {k['load_seconds']['patched']:.2f} s vs plain Llama of the same kept size "
        f"{k['load_seconds']['plain_llama']:.2f} s (ratio {k['load_ratio_patched_over_plain_llama']:.2f})",
        "",
    ]


def checks(k: dict) -> list[Claim]:
    patch_bytes = k["bytes"]["patched"] - k["bytes"]["plain_llama"]
    return [
        Claim(
            "the patch adds at most 1% to the plain pruned checkpoint",
            patch_bytes <= 0.01 * k["bytes"]["plain_llama"],
            f"{patch_bytes / 2**20:.2f} MiB on {k['bytes']['plain_llama'] / 2**20:.1f} MiB",
        ),
        Claim(
            "a LinearPatch checkpoint loads within 1.5x the time of a plain Llama of the same size",
            k["load_ratio_patched_over_plain_llama"] <= 1.5,
            f"ratio {k['load_ratio_patched_over_plain_llama']:.2f}",
        ),
    ]
