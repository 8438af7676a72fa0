"""Run as a script: load checkpoints with trust_remote_code in a process where `linearpatch` cannot be imported.

This is how a user without the package sees a checkpoint; `remote_check.logits_without_package` runs it by file path
(never as `linearpatch.…`, which would import the package). It imports only torch, safetensors and transformers.

usage: load_without_package.py INPUTS.safetensors OUTPUTS.safetensors CHECKPOINT [CHECKPOINT ...]
       load_without_package.py --import-only CHECKPOINT
A CHECKPOINT is loaded with AutoModelForCausalLM and trust_remote_code, unless prefixed:
  `adapter:PATH_OR_REPO`  a PEFT adapter, loaded with AutoPeftModelForCausalLM and merged;
  `base-bf16:PATH`        the base model (AutoModel, as vLLM builds it) in bf16; its last hidden state is returned;
  `stock:PATH`            an exported stock-architecture folder, loaded *without* trust_remote_code.
"""

import importlib.abc
import importlib.util
import sys


class _BlockLinearpatch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "linearpatch" or name.startswith("linearpatch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this process must not see the package)")
        return None


sys.meta_path.insert(0, _BlockLinearpatch())

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def import_only(checkpoint: str) -> None:
    """Resolve every auto_map class of a local checkpoint (config and modeling files), without loading weights."""
    import json
    from pathlib import Path

    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = json.loads((Path(checkpoint) / "config.json").read_text())["auto_map"]
    for reference in auto_map.values():
        get_class_from_dynamic_module(reference, checkpoint)


def main() -> None:
    try:  # the blocker above refuses it; finding it would mean the package leaks into this process
        importlib.util.find_spec("linearpatch")
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("linearpatch is importable; the check would prove nothing")
    if sys.argv[1] == "--import-only":
        import_only(sys.argv[2])
        return
    inputs, outputs, *checkpoints = sys.argv[1:]
    input_ids = load_file(inputs)["input_ids"]
    results = {}
    for index, checkpoint in enumerate(checkpoints):
        kind, _, target = checkpoint.partition(":")
        if kind not in ("adapter", "base-bf16", "stock"):
            kind, target = "model", checkpoint
        if kind == "adapter":  # a PEFT adapter of a LinearPatch checkpoint, loaded with stock PEFT
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(target, trust_remote_code=True).merge_and_unload()
        elif kind == "base-bf16":
            from transformers import AutoModel

            model = AutoModel.from_pretrained(target, trust_remote_code=True, dtype=torch.bfloat16)
        elif kind == "stock":
            model = AutoModelForCausalLM.from_pretrained(target)
            assert not model.config.model_type.startswith("linearpatch_") and not getattr(
                model.config, "auto_map", None
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True)
        model.eval()
        assert "linearpatch" not in type(model).__module__.split(".")[0], type(model).__module__
        if kind != "stock":
            assert model.config.model_type.startswith("linearpatch_"), model.config.model_type
            for name, parameter in model.named_parameters():
                if "linear_patch" in name and model.config.keep_patch_in_fp32:
                    assert parameter.dtype == torch.float32, (name, parameter.dtype)
        with torch.no_grad():
            output = model(input_ids)
        values = output.last_hidden_state if kind == "base-bf16" else output.logits
        results[f"logits_{index}"] = values.float().contiguous()
    save_file(results, outputs)
    assert not any(name == "linearpatch" or name.startswith("linearpatch.") for name in sys.modules)


if __name__ == "__main__":
    main()
