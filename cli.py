"""The `linearpatch` command line: prune, distill, eval, report, push, pull."""

import argparse
import sys

import torch

DEVICE_DEFAULTS = {"cpu": dict(num_samples=32, seq_len=512), "cuda": dict(num_samples=128, seq_len=2048)}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def cmd_prune(args: argparse.Namespace) -> int:
    from linearpatch.integration.checkpoints import check_output, save_checkpoint
    from linearpatch.integration.evaluation import corpus_perplexity
    from linearpatch.integration.models import base_model_id, load_model
    from linearpatch.integration.prune import prune
    from linearpatch.integration.selection import parse_layers

    check_output(args.output, args.overwrite)
    device = args.device or _default_device()
    defaults = DEVICE_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    pruned, report = prune(
        model,
        tokenizer,
        num_layers=args.num_layers,
        layers=parse_layers(args.layers) if args.layers else None,
        metric=args.metric,
        patch=args.patch,
        calibration=args.calibration,
        num_samples=args.num_samples or defaults["num_samples"],
        seq_len=args.seq_len or defaults["seq_len"],
        seed=args.seed,
        batch_size=args.batch_size,
        base_model=base_model_id(args.model),
    )
    if args.eval_windows:
        for name, candidate in (("dense", model), ("pruned", pruned)):
            report.evaluation[name] = {
                source: corpus_perplexity(candidate, tokenizer, source, args.eval_windows, args.eval_seq_len)
                for source in args.eval_corpus
            }
    save_checkpoint(pruned, tokenizer, args.output, args.overwrite, {"linearpatch_report.json": report.to_json()})
    if args.plots:
        from linearpatch.integration.data import token_windows
        from linearpatch.integration.plots import write_report_plots

        windows = token_windows("wikipedia-eval", tokenizer, 8, min(256, args.seq_len or 256), seed=args.seed)
        write_report_plots(model, pruned, windows.input_ids, args.output)
    print(f"Pruned layers {report.pruned_layers} of {report.num_dense_layers} ({report.metric}, patch {report.patch})")
    if report.candidate_scores:
        best = sorted(report.candidate_scores.items(), key=lambda item: item[1], reverse=args.metric == "cosine")[:5]
        print("Top candidates:", ", ".join(f"{start}: {score:.4f}" for start, score in best))
    for name, values in report.evaluation.items():
        print(f"  {name:>6} perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    print(f"Saved to {args.output} (report: linearpatch_report.json)")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from linearpatch.integration.checkpoints import atomic_directory, check_output
    from linearpatch.integration.data import token_windows
    from linearpatch.integration.distill import build_cache_in_subprocess, distill
    from linearpatch.integration.models import cache_dir, load_model

    check_output(args.output, args.overwrite)
    device = args.device or _default_device()
    # The student (pruned checkpoint) is the only model this process loads; the teacher runs in a child process.
    student, tokenizer = load_model(args.checkpoint, dtype=args.dtype, device=device)
    if student.config.model_type != "linearpatch_llama":
        raise ValueError(f"{args.checkpoint} is not a LinearPatch checkpoint; run `linearpatch prune` first.")
    windows = token_windows(args.data, tokenizer, args.num_samples, args.seq_len, seed=args.seed)
    cache_root = Path(args.cache_dir) if args.cache_dir else cache_dir() / "teacher-cache"
    cache = build_cache_in_subprocess(args.teacher, windows.input_ids, cache_root, args.top_k, device, args.dtype)
    work_dir = Path(args.work_dir or f"{args.output}.work")
    overrides = dict(
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        use_cpu=device == "cpu",
    )
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    model = distill(
        student, cache, work_dir, args.temperature, resume_from_checkpoint=args.resume or None, **overrides
    )
    recipe = dict(
        teacher=args.teacher,
        top_k=args.top_k,
        data=windows.describe(),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        temperature=args.temperature,
        cache=cache.manifest["key"],
        bytes_per_token=cache.bytes_per_token,
    )
    with atomic_directory(args.output, args.overwrite) as staging:
        if args.adapter_only:
            model.peft_config["default"].base_model_name_or_path = args.checkpoint
            model.save_pretrained(staging)
        else:
            merged = model.merge_and_unload()
            merged.config.patch_kind = f"{merged.config.patch_kind or 'hadamard'}+distilled"
            merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "linearpatch_distill.json").write_text(json.dumps(recipe, indent=2))
    kind = "adapter" if args.adapter_only else "merged checkpoint"
    print(
        f"Distilled {cache.num_windows} windows ({cache.bytes_per_token} cache bytes/token); {kind} in {args.output}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from linearpatch.integration.checkpoints import check_output, write_files_atomically
    from linearpatch.integration.report import comparison, evaluate_model, markdown_table, to_json

    names = {"linearpatch_eval.json", "linearpatch_eval.md"}
    if args.output:
        for name in names:
            check_output(Path(args.output) / name, args.overwrite)
    options = dict(
        tasks=args.tasks,
        limit=args.limit or None,
        corpora=args.ppl_corpus,
        perplexity_windows=args.ppl_windows,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
    )
    baseline = evaluate_model(args.baseline, **options)
    evaluations = [evaluate_model(name, **options) for name in args.models]
    data = comparison(evaluations, baseline)
    data["settings"] = {key: value for key, value in options.items() if key not in ("device",)}
    table = markdown_table(data)
    print(table)
    if args.output:
        # Into any folder, a checkpoint's own included: `linearpatch push` puts the table on the model card.
        write_files_atomically(
            args.output, {"linearpatch_eval.json": to_json(data), "linearpatch_eval.md": table}, args.overwrite
        )
        print(f"Wrote linearpatch_eval.json and linearpatch_eval.md to {args.output}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from linearpatch.integration.data import token_windows
    from linearpatch.integration.models import embedded_name_for, load_model
    from linearpatch.integration.plots import write_report_plots

    patched, tokenizer = load_model(args.checkpoint, dtype="float32", device=args.device)
    if patched.config.model_type != "linearpatch_llama":
        raise ValueError(f"{args.checkpoint} is not a LinearPatch checkpoint.")
    dense_name = args.dense or embedded_name_for(patched.config.base_model)
    if not dense_name:
        raise ValueError("The checkpoint does not record its dense model; pass --dense MODEL.")
    dense, _ = load_model(dense_name, dtype="float32", device=args.device)
    windows = token_windows(args.data, tokenizer, args.num_samples, args.seq_len, seed=args.seed)
    write_report_plots(dense, patched, windows.input_ids, args.checkpoint)
    print(
        "Wrote cosine_heatmap.png, layer_magnitudes.png, cut_mismatch.png and linearpatch_plots.json "
        f"to {args.checkpoint}"
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from linearpatch.hub_tools import push_to_hub

    url = push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        base_model=args.base_model,
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from linearpatch.hub_tools import pull

    print(pull(args.repo_id, args.local_dir, revision=args.revision))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from linearpatch import __version__

    parser = argparse.ArgumentParser(
        prog="linearpatch",
        description="Prune decoder layers of Llama-family LLMs and revive them with LinearPatch.",
    )
    parser.add_argument("--version", action="version", version=f"linearpatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prune = commands.add_parser("prune", help="drop layers and fit a training-free LinearPatch per gap")
    prune.add_argument("model", help="dense model: smollm2-135m (embedded), a local folder, or a Hub id")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--num-layers", type=int, help="how many layers to drop (chosen by --metric)")
    which.add_argument("--layers", help="explicit layers, e.g. 20-24 or 3,7,9 (dense indices)")
    prune.add_argument("--metric", default="cosine", choices=["cosine", "angular", "block-influence"])
    prune.add_argument("--patch", default="hadamard", choices=["hadamard", "diag", "scalar", "lstsq", "none"])
    prune.add_argument("--calibration", default="wikipedia-calibration", help="embedded corpus, file or datasets name")
    prune.add_argument("--num-samples", type=int, help="calibration windows (default 32 on CPU, 128 on GPU)")
    prune.add_argument("--seq-len", type=int, help="tokens per window (default 512 on CPU, 2048 on GPU)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--batch-size", type=int, default=1)
    prune.add_argument("--eval-windows", type=int, default=0, help="also report held-out perplexity on N windows")
    prune.add_argument("--eval-seq-len", type=int, default=512)
    prune.add_argument("--eval-corpus", nargs="+", default=["wikipedia-eval", "lee-news"])
    prune.add_argument("--plots", action="store_true", help="also write the report plots (see `linearpatch report`)")
    prune.add_argument("--output", required=True, help="checkpoint folder to write")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_model_options(prune)
    prune.set_defaults(handler=cmd_prune)

    distill = commands.add_parser("distill", help="train only the patches from the dense model's top-K logits")
    distill.add_argument("checkpoint", help="a LinearPatch checkpoint (from `linearpatch prune`)")
    distill.add_argument("--teacher", required=True, help="the dense model (run once, in a separate process)")
    distill.add_argument("--output", required=True)
    distill.add_argument("--top-k", type=int, default=100)
    distill.add_argument("--data", default="wikipedia-calibration", help="training text (embedded, file, datasets)")
    distill.add_argument("--num-samples", type=int, default=256, help="training windows (paper: 5000)")
    distill.add_argument("--seq-len", type=int, default=512, help="tokens per window (paper: 2048)")
    distill.add_argument("--epochs", type=float, default=1.0)
    distill.add_argument("--lr", type=float, default=1e-4)
    distill.add_argument("--batch-size", type=int, default=1)
    distill.add_argument("--gradient-accumulation-steps", type=int, default=1)
    distill.add_argument("--max-steps", type=int, default=0)
    distill.add_argument("--temperature", type=float, default=1.0)
    distill.add_argument("--seed", type=int, default=1, help="window sampling and training seed")
    distill.add_argument("--bf16", action="store_true")
    distill.add_argument("--activation-checkpointing", action="store_true")
    distill.add_argument("--save-steps", type=int, default=0, help="Trainer checkpoint every N steps (for --resume)")
    distill.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --work-dir")
    distill.add_argument("--work-dir", help="Trainer checkpoints (default: OUTPUT.work)")
    distill.add_argument("--cache-dir", help="teacher cache root (default: ~/.cache/linearpatch/teacher-cache)")
    distill.add_argument("--adapter-only", action="store_true", help="write only the PEFT adapter, not merged")
    distill.add_argument("--overwrite", action="store_true")
    _add_model_options(distill)
    distill.set_defaults(handler=cmd_distill)

    evaluate = commands.add_parser("eval", help="compare models: lm-eval accuracy, retained performance, perplexity")
    evaluate.add_argument("models", nargs="+", help="models to compare (folders, Hub ids, smollm2-135m)")
    evaluate.add_argument("--baseline", required=True, help="the dense model")
    evaluate.add_argument(
        "--tasks",
        nargs="*",
        default=["wiki_next_sentence", "mmlu_dev_offline"],
        help="lm-eval tasks: the offline ones, or lm-eval names (arc_easy, piqa, ...) with Hub access",
    )
    evaluate.add_argument("--limit", type=int, default=200, help="documents per task (0 = all)")
    evaluate.add_argument("--ppl-corpus", nargs="*", default=["wikipedia-eval", "lee-news"])
    evaluate.add_argument("--ppl-windows", type=int, default=16)
    evaluate.add_argument("--seq-len", type=int, default=512, help="perplexity window length (paper: 2048)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument(
        "--output", help="folder for linearpatch_eval.json/.md (a checkpoint folder: push shows it on the card)"
    )
    evaluate.add_argument("--overwrite", action="store_true")
    _add_model_options(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    report = commands.add_parser("report", help="write the selection heatmap and magnitude plots next to a checkpoint")
    report.add_argument("checkpoint")
    report.add_argument("--dense", help="the dense model (default: the checkpoint's base_model when available)")
    report.add_argument("--data", default="wikipedia-eval")
    report.add_argument("--num-samples", type=int, default=8)
    report.add_argument("--seq-len", type=int, default=256)
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--device", default=None)
    report.set_defaults(handler=cmd_report)

    push = commands.add_parser("push", help="validate a checkpoint or adapter, write its card, push in one commit")
    push.add_argument("folder")
    push.add_argument("repo_id", help="org/name")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch (default main)")
    push.add_argument("--commit-message")
    push.add_argument("--base-model", help="Hub id of the model it was made from (required for a local adapter)")
    push.set_defaults(handler=cmd_push)

    pull = commands.add_parser("pull", help="download, verify and summarise a LinearPatch repo (works offline)")
    pull.add_argument("repo_id")
    pull.add_argument("local_dir", nargs="?", help="copy into this folder instead of only the HF cache")
    pull.add_argument("--revision")
    pull.set_defaults(handler=cmd_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return args.handler(args)
    except (ValueError, FileExistsError, RuntimeError, HfHubHTTPError) as error:
        print(f"linearpatch {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
