"""At the size users prune: a random-weight model of Llama-3-8B's exact shape (16 GB of bf16 safetensors in shards of
at most 2 GB, written once by `bench/scale_model.py` and cached) through every stage with `--max-memory 4GB`, each
step in a fresh process: prune with explicit layers and a Hadamard patch, prune choosing 4 layers by cosine with
`--patch auto`, `export --fold auto` of the first, `distill` of the first for a few steps, and `eval` (perplexity and
closeness, layer by layer) of every output against the dense model. Cost does not depend on the weights, so random
ones measure it honestly.

Per step: peak RSS (VmHWM), wall seconds, bytes read (rchar) against the bytes the step's passes need, and time per
layer; for the calibration pass, its FLOP/s against the machine's own bf16 and fp32 matmul FLOP/s measured in this run
at the layer's shapes. Each output is deleted once it is measured, so the section holds at most the model and two
checkpoints (about 45 GB) at once. Opt-in (`make bench-scale`): it takes about an hour of 2 CPU cores.
"""

import json
import shutil
import time
from pathlib import Path

from linearpatch.common.names import EVAL_FILES, EXPORT_RECORD, PRUNE_RECORD
from linearpatch.common.reporting import markdown_table

from ..harness import Claim, cli_costs
from ..scale_model import LLAMA_3_8B

TITLE = "At scale: a Llama-3-8B-shaped model with --max-memory 4GB (about an hour on 2 CPU cores; make bench-scale)"
DEFAULT = False
OPT_IN = True  # not among `--check`'s default sections: 45 GB of disk and an hour; `--sections scale` runs it
RSS_LIMIT_MIB = 6 * 1024  # the 4 GB limit plus the process baseline
MATMUL_SHARE = 0.4  # the calibration pass's FLOP/s over the machine's best matmul FLOP/s, at least
READ_SLACK = 1.02  # bytes read over the bytes the passes need (tokenizer, configs, page rounding)
DISK_LIMIT_GB = 46.0
SIZES = {
    # shape, --max-memory, calibration windows, tokens per window, distill windows and steps, eval windows
    False: dict(
        shape="llama-3-8b",
        max_memory="4GB",
        samples=8,
        seq_len=512,
        cut=(24, 28),
        choose=4,
        distill=(4, 2),
        eval_windows=4,
    ),
    True: dict(
        shape="tiny", max_memory="200KB", samples=8, seq_len=64, cut=(1, 2), choose=1, distill=(4, 2), eval_windows=2
    ),
}


