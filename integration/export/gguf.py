"""`export --gguf`: the stock export as GGUF files for llama.cpp (and Ollama, LM Studio), written by llama.cpp's own
converter and quantizer (`make gguf`), measured by `llama-perplexity` beside transformers on the same text, and refused
where llama.cpp would run the pruned model differently from transformers.

llama.cpp's graph for a family is fixed by a few GGUF keys, so a pruned model converts unchanged except where the
converter or llama.cpp assumes the dense model's layer count:
- Gemma 3: llama.cpp assumes one global layer in every `period` (`period - 1` sliding layers, then a global one), with
  period 6 unless the GGUF says otherwise, and the converter writes no period. A pruned model whose layers still
  follow such a pattern gets its period written (`llama-quantize --override-kv`); any other pattern is refused.
  llama.cpp also scales attention by the head size (by hidden / heads at 62 layers, Gemma 3 27B), not by
  `query_pre_attn_scalar`: a model where they differ is refused.
- a sliding window outside Gemma 3 (Mistral, Qwen with `use_sliding_window`): llama.cpp attends to the whole context,
  so the GGUF equals transformers only up to the window's length. Said in one line and on the card.
"""

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from linearpatch.common.errors import LinearPatchError, first_line
from linearpatch.modeling import FAMILIES, family_of
from linearpatch.modeling.families import LlamaCppLayout

from ..choices import GGUF_FLOAT_TYPES, GGUF_NEEDS_IMATRIX, uses_imatrix
from ..data import TokenWindows, load_texts
from ..defaults import Sizes
from ..llama_cpp import converter_command, gguf_perplexity, llama_tool, read_gguf, run_tool
from ..measurement.perplexity import half_window_perplexity

logger = logging.getLogger("linearpatch")

FLOAT_TYPES = GGUF_FLOAT_TYPES  # the converter's, most precise first (`choices.py`)


def converted_families() -> tuple[str, ...]:
    """The dense `model_type`s llama.cpp's converter takes: the families whose entry says what llama.cpp assumes."""
    return tuple(model_type for model_type, family in FAMILIES.items() if family.llama_cpp is not None)


@dataclass(frozen=True)
class GgufPlan:
    r"""
    The GGUF files an export writes and what llama.cpp needs told about the pruned model.

    Args:
        types (`tuple[str, ...]`): the files, each one of `GGUF_TYPES`.
        base (`str`): the float type the converter writes; llama-quantize makes the others from it.
        overrides (`tuple[str, ...]`): `KEY=TYPE:VALUE` metadata written into every file (Gemma 3's period).
        notes (`tuple[str, ...]`): where the files equal transformers only within limits (a sliding window).
        imatrix (`bool`, *optional*): `--imatrix` (every quantized type with the importance matrix), `--no-imatrix`
            (none), or `None`: the types of 4 bits and below (see `choices.uses_imatrix`).
    """

    types: tuple[str, ...]
    base: str
    overrides: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    imatrix: bool | None = None

    @property
    def imatrix_types(self) -> tuple[str, ...]:
        """The files quantized with the importance matrix."""
        return tuple(kind for kind in self.types if uses_imatrix(kind, self.imatrix))

    @staticmethod
    def imatrix_name(name: str) -> str:
        """`NAME.imatrix`: llama.cpp's GGUF-format matrix, named so that no listing takes it for a model."""
        return f"{name}.imatrix"

    @staticmethod
    def file_name(name: str, gguf_type: str) -> str:
        """`NAME-Q4_K_M.gguf`: the suffix Ollama's and LM Studio's Hub listings read the quantization from."""
        return f"{name}-{gguf_type.upper()}.gguf"


def llama_cpp_period(sliding: list[bool], default: int) -> int | None:
    """The period llama.cpp's Gemma 3 reads (`il % period < period - 1` is sliding, 0: every layer) that gives
    exactly these sliding layers, its `default` first; `None` when no period does."""
    count = len(sliding)
    for period in (default, *range(1, count + 1), 0):
        if all(flag == (period == 0 or index % period < period - 1) for index, flag in enumerate(sliding)):
            return period
    return None


