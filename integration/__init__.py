"""What linearpatch does with models, one room per concept:

- `models`, `data`, `defaults`: resolving, validating, loading and saving models; text and token windows; default
  sizes;
- `pruning`: the calibration pass, block selection, patch estimation, `prune` and `prune_checkpoint`;
- `distillation`: the teacher cache, the patch-only adapter and Trainer, `distill_checkpoint`;
- `evaluation`: perplexity, lm-eval tasks, `compare_models`, figures.

Each `linearpatch` command calls one function here and prints what it returns.
"""
