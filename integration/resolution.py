"""What a model input is: an embedded name, a folder or a Hub id resolved to where its files are, its config read
and checked, and its files checked, once. [`open_model`] does all of it and returns a [`ModelRef`], which every stage
passes down: each function here (and every loader in `models.py`) takes a `ModelRef` in place of a name and then
reads nothing again.
"""

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig

from linearpatch.common.errors import (
    CheckpointMismatchError,
    LinearPatchError,
    ModelNotFoundError,
    UnsupportedModelError,
    first_line,
)
from linearpatch.common.names import ADAPTER_CONFIG, CONFIG_FILE, EXPORT_RECORD, REPO_ID, WEIGHTS_FILE, is_repo_id
from linearpatch.modeling import checkpoint_model_types, supported_model_types

from .adapter import adapter_base, check_adapter_folder
from .embedded import EMBEDDED_MODELS, cache_dir, convert_embedded
from .shards import SafetensorsCheckpoint

_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/")

# What a model input is, as `ModelRef.kind` says.
MODEL_KINDS = ("dense", "checkpoint", "adapter", "stock")


@dataclass(frozen=True)
class ModelRef:
    r"""
    A model input opened once (by [`open_model`]): where it is, what it is, and its config, checked.

    Args:
        name (`str`): as the user gave it (`smollm2-135m`, a folder or a Hub id); what messages name.
        path (`str`): where its files are: a folder, or a Hub id for `from_pretrained`. For an adapter, the adapter's
            folder.
        config (`PreTrainedConfig`): its config (for an adapter, its base checkpoint's).
        kind (`str`): `dense` (a supported family, as downloaded), `checkpoint` (a LinearPatch checkpoint),
            `adapter` (a patch adapter folder; `base` is its checkpoint) or `stock` (a stock-architecture export of
            a checkpoint, written by `linearpatch export`).
        base (`ModelRef`, *optional*): an adapter's checkpoint, opened.
        layerwise (`bool`, *optional*, defaults to `False`): whether it runs layer by layer from its shards, because
            it does not fit the memory the command was given (or `--sequential` said so); set by the stage that
            decides it, with [`ModelRef.placed`].
    """

    name: str
    path: str
    config: PreTrainedConfig
    kind: str
    base: "ModelRef | None" = None
    layerwise: bool = False

    def __str__(self) -> str:
        return self.name

    def __fspath__(self) -> str:
        return self.path

    @property
    def is_folder(self) -> bool:
        """Whether its files are a local folder (not a Hub id)."""
        return Path(self.path).is_dir()

    @property
    def origin(self) -> str | None:
        """What to record as its origin (see [`portable_model_id`])."""
        return portable_model_id(self.name if self.name in EMBEDDED_MODELS else self.path)

    def checked(self, kind: str | None) -> "ModelRef":
        """This reference, if it is of `kind` as [`load_config`] means it (`None`: any).

        Raises:
            UnsupportedModelError: naming what it is and what was expected.
        """
        if kind == "checkpoint" and self.kind not in ("checkpoint", "adapter"):
            raise UnsupportedModelError(
                f"{self.name} is a {self.config.model_type!r} model, not a LinearPatch checkpoint; run "
                "`linearpatch prune` on it first."
            )
        if kind == "dense" and self.kind not in ("dense", "stock"):
            raise UnsupportedModelError(
                f"{self.name} is a {self.kind}, not a dense model: prune its dense model instead."
            )
        return self

    def placed(self, layerwise: bool) -> "ModelRef":
        """The same reference, marked as run layer by layer (or whole)."""
        return replace(self, layerwise=layerwise)


