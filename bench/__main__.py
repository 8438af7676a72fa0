"""Benchmarks: what each stage costs, as ratios measured side by side in one run.

    python -m bench [--sections inference calibration distillation checkpoint quality patch_kinds serving sequential
                     search]

Writes bench/results/latest.json and bench/results/latest.md. Every figure is a ratio of two measurements taken in the
same run (interleaved, median of repeats), so it holds on a noisy machine. `quality` (distillation vs training-free
perplexity on SmolLM2, about 25 minutes on 2 CPU cores) is off unless asked for.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import linearpatch
from linearpatch.integration.data import token_windows
from linearpatch.integration.models import load_model
from linearpatch.integration.pruning.calibration import calibrate
from linearpatch.modeling import LinearPatch, prune_state_dict

RESULTS = Path(__file__).parent / "results"
BLOCK = list(range(20, 25))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(function, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        function()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(functions: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, alternating between them so that drift hits all alike."""
    samples = {name: [] for name in functions}
    for function in functions.values():
        function()  # warm up
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(_median_time(function, 1, device))
    return {name: statistics.median(values) for name, values in samples.items()}


class PeakRss:
    """Peak resident memory (MiB) while the block runs, sampled from /proc every 2 ms, and the level before it.

    `ru_maxrss` is a whole-process maximum (dominated by model loading), so it cannot show a pass's own peak."""

    def __enter__(self):
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.before = self._rss()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> float:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * self._page / 2**20

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> float:
        return self.peak - self.before