def period_overrides(config, facts: LlamaCppLayout) -> tuple[str, ...]:
    """The metadata llama.cpp needs to run this pruned model's sliding/global layer pattern (and attention scale) as
    transformers does, for a family whose pattern llama.cpp reads as a period (Gemma 3).

    Raises:
        LinearPatchError: when llama.cpp cannot express its layer pattern or its attention scale.
    """
    layer_types = list(config.layer_types)
    sliding = [kind == "sliding_attention" for kind in layer_types]
    period = llama_cpp_period(sliding, facts.default_period)
    if period is None:
        globals_at = [index for index, flag in enumerate(sliding) if not flag]
        raise LinearPatchError(
            f"--gguf: llama.cpp runs Gemma 3 with one global-attention layer every N layers, but this pruned model's "
            f"global layers are {globals_at} of {len(sliding)}: no GGUF can say that. Prune a block whose removal "
            "keeps the pattern regular (e.g. whole periods of 6), or serve the export with transformers or vLLM."
        )
    heads_size = config.hidden_size // config.num_attention_heads
    scalar = heads_size if config.num_hidden_layers == facts.head_scale_from_width_at else config.head_dim
    if config.query_pre_attn_scalar != scalar:
        raise LinearPatchError(
            f"--gguf: llama.cpp scales this Gemma 3's attention by 1/sqrt({scalar}) (at {config.num_hidden_layers} "
            f"layers), but its query_pre_attn_scalar is {config.query_pre_attn_scalar}: the GGUF would be silently "
            "wrong. Serve the export with transformers or vLLM instead."
        )
    return () if period == facts.default_period else (f"{facts.period_key}=int:{period}",)


