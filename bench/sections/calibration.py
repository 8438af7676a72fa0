"""The calibration pass against a plain forward: speed, and peak memory at a fixed number of tokens."""

import subprocess
import sys

from ..harness import ROOT, Claim, interleaved

TITLE = "Calibration pass (SmolLM2)"
DEFAULT = True


def _peak_rss_of_calibration(seq_len: int, total_tokens: int, device: str) -> dict:
    """Peak RSS (MiB) during one calibration pass over `total_tokens` tokens, measured in a fresh process."""
    code = (
        "import torch\n"
        "from bench.harness import PeakRss\n"
        "from linearpatch.integration.models import load_model\n"
        "from linearpatch.integration.measurement.calibration import calibrate\n"
        f"model, _ = load_model('smollm2-135m', device={device!r})\n"
        f"ids = torch.randint(3, 49152, ({total_tokens // seq_len}, {seq_len}))\n"
        "with torch.no_grad(): model.model(ids[:1, :8])\n"
        "with PeakRss() as rss: calibrate(model, ids, distances=(1, 5), progress=False)\n"
        "print(rss.before, rss.peak)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    before, peak = float(output[-2]), float(output[-1])
    return dict(seq_len=seq_len, peak_rss_mib=peak, growth_mib=peak - before)


def run(device: str, quick: bool) -> dict:
    import torch

    from linearpatch.integration.data import token_windows
    from linearpatch.integration.measurement.calibration import calibrate
    from linearpatch.integration.models import load_model

    model, tokenizer = load_model("smollm2-135m", device=device)
    windows = token_windows("wikipedia-calibration", tokenizer, 4 if quick else 8, 512, seed=0)
    ids = windows.input_ids.to(device)

    def plain_forward():
        with torch.no_grad():
            for window in ids:
                model(window[None], use_cache=False)

    times = interleaved(
        {"calibration": lambda: calibrate(model, ids, distances=(1, 5), progress=False), "forward": plain_forward},
        3,
        device,
    )
    total = 4096 if quick else 8192
    memory = [_peak_rss_of_calibration(seq_len, total, device) for seq_len in (256, 512, 1024)]
    return dict(
        tokens=ids.numel(),
        calibration_tokens_per_s=ids.numel() / times["calibration"],
        forward_tokens_per_s=ids.numel() / times["forward"],
        speed_ratio=times["forward"] / times["calibration"],
        memory_at_fixed_tokens=memory,
        peak_rss_ratio_1024_over_512=memory[2]["peak_rss_mib"] / memory[1]["peak_rss_mib"],
    )


def markdown(c: dict) -> list[str]:
    return [
        "**Calibration pass** (SmolLM2)",
        "",
        f"- {c['calibration_tokens_per_s']:.0f} tokens/s vs plain no-grad forward {c['forward_tokens_per_s']:.0f} "
        f"tokens/s: ratio {c['speed_ratio']:.2f}",
        "- peak RSS at fixed tokens: "
        + ", ".join(
            f"seq-len {m['seq_len']}: {m['peak_rss_mib']:.0f} MiB (+{m['growth_mib']:.0f})"
            for m in c["memory_at_fixed_tokens"]
        )
        + f" (1024 / 512: {c['peak_rss_ratio_1024_over_512']:.3f})",
        "",
    ]


def checks(c: dict) -> list[Claim]:
    return [
        Claim(
            "calibration runs at least 0.8x as fast as a plain no-grad forward",
            c["speed_ratio"] >= 0.8,
            f"ratio {c['speed_ratio']:.2f}",
        ),
        Claim(
            "calibration memory at fixed tokens grows under 1.2x from 512- to 1024-token windows",
            c["peak_rss_ratio_1024_over_512"] < 1.2,
            f"1024 / 512: {c['peak_rss_ratio_1024_over_512']:.3f}",
        ),
    ]
