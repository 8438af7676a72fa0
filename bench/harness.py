"""The bench's toolkit: timing side by side, peak memory, fresh-process runs, and claims.

A section of the bench (one module in `bench/sections/`) is three functions:

- `run(device, quick) -> dict`: measure, return plain JSON-able data;
- `markdown(result) -> list[str]`: the result as Markdown lines (README tables come from here);
- `checks(result) -> list[Claim]`: the quality and cost claims the project makes about that result. `python -m bench
  --check` runs the sections and fails, naming the claim, when one no longer holds.
"""

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = list(range(20, 25))  # SmolLM2's stress cut: layers 20..24 removed
EVAL_CORPORA = ("wikipedia-eval", "lee-news")


@dataclass(frozen=True)
class Claim:
    r"""
    One claim the project makes about a measured result.

    Args:
        name (`str`): what is claimed, with its threshold (stable: tests and CI logs refer to it).
        holds (`bool`): whether the result bears it out.
        measured (`str`): the figures it was judged on.
    """

    name: str
    holds: bool
    measured: str

    def line(self, section: str) -> str:
        return f"{'PASS' if self.holds else 'FAIL'} {section}: {self.name} ({self.measured})"


def per_corpus(values: dict[str, float], digits: int = 3) -> str:
    """`wikipedia-eval 2.130, lee-news 2.102`: a figure per corpus, for a claim's `measured`."""
    return ", ".join(f"{corpus} {value:.{digits}f}" for corpus, value in values.items())


def compare_side_by_side(paths: dict, dense: str, **options) -> tuple[dict[str, dict], dict]:
    """`linearpatch eval` of the checkpoints `paths` (label -> folder) against the dense model `dense`, quietly: each
    model's row of the comparison by its label (`dense` for the baseline), and the run's settings. `options` are
    `compare_models`' (tasks, limit, device, window sizes)."""
    from linearpatch.integration.evaluation.comparison import compare_models

    data = compare_models([str(path) for path in paths.values()], dense, log=lambda line: None, **options).data
    by_name = {row["name"]: row for row in data["models"]}
    rows = {"dense": by_name[dense]} | {label: by_name[str(path)] for label, path in paths.items()}
    return rows, data["settings"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(seconds: dict[str, float], name: str, function, *args, **options):
    """`function(*args, **options)`, its wall seconds recorded as `seconds[name]` (a stage of a section's run)."""
    started = time.perf_counter()
    result = function(*args, **options)
    seconds[name] = round(time.perf_counter() - started, 1)
    return result


def median_time(function, repeats: int, device: str) -> float:
    """Median wall seconds of `repeats` calls (the device synchronised around each)."""
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        function()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved(functions: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, alternating between them so that drift hits all alike."""
    samples = {name: [] for name in functions}
    for function in functions.values():
        function()  # warm up
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(median_time(function, 1, device))
    return {name: statistics.median(values) for name, values in samples.items()}


class PeakRss:
    """Peak resident memory (MiB) while the block runs, sampled from /proc every 2 ms, and the level before it.

    `ru_maxrss` is a whole-process maximum (dominated by model loading), so it cannot show a pass's own peak."""

    def __enter__(self):
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


_CLI_RSS = """
import sys, time
started = time.perf_counter()
if sys.argv[1] == "baseline":
    import torch, transformers, linearpatch.cli  # noqa: F401
else:
    from linearpatch.cli import main
    main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec, so a child of a process
# bigger than itself would report the parent's size. rchar: every byte read() returned, page cache or not (the
# safetensors shards are read with plain reads, never memory-mapped).
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]
read = next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1]
print("RESULT", int(peak) / 1024, time.perf_counter() - started, read)
"""


def cli_costs(*arguments: str) -> dict[str, float]:
    """Peak RSS (`peak_rss_mib`), `seconds` and bytes read from files (`read_bytes`) of one `linearpatch` command in a
    fresh process (`baseline`: the imports only)."""
    output = subprocess.run(
        [sys.executable, "-c", _CLI_RSS, *arguments], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    _, peak, seconds, read = next(line for line in output.splitlines() if line.startswith("RESULT")).split()
    return dict(peak_rss_mib=float(peak), seconds=float(seconds), read_bytes=int(read))


def cli_peak_rss(*arguments: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `linearpatch` command in a fresh process (`baseline`: the imports only)."""
    costs = cli_costs(*arguments)
    return costs["peak_rss_mib"], costs["seconds"]


def evaluation_windows(tokenizer, windows: int, seq_len: int = 512) -> dict:
    """Held-out evaluation text: `windows` chunked windows of each corpus in [`EVAL_CORPORA`], never calibrated on."""
    from linearpatch.integration.data import token_windows

    return {corpus: token_windows(corpus, tokenizer, windows, seq_len, sampling="chunked") for corpus in EVAL_CORPORA}


def perplexities(model, evaluation: dict) -> dict[str, float]:
    """Chunked perplexity of `model` on each corpus of `evaluation` (from [`evaluation_windows`])."""
    from linearpatch.integration.measurement.perplexity import chunked_perplexity

    return {corpus: chunked_perplexity(model, windows) for corpus, windows in evaluation.items()}
