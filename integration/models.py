"""Load and save models: the embedded models (converted once from PyPI wheels), local folders, adapters and Hub ids,
each opened by `resolution.py` (what it is and whether its config and files are whole) before any weight is read.
Every loader takes a name or an opened [`ModelRef`].
"""

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from linearpatch.common.errors import CheckpointMismatchError, LinearPatchError
from linearpatch.common.files import atomic_directory
from linearpatch.common.names import PRUNE_RECORD, is_repo_id

from .adapter import adapter_base, base_identity, merge_patch_adapter, write_adapter
from .defaults import default_device
from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS, cache_dir
from .resolution import (
    ModelRef,
    check_model_files,
    embedded_name_for,
    load_config,
    open_model,
    portable_model_id,
    resolve_model,
)
from .shards import compute_dtype, refuse_non_finite, write_sharded_safetensors

logger = logging.getLogger(__name__)


def resolve_device(device: str | None) -> str:
    """The device to run on: `device` if it exists, else the best available.

    Raises:
        LinearPatchError: for a CUDA device when torch sees none, or a device string torch does not know.
    """
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise LinearPatchError(f"Unknown device {device!r} ({error}); use cpu, cuda or cuda:N.") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LinearPatchError(
                f"--device {device} was asked for, but torch {torch.__version__} sees no CUDA device; use --device "
                "cpu, or install a CUDA build of torch on a machine with a GPU."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LinearPatchError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible.")
    return device


def check_same_vocabulary(name: str, vocab_size: int, reference: str, reference_vocab_size: int, why: str) -> None:
    """Refuse a model whose vocabulary is not the one it is compared with token by token (a teacher's with its
    student's, a candidate's with the baseline's).

    Raises:
        CheckpointMismatchError: naming both vocabularies, then `why` (what compares them and what to use).
    """
    if vocab_size != reference_vocab_size:
        raise CheckpointMismatchError(
            f"{name} has a vocabulary of {vocab_size} tokens and {reference} {reference_vocab_size}: {why}"
        )


def check_same_base(config, dense_config, dense: str, role: str) -> None:
    """Refuse a dense model (a teacher, a `report --dense`) that is not of the checkpoint's family and shapes: its
    statistics or logits would be compared with the pruned model's layer by layer and token by token.

    Raises:
        CheckpointMismatchError: naming every difference and the model to use instead.
    """
    from linearpatch.modeling import family_of

    family = family_of(config).dense_model_type
    differences = []
    if dense_config.model_type != family:
        differences.append(f"it is a {dense_config.model_type!r} model, the checkpoint a pruned {family!r} one")
    for field, theirs in (
        ("hidden_size", config.hidden_size),
        ("intermediate_size", getattr(config, "intermediate_size", None)),
        ("vocab_size", config.vocab_size),
        ("num_hidden_layers", getattr(config, "original_num_hidden_layers", config.num_hidden_layers)),
    ):
        ours = getattr(dense_config, field, None)
        if ours != theirs:
            differences.append(f"{field} {ours} against {theirs}")
    if differences:
        origin = getattr(config, "base_model", None) or "the dense model it was pruned from"
        raise CheckpointMismatchError(
            f"The {role} {dense} is not the model this checkpoint was pruned from ({'; '.join(differences)}): use "
            f"{origin}."
        )


def load_tokenizer(name_or_path: str | ModelRef):
    """The tokenizer of a model. It never runs remote code: a LinearPatch checkpoint's tokenizer is a stock one."""
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=False)


