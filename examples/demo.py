"""The main job on the embedded default model (SmolLM2-135M): prune, compare, save, reload without the package.

    python examples/demo.py [--layers 20-24 | --num-layers 5] [--output outputs/smollm2-linearpatch]

1. Calibrate on Wikipedia articles (64 x 512 tokens) and remove the layers (default: 20..24, a hard case).
2. Held-out perplexity of dense / plain-pruned / LinearPatch (the paper's Hadamard patch) / `--patch auto` (the
   default: every patch kind and none, scored on held-out calibration windows) models, side by side, on Wikipedia
   articles not used for calibration and on the Lee news corpus.
3. Save the default (auto) checkpoint and reload it with `trust_remote_code=True` in a process that cannot import
   linearpatch; check that its logits equal the in-memory model's.
"""

import argparse

import torch

import linearpatch
from linearpatch.common.files import check_output
from linearpatch.common.remote_check import logits_without_package
from linearpatch.common.reporting import values_table
from linearpatch.integration.data import token_windows
from linearpatch.integration.measurement.perplexity import chunked_perplexity
from linearpatch.integration.models import DEFAULT_MODEL
from linearpatch.integration.pruning.selection import parse_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layers", default="20-24")
    parser.add_argument("--num-layers", type=int, help="choose this many layers by the cosine metric instead")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--output", default="outputs/smollm2-linearpatch")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    args = parser.parse_args()

    check_output(args.output, args.overwrite)
    model, tokenizer = linearpatch.load_model(args.model)
    calibration = token_windows("wikipedia-calibration", tokenizer, args.num_samples, args.seq_len, seed=0)
    layers = None if args.num_layers else parse_layers(args.layers)
    hadamard, hadamard_report = linearpatch.prune(
        model, tokenizer, num_layers=args.num_layers, layers=layers, patch="hadamard", calibration=calibration
    )
    layers = hadamard_report.pruned_layers  # the same cut for the default, whose held-out split moves the cosine
    patched, report = linearpatch.prune(model, tokenizer, layers=layers, calibration=calibration)
    plain = linearpatch.prune_layers(model, layers, add_patches=False)
    print(
        f"\nRemoved layers {layers} of {report.num_dense_layers} ({hadamard_report.metric}); one patch per gap "
        f"{report.gaps}: the paper's Hadamard LinearPatch, and the default --patch auto (kept: {report.patch_kind})"
    )

    corpora = ("wikipedia-eval", "lee-news")
    evaluation = {c: token_windows(c, tokenizer, args.eval_windows, args.seq_len, sampling="chunked") for c in corpora}
    rows = {
        name: {c: chunked_perplexity(m, w, progress=True) for c, w in evaluation.items()}
        for name, m in (("dense", model), ("plain pruned", plain), ("LinearPatch", hadamard), ("auto", patched))
    }
    print(
        f"\nHeld-out perplexity ({args.eval_windows} x {args.seq_len} tokens per corpus, "
        "text not used for calibration)"
    )
    print(values_table(rows))
    for c in corpora:
        gains = (rows["plain pruned"][c] / rows[name][c] for name in ("LinearPatch", "auto"))
        print(f"LinearPatch and auto improve plain pruning {next(gains):.2f}x and {next(gains):.2f}x on {c}")

    report.evaluation = rows
    linearpatch.save_checkpoint(patched, tokenizer, args.output, args.overwrite, report=report)
    input_ids = evaluation["wikipedia-eval"].input_ids[:1, :128]
    with torch.no_grad():
        expected = patched(input_ids).logits
    (reloaded,) = logits_without_package([args.output], input_ids)
    difference = (expected - reloaded).abs().max().item()
    status = "OK" if difference <= 1e-5 else "FAILED"
    print(
        f"\nReload check ({args.output}, trust_remote_code=True, linearpatch not importable): "
        f"max |logits difference| = {difference:.2e} -> {status}"
    )
    if status != "OK":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