def _layer_macs(config) -> int:
    """Multiply-accumulates per token of one decoder layer's matrices (attention scores excluded)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter


def _patch_time_share(model, input_ids: torch.Tensor, device: str, repeats: int) -> float:
    """Measured fraction of forward time spent inside LinearPatch modules (timed with hooks)."""
    spent = []

    def before(module, args):
        _sync(device)
        module._started = time.perf_counter()

    def after(module, args, output):
        _sync(device)
        spent.append(time.perf_counter() - module._started)

    patches = [m for m in model.modules() if isinstance(m, LinearPatch)]
    handles = [h for m in patches for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        totals = []
        with torch.no_grad():
            model(input_ids, use_cache=False)
            spent.clear()
            for _ in range(repeats):
                totals.append(_median_time(lambda: model(input_ids, use_cache=False), 1, device))
    finally:
        for handle in handles:
            handle.remove()
    return sum(spent) / sum(totals)


def _prefill(model, input_ids: torch.Tensor) -> None:
    model(input_ids, use_cache=False)


def _decode(model, prompt: torch.Tensor, steps: int) -> None:
    model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)


def bench_inference(device: str, quick: bool) -> list[dict]:
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
            prefill = _interleaved(
                {k: partial(_prefill, m, input_ids) for k, m in models.items()}, 5 if quick else 9, device
            )
            decode = _interleaved(
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


def _peak_rss_of_calibration(seq_len: int, total_tokens: int, device: str) -> dict:
    """Peak RSS (MiB) during one calibration pass over `total_tokens` tokens, measured in a fresh process."""
    code = (
        "import torch\n"
        "from bench.__main__ import PeakRss\n"
        "from linearpatch.integration.models import load_model\n"
        "from linearpatch.integration.pruning.calibration import calibrate\n"
        f"model, _ = load_model('smollm2-135m', device={device!r})\n"
        f"ids = torch.randint(3, 49152, ({total_tokens // seq_len}, {seq_len}))\n"
        "with torch.no_grad(): model.model(ids[:1, :8])\n"
        "with PeakRss() as rss: calibrate(model, ids, distances=(1, 5), progress=False)\n"
        "print(rss.before, rss.peak)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    ).stdout.split()
    before, peak = float(output[-2]), float(output[-1])
    return dict(seq_len=seq_len, peak_rss_mib=peak, growth_mib=peak - before)


def bench_calibration(device: str, quick: bool) -> dict:
    model, tokenizer = load_model("smollm2-135m", device=device)
    windows = token_windows("wikipedia-calibration", tokenizer, 4 if quick else 8, 512, seed=0)
    ids = windows.input_ids.to(device)

    def plain_forward():
        with torch.no_grad():
            for window in ids:
                model(window[None], use_cache=False)

    times = _interleaved(
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


def bench_distillation(device: str, quick: bool) -> dict:
    from linearpatch.integration.distillation.teacher_cache import index_dtype
    from linearpatch.integration.distillation.trainer import get_patch_peft_model, top_k_kl_loss

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
    times = _interleaved({"patch_only": lambda: step(patch_only), "full": lambda: step(full)}, 3, device)
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


def bench_checkpoint(device: str, quick: bool) -> dict:
    model, _ = load_model("smollm2-135m")
    patched = linearpatch.prune_layers(model, BLOCK)
    plain_state = prune_state_dict(model.state_dict(), BLOCK, model.config.num_hidden_layers)
    plain_config = LlamaConfig.from_dict({**model.config.to_dict(), "num_hidden_layers": 25})
    plain = LlamaForCausalLM(plain_config)
    plain.load_state_dict(plain_state, strict=False)
    with tempfile.TemporaryDirectory() as scratch:
        paths = {name: Path(scratch) / name for name in ("dense", "patched", "plain_llama")}
        model.save_pretrained(paths["dense"])
        patched.save_pretrained(paths["patched"])
        plain.save_pretrained(paths["plain_llama"])
        sizes = {name: (path / "model.safetensors").stat().st_size for name, path in paths.items()}
        loads = _interleaved(
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


def bench_quality(device: str, quick: bool, windows: int = 300, seq_len: int = 512, lr: float = 3e-4) -> dict:
    """Issue-4 budget: distill SmolLM2 (layers 20..24 removed) on `windows` Wikipedia windows disjoint from the
    evaluation articles, and compare held-out perplexity with the training-free Hadamard patch."""
    from linearpatch.integration.distillation.teacher_cache import build_teacher_cache
    from linearpatch.integration.distillation.trainer import distill
    from linearpatch.integration.evaluation.perplexity import chunked_perplexity

    started = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", device=device)
    calibration = token_windows("wikipedia-calibration", tokenizer, 64, 512, seed=0)
    patched, _ = linearpatch.prune(model, tokenizer, layers=BLOCK, calibration=calibration, progress=False)
    evaluation = {c: token_windows(c, tokenizer, 16, 512, sampling="chunked") for c in ("wikipedia-eval", "lee-news")}
    before = {c: chunked_perplexity(patched, w) for c, w in evaluation.items()}
    train = token_windows("wikipedia-calibration", tokenizer, windows, seq_len, seed=1)
    with tempfile.TemporaryDirectory() as scratch:
        cache_started = time.perf_counter()
        cache = build_teacher_cache(model, train.input_ids, Path(scratch) / "cache", top_k=100, progress=False)
        cache_seconds = time.perf_counter() - cache_started
        del model
        train_started = time.perf_counter()
        trained = distill(patched, cache, Path(scratch) / "run", learning_rate=lr, disable_tqdm=True, logging_steps=50)
        train_seconds = time.perf_counter() - train_started
    merged = trained.merge_and_unload()
    after = {c: chunked_perplexity(merged, w) for c, w in evaluation.items()}
    return dict(
        budget=dict(windows=windows, seq_len=seq_len, top_k=100, lr=lr, epochs=1, batch_size=1),
        teacher_cache_seconds=cache_seconds,
        training_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        perplexity_training_free=before,
        perplexity_distilled=after,
        improvement={c: before[c] / after[c] for c in before},
    )


def bench_patch_kinds(device: str, quick: bool) -> dict:
    """Every training-free patch kind on SmolLM2 with layers 20..24 removed: held-out perplexity (12 x 512 windows per
    corpus) from one calibration pass (64 x 512 Wikipedia windows). The README's patch-kind table."""
    from linearpatch.integration.evaluation.perplexity import chunked_perplexity
    from linearpatch.integration.pruning import prune

    model, tokenizer = load_model("smollm2-135m", device=device)
    windows = 8 if quick else 64
    calibration = token_windows("wikipedia-calibration", tokenizer, windows, 512, seed=0)
    statistics = calibrate(model, calibration, distances=(1, 5), regression_blocks=[(20, 25)], progress=False)
    evaluation = {
        c: token_windows(c, tokenizer, 2 if quick else 12, 512, sampling="chunked")
        for c in ("wikipedia-eval", "lee-news")
    }
    perplexity = {}
    for kind in ("none", "hadamard", "diag", "scalar", "lstsq"):
        pruned, _ = prune(model, tokenizer, layers=BLOCK, patch=kind, statistics=statistics, progress=False)
        perplexity[kind] = {c: chunked_perplexity(pruned, w) for c, w in evaluation.items()}
    return dict(calibration=calibration.describe(), perplexity=perplexity)