def load_model(
    name_or_path: str | ModelRef,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    kind: str | None = None,
    **kwargs,
):
    """Load a causal LM and its tokenizer by name (see [`resolve_model`]) or opened reference (see [`open_model`]);
    the model is put in eval mode.

    Only safetensors weights are accepted (`use_safetensors=True`): pickled checkpoints are never loaded. A folder
    holding a LinearPatch PEFT adapter loads its base checkpoint and merges the adapter (after checking that it
    belongs to that base).

    Args:
        name_or_path (`str` or `ModelRef`): `smollm2-135m`, a folder, or a Hub id.
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.float32`): the dtype the weights are loaded in
            (`auto`: the compute dtype, float32).
        device (`str`, *optional*): defaults to CUDA when available.
        kind (`str`, *optional*): `dense` or `checkpoint` to refuse the other (see [`load_config`]).

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`
    """
    device = resolve_device(device)
    dtype = compute_dtype(dtype)
    opened = open_model(name_or_path, kind, check_files=False)
    if opened.kind == "adapter":
        return load_patch_adapter(opened.path, base=opened.base, dtype=dtype, device=device)
    path = opened.path
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **kwargs)
    except Exception as error:
        if "safetensor" in type(error).__name__.lower() or "deserializ" in str(error).lower():
            raise CheckpointMismatchError(
                f"The weights of {name_or_path} are truncated or corrupt ({str(error).splitlines()[0]}); "
                "download or export the checkpoint again."
            ) from error
        if isinstance(error, OSError) and "safetensors" in str(error):
            raise CheckpointMismatchError(
                f"{name_or_path} has no safetensors weights: linearpatch never loads pickled (.bin) weights; "
                "convert them with `save_pretrained(..., safe_serialization=True)` in a trusted environment."
            ) from error
        raise
    if "device_map" not in kwargs:  # a device map placed every layer already (accelerate's big-model loading)
        model.to(device)
    for name, tensor in model.state_dict().items():  # one pass over the weights: cheap next to any use of them
        refuse_non_finite(f"{name_or_path}: {name}", tensor)
    return model.eval(), load_tokenizer(opened)


def load_patch_adapter(
    adapter_dir: str | Path, base: str | ModelRef | None = None, dtype=torch.float32, device: str = "cpu"
):
    """Load a LinearPatch checkpoint, check that the adapter in `adapter_dir` belongs to it, and merge the adapter.

    Args:
        adapter_dir (`str` or `Path`): a folder written by `linearpatch distill --adapter-only` or
            [`save_patch_adapter`].
        base (`str`, *optional*): the pruned checkpoint (default: the one the adapter records).

    Returns:
        `tuple[LinearPatchForCausalLM, tokenizer]`: the merged model, in eval mode.
    """
    checkpoint = base if isinstance(base, ModelRef) else adapter_base(adapter_dir, base)
    model, tokenizer = load_model(checkpoint, dtype=dtype, device=device, kind="checkpoint")
    return merge_patch_adapter(model, adapter_dir), tokenizer


def save_patch_adapter(peft_model, folder: str | Path, base: str | Path, overwrite: bool = False) -> Path:
    r"""
    Save the trained patches of `peft_model` (from [`distill`]) as an adapter that belongs to the pruned checkpoint
    `base`: stock PEFT (`AutoPeftModelForCausalLM`, `PeftModel.from_pretrained`) and every linearpatch load path load
    it, and linearpatch checks that it is loaded onto that checkpoint.

    Args:
        peft_model (`PeftModel`): the trained model.
        folder (`str` or `Path`): the adapter folder to create (atomically).
        base (`str` or `Path`): where the pruned checkpoint is (a folder from [`save_checkpoint`], or its Hub id).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing folder.

    Raises:
        CheckpointMismatchError: if `base` is not the checkpoint the patches were trained on.
    """
    identity = base_identity(peft_model.get_base_model())
    config = load_config(str(base), kind="checkpoint")
    if list(config.pruned_layers) != identity["pruned_layers"]:
        raise CheckpointMismatchError(
            f"{base} has pruned layers {list(config.pruned_layers)}, but the patches were trained on a model without "
            f"layers {identity['pruned_layers']}: pass the checkpoint the model was saved to."
        )
    local = Path(str(base)).expanduser().exists()
    base_path = str(Path(str(base)).expanduser().resolve()) if local else str(base)
    hub_id = str(base) if not local and is_repo_id(str(base)) else None
    with atomic_directory(folder, overwrite) as staging:
        write_adapter(peft_model, staging, identity, hub_id, base_path)
    return Path(folder)


