"""Run as a script: load checkpoints with trust_remote_code in a process where `linearpatch` cannot be imported.

This is how a user without the package sees a checkpoint; `checkpoints.logits_without_package` runs it by file path
(never as `linearpatch.…`, which would import the package). It imports only torch, safetensors and transformers.

usage: load_without_package.py INPUTS.safetensors OUTPUTS.safetensors CHECKPOINT [CHECKPOINT ...]
"""

import importlib.abc
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


def main() -> None:
    inputs, outputs, *checkpoints = sys.argv[1:]
    try:
        import linearpatch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("linearpatch is importable; the test would prove nothing")
    input_ids = load_file(inputs)["input_ids"]
    results = {}
    for index, checkpoint in enumerate(checkpoints):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
        assert "linearpatch" not in type(model).__module__.split(".")[0], type(model).__module__
        assert model.config.model_type == "linearpatch_llama", model.config.model_type
        for name, parameter in model.named_parameters():
            if "linear_patch" in name and model.config.keep_patch_in_fp32:
                assert parameter.dtype == torch.float32, (name, parameter.dtype)
        with torch.no_grad():
            results[f"logits_{index}"] = model(input_ids).logits.float().contiguous()
    save_file(results, outputs)
    assert not any(name == "linearpatch" or name.startswith("linearpatch.") for name in sys.modules)


if __name__ == "__main__":
    main()