def bench_search(device: str, quick: bool) -> dict:
    """Choosing by outcome on SmolLM2 (issue #13), every perplexity on 12 x 512 evaluation windows per corpus that no
    choice saw:

    - `stress_cut`: layers 20..24, hadamard and lstsq against `--patch auto` (64 x 512 calibration, as `patch_kinds`);
    - `five_layers`: the cosine block with every single kind against `--metric loss --patch auto`, with the time of
      `loss`, `auto` and both against the cosine/hadamard default (each a whole `prune` from its own calibration
      pass, the CPU default of 32 x 512 windows);
    - `target`: `--target-ppl-ratio 1.6`: the depth chosen, its held-out and evaluation perplexity ratios, the curve.
    """
    from linearpatch.integration.evaluation.perplexity import chunked_perplexity
    from linearpatch.integration.pruning import prune

    model, tokenizer = load_model("smollm2-135m", device=device)
    evaluation = {
        c: token_windows(c, tokenizer, 2 if quick else 12, 512, sampling="chunked")
        for c in ("wikipedia-eval", "lee-news")
    }

    def perplexities(candidate) -> dict[str, float]:
        return {corpus: chunked_perplexity(candidate, windows) for corpus, windows in evaluation.items()}

    def timed_prune(**kwargs):
        started = time.perf_counter()
        pruned, report = prune(model, tokenizer, progress=False, **kwargs)
        return pruned, report, time.perf_counter() - started

    dense = perplexities(model)
    results = dict(dense=dense)

    stress = token_windows("wikipedia-calibration", tokenizer, 8 if quick else 64, 512, seed=0)
    statistics = calibrate(model, stress, distances=(1, 5), regression_blocks=[(20, 25)], progress=False)
    stress_cut = {}
    for kind in ("hadamard", "lstsq"):
        pruned, _ = prune(model, tokenizer, layers=BLOCK, patch=kind, statistics=statistics, progress=False)
        stress_cut[kind] = perplexities(pruned)
    pruned, report, _ = timed_prune(layers=BLOCK, patch="auto", calibration=stress)
    stress_cut["auto"] = dict(perplexities(pruned), chosen=report.patch_choices[0]["label"])
    results["stress_cut"] = stress_cut

    calibration = token_windows("wikipedia-calibration", tokenizer, 8 if quick else 32, 512, seed=0)
    statistics = calibrate(model, calibration, distances=(1, 5), progress=False)
    five = {}
    for kind in ("none", "hadamard", "diag", "scalar", "lstsq"):
        pruned, report = prune(
            model, tokenizer, num_layers=5, patch=kind, calibration=calibration, statistics=statistics, progress=False
        )
        five[f"cosine+{kind}"] = dict(perplexities(pruned), layers=report.pruned_layers)
    seconds = {}
    for name, kwargs in {
        "cosine+hadamard": {},
        "loss+hadamard": dict(metric="loss"),
        "cosine+auto": dict(patch="auto"),
        "loss+auto": dict(metric="loss", patch="auto"),
    }.items():
        pruned, report, seconds[name] = timed_prune(num_layers=5, calibration=calibration, **kwargs)
        if name != "cosine+hadamard":
            five[name] = dict(perplexities(pruned), layers=report.pruned_layers, patch=report.patch_kind)
    results["five_layers"] = dict(
        perplexity=five,
        seconds=seconds,
        time_ratio={name: value / seconds["cosine+hadamard"] for name, value in seconds.items()},
    )

    pruned, report, took = timed_prune(target_ppl_ratio=1.6, calibration=calibration)
    chosen = perplexities(pruned)
    results["target"] = dict(
        target=1.6,
        num_layers=len(report.pruned_layers),
        layers=report.pruned_layers,
        patch=report.patch_kind,
        heldout_ratio=report.depth_curve[len(report.pruned_layers) - 1]["ratio"],
        evaluation_ratio={corpus: chosen[corpus] / dense[corpus] for corpus in chosen},
        curve=report.depth_curve,
        seconds=took,
        time_ratio=took / seconds["cosine+hadamard"],
    )
    return results


_CLI_RSS = """
import sys, time
started = time.perf_counter()
if sys.argv[1] == "baseline":
    import torch, transformers, linearpatch.cli  # noqa: F401
else:
    from linearpatch.cli import main
    main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec, so a child of a process
# bigger than itself would report the parent's size.
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]
print("RESULT", int(peak) / 1024, time.perf_counter() - started)
"""