def save_checkpoint(
    model,
    tokenizer,
    output: str | Path,
    overwrite: bool = False,
    report=None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    r"""
    Save a pruned model, its tokenizer and its report into one folder, atomically.

    The folder holds the safetensors weights, the Hub-side modeling files (`trust_remote_code` loads it without
    linearpatch), the tokenizer and `linearpatch_report.json`. It appears in one rename when complete; an existing
    folder is only replaced with `overwrite=True`.

    Args:
        model (`LinearPatchForCausalLM`): from [`prune`].
        tokenizer: its tokenizer (`None` to leave it out, e.g. for an intermediate).
        output (`str` or `Path`): the folder to create.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing folder.
        report (`PruneReport`, *optional*): written as `linearpatch_report.json`.
        extra_files (`dict[str, str]`, *optional*): more text files (name -> content).

    Afterwards `model.name_or_path` is the folder, as after `from_pretrained`: an adapter trained on the model (see
    [`distill`]) records it as its base.
    """
    files = dict(extra_files or {})
    if report is not None:
        files[PRUNE_RECORD] = report.to_json()
    with atomic_directory(output, overwrite) as staging:
        write_checkpoint_files(staging, model, tokenizer, files)
    # The model now lives there, as if loaded from there: a PEFT adapter trained on it records this folder as its base.
    model.name_or_path = model.config._name_or_path = str(Path(output).resolve())
    return Path(output)


def cast_for_storage(model, dtype: torch.dtype):
    """Cast `model` in place to the dtype it is written in, its `_keep_in_fp32_modules_strict` (the patches) kept in
    float32 as `from_pretrained` loads them; the config records the dtype. Returns the model."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    # Parameter by parameter, the kept modules' never cast (a round trip through bf16 would round the patch); buffers
    # (rotary frequencies) are not written and stay as computed.
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    model.config.dtype = dtype
    return model


def generation_config_of(folder: str | Path):
    """The generation config a model folder holds (`GenerationConfig`), or `None` when it holds none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return None


def write_streamed_model(
    folder: Path, config, plan: list, generation_config=None, max_shard_size: int = 5 * 1024**3, progress: bool = True
) -> list[str]:
    """What `save_pretrained` writes, for a model whose tensors are streamed (`plan`: `(name, PendingTensor)` pairs)
    instead of held: the remote-code files and their `auto_map` (for a LinearPatch config), the config, the
    generation config when given, then the weights in shards of `max_shard_size`. Returns the weight files."""
    from transformers.dynamic_module_utils import custom_object_save

    from linearpatch.modeling import family_of

    with torch.device("meta"):
        skeleton = family_of(config).causal_lm_class(config)
    custom_object_save(skeleton, folder, config=config)
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    return write_sharded_safetensors(folder, plan, max_shard_size=max_shard_size, progress=progress)


def write_checkpoint_files(
    folder: Path, model, tokenizer=None, files: dict[str, str] | None = None, dtype: torch.dtype | None = None
) -> None:
    """Write a model (safetensors and remote-code files), its tokenizer and text files into an existing (staging)
    folder; see [`save_checkpoint`] for the atomic version. `model` may be `None` when the weights were written
    otherwise (a sequential prune streams them). With `dtype`, the model is first cast to it in place
    ([`cast_for_storage`]): a job's model, done computing, written in its source's dtype."""
    if model is not None:
        if dtype is not None:
            cast_for_storage(model, dtype)
        for name, tensor in model.state_dict().items():
            refuse_non_finite(name, tensor)
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, text in (files or {}).items():
        (folder / name).write_text(text)


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ModelRef",
    "cache_dir",
    "cast_for_storage",
    "check_model_files",
    "check_same_base",
    "check_same_vocabulary",
    "embedded_name_for",
    "generation_config_of",
    "load_config",
    "load_model",
    "load_patch_adapter",
    "load_tokenizer",
    "open_model",
    "portable_model_id",
    "resolve_device",
    "resolve_model",
    "save_checkpoint",
    "save_patch_adapter",
    "write_checkpoint_files",
    "write_streamed_model",
]