def sliding_window_note(config, model_type: str, facts: LlamaCppLayout) -> str | None:
    """One line when transformers slides a window that llama.cpp ignores (a family whose windows llama.cpp does not
    run)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    slides = "sliding_attention" in layer_types or (facts.window_on_every_layer and not layer_types)
    if not window or not slides:
        return None
    return (
        f"llama.cpp ignores {model_type}'s sliding window of {window} tokens: the GGUF files equal transformers for "
        f"contexts up to {window} tokens and attend to the whole context beyond."
    )


def plan_gguf(config, types: tuple[str, ...] | list[str], imatrix: bool | None = None) -> GgufPlan | None:
    """What `export --gguf TYPES [--imatrix | --no-imatrix]` writes for a checkpoint of `config` (`None` for no
    files), checked before any work.

    Raises:
        LinearPatchError: for a family llama.cpp does not convert, a Gemma 3 it would run differently, or llama.cpp
            not built.
    """
    if not types:
        return None
    family = family_of(config)
    model_type, facts = family.dense_model_type, family.llama_cpp
    if facts is None:
        raise LinearPatchError(
            f"--gguf: llama.cpp's converter does not take {model_type} models here (it takes "
            f"{', '.join(converted_families())}): export without --gguf."
        )
    llama_tool("llama-quantize")  # not built: say so now, not after the fit
    types = tuple(dict.fromkeys(types))
    plan = GgufPlan(types, "f16", imatrix=imatrix)
    if plan.imatrix_types:
        llama_tool("llama-imatrix")
    base = next((kind for kind in FLOAT_TYPES if kind in types), "f16")
    overrides = period_overrides(config, facts) if facts.period_key else ()
    note = None if facts.runs_sliding_window else sliding_window_note(config, model_type, facts)
    if note:
        logger.warning("linearpatch: %s", note)
    return GgufPlan(types, base, overrides, (note,) if note else (), imatrix)


def imatrix_text(windows: TokenWindows, tokenizer, directory: Path) -> Path:
    """The calibration windows as llama-imatrix reads them: each window's text (special tokens left out: llama.cpp
    tokenises the text again and puts BOS first in each chunk where the model adds one), one after another."""
    path = directory / "imatrix-calibration.txt"
    texts = tokenizer.batch_decode(windows.input_ids.tolist(), skip_special_tokens=True)
    path.write_text("".join(texts), encoding="utf-8")
    return path


def prune_calibration(folder: str | Path, tokenizer, fallback: Callable[[], TokenWindows]) -> TokenWindows:
    """The windows the checkpoint in `folder` was calibrated on, as its prune report records them (drawn again from
    the same text with the same seed, and checked by their SHA-256); `fallback()` after one log line saying why when
    they cannot be (no report, text not on this machine, other windows)."""
    from linearpatch.common.names import PRUNE_RECORD

    from ..data import token_windows

    report = Path(folder) / PRUNE_RECORD
    why = f"{report} records no calibration windows"
    if report.is_file():
        calibration = json.loads(report.read_text()).get("calibration") or {}
        try:
            source, count, seq_len = calibration["source"], calibration["num_windows"], calibration["seq_len"]
            windows = token_windows(source, tokenizer, count, seq_len, calibration["seed"])
            if windows.fingerprint == calibration.get("sha256"):
                return windows
            why = f"the windows drawn again from {calibration['source']} are not the ones {report} records"
        except (KeyError, TypeError):
            pass
        except (LinearPatchError, OSError) as error:
            why = f"{calibration.get('source')} cannot be read here ({first_line(error)})"
    windows = fallback()
    logger.warning("linearpatch: --gguf: the importance matrix runs on %s: %s.", windows.source, why)
    return windows


def compute_imatrix(base: Path, target: Path, plan: GgufPlan, windows: TokenWindows, tokenizer) -> dict:
    """Run llama-imatrix on the float `base` file over `windows` (one chunk per window, of the windows' length),
    writing `target`; the record of what it was computed on."""
    overrides = [argument for override in plan.overrides for argument in ("--override-kv", override)]
    num_windows, seq_len = windows.input_ids.shape
    with tempfile.TemporaryDirectory(prefix="linearpatch-imatrix-") as directory:
        text = imatrix_text(windows, tokenizer, Path(directory))
        command = [str(llama_tool("llama-imatrix")), "-m", str(base), "-f", str(text), "-o", str(target)]
        command += ["--output-format", "gguf", "-c", str(seq_len), "--chunks", str(num_windows), "--no-ppl"]
        run_tool(command + overrides, "llama-imatrix")
    return dict(file=target.name, **windows.describe())


def write_ggufs(
    folder: Path, name: str, plan: GgufPlan, imatrix_windows: TokenWindows | None = None, tokenizer=None
) -> tuple[list[dict], dict | None]:
    """Convert the stock model in `folder` with llama.cpp's converter, compute the importance matrix over
    `imatrix_windows` when a file uses it (`NAME.imatrix`, kept beside the files), then make each file of `plan`
    with llama-quantize, into `folder`. Returns each file's name, type, size and whether it used the matrix, and the
    matrix's record (`None` without one).

    Raises:
        LinearPatchError: when a file needs the matrix and no windows are given.
    """
    if plan.imatrix_types and imatrix_windows is None:
        raise LinearPatchError(
            f"--gguf {plan.imatrix_types[0]} is quantized with an importance matrix, which needs calibration "
            "windows; none were given."
        )
    base = folder / f".{name}-base.gguf"
    command, environment = converter_command(folder, base, plan.base)
    run_tool(command + ["--model-name", name], "llama.cpp's convert_hf_to_gguf.py", environment)
    matrix = None
    if plan.imatrix_types:
        matrix = compute_imatrix(base, folder / plan.imatrix_name(name), plan, imatrix_windows, tokenizer)
    quantize = str(llama_tool("llama-quantize"))
    overrides = [argument for override in plan.overrides for argument in ("--override-kv", override)]
    kept_as_is = plan.base if plan.base in plan.types and not overrides else None
    files = []
    for gguf_type in sorted(plan.types, key=lambda kind: kind == kept_as_is):  # the base file last: it is moved
        target = folder / plan.file_name(name, gguf_type)
        with_matrix = gguf_type in plan.imatrix_types
        if gguf_type == kept_as_is:
            os.replace(base, target)
        else:
            options = ["--imatrix", str(folder / matrix["file"])] if with_matrix else []
            command = [quantize, *options, *overrides, str(base), str(target), gguf_type.upper()]
            run_tool(command, f"llama-quantize {gguf_type}")
        files.append(dict(file=target.name, type=gguf_type, bytes=target.stat().st_size, imatrix=with_matrix))
    base.unlink(missing_ok=True)
    return sorted(files, key=lambda entry: plan.types.index(entry["type"])), matrix


def text_for(corpus: str, tokenizer, num_tokens: int, directory: Path) -> tuple[Path, list[int]]:
    """The first documents of `corpus` joined into one text of at least `num_tokens` tokens, written to a file in
    `directory`, and its token ids (tokenised whole, without special tokens: what llama.cpp tokenises)."""
    documents = load_texts(corpus)
    count, ids = 0, []
    while len(ids) < num_tokens and count < len(documents):
        count = min(len(documents), max(1, 2 * count))
        text = "\n\n".join(documents[:count])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < num_tokens:
        raise LinearPatchError(f"{corpus} has {len(ids)} tokens, fewer than the {num_tokens} that --gguf measures on.")
    path = directory / f"{len(list(directory.iterdir()))}.txt"
    path.write_text(text, encoding="utf-8")
    return path, ids


def measure_ggufs(folder: Path, files: list[dict], tokenizer, corpora: tuple[str, ...], sizes: Sizes, model=None):
    """`llama-perplexity` of each file on each corpus (`sizes`: windows x tokens, scored on each window's second
    half), added to `files` in place; and, with `model` (the stock export), transformers' perplexity of it on the same
    text scored the same way: the reference each file is compared with. Returns that reference per corpus."""
    metadata = read_gguf(folder / files[0]["file"])
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    adds_bos = metadata.get("tokenizer.ggml.add_bos_token", tokenizer("a")["input_ids"][:1] == [bos])
    reference = {}
    with tempfile.TemporaryDirectory(prefix="linearpatch-gguf-") as directory:
        for corpus in corpora:
            # llama-perplexity needs two windows beyond the ones it scores.
            path, ids = text_for(corpus, tokenizer, (sizes.num_samples + 2) * sizes.seq_len, Path(directory))
            for entry in files:
                value = gguf_perplexity(folder / entry["file"], path, sizes.seq_len, sizes.num_samples)
                entry.setdefault("perplexity", {})[corpus] = value
            if model is not None:
                token_ids = torch.tensor(([bos] if adds_bos else []) + ids)
                start = bos if adds_bos else None
                reference[corpus] = half_window_perplexity(model, token_ids, sizes.seq_len, sizes.num_samples, start)
    return reference


def export_gguf(
    folder: Path,
    name: str,
    plan: GgufPlan,
    tokenizer,
    measured: tuple | None = None,
    model=None,
    imatrix_windows: TokenWindows | None = None,
) -> dict:
    """Write `plan`'s GGUF files beside the stock model in `folder` (the importance matrix over `imatrix_windows`
    where a file uses it) and, with `measured` (`(corpora, sizes)`), measure them (see [`measure_ggufs`]): the export
    report's `gguf` record."""
    files, matrix = write_ggufs(folder, name, plan, imatrix_windows, tokenizer)
    record = dict(files=files, base=plan.base, overrides=list(plan.overrides), notes=list(plan.notes))
    if matrix is not None:
        record["imatrix"] = matrix
    if measured is not None:
        corpora, sizes = measured
        record.update(
            windows=sizes.num_samples,
            seq_len=sizes.seq_len,
            reference=measure_ggufs(folder, files, tokenizer, corpora, sizes, model),
        )
    else:
        logger.warning("linearpatch: --gguf: the files are not measured (no held-out comparison in this export).")
    return record


__all__ = [
    "GGUF_NEEDS_IMATRIX",
    "compute_imatrix",
    "converted_families",
    "export_gguf",
    "GgufPlan",
    "llama_cpp_period",
    "imatrix_text",
    "measure_ggufs",
    "prune_calibration",
    "period_overrides",
    "plan_gguf",
    "sliding_window_note",
    "text_for",
    "write_ggufs",
]
