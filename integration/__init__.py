"""The library's core: what linearpatch does with models, one room per concept (README, Layout, for the layers):

- `requests`: each command's options and defaults (one dataclass per command; the CLI's flags map onto them);
- `models`, `adapter`, `data`, `defaults`, `shards`, `layerwise`, `opening`: resolving, checking, loading and saving
  checkpoints (the patch adapter format included); text and token windows; default sizes; safetensors shards;
  running a model larger than memory layer by layer; the checks every job opens with;
- `measurement`: the calibration pass over the dense model, the Hadamard transform, perplexity;
- `pruning`: block selection, patch estimation, the outcome search, and the `prune` job;
- `distillation`: the teacher cache, the patch-only adapter's Trainer, and the `distill` job;
- `evaluation`: lm-eval tasks, `compare_models`, figures;
- `export` and `serving`: the stock-architecture export and vLLM.

Each `linearpatch` command builds its request, calls one job here and prints the report it returns.
"""
