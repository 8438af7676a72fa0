"""The patch adapter, a checkpoint format: a PEFT adapter holding only the patches of a pruned checkpoint, which knows
the checkpoint it belongs to. (Loading one onto its base is `models.load_model`'s; training one is distillation's.)

PEFT only warns when an adapter's modules do not match the model it is loaded onto, and then merges nothing: a
patch trained for layers 20..24 silently does nothing on a model pruned at 12..16. Every adapter written by
linearpatch therefore carries `linearpatch_adapter.json` with its base's pruned layers, patch names and shapes, and a
hash of the base's patch weights, and every linearpatch load path checks it (adapters without the record are checked
by their weight names and shapes).
"""

import contextlib
import hashlib
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from linearpatch.common.errors import CheckpointMismatchError
from linearpatch.common.names import ADAPTER_CONFIG, ADAPTER_RECORD, ADAPTER_WEIGHTS

from .shards import read_header


@contextlib.contextmanager
def quiet_peft():
    """Silence the two warnings PEFT gives every time it wraps a LinearPatch model, neither of which is a problem:
    LN tuning on a non-norm module is "at your own risk" (a full trainable copy is exactly what a C x C patch wants),
    and PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


_PATCH_KEY = re.compile(r"(model\.(?:layers\.\d+|norm))\.linear_patch\.")


def canonical_patch_name(key: str) -> str | None:
    """`model.layers.N.linear_patch.weight` (or `model.norm...`) for any key of that patch: PEFT-prefixed, the base
    layer of an LN-tuning wrapper, or its trained copy; `None` for a key of anything else."""
    match = _PATCH_KEY.search(key)
    return f"{match[1]}.linear_patch.weight" if match else None


def patch_weights(model, trained: bool = False) -> dict[str, torch.Tensor]:
    """The patch matrices of a LinearPatch model, plain or PEFT-wrapped, by canonical name (see
    [`canonical_patch_name`]): the model's own, or with `trained=True` the adapter's trained copies."""
    weights = {}
    for key, tensor in model.state_dict().items():
        name = canonical_patch_name(key)
        if name is not None and (".ln_tuning_layers." in key) == trained:
            weights[name] = tensor
    return weights


def base_identity(model) -> dict:
    """What identifies a pruned checkpoint as an adapter's base: pruned layers, patch names and shapes, and the
    SHA-256 of its patch weights (computed in float32, names sorted). `model` may already be PEFT-wrapped: its base
    layers are the checkpoint's patches."""
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
            name = canonical_patch_name(key)
            if name is not None:
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


def adapter_card(identity: dict, base_model: str | None, recipe: dict | None = None) -> str:
    """The model card of a patch adapter: what it is, which checkpoint it belongs to, and how to load it."""
    metadata = ["---", *([f"base_model: {base_model}"] if base_model else []), "library_name: peft", "tags:"]
    metadata += ["- linearpatch", "- layer-pruning", "---", ""]
    base = base_model or "the LinearPatch checkpoint it was trained on (see `linearpatch_adapter.json`)"
    gaps = ", ".join(name.removesuffix(".linear_patch.weight") for name in identity["patch_shapes"])
    lines = [
        *metadata,
        "# LinearPatch adapter",
        "",
        f"Distilled LinearPatch matrices for {base}: pruned layers {identity['pruned_layers']}, one patch per gap "
        f"({gaps}). Only the patches are stored; merged, they replace the checkpoint's own.",
        "",
    ]
    if recipe:
        shown = {key: recipe[key] for key in sorted(recipe) if key != "log"}
        lines += [f"Recipe: `{json.dumps(shown)}`", ""]
    lines += [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model or "PRUNED_CHECKPOINT"}", trust_remote_code=True)',
        'model = PeftModel.from_pretrained(base, "THIS_ADAPTER").merge_and_unload()',
        "```",
        "",
        "With linearpatch installed, `linearpatch eval THIS_ADAPTER` and `load_patch_adapter` first check that the "
        "adapter belongs to its base (its pruned layers and a hash of the base's patches must match).",
        "",
    ]
    return "\n".join(lines)


