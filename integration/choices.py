"""The names the command line and the Python API offer (patch kinds, selection metrics, export folds), importable
without torch or transformers: `linearpatch --help` shows them at once. The code that implements each lives in its
own module (`pruning/patches.py`, `pruning/selection.py`, `pruning/search.py`, `export.py`)."""

from linearpatch.common.errors import LinearPatchError

# Training-free patch kinds (`pruning/patches.py`).
PATCH_KINDS = ("hadamard", "diag", "scalar", "lstsq", "none")
# What `prune` accepts: a kind above, or `auto` (each kind fitted and the best on held-out windows kept, `search.py`).
PATCH_CHOICES = (*PATCH_KINDS, "auto")
# Proxies that score a block from one calibration pass (`pruning/selection.py`).
METRICS = ("cosine", "angular", "block-influence")
# What held-out scoring can rank candidates by (`search.py`, `export`'s `auto`): the pruned model's loss (its
# perplexity), or its KL to the dense model (`measurement/closeness.py`): how far it moved from the model it came from.
OUTCOMES = ("loss", "kl")
# What `prune` accepts: the proxies above, and an outcome of each candidate on held-out windows.
SELECTION_METRICS = (*METRICS, *OUTCOMES)
# What a candidate's score is, per metric, and which way is better (reports and the CLI say it beside the scores).
METRIC_SCORES = {
    "cosine": "block start: cosine of the block's input and output, higher is better",
    "angular": "block start: angular distance of the block's input and output, lower is better",
    "block-influence": "layer: block influence (1 - cosine of its input and output), lower is better",
    "loss": "block start: held-out perplexity of the patched model, lower is better",
    "kl": "block start: held-out KL of the patched model to the dense model (nats per token), lower is better",
}
# What a map on the MLP output before a gap is fitted to reproduce (`folding.py`): the patched stream, or the dense
# model's stream after the removed block by least squares, by cosine distance, or by least squares together with a
# rotation and scale of the stream after the gap.
DENSE_OBJECTIVES = ("down-proj-dense", "down-proj-cosine", "down-proj-rotated")  # the ones that need the dense model
# The objective whose fit also rotates and rescales the layers after the gap (see `folding.fit_rotated`).
ROTATED_OBJECTIVE = "down-proj-rotated"
FOLD_OBJECTIVES = ("down-proj", *DENSE_OBJECTIVES)
# How `export` folds a patch into the stock architecture (`export.py`): a map fitted to one objective, `auto` (each
# objective fitted and the best on held-out windows kept), or `scalar` (Prune&Comp).
FOLDS = ("auto", *FOLD_OBJECTIVES, "scalar")
# The GGUF files `export --gguf` writes (`export/gguf.py`): the converter's float types, then llama-quantize's.
# The converter's float types in order of precision: it writes the most precise one asked for (f16 when none is), and
# llama-quantize makes every other file from it.
GGUF_FLOAT_TYPES = ("f32", "f16", "bf16")
GGUF_TYPES = (*GGUF_FLOAT_TYPES, "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "iq3_m", "iq2_m")
# The types of 4 bits and below, quantized with an importance matrix by default; the i-quants are made only with one.
GGUF_LOW_BIT = ("q4_k_m", "iq4_xs", "iq3_m", "iq2_m")
GGUF_NEEDS_IMATRIX = ("iq4_xs", "iq3_m", "iq2_m")
# `--gguf q8_0 --gguf q4_k_m` or `--gguf q8_0 q4_k_m`: llama.cpp files beside the stock export (`export/gguf.py`).
GGUF_HELP = f"also write OUTPUT/NAME-TYPE.gguf for llama.cpp; TYPE: {', '.join(GGUF_TYPES)}"
GGUF_OPTION = dict(choices=GGUF_TYPES, nargs="+", action="extend", metavar="TYPE", help=GGUF_HELP)
IMATRIX_OPTION = dict(
    negatable=True,
    help="with --gguf: compute llama.cpp's importance matrix (llama-imatrix) over the calibration windows, write "
    f"NAME.imatrix and quantize with it (default: for {', '.join(GGUF_LOW_BIT)}; --imatrix: every quantized type)",
)


def gguf_types(types, imatrix: bool | None = None) -> tuple[str, ...]:
    """`--gguf`'s types as a tuple (one type may be given as a string), each one of `GGUF_TYPES`, checked against
    `--imatrix` / `--no-imatrix` (`imatrix`: `None` for the default)."""
    types = (types,) if isinstance(types, str) else tuple(types or ())
    unknown = [kind for kind in types if kind not in GGUF_TYPES]
    if unknown:
        raise LinearPatchError(f"Unknown --gguf type {unknown[0]!r}: choose from {', '.join(GGUF_TYPES)}.")
    needing = [kind for kind in types if kind in GGUF_NEEDS_IMATRIX]
    if imatrix is False and needing:
        raise LinearPatchError(
            f"--gguf {needing[0]} is made only with an importance matrix: drop --no-imatrix (or choose q4_k_m)."
        )
    if imatrix is not None and not types:
        raise LinearPatchError("--imatrix and --no-imatrix choose how --gguf files are quantized: add --gguf TYPE.")
    return types


def uses_imatrix(gguf_type: str, imatrix: bool | None) -> bool:
    """Whether the file of `gguf_type` is quantized with the importance matrix (`imatrix`: `--imatrix`,
    `--no-imatrix` or `None`, the default: the types of 4 bits and below). Float files never are."""
    if gguf_type in GGUF_FLOAT_TYPES or imatrix is False:
        return False
    return imatrix is True or gguf_type in GGUF_LOW_BIT


# `auto` computes in COMPUTE_DTYPE and writes each output in the dtype its source is stored in (a bf16 model stays
# bf16 on disk, as `from_pretrained(dtype="auto")` users expect); a named dtype is both the compute and stored one.
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPUTE_DTYPE = "float32"
DTYPE_HELP = (
    f"compute dtype, and the dtype written (auto: compute in {COMPUTE_DTYPE}, write the source's own dtype; the patch "
    "stays float32)"
)


def compute_dtype_name(dtype: str) -> str:
    """The dtype a model computes in, by name: a named `--dtype`, or COMPUTE_DTYPE for `auto`."""
    return COMPUTE_DTYPE if dtype == "auto" else dtype


__all__ = [
    "DENSE_OBJECTIVES",
    "ROTATED_OBJECTIVE",
    "FOLDS",
    "FOLD_OBJECTIVES",
    "METRICS",
    "METRIC_SCORES",
    "GGUF_FLOAT_TYPES",
    "GGUF_HELP",
    "GGUF_LOW_BIT",
    "GGUF_NEEDS_IMATRIX",
    "GGUF_OPTION",
    "IMATRIX_OPTION",
    "GGUF_TYPES",
    "OUTCOMES",
    "PATCH_CHOICES",
    "PATCH_KINDS",
    "SELECTION_METRICS",
    "COMPUTE_DTYPE",
    "DTYPES",
    "DTYPE_HELP",
    "compute_dtype_name",
    "gguf_types",
    "uses_imatrix",
]
