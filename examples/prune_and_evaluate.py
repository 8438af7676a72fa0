"""Prune a model with LinearPatch and compare it with the dense model, from Python: what `linearpatch prune` and
`linearpatch eval` do, as two calls a script can build on.

    python examples/prune_and_evaluate.py [--model smollm2-135m] [--num-layers 5] [--output pruned]

It shows:

1. `prune_checkpoint`: the dense model by name (or folder, or Hub id), a block of `--num-layers` chosen by the cosine
   metric, the default patch (`auto`: every patch kind and none, scored on held-out calibration windows), written to
   `--output` with its report;
2. `compare_models`: dense and pruned side by side on held-out text (perplexity, KL and top-1 agreement to dense) and
   an offline lm-eval task, written as JSON and Markdown beside the checkpoint.

Set `LINEARPATCH_QUICK=1` for smoke-test sizes.
"""

import argparse

from linearpatch.integration.evaluation import compare_models
from linearpatch.integration.pruning import prune_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-layers", type=int, default=5)
    parser.add_argument("--output", default="pruned")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    args = parser.parse_args()

    report = prune_checkpoint(args.model, args.output, num_layers=args.num_layers, overwrite=args.overwrite)
    print(report.summary())
    comparison = compare_models(
        [args.output],
        args.model,
        tasks=["wiki_next_sentence"],
        limit=20,
        output=f"{args.output}/evaluation",
        overwrite=args.overwrite,
    )
    print(comparison.table)


if __name__ == "__main__":
    main()