def layer_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of every matrix of one decoder layer (q, k, v, o and the gated MLP's gate, up and down), as
    transformers' own Llama of `config` has them (`bench.scale_model.shapes_of`, built with one layer)."""
    from transformers import LlamaConfig

    from bench.scale_model import shapes_of

    one_layer = LlamaConfig.from_dict(dict(config.to_dict(), num_hidden_layers=1))
    weights = shapes_of(one_layer)
    return [(shape[1], shape[0]) for name, shape in weights if name.startswith("model.layers.0.") and len(shape) == 2]


def layer_flops(config, windows: int, seq_len: int) -> float:
    """FLOPs of one decoder layer's forward over `windows` x `seq_len` tokens: 2 per weight per token, plus causal
    attention (Q K^T and the weighted sum over half the positions on average: 2 x seq_len^2 x width per window)."""
    weights = sum(a * b for a, b in layer_shapes(config))
    return 2.0 * weights * windows * seq_len + 2.0 * windows * seq_len**2 * config.hidden_size


def matmul_flops(config, tokens: int, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of `torch.nn.functional.linear` over one layer's seven matrices on `tokens` tokens, per dtype (median
    of `repeats` after a warm-up): what the machine's matmul can do at the shapes the calibration pass runs."""
    import statistics

    import torch

    measured = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        generator = torch.Generator().manual_seed(0)
        weights = [(torch.randn(b, a, generator=generator) * 0.02).to(dtype) for a, b in layer_shapes(config)]
        inputs = {a: torch.randn(tokens, a, generator=generator).to(dtype) for a, _ in layer_shapes(config)}
        flops = 2.0 * tokens * sum(w.numel() for w in weights)
        times = []
        for attempt in range(repeats + 1):
            started = time.perf_counter()
            for weight in weights:
                torch.nn.functional.linear(inputs[weight.shape[1]], weight)
            if attempt:  # the first is a warm-up
                times.append(time.perf_counter() - started)
        measured[name] = flops / statistics.median(times)
        del weights, inputs
    return measured


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


class Steps:
    """Runs the section's commands in fresh processes and keeps what each cost, what the later figures need of its
    output (`facts`), and the most disk held at once. Each finished step is written to `WORK/steps.json`, so a run
    that stops (a failure, a machine taken back) resumes after the last finished step; the work folder goes once the
    section has finished."""

    def __init__(self, model: Path, work: Path, layer_bytes: float):
        self.model, self.work, self.layer_bytes = model, work, layer_bytes
        self.state_file = work / "steps.json"
        work.mkdir(parents=True, exist_ok=True)
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        # What a process reads before any command runs (Python, torch, transformers): not the step's.
        self.baseline = self.state.setdefault("baseline", cli_costs("baseline"))

    def run(self, name: str, *arguments, facts=None) -> dict:
        """Run `linearpatch ARGUMENTS` (unless a previous run finished it) and return its recorded facts."""
        if name in self.state:
            print(f"-- {name}: finished by a previous run, kept", flush=True)
            return self.state[name]["facts"]
        print(f"-- {name}: linearpatch {' '.join(str(a) for a in arguments)}", flush=True)
        costs = cli_costs(*(str(argument) for argument in arguments))
        held = _folder_bytes(self.model) + _folder_bytes(self.work)
        weights_read = costs["read_bytes"] - self.baseline["read_bytes"]
        measured = dict(
            costs,
            weights_read_bytes=weights_read,
            # Seconds per layer's worth of shard bytes read: every step's time per layer, on one scale.
            seconds_per_layer_read=costs["seconds"] / max(weights_read / self.layer_bytes, 1e-9),
            disk_held_gb=held / 1e9,
        )
        self.state[name] = dict(measured=measured, facts=facts() if facts is not None else {})
        self.state_file.write_text(json.dumps(self.state, indent=1))
        print(json.dumps(measured), flush=True)
        return self.state[name]["facts"]

    @property
    def measured(self) -> dict:
        return {name: step["measured"] for name, step in self.state.items() if name != "baseline"}

    def remove(self, *folders: Path) -> None:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def _record(folder: Path, name: str):
    """`facts` of a step that wrote `folder`: its JSON record `name` and the bytes of its weights."""
    return lambda: dict(record=json.loads((folder / name).read_text()), weights_bytes=_weights_bytes(folder))


def run(device: str, quick: bool) -> dict:
    from transformers import AutoConfig

    from bench.scale_model import default_folder, write_scale_model

    sizes = SIZES[quick]
    model = write_scale_model(default_folder(sizes["shape"]), sizes["shape"], progress=False)
    config = AutoConfig.from_pretrained(model)
    layers = config.num_hidden_layers
    cut = sizes["cut"]
    limit = ["--max-memory", sizes["max_memory"], "--dtype", "bfloat16", "--device", device]
    calibration = ["--num-samples", str(sizes["samples"]), "--seq-len", str(sizes["seq_len"])]
    evaluation = ["--tasks", "--gen-prompts", "0", "--ppl-corpus", "wikipedia-eval"]
    evaluation += ["--ppl-windows", str(sizes["eval_windows"]), "--seq-len", str(sizes["seq_len"])]
    flops = matmul_flops(config, sizes["samples"] * sizes["seq_len"] if quick else 512)
    # (Paths here have no spaces: the work folder is beside the cached model.)
    work = model.parent / f"{sizes['shape']}-work"
    model_bytes = _weights_bytes(model)
    steps = Steps(model, work, model_bytes / layers)
    hadamard, auto, export, distilled = (work / name for name in ("hadamard", "auto", "export", "distilled"))
    pruned = steps.run("prune_hadamard", "prune", model, *f"--output {hadamard} --layers {cut[0]}-{cut[1]}".split(),
                       "--patch", "hadamard", *calibration, *limit, facts=_record(hadamard, PRUNE_RECORD))  # fmt: skip
    chosen = steps.run("prune_auto", "prune", model, *f"--output {auto} --num-layers {sizes['choose']}".split(),
                       *"--metric cosine --patch auto".split(), *calibration, *limit,
                       facts=_record(auto, PRUNE_RECORD))  # fmt: skip

    def evaluate(name: str, *models: Path) -> dict:
        """`eval` of `models` against the dense model, layer by layer (they do not fit --max-memory)."""
        folder = work / f"eval-{name}"
        return steps.run(f"eval_{name}", "eval", *models, *f"--baseline {model} --output {folder}".split(),
                         *evaluation, *limit, facts=_record(folder, EVAL_FILES[0]))["record"]  # fmt: skip

    evaluations = {"pruned": evaluate("pruned", hadamard, auto)}
    steps.remove(auto)
    exported = steps.run("export", "export", hadamard, *f"--output {export} --fold auto --dense {model}".split(),
                         *calibration, *limit, facts=_record(export, EXPORT_RECORD))  # fmt: skip
    evaluations["export"] = evaluate("export", export)
    steps.remove(export)
    windows, updates = sizes["distill"]
    taught = steps.run("distill", "distill", hadamard, *f"--teacher {model} --output {distilled} --bf16".split(),
                       *f"--num-samples {windows} --seq-len {sizes['seq_len']} --max-steps {updates}".split(),
                       *f"--cache-dir {work}/teacher-cache".split(), *limit,
                       facts=lambda: dict(cache_bytes=_folder_bytes(work / "teacher-cache")))  # fmt: skip
    evaluations["distilled"] = evaluate("distilled", distilled)
    measured, disk_peak = steps.measured, max(step["disk_held_gb"] for step in steps.measured.values()) * 1e9
    steps.remove(work)
    reports = {"hadamard": pruned["record"], "auto": chosen["record"]}
    kept = {"hadamard": pruned["weights_bytes"], "auto": chosen["weights_bytes"]}
    export_report, student_bytes, cache_bytes = exported["record"], pruned["weights_bytes"], taught["cache_bytes"]
    statistics = reports["hadamard"]["calibration"]
    pass_flops = layers * layer_flops(config, sizes["samples"], sizes["seq_len"])
    return dict(
        model=dict(
            shape=sizes["shape"],
            folder=str(model),
            bytes=model_bytes,
            layers=layers,
            layer_flops_per_token=2 * sum(a * b for a, b in layer_shapes(config)),
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
        ),
        settings=sizes,
        matmul_flops=flops,
        steps=measured,
        calibration=dict(
            seconds=statistics["seconds"],
            tokens=statistics["tokens"],
            flops=pass_flops,
            flops_per_second=pass_flops / statistics["seconds"],
            seconds_per_layer=statistics["seconds"] / layers,
            share_of_bf16_matmul=pass_flops / statistics["seconds"] / flops["bfloat16"],
            share_of_best_matmul=pass_flops / statistics["seconds"] / max(flops.values()),
        ),
        # What each step's passes need to read: prune = one calibration pass over the whole model (the head
        # excepted) + the streaming write of what is kept; eval = one pass per model.
        needed_bytes=dict(
            prune_hadamard=model_bytes + kept["hadamard"],
            eval_pruned=model_bytes + kept["hadamard"] + kept["auto"],
        ),
        layer_bytes=model_bytes / layers,
        baseline=steps.baseline,
        auto_choice=dict(
            layers=reports["auto"]["pruned_layers"],
            patch=reports["auto"]["patch_kind"],
            seconds=reports["auto"]["seconds"],
            holdout=reports["auto"].get("holdout", {}),
        ),
        export_folds=[fold.get("objective") or fold.get("kind") for fold in export_report.get("folds", [])],
        distill=dict(student_bytes=student_bytes, teacher_cache_bytes=cache_bytes, steps=updates, windows=windows),
        perplexity={
            name: {Path(row["name"]).name: row["perplexity"] for row in data["models"]}
            for name, data in evaluations.items()
        },
        disk_peak_gb=disk_peak / 1e9,
    )


# The Llama 3 shapes the README's table derives (Meta's configs: the 8B one the section measures, and the larger
# two, which differ from it in width, depth and heads; GQA with 8 KV heads and the 128256-token vocabulary in all).
LLAMA_3 = {
    "8B": LLAMA_3_8B,
    "70B": dict(LLAMA_3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "405B": dict(
        LLAMA_3_8B, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128
    ),
}
# The one-GPU column is arithmetic from these, not a measurement: an 80 GB GPU at 600 TFLOP/s of bf16 matmul (about
# 60% of an H100's dense peak), its shards read from NVMe at 3 GB/s, and the GPU calibration default of 128 x 2048.
GPU = dict(memory=80e9, flops=600e12, read=3e9, windows=128, seq_len=2048)
PROCESS_BYTES = 0.45e9  # a linearpatch process before any weights (torch, transformers, the tokenizer)


def _shape(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA_3[name])


def derived(q: dict) -> list[dict]:
    """Expected time and memory of a prune (CPU and GPU defaults) and an eval for each Llama 3 shape, from what this
    run measured at 8B: the calibration pass's FLOP/s and the streaming write's bytes per second (see the README)."""
    rate = q["calibration"]["flops_per_second"]
    prune = q["steps"]["prune_hadamard"]
    write_rate = q["needed_bytes"]["prune_hadamard"] - q["model"]["bytes"]  # the kept tensors
    write_rate /= max(prune["seconds"] - q["calibration"]["seconds"], 1e-9)
    rows = []
    for name in LLAMA_3:
        config = _shape(name)
        layers, width = config.num_hidden_layers, config.hidden_size
        layer_bytes = 2 * sum(a * b for a, b in layer_shapes(config))
        model_bytes = layers * layer_bytes + 2 * 2 * config.vocab_size * width  # + embedding and head
        kept = model_bytes - layers // 8 * layer_bytes  # a prune of one layer in eight
        cpu = layers * layer_flops(config, 32, 512) / rate + kept / write_rate
        evaluation = layers * layer_flops(config, 4, 512) / rate
        memory = PROCESS_BYTES + 2 * layer_bytes + 3 * 32 * 512 * width * 2
        gpu_compute = layers * layer_flops(config, GPU["windows"], GPU["seq_len"]) / GPU["flops"]
        activations = 3 * GPU["windows"] * GPU["seq_len"] * width * 2
        in_memory = model_bytes + activations <= GPU["memory"]
        # In memory: load once, compute; layer by layer: each pass reads the shards once, behind the compute.
        gpu = (model_bytes / GPU["read"] + gpu_compute) if in_memory else max(gpu_compute, model_bytes / GPU["read"])
        gpu += kept / GPU["read"]  # writing what is kept, at the same speed
        rows.append(
            dict(
                model=f"Llama-3-{name}",
                layers=layers,
                model_gb=model_bytes / 1e9,
                layer_gb=layer_bytes / 1e9,
                cpu_prune_minutes=cpu / 60,
                cpu_prune_gb=memory / 1e9,
                cpu_eval_minutes=evaluation / 60,
                gpu_prune_minutes=gpu / 60,
                gpu_memory_gb=(model_bytes if in_memory else 2 * layer_bytes) / 1e9 + activations / 1e9,
                gpu_path="in memory" if in_memory else "layer by layer",
                student_gb=(model_bytes - 4 * layer_bytes) / 1e9,
            )  # fmt: skip
        )
    return rows


def markdown(q: dict) -> list[str]:
    mib = 2**20
    rows = []
    for name, step in q["steps"].items():
        rows.append(
            [
                name,
                f"{step['peak_rss_mib'] / 1024:.2f}",
                f"{step['seconds']:.0f}",
                f"{step['weights_read_bytes'] / 1e9:.1f}",
                f"{step['weights_read_bytes'] / q['model']['bytes']:.2f}",
                f"{step['seconds_per_layer_read']:.2f}",
            ]
        )
    c = q["calibration"]
    flops = q["matmul_flops"]
    lines = [
        f"**At scale** ({q['model']['shape']}, random bf16 weights, {q['model']['bytes'] / 1e9:.1f} GB in shards; "
        f"every step a fresh process with `--max-memory {q['settings']['max_memory']} --dtype bfloat16`; "
        f"{q['settings']['samples']} x {q['settings']['seq_len']} calibration tokens)",
        "",
        *markdown_table(
            ["step", "peak RSS GiB", "seconds", "read GB", "read / model", "s per layer read"], rows
        ).splitlines(),
        "",
        f"- calibration pass: {c['seconds']:.0f} s, {c['seconds_per_layer']:.2f} s per layer, "
        f"{c['flops_per_second'] / 1e9:.0f} GFLOP/s = {c['share_of_bf16_matmul']:.0%} of the bf16 matmul measured "
        f"beside it ({flops['bfloat16'] / 1e9:.0f} GFLOP/s; fp32 {flops['float32'] / 1e9:.0f})",
        f"- `--patch auto` chose layers {q['auto_choice']['layers']} with {q['auto_choice']['patch']}; the export "
        f"folded with {', '.join(str(f) for f in q['export_folds'])}",
        f"- distill: student {q['distill']['student_bytes'] / 1e9:.1f} GB of bf16 weights, teacher cache "
        f"{q['distill']['teacher_cache_bytes'] / mib:.0f} MiB for {q['distill']['windows']} windows",
        f"- most disk held at once (model + outputs): {q['disk_peak_gb']:.1f} GB",
        "",
        "Derived from these costs (assumptions: `derived` in bench/sections/scale.py and the README):",
        "",
        *markdown_table(
            [
                "model",
                "weights",
                "one layer",
                "prune, 2 CPU cores (32 x 512)",
                "its memory",
                "eval 4 x 512, CPU",
                "prune, one GPU (128 x 2048)",
                "GPU memory",
                "distill's student",
            ],
            [
                [
                    row["model"],
                    f"{row['model_gb']:.0f} GB",
                    f"{row['layer_gb']:.2f} GB",
                    f"{row['cpu_prune_minutes']:.0f} min",
                    f"{row['cpu_prune_gb']:.1f} GB",
                    f"{row['cpu_eval_minutes']:.1f} min",
                    f"{row['gpu_prune_minutes']:.1f} min ({row['gpu_path']})",
                    f"{row['gpu_memory_gb']:.0f} GB",
                    f"{row['student_gb']:.0f} GB",
                ]
                for row in derived(q)
            ],
        ).splitlines(),  # fmt: skip
        "",
    ]
    return lines


def checks(q: dict) -> list[Claim]:
    steps = q["steps"]
    bounded = {name: steps[name]["peak_rss_mib"] for name in steps if name != "distill"}
    needed = q["needed_bytes"]
    reads = {name: steps[name]["weights_read_bytes"] / needed[name] for name in needed}
    share = q["calibration"]["share_of_best_matmul"]
    return [
        Claim(
            f"prune, export and eval of a 16 GB model with --max-memory 4GB peak at most {RSS_LIMIT_MIB} MiB RSS",
            all(value <= RSS_LIMIT_MIB for value in bounded.values()),
            ", ".join(f"{name} {value:.0f}" for name, value in bounded.items()),
        ),
        Claim(
            f"the calibration pass reaches at least {MATMUL_SHARE:.0%} of the machine's best matmul FLOP/s",
            share >= MATMUL_SHARE,
            f"{share:.0%} ({q['calibration']['flops_per_second'] / 1e9:.0f} GFLOP/s)",
        ),
        Claim(
            f"each shard is read once per pass (bytes read within {READ_SLACK}x what the passes need)",
            all(value <= READ_SLACK for value in reads.values()),
            ", ".join(f"{name} {value:.3f}" for name, value in reads.items()),
        ),
        Claim(
            "distill's student fits the machine (peak RSS at most 1.25x its bf16 weights + 1 GiB)",
            steps["distill"]["peak_rss_mib"] * 2**20 <= 1.25 * q["distill"]["student_bytes"] + 2**30,
            f"{steps['distill']['peak_rss_mib'] / 1024:.2f} GiB for {q['distill']['student_bytes'] / 2**30:.2f} GiB",
        ),
    ]
