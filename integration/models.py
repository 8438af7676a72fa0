"""Resolve, validate, load and save models: the embedded default model (SmolLM2-135M, converted once from a PyPI
wheel), local folders and Hub ids.

Everything that can be checked from a config is checked here, before any weight is read: that the model exists,
that its family is supported, that the device exists.
"""

import json
import logging
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from linearpatch.common.errors import (
    CheckpointMismatchError,
    LinearPatchError,
    ModelNotFoundError,
    UnsupportedModelError,
    first_line,
)
from linearpatch.common.files import atomic_directory
from linearpatch.common.names import ADAPTER_CONFIG, CONFIG_FILE, PRUNE_RECORD, REPO_ID, WEIGHTS_FILE, is_repo_id
from linearpatch.modeling import checkpoint_model_types, supported_model_types

from .adapter import adapter_base, base_identity, check_adapter_folder, merge_patch_adapter, write_adapter
from .defaults import default_device
from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS, cache_dir, convert_embedded
from .shards import SafetensorsCheckpoint, refuse_non_finite

logger = logging.getLogger(__name__)

_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/")


def resolve_model(name_or_path: str) -> str:
    """Return a path or Hub id loadable by `from_pretrained`; embedded names are converted once and cached.

    Args:
        name_or_path (`str`): `smollm2-135m`, a local checkpoint folder, or a Hub repo id.

    Raises:
        ModelNotFoundError: for a path that does not exist (and is not a Hub id).
    """
    name_or_path = str(name_or_path)
    spec = EMBEDDED_MODELS.get(name_or_path)
    if spec is not None:
        target = cache_dir() / "models" / name_or_path
        if not (target / WEIGHTS_FILE).exists():
            convert_embedded(name_or_path, spec, target)
        return str(target)
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if not REPO_ID.match(name_or_path):
        raise ModelNotFoundError(
            f"Model {name_or_path!r} not found: it is not a folder, not a Hub id (org/name), and not an embedded "
            f"model ({', '.join(EMBEDDED_MODELS)}). Check the path."
        )
    return name_or_path


def portable_model_id(name_or_path: str | None) -> str | None:
    """What to record as a model's origin so that another machine can resolve it: the Hub id of an embedded model
    (never its cache path), a Hub id as given, the repo of an HF cache snapshot, or the `base_model` a LinearPatch
    checkpoint folder records. `None` for a local folder with no Hub identity (pass `base_model=` then)."""
    if not name_or_path:
        return None
    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name_or_path].hub_id
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path if REPO_ID.match(name_or_path) else None
    source = path / "EMBEDDED_SOURCE"
    if source.exists():
        return source.read_text().split()[2]
    snapshot = _CACHE_SNAPSHOT.search(str(path.resolve()))
    if snapshot:
        return f"{snapshot['org']}/{snapshot['name']}"
    config = path / CONFIG_FILE
    if config.exists():
        recorded = json.loads(config.read_text()).get("base_model")
        if is_repo_id(recorded):
            return recorded
    return None


def embedded_name_for(model_id: str | None) -> str | None:
    """The embedded name whose Hub id is `model_id` (so a recorded `base_model` loads offline), else `model_id`."""
    for name, spec in EMBEDDED_MODELS.items():
        if spec.hub_id == model_id:
            return name
    return model_id


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


def load_config(name_or_path: str, kind: str | None = None):
    """Read a model's config (no weights) and check that linearpatch can work on it.

    Args:
        name_or_path (`str`): see [`resolve_model`].
        kind (`str`, *optional*): `dense` (a model to prune: a supported family), `checkpoint` (a LinearPatch
            checkpoint), `None` (either), or `teacher` (any causal LM: the distillation teacher, which the parent
            process checked as `dense`; its child process knows only the built-in families, not registered ones).

    Raises:
        ModelNotFoundError, UnsupportedModelError: naming the model and what would work.
    """
    import linearpatch.modeling  # noqa: F401  (registers the LinearPatch auto classes)

    path = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        if Path(path).is_dir():
            raise ModelNotFoundError(
                f"{name_or_path} is a folder but not a model ({str(error).splitlines()[0]}); it needs a config.json."
            ) from error
        raise ModelNotFoundError(
            f"Cannot load {name_or_path!r} from the Hub ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Check the id, your network and HF_TOKEN, or pass a local folder."
        ) from error
    model_type = config.model_type
    families = ", ".join(supported_model_types())
    checkpoint_types = checkpoint_model_types()
    if kind == "checkpoint" and model_type not in checkpoint_types:
        raise UnsupportedModelError(
            f"{name_or_path} is a {model_type!r} model, not a LinearPatch checkpoint; run `linearpatch prune` on it "
            "first."
        )
    if kind == "dense" and model_type not in supported_model_types():
        hint = " It is already pruned: prune its dense model instead." if model_type in checkpoint_types else ""
        raise UnsupportedModelError(
            f"{name_or_path} is a {model_type!r} model; linearpatch prunes these families: {families}.{hint}"
        )
    if kind is None and model_type not in (*supported_model_types(), *checkpoint_types):
        raise UnsupportedModelError(
            f"{name_or_path} is a {model_type!r} model; linearpatch works on {families} and LinearPatch checkpoints."
        )
    return config


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