def _cli_peak_rss(*arguments: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `linearpatch` command in a fresh process (`baseline`: the imports only)."""
    output = subprocess.run(
        [sys.executable, "-c", _CLI_RSS, *arguments],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    ).stdout
    _, peak, seconds = next(line for line in output.splitlines() if line.startswith("RESULT")).split()
    return float(peak), float(seconds)


def bench_sequential(device: str, quick: bool) -> dict:
    """Peak RSS and time of `linearpatch prune smollm2-135m --layers 20-24` in memory and `--sequential` (same tokens),
    above the import baseline (`import torch, transformers, linearpatch.cli`), each in a fresh process."""
    import tempfile

    sizes = ["--num-samples", "4", "--seq-len", "128"] if quick else []
    runs = {"baseline": ["baseline"]}
    variants = {
        "in_memory": [],
        "sequential": ["--sequential"],
        # Plain pruning needs no calibration: what remains is load-prune-save against streaming the shards.
        "load_prune_save": ["--patch", "none"],
        "streaming_prune": ["--patch", "none", "--sequential"],
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, flags in variants.items():
            runs[name] = ["prune", "smollm2-135m", "--layers", "20-24", *sizes, *flags, "--device", device]
            runs[name] += ["--output", str(Path(folder) / name)]
        measured = {name: _cli_peak_rss(*arguments) for name, arguments in runs.items()}
    baseline = measured["baseline"][0]
    above = {name: measured[name][0] - baseline for name in variants}
    return dict(
        command="linearpatch prune smollm2-135m --layers 20-24" + (" " + " ".join(sizes) if sizes else ""),
        baseline_rss_mib=baseline,
        peak_rss_mib={name: measured[name][0] for name in above},
        above_baseline_mib=above,
        seconds={name: measured[name][1] for name in above},
        rss_ratio_sequential_over_in_memory=above["sequential"] / above["in_memory"],
        time_ratio_sequential_over_in_memory=measured["sequential"][1] / measured["in_memory"][1],
        rss_ratio_streaming_over_load_prune_save=above["streaming_prune"] / above["load_prune_save"],
    )


def bench_serving(device: str, quick: bool) -> dict:
    """Issue #11: vLLM generation throughput of dense / plain pruned (native kernels), LinearPatch (remote code, the
    Transformers backend) and its `linearpatch export` (native), side by side in one run, plus what the export's fold
    costs in held-out perplexity. Runs vLLM from .venv-serving (`make serving`), bf16 (vLLM's CPU default)."""
    from linearpatch.integration.evaluation.perplexity import chunked_perplexity
    from linearpatch.integration.export import export_model, stock_config
    from linearpatch.integration.models import save_checkpoint
    from linearpatch.integration.serving import SERVING_VENV

    model, tokenizer = load_model("smollm2-135m")
    calibration = token_windows("wikipedia-calibration", tokenizer, 16, 256, seed=0)
    patched, _ = linearpatch.prune(model, tokenizer, layers=BLOCK, calibration=calibration, progress=False)
    exported, folds = export_model(patched, "down-proj", calibration.input_ids)
    plain = LlamaForCausalLM(stock_config(patched.config))
    plain.load_state_dict({k: v for k, v in patched.state_dict().items() if ".linear_patch." not in k}, strict=False)
    plain.tie_weights()
    evaluation = {c: token_windows(c, tokenizer, 4, 512, sampling="chunked") for c in ("wikipedia-eval", "lee-news")}
    perplexity = {
        name: {c: chunked_perplexity(m, w) for c, w in evaluation.items()}
        for name, m in (("patched", patched), ("export", exported), ("plain", plain.eval()))
    }
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
            [str(SERVING_VENV / "bin" / "python"), str(Path(__file__).with_name("serving_throughput.py"))]
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
        folds=folds,
        perplexity=perplexity,
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']} ({results['date']})", ""]
    for row in results.get("inference", []):
        columns = ("dense", "plain", "patched")
        theory_patch = f"{row['theory_patched_over_plain']:.4f}"
        lines += [
            f"**Inference, {row['model']}** (dense / plain pruned / LinearPatch)",
            "",
            "| metric | dense | plain | patched |",
            "|---|---|---|---|",
            "| prefill tokens/s | " + " | ".join(f"{row['prefill_tokens_per_s'][k]:.0f}" for k in columns) + " |",
            "| decode ms/token | " + " | ".join(f"{row['decode_ms_per_token'][k]:.2f}" for k in columns) + " |",
            "",
            "| ratio | measured | theoretical (FLOPs) |",
            "|---|---|---|",
            f"| prefill time plain / dense | {row['prefill_ratio_plain_over_dense']:.3f} "
            f"| {row['theory_plain_over_dense']:.3f} |",
            f"| prefill time patched / plain | {row['prefill_ratio_patched_over_plain']:.3f} | {theory_patch} |",
            f"| decode time patched / plain | {row['decode_ratio_patched_over_plain']:.3f} | {theory_patch} |",
            f"| patch share of forward time | {row['patch_time_share']:.4f} | {row['patch_flop_share']:.4f} |",
            "",
        ]
    if "calibration" in results:
        c = results["calibration"]
        lines += [
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
    if "sequential" in results:
        q = results["sequential"]
        lines += [
            f"**Sequential prune** (`{q['command']}`, each run in a fresh process; RSS above the import baseline "
            f"of {q['baseline_rss_mib']:.0f} MiB)",
            "",
            "| run | peak RSS MiB | above baseline MiB | seconds |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {q['peak_rss_mib'][name]:.0f} | {q['above_baseline_mib'][name]:.0f} "
            f"| {q['seconds'][name]:.1f} |"
            for name in q["peak_rss_mib"]
        ]
        lines += [
            "",
            f"- RSS ratio sequential / in memory: {q['rss_ratio_sequential_over_in_memory']:.3f}; time ratio: "
            f"{q['time_ratio_sequential_over_in_memory']:.2f}",
        ]
        if "rss_ratio_streaming_over_load_prune_save" in q:
            lines.append(
                "- RSS ratio streaming prune / load-prune-save (`--patch none`): "
                f"{q['rss_ratio_streaming_over_load_prune_save']:.3f}"
            )
        lines.append("")
    if "distillation" in results:
        d = results["distillation"]
        lines += [
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
    if "checkpoint" in results:
        k = results["checkpoint"]
        lines += [
            "**Checkpoint** (SmolLM2, layers 20..24 removed)",
            "",
            f"- size: patched {k['bytes']['patched'] / 2**20:.1f} MiB vs dense {k['bytes']['dense'] / 2**20:.1f} MiB "
            f"(ratio {k['size_ratio_patched_over_dense']:.3f})",
            f"- load: patched {k['load_seconds']['patched']:.2f} s vs plain Llama of the same kept size "
            f"{k['load_seconds']['plain_llama']:.2f} s (ratio {k['load_ratio_patched_over_plain_llama']:.2f})",
            "",
        ]
    if "quality" in results:
        q = results["quality"]
        b = q["budget"]
        lines += [
            "**Distillation quality** (SmolLM2, layers 20..24 removed; held-out perplexity, 16 x 512 tokens)",
            "",
            f"Budget: {b['windows']} windows x {b['seq_len']} tokens, top-{b['top_k']}, lr {b['lr']}, 1 epoch; "
            f"teacher cache {q['teacher_cache_seconds'] / 60:.1f} min + training {q['training_seconds'] / 60:.1f} min "
            f"(total {q['total_seconds'] / 60:.1f} min)",
            "",
            "| corpus | training-free hadamard | distilled | improvement |",
            "|---|---|---|---|",
        ]
        for corpus, value in q["perplexity_training_free"].items():
            distilled, ratio = q["perplexity_distilled"][corpus], q["improvement"][corpus]
            lines.append(f"| {corpus} | {value:.2f} | {distilled:.2f} | {ratio:.2f}x |")
        lines.append("")
    if "serving" in results:
        v = results["serving"]
        lines += [
            f"**vLLM serving** (SmolLM2, layers 20..24 removed; vllm-cpu 0.32, bf16, {v['prompts']} prompts x "
            f"{v['max_tokens']} greedy tokens, median of repeats after a warm-up)",
            "",
            "| model | backend | tokens/s |",
            "|---|---|---|",
        ]
        lines += [
            f"| {name} | {values['impl'].replace('auto', 'native')} | {values['tokens_per_second']:.1f} |"
            for name, values in v["throughput"].items()
        ]
        lines += ["", "| ratio | measured |", "|---|---|"]
        lines += [f"| {name.replace('_', ' ')} | {value:.3f} |" for name, value in v["ratios"].items()]
        corpora = list(v["perplexity"]["patched"])
        lines += ["", "Export (`--fold down-proj`) held-out perplexity (4 x 512 tokens):", ""]
        lines += ["| model | " + " | ".join(corpora) + " |", "|---|" + "---|" * len(corpora)]
        lines += [
            f"| {name} | " + " | ".join(f"{values[c]:.2f}" for c in corpora) + " |"
            for name, values in v["perplexity"].items()
        ]
        lines.append("")
    if "patch_kinds" in results:
        v = results["patch_kinds"]
        corpora = list(v["perplexity"]["none"])
        lines += [
            f"**Patch kinds** (SmolLM2, layers 20..24 removed; calibration {v['calibration']['num_windows']} x "
            f"{v['calibration']['seq_len']}, held-out perplexity on 12 x 512 windows)",
            "",
            "| patch | " + " | ".join(corpora) + " |",
            "|---|" + "---|" * len(corpora),
        ]
        lines += [
            f"| {kind} | " + " | ".join(f"{values[c]:.1f}" for c in corpora) + " |"
            for kind, values in v["perplexity"].items()
        ]
        lines.append("")
    if "search" in results:
        v = results["search"]
        corpora = list(v["dense"])

        def row(name: str, values: dict) -> str:
            extra = ", ".join(f"{key} {values[key]}" for key in ("layers", "patch", "chosen") if key in values)
            return f"| {name} | " + " | ".join(f"{values[c]:.1f}" for c in corpora) + f" | {extra} |"

        header = ["| model | " + " | ".join(corpora) + " | choice |", "|---|" + "---|" * (len(corpora) + 1)]
        five = v["five_layers"]
        target = v["target"]
        lines += [
            "**Choosing by outcome** (SmolLM2; perplexity on 12 x 512 evaluation windows per corpus, unseen by any "
            "choice)",
            "",
            "Layers 20..24, calibration 64 x 512 (auto: 56 to fit, 8 held out):",
            "",
            *header,
            row("dense", v["dense"]),
            *(row(name, values) for name, values in v["stress_cut"].items()),
            "",
            "Five layers, calibration 32 x 512 (loss and auto: 28 to fit, 4 held out):",
            "",
            *header,
            *(row(name, values) for name, values in five["perplexity"].items()),
            "",
            "| prune time over cosine+hadamard | " + " | ".join(five["time_ratio"]) + " |",
            "|---|" + "---|" * len(five["time_ratio"]),
            "| ratio | " + " | ".join(f"{value:.2f}" for value in five["time_ratio"].values()) + " |",
            "",
            f"`--target-ppl-ratio {target['target']}` chose {target['num_layers']} layers {target['layers']} "
            f"({target['patch']}): held-out ratio {target['heldout_ratio']:.3f}, evaluation ratio "
            + ", ".join(f"{c} {r:.3f}" for c, r in target["evaluation_ratio"].items())
            + f"; {target['time_ratio']:.1f}x the time of the default prune.",
            "",
            "| layers removed | plain | hadamard | chosen | chosen block, patch |",
            "|---|---|---|---|---|",
            *(
                f"| {p['num_layers']} | {p['plain_ratio']:.3f} | {p['fixed_ratio']:.3f} | {p['ratio']:.3f} | "
                f"{p['layers'][0]}-{p['layers'][1]}, {p['patch']} |"
                for p in target["curve"]
            ),
            "",
        ]
    return "\n".join(lines)


SECTIONS = {
    "inference": bench_inference,
    "calibration": bench_calibration,
    "distillation": bench_distillation,
    "checkpoint": bench_checkpoint,
    "quality": bench_quality,
    "patch_kinds": bench_patch_kinds,
    "serving": bench_serving,
    "sequential": bench_sequential,
    "search": bench_search,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["inference", "calibration", "distillation", "checkpoint"],
        choices=list(SECTIONS),
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--output", default=str(RESULTS / "latest"), help="path prefix for .json and .md")
    args = parser.parse_args()
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": args.device}
    previous = Path(args.output + ".json")
    if previous.exists():  # keep sections not rerun (e.g. the long quality run)
        results = {**json.loads(previous.read_text()), **results}
    for section in args.sections:
        print(f"== {section}", flush=True)
        results[section] = SECTIONS[section](args.device, args.quick)
        print(json.dumps(results[section], indent=1), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(results, indent=2))
    Path(args.output + ".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