def open_model(name_or_path: "str | ModelRef", kind: str | None = None, check_files: bool = True) -> ModelRef:
    """Resolve a model input, read and check its config and (for a folder) its safetensors files, once: see
    [`resolve_model`], [`load_config`] and [`check_model_files`]; an opened `ModelRef` is returned as it is (after
    checking its kind).

    Args:
        name_or_path (`str` or `ModelRef`): `smollm2-135m`, a folder, an adapter folder or a Hub id.
        kind (`str`, *optional*): `dense`, `checkpoint`, `teacher` or `None` (either), as in [`load_config`].
        check_files (`bool`, *optional*, defaults to `True`): read a folder's safetensors headers (a loader that
            reads the weights next skips it: `from_pretrained` names a broken file itself).

    Raises:
        ModelNotFoundError, UnsupportedModelError, CheckpointMismatchError: naming the model and the fix.
    """
    if isinstance(name_or_path, ModelRef):
        return name_or_path.checked(kind)
    name = str(name_or_path)
    if _is_patch_adapter(name, kind):
        return _open_adapter(name)
    path = resolve_model(name)
    config = _read_config(name, path, kind)
    if check_files and Path(path).is_dir():
        SafetensorsCheckpoint(Path(path))
    if config.model_type in checkpoint_model_types():
        what = "checkpoint"
    else:
        what = "stock" if Path(path, EXPORT_RECORD).exists() else "dense"
    return ModelRef(name, path, config, what)


def resolve_model(name_or_path: "str | ModelRef") -> str:
    """Return a path or Hub id loadable by `from_pretrained`; embedded names are converted once and cached.

    Args:
        name_or_path (`str` or `ModelRef`): `smollm2-135m`, a local checkpoint folder, or a Hub repo id (an opened
            [`ModelRef`] gives its path without resolving it again).

    Raises:
        ModelNotFoundError: for a path that does not exist (and is not a Hub id).
    """
    if isinstance(name_or_path, ModelRef):
        return name_or_path.path
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


def portable_model_id(name_or_path: "str | ModelRef | None") -> str | None:
    """What to record as a model's origin so that another machine can resolve it: the Hub id of an embedded model
    (never its cache path), a Hub id as given, the repo of an HF cache snapshot, or the `base_model` a LinearPatch
    checkpoint folder records. `None` for a local folder with no Hub identity (pass `base_model=` then)."""
    if isinstance(name_or_path, ModelRef):
        return name_or_path.origin
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


def load_config(name_or_path: "str | ModelRef", kind: str | None = None):
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

    if isinstance(name_or_path, ModelRef):
        return name_or_path.checked(kind).config
    return _read_config(name_or_path, resolve_model(name_or_path), kind)


def _read_config(name_or_path: str, path: str, kind: str | None):
    """[`load_config`] of the model `name_or_path`, resolved to `path`."""
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


def _is_patch_adapter(name_or_path: "str | ModelRef", kind: str | None) -> bool:
    """Whether a model input is a patch adapter folder (a dense model or teacher never is one)."""
    if isinstance(name_or_path, ModelRef):
        return name_or_path.kind == "adapter"
    return (Path(str(name_or_path)) / ADAPTER_CONFIG).exists() and kind not in ("dense", "teacher")


def check_model_files(name_or_path: "str | ModelRef", kind: str | None = None):
    """Open and check a model input without loading its weights: its config and family (see [`load_config`]), and
    for a local folder its safetensors files (every shard present and as long as its header says, every index entry
    in its shard); for a patch adapter, the adapter's files and the checkpoint it belongs to. Commands run this on
    every model they are given before the first forward pass of any.

    Returns:
        The model's config (for an adapter: its base checkpoint's).

    Raises:
        ModelNotFoundError, UnsupportedModelError, CheckpointMismatchError: naming the model and the fix.
    """
    return open_model(name_or_path, kind).config


def _open_adapter(adapter_dir: str) -> ModelRef:
    """[`open_model`] of a patch adapter: its own files, the checkpoint it belongs to (a LinearPatch checkpoint whose
    files are complete), and that its patches fit that checkpoint's."""
    base = adapter_base(adapter_dir)
    try:
        opened = open_model(base, kind="checkpoint")
    except LinearPatchError as error:
        raise CheckpointMismatchError(
            f"The adapter {adapter_dir} names {base} as its base, which is not a usable LinearPatch checkpoint "
            f"({first_line(error)}). Save the adapter with `save_patch_adapter(model, folder, base=CHECKPOINT)` or "
            "`linearpatch distill --adapter-only`."
        ) from error
    check_adapter_folder(adapter_dir, base, opened.config)
    return ModelRef(adapter_dir, str(Path(adapter_dir).expanduser()), opened.config, "adapter", base=opened)


__all__ = [
    "MODEL_KINDS",
    "ModelRef",
    "check_model_files",
    "embedded_name_for",
    "load_config",
    "open_model",
    "portable_model_id",
    "resolve_model",
]