def _is_patch_adapter(name_or_path: str, kind: str | None) -> bool:
    """Whether a model input is a patch adapter folder (a dense model or teacher never is one)."""
    return (Path(str(name_or_path)) / ADAPTER_CONFIG).exists() and kind not in ("dense", "teacher")


def check_model_files(name_or_path: str, kind: str | None = None):
    """Open and check a model input without loading its weights: its config and family (see [`load_config`]), and
    for a local folder its safetensors files (every shard present and as long as its header says, every index entry
    in its shard); for a patch adapter, the adapter's files and the checkpoint it belongs to. Commands run this on
    every model they are given before the first forward pass of any.

    Returns:
        The model's config (for an adapter: its base checkpoint's).

    Raises:
        ModelNotFoundError, UnsupportedModelError, CheckpointMismatchError: naming the model and the fix.
    """
    if _is_patch_adapter(name_or_path, kind):
        return _check_adapter_files(name_or_path)
    config = load_config(name_or_path, kind)
    path = Path(resolve_model(name_or_path))
    if path.is_dir():
        SafetensorsCheckpoint(path)
    return config


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model. It never runs remote code: a LinearPatch checkpoint's tokenizer is a stock one."""
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=False)


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    kind: str | None = None,
    **kwargs,
):
    """Load a causal LM and its tokenizer by name (see [`resolve_model`]); the model is put in eval mode.

    Only safetensors weights are accepted (`use_safetensors=True`): pickled checkpoints are never loaded. A folder
    holding a LinearPatch PEFT adapter loads its base checkpoint and merges the adapter (after checking that it
    belongs to that base).

    Args:
        name_or_path (`str`): `smollm2-135m`, a folder, or a Hub id.
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.float32`).
        device (`str`, *optional*): defaults to CUDA when available.
        kind (`str`, *optional*): `dense` or `checkpoint` to refuse the other (see [`load_config`]).

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`
    """
    device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if _is_patch_adapter(name_or_path, kind):
        return load_patch_adapter(name_or_path, dtype=dtype, device=device)
    load_config(name_or_path, kind)
    path = resolve_model(name_or_path)
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
    return model.eval(), load_tokenizer(path)


def _check_adapter_files(adapter_dir: str | Path):
    """[`check_model_files`] of a patch adapter: its own files, the checkpoint it belongs to (a LinearPatch checkpoint
    whose files are complete), and that its patches fit that checkpoint's. Returns the base checkpoint's config."""
    base = adapter_base(adapter_dir)
    try:
        config = check_model_files(base, kind="checkpoint")
    except LinearPatchError as error:
        raise CheckpointMismatchError(
            f"The adapter {adapter_dir} names {base} as its base, which is not a usable LinearPatch checkpoint "
            f"({first_line(error)}). Save the adapter with `save_patch_adapter(model, folder, base=CHECKPOINT)` or "
            "`linearpatch distill --adapter-only`."
        ) from error
    check_adapter_folder(adapter_dir, base, config)
    return config


def load_patch_adapter(adapter_dir: str | Path, base: str | None = None, dtype=torch.float32, device: str = "cpu"):
    """Load a LinearPatch checkpoint, check that the adapter in `adapter_dir` belongs to it, and merge the adapter.

    Args:
        adapter_dir (`str` or `Path`): a folder written by `linearpatch distill --adapter-only` or
            [`save_patch_adapter`].
        base (`str`, *optional*): the pruned checkpoint (default: the one the adapter records).

    Returns:
        `tuple[LinearPatchForCausalLM, tokenizer]`: the merged model, in eval mode.
    """
    model, tokenizer = load_model(adapter_base(adapter_dir, base), dtype=dtype, device=device, kind="checkpoint")
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


def write_checkpoint_files(folder: Path, model, tokenizer=None, files: dict[str, str] | None = None) -> None:
    """Write a model (safetensors and remote-code files), its tokenizer and text files into an existing (staging)
    folder; see [`save_checkpoint`] for the atomic version. `model` may be `None` when the weights were written
    otherwise (a sequential prune streams them)."""
    if model is not None:
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
    "cache_dir",
    "check_model_files",
    "check_same_base",
    "check_same_vocabulary",
    "embedded_name_for",
    "load_config",
    "load_model",
    "load_patch_adapter",
    "load_tokenizer",
    "portable_model_id",
    "resolve_device",
    "resolve_model",
    "save_checkpoint",
    "save_patch_adapter",
    "write_checkpoint_files",
]
