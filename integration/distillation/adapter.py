"""A patch adapter knows which pruned checkpoint it belongs to.

PEFT only warns when an adapter's modules do not match the model it is loaded onto, and then merges nothing: a
patch trained for layers 20..24 silently does nothing on a model pruned at 12..16. Every adapter written by
linearpatch therefore carries `linearpatch_adapter.json` with its base's pruned layers, patch names and shapes, and a
hash of the base's patch weights, and every linearpatch load path checks it (adapters without the record are checked
by their weight names and shapes).
"""

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from linearpatch.common.errors import CheckpointMismatchError

ADAPTER_RECORD = "linearpatch_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@contextlib.contextmanager
def quiet_peft():
    """Silence the two warnings PEFT gives every time it wraps a LinearPatch model, neither of which is a problem:
    LN tuning on a non-norm module is "at your own risk" (a full trainable copy is exactly what a C x C patch wants),
    and PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def patch_weights(model) -> dict[str, torch.Tensor]:
    """The patch matrices of a plain (not PEFT-wrapped) LinearPatch model, by parameter name."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".linear_patch." in name}


def base_identity(model) -> dict:
    """What identifies a pruned checkpoint as an adapter's base: pruned layers, patch names and shapes, and the
    SHA-256 of its patch weights (computed in float32, names sorted)."""
    weights = patch_weights(model)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().float().contiguous().cpu().numpy().tobytes())
    return {
        "pruned_layers": list(model.config.pruned_layers),
        "patch_positions": list(model.config.patch_positions),
        "patch_shapes": {name: list(tensor.shape) for name, tensor in sorted(weights.items())},
        "patch_sha256": digest.hexdigest(),
    }


def _adapter_patch_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    """`model.layers.N.linear_patch.weight` -> shape, read from the adapter's safetensors header."""
    shapes = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as weights:
        for key in weights.keys():
            marker = key.find("model.layers.") if "model.layers." in key else key.find("model.norm.")
            if ".linear_patch." in key and marker >= 0:
                name = key[marker:].split(".linear_patch.")[0] + ".linear_patch.weight"
                shapes[name] = list(weights.get_slice(key).get_shape())
    return shapes


def check_adapter_base(adapter_dir: str | Path, base_model) -> None:
    """Refuse to use the adapter in `adapter_dir` with `base_model` unless it was trained on that base.

    Raises:
        CheckpointMismatchError: naming what differs and what to do.
    """
    adapter_dir = Path(adapter_dir)
    identity = base_identity(base_model)
    record_path = adapter_dir / ADAPTER_RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        for key, label in (
            ("pruned_layers", "pruned layers"),
            ("patch_shapes", "patch modules"),
            ("patch_sha256", "patch weights (hash)"),
        ):
            if record.get(key) != identity[key]:
                raise CheckpointMismatchError(
                    f"The adapter {adapter_dir} was trained on a different pruned model: its base had {label} "
                    f"{_short(record.get(key))}, this one has {_short(identity[key])}. Load it onto the checkpoint it "
                    f"was distilled from ({record.get('base_model') or record.get('base_model_path')})."
                )
        return
    shapes = _adapter_patch_shapes(adapter_dir)
    if shapes != identity["patch_shapes"]:
        raise CheckpointMismatchError(
            f"The adapter {adapter_dir} holds patches {_short(shapes)} but the model has "
            f"{_short(identity['patch_shapes'])}: it belongs to a differently pruned model. Load it onto the "
            "checkpoint it was trained on."
        )


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def write_adapter_record(folder: str | Path, identity: dict, base_model: str | None, base_model_path: str) -> None:
    """Write `linearpatch_adapter.json` (see module docstring) into an adapter folder."""
    record = dict(identity, base_model=base_model, base_model_path=base_model_path)
    (Path(folder) / ADAPTER_RECORD).write_text(json.dumps(record, indent=2))


def load_patch_adapter(adapter_dir: str | Path, base: str | None = None, dtype=torch.float32, device: str = "cpu"):
    """Load a LinearPatch checkpoint, check that the adapter in `adapter_dir` belongs to it, and merge the adapter.

    Args:
        adapter_dir (`str` or `Path`): a folder written by `linearpatch distill --adapter-only`.
        base (`str`, *optional*): the pruned checkpoint (default: the one the adapter records).

    Returns:
        `tuple[LinearPatchForCausalLM, tokenizer]`: the merged model, in eval mode.
    """
    from peft import PeftModel

    from ..models import load_model

    adapter_dir = Path(adapter_dir)
    record_path = adapter_dir / ADAPTER_RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    candidates = [base] if base else [record.get("base_model_path"), record.get("base_model")]
    candidates.append(config.get("base_model_name_or_path"))
    source = next((c for c in candidates if c and (Path(c).exists() or "/" in c)), None)
    if source is None:
        raise CheckpointMismatchError(
            f"The adapter {adapter_dir} does not say which checkpoint it belongs to; pass it."
        )
    model, tokenizer = load_model(source, dtype=dtype, device=device, kind="checkpoint")
    check_adapter_base(adapter_dir, model)
    with quiet_peft():
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.eval(), tokenizer


__all__ = [
    "ADAPTER_RECORD",
    "base_identity",
    "check_adapter_base",
    "load_patch_adapter",
    "patch_weights",
    "write_adapter_record",
]