def write_adapter(
    peft_model,
    folder: str | Path,
    identity: dict,
    base_model: str | None,
    base_model_path: str,
    recipe: dict | None = None,
) -> None:
    """Save a trained patch adapter into an existing (staging) folder: the PEFT adapter whose
    `base_model_name_or_path` is the pruned checkpoint, `linearpatch_adapter.json` and a model card."""
    peft_model.peft_config["default"].base_model_name_or_path = base_model or base_model_path
    with quiet_peft():
        peft_model.save_pretrained(folder)
    write_adapter_record(folder, identity, base_model, base_model_path)
    (Path(folder) / "README.md").write_text(adapter_card(identity, base_model, recipe))


def adapter_base(adapter_dir: str | Path, base: str | None = None) -> str:
    """The pruned checkpoint an adapter belongs to: `base` if given, else the one its `linearpatch_adapter.json`
    records (local path first, then Hub id), else its PEFT `base_model_name_or_path`.

    Raises:
        CheckpointMismatchError: when it names none.
    """
    adapter_dir = Path(adapter_dir)
    record_path = adapter_dir / ADAPTER_RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    candidates = [base] if base else [record.get("base_model_path"), record.get("base_model")]
    candidates.append(config.get("base_model_name_or_path"))
    source = next((c for c in candidates if c and (Path(c).exists() or "/" in c)), None)
    if source is None:
        raise CheckpointMismatchError(
            f"The adapter {adapter_dir} does not say which checkpoint it belongs to; pass it."
        )
    return source


def _expected_patch_shapes(config) -> dict[str, list[int]]:
    """The patch names and shapes a checkpoint's config promises (what an adapter for it must hold)."""
    shapes = {}
    for position in config.patch_positions:
        owner = f"model.layers.{position}" if position < config.num_hidden_layers else "model.norm"
        shapes[f"{owner}.linear_patch.weight"] = [config.hidden_size, config.hidden_size]
    return shapes


def check_adapter_folder(adapter_dir: str | Path, base: str, base_config) -> None:
    """Check an adapter folder's own files against the config of the checkpoint it names (`base`), without loading
    any weights: the weights file is there and whole, and its patches are the ones that checkpoint has.

    Raises:
        CheckpointMismatchError: naming what is wrong and what to do.
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointMismatchError(f"The adapter {adapter_dir} has no {ADAPTER_WEIGHTS}: save it again.")
    read_header(weights)  # a truncated or corrupt file fails here
    shapes, expected = _adapter_patch_shapes(adapter_dir), _expected_patch_shapes(base_config)
    record_path = adapter_dir / ADAPTER_RECORD
    recorded = json.loads(record_path.read_text()).get("pruned_layers") if record_path.exists() else None
    if shapes != expected or (recorded is not None and recorded != list(base_config.pruned_layers)):
        raise CheckpointMismatchError(
            f"The adapter {adapter_dir} holds patches {_short(shapes)} but its base {base} has {_short(expected)}: it "
            "belongs to a differently pruned model. Load it onto the checkpoint it was trained on."
        )


def merge_patch_adapter(model, adapter_dir: str | Path):
    """`model` (the adapter's base checkpoint, loaded) with the adapter in `adapter_dir` merged, after checking that
    the adapter was trained on it (see [`check_adapter_base`]). In eval mode."""
    from peft import PeftModel

    check_adapter_base(adapter_dir, model)
    with quiet_peft():
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.eval()


__all__ = [
    "adapter_card",
    "adapter_base",
    "base_identity",
    "canonical_patch_name",
    "check_adapter_base",
    "check_adapter_folder",
    "merge_patch_adapter",
    "patch_weights",
    "write_adapter",
    "write_adapter_record",
]
