"""The `linearpatch` command line: prune, distill, eval, report, export, serve, push, pull.

Each command parses its options, calls one function (in `linearpatch.integration` or `linearpatch.hub_tools`) and
prints what it returns. Bad input ends with one line on stderr that names the problem and the fix (exit 2); an
interrupt (Ctrl-C, SIGTERM) says what was and was not written (exit 130).
"""

import argparse
import os
import signal
import sys


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (`--num-samples 0` is a mistake, not a request for the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 switches the feature off)."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, unless the help text already says it (or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # `is`, not `in`: 0 == False, and a default of 0 is worth showing.
        shown = action.option_strings and not any(action.default is x for x in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


# Each command's flags map onto the fields of its request (`linearpatch.integration.requests`), by name; these are the
# flags whose name differs from their field's.
RENAMED_FLAGS = {
    "prune": {"eval_corpus": "eval_corpora"},
    "distill": {"eval_corpus": "eval_corpora"},
    "eval": {"ppl_corpus": "corpora", "ppl_windows": "perplexity_windows"},
    "export": {"eval_corpus": "eval_corpora"},
}


def request_fields(command: str, request_class, dests) -> dict[str, str]:
    """Flag dest -> the request field it sets, for each of `dests` that sets one."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(request_class)}
    renamed = RENAMED_FLAGS[command]
    return {dest: renamed.get(dest, dest) for dest in dests if renamed.get(dest, dest) in names}


def request_from(args: argparse.Namespace, command: str, request_class, **converted):
    """The request the parsed flags make: each flag's value under its field's name, then the fields the CLI converts
    (e.g. `--layers 20-24` into a list)."""
    fields = request_fields(command, request_class, vars(args))
    return request_class(**({field: getattr(args, dest) for dest, field in fields.items()} | converted))


def take_defaults(parser: argparse.ArgumentParser, command: str, request_class) -> None:
    """A command's defaults are its request's: each flag's default is read from the field it sets (a tuple shown as
    a list, as argparse gives it back), so that the CLI restates none of them."""
    import dataclasses

    defaults = {field.name: field.default for field in dataclasses.fields(request_class)}
    fields = request_fields(command, request_class, [action.dest for action in parser._actions])
    for action in parser._actions:
        default = defaults.get(fields.get(action.dest), dataclasses.MISSING)
        if action.option_strings and default is not dataclasses.MISSING:
            action.default = list(default) if isinstance(default, tuple) else default


def cmd_prune(args: argparse.Namespace) -> int:
    from linearpatch.integration.pruning import parse_layers, prune_checkpoint
    from linearpatch.integration.requests import PruneRequest

    layers = parse_layers(args.layers) if args.layers else None
    report = prune_checkpoint(**request_from(args, "prune", PruneRequest, layers=layers).options())
    print(report.summary())
    print(f"Saved to {report.output} (report: linearpatch_report.json{', plots' if args.plots else ''})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from linearpatch.integration.distillation import distill_checkpoint
    from linearpatch.integration.requests import DistillRequest

    report = distill_checkpoint(**request_from(args, "distill", DistillRequest).options())
    print(report.summary())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from linearpatch.integration.evaluation import compare_models
    from linearpatch.integration.requests import EvalRequest

    result = compare_models(**request_from(args, "eval", EvalRequest).options())
    print(result.table)
    print(f"Took {result.seconds / 60:.1f} min (estimated {result.estimate_seconds / 60:.1f}).")
    if result.written:
        print(f"Wrote {', '.join(result.written)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from linearpatch.integration.evaluation import plot_checkpoint

    written = plot_checkpoint(
        args.checkpoint,
        dense=args.dense,
        data=args.data,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
    )
    print(f"Wrote {', '.join(path.name for path in written)} to {args.checkpoint}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from linearpatch.integration.export import export_checkpoint
    from linearpatch.integration.requests import ExportRequest

    report = export_checkpoint(**request_from(args, "export", ExportRequest).options())
    print(report.summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from linearpatch.integration.serving import serve

    return serve(args.checkpoint, vllm=args.vllm, extra=args.vllm_args)


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


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    # Defaults: the command's request (`take_defaults`).
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    from linearpatch import __version__

    # The choices' names, without torch: --help shows at once.
    from linearpatch.integration.choices import FOLDS, PATCH_CHOICES, SELECTION_METRICS
    from linearpatch.integration.defaults import CALIBRATION, DISTILLATION, FIGURES, PERPLEXITY, TASK_LIMIT
    from linearpatch.integration.requests import DistillRequest, EvalRequest, ExportRequest, PruneRequest

    def sizes(table) -> str:
        return (
            f"{table['cpu'].num_samples} x {table['cpu'].seq_len} on CPU, {table['cuda'].num_samples} x "
            f"{table['cuda'].seq_len} on GPU, {table['quick'].num_samples} x {table['quick'].seq_len} with "
            "LINEARPATCH_QUICK=1"
        )

    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="linearpatch",
        description="Prune decoder layers of Llama, Mistral, Qwen2, Qwen3 and Gemma 3 LLMs and revive them with "
        "LinearPatch.",
        epilog="LINEARPATCH_QUICK=1 shrinks every default size to a smoke test; explicit flags still win.",
    )
    parser.add_argument("--version", action="version", version=f"linearpatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prune = commands.add_parser(
        "prune", help="drop layers and fit a training-free LinearPatch per gap", formatter_class=formatter
    )
    prune.add_argument(
        "model",
        help="dense model (llama, mistral, qwen2, qwen3 or gemma3_text): smollm2-135m (embedded), a local folder, or "
        "a Hub id",
    )
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--num-layers", type=positive_int, help="how many layers to drop (chosen by --metric)")
    which.add_argument("--layers", help="explicit layers, e.g. 20-24 or 3,7,9 (dense indices)")
    which.add_argument(
        "--target-ppl-ratio",
        type=float,
        metavar="R",
        help="drop the most layers whose pruned model stays within R x the dense perplexity on held-out calibration "
        "windows (metric loss and patch auto unless given)",
    )
    prune.add_argument(
        "--metric",
        choices=SELECTION_METRICS,
        help="how the block is chosen: a proxy (cosine, angular, block-influence) or loss, the held-out perplexity of "
        "each patched candidate (default: cosine; loss with --target-ppl-ratio)",
    )
    prune.add_argument(
        "--patch",
        choices=PATCH_CHOICES,
        help="patch kind fitted per gap, or auto: every kind (lstsq with a ridge grid) scored on held-out windows "
        "and the best kept (default: hadamard; auto with --target-ppl-ratio)",
    )
    prune.add_argument(
        "--holdout",
        type=positive_int,
        help="calibration windows held out (never fitted) to score loss, auto and --target-ppl-ratio "
        "(default: one in eight)",
    )
    prune.add_argument(
        "--candidates",
        type=non_negative_int,
        help="blocks per depth that --metric loss scores, best cosine first (0: every start)",
    )
    prune.add_argument("--calibration", help="embedded corpus, .txt/.jsonl file or datasets name")
    prune.add_argument("--num-samples", type=positive_int, help=f"calibration windows (default: {sizes(CALIBRATION)})")
    prune.add_argument("--seq-len", type=positive_int, help="tokens per calibration window (default: see above)")
    prune.add_argument("--seed", type=int, help="seed of the calibration window offsets")
    prune.add_argument("--batch-size", type=positive_int, help="windows per calibration forward")
    prune.add_argument(
        "--base-model", help="Hub id to record as the dense model (default: the model's own Hub id, if any)"
    )
    prune.add_argument("--eval-windows", type=non_negative_int, help="also report held-out perplexity on N windows")
    prune.add_argument("--eval-seq-len", type=positive_int, help="tokens per evaluation window (default: as eval)")
    prune.add_argument("--eval-corpus", nargs="+", help="corpora for --eval-windows")
    prune.add_argument("--plots", action="store_true", help="also write the figures of `linearpatch report`")
    prune.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="calibrate one layer at a time from the safetensors shards and stream the output, never holding the "
        "whole model (default: only when it does not fit --max-memory)",
    )
    prune.add_argument(
        "--max-memory", help="memory the model may use on the device, e.g. 200MB or 80GB (default: its free memory)"
    )
    prune.add_argument("--max-shard-size", help="weights shard size of a sequential output")
    prune.add_argument("--output", required=True, help="checkpoint folder to create")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_model_options(prune)
    take_defaults(prune, "prune", PruneRequest)
    prune.set_defaults(handler=cmd_prune)

    distill = commands.add_parser(
        "distill", help="train only the patches from the dense model's top-K logits", formatter_class=formatter
    )
    distill.add_argument("checkpoint", help="a LinearPatch checkpoint (from `linearpatch prune`)")
    distill.add_argument("--teacher", required=True, help="the dense model (run once, in a separate process)")
    distill.add_argument("--output", required=True, help="folder for the merged checkpoint (or the adapter)")
    distill.add_argument("--top-k", type=positive_int, help="teacher log-probabilities kept per token")
    distill.add_argument("--data", help="training text (embedded corpus, file, datasets name)")
    distill.add_argument("--num-samples", type=positive_int, help=f"training windows (default: {sizes(DISTILLATION)})")
    distill.add_argument("--seq-len", type=positive_int, help="tokens per training window (default: see above)")
    distill.add_argument("--epochs", type=float, help="passes over the training windows")
    distill.add_argument("--lr", type=float, help="AdamW learning rate (cosine decay to lr/20)")
    distill.add_argument("--batch-size", type=positive_int, help="windows per device per step")
    distill.add_argument("--gradient-accumulation-steps", type=positive_int, help="steps per update")
    distill.add_argument("--max-steps", type=non_negative_int, help="stop after N steps (0: no limit)")
    distill.add_argument("--temperature", type=float, help="distillation temperature")
    distill.add_argument("--seed", type=int, help="window sampling and training seed")
    distill.add_argument("--bf16", action="store_true", help="train in bf16 mixed precision (GPU)")
    distill.add_argument("--activation-checkpointing", action="store_true", help="trade compute for memory")
    distill.add_argument("--save-steps", type=non_negative_int, help="Trainer checkpoint every N steps (for --resume)")
    distill.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --work-dir")
    distill.add_argument(
        "--work-dir", help="Trainer checkpoints with --save-steps (default: OUTPUT.work beside the output)"
    )
    distill.add_argument("--cache-dir", help="teacher cache root (default: ~/.cache/linearpatch/teacher-cache)")
    distill.add_argument("--adapter-only", action="store_true", help="write only the PEFT adapter, not merged")
    distill.add_argument(
        "--export",
        action="store_true",
        help="train, per gap, a map on the MLP output before it instead of the patch (started from the best "
        "training-free `export --fold auto`) and write the family's stock architecture with it folded in",
    )
    distill.add_argument("--eval-corpus", nargs="*", help="with --export: held-out perplexity corpora")
    distill.add_argument(
        "--eval-windows",
        type=non_negative_int,
        help=f"with --export: held-out windows per corpus; 0 skips the comparison (default: {sizes(PERPLEXITY)})",
    )
    distill.add_argument(
        "--sequential-teacher",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build the teacher cache one layer at a time from its shards (default: if it exceeds --max-memory)",
    )
    distill.add_argument(
        "--max-memory",
        help="memory a model may use on the device, e.g. 80GB (default: its free memory); a larger student is "
        "spread with device_map='auto'",
    )
    distill.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_model_options(distill)
    take_defaults(distill, "distill", DistillRequest)
    distill.set_defaults(handler=cmd_distill)

    evaluate = commands.add_parser(
        "eval", help="compare models: lm-eval accuracy, retained performance, perplexity", formatter_class=formatter
    )
    evaluate.add_argument("models", nargs="+", help="models to compare (folders, adapters, Hub ids, smollm2-135m)")
    evaluate.add_argument("--baseline", required=True, help="the dense model")
    evaluate.add_argument(
        "--tasks",
        nargs="*",
        help="lm-eval tasks: the offline ones, or lm-eval names (arc_easy, piqa, ...) with Hub access",
    )
    evaluate.add_argument(
        "--limit",
        type=int,
        help=f"documents per task (-1: {TASK_LIMIT['cpu']} on CPU, all on GPU, {TASK_LIMIT['quick']} quick; 0: all)",
    )
    evaluate.add_argument("--ppl-corpus", nargs="*", help="corpora for chunked perplexity")
    evaluate.add_argument(
        "--ppl-windows", type=positive_int, help=f"windows per corpus (default: {sizes(PERPLEXITY)})"
    )
    evaluate.add_argument("--seq-len", type=positive_int, help="perplexity window length (paper: 2048)")
    evaluate.add_argument("--batch-size", type=positive_int, help="lm-eval batch size")
    evaluate.add_argument(
        "--output", help="folder for linearpatch_eval.json/.md (a checkpoint folder: push shows it on the card)"
    )
    evaluate.add_argument("--overwrite", action="store_true", help="replace existing linearpatch_eval files")
    _add_model_options(evaluate)
    take_defaults(evaluate, "eval", EvalRequest)
    evaluate.set_defaults(handler=cmd_eval)

    report = commands.add_parser(
        "report",
        help="write the selection heatmap and magnitude plots next to a checkpoint",
        formatter_class=formatter,
    )
    report.add_argument("checkpoint", help="a LinearPatch checkpoint folder")
    report.add_argument("--dense", help="the dense model (default: the checkpoint's base_model when available)")
    report.add_argument("--data", default="wikipedia-eval", help="text for the windows")
    report.add_argument("--num-samples", type=positive_int, help=f"windows (default: {sizes(FIGURES)})")
    report.add_argument("--seq-len", type=positive_int, help="tokens per window (default: see above)")
    report.add_argument("--seed", type=int, default=0, help="seed of the window offsets")
    report.add_argument("--overwrite", action="store_true", help="replace figures already in the folder")
    report.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    report.set_defaults(handler=cmd_report)

    export = commands.add_parser(
        "export",
        help="fold the patches into the family's stock architecture (LlamaForCausalLM, Qwen3ForCausalLM, ...) for "
        "engines without remote code",
        formatter_class=formatter,
    )
    export.add_argument("checkpoint", help="a LinearPatch checkpoint")
    export.add_argument("--output", required=True, help="folder for the stock-architecture model")
    export.add_argument(
        "--fold",
        choices=FOLDS,
        help="auto: fit a map on the MLP output before each gap (folded into that layer's down_proj) to each "
        "objective and keep the best on held-out calibration windows; down-proj: reproduce the patched stream; "
        "down-proj-dense / down-proj-cosine: reproduce the dense model's stream by least squares / cosine distance; "
        "down-proj-rotated: the same by least squares together with a rotation and scale of the stream after the "
        "gap, folded into every later layer and the head (Llama, Mistral, Qwen; unties the head); scalar: Prune&Comp "
        "scaling (exact for scalar patches). A gap at layer 0 is always folded exactly into the embeddings",
    )
    export.add_argument(
        "--dense",
        help="the dense model the checkpoint was pruned from, for the dense objectives (default: its base_model; "
        "auto leaves them out, with a warning, when that cannot be opened)",
    )
    export.add_argument("--calibration", help="text for the fit")
    export.add_argument("--num-samples", type=positive_int, help=f"fit windows (default: {sizes(CALIBRATION)})")
    export.add_argument("--seq-len", type=positive_int, help="tokens per fit window (default: see above)")
    export.add_argument("--seed", type=int, help="seed of the fit window offsets")
    export.add_argument("--eval-corpus", nargs="*", help="held-out perplexity corpora")
    export.add_argument(
        "--eval-windows",
        type=non_negative_int,
        help=f"held-out windows per corpus; 0 skips the comparison (default: {sizes(PERPLEXITY)})",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit layer by layer and stream the folded tensors, never holding the checkpoint (default: when it does "
        "not fit --max-memory; skips the held-out comparison)",
    )
    export.add_argument("--max-memory", help="memory the checkpoint may use on the device, e.g. 200MB")
    export.add_argument("--max-shard-size", help="weights shard size of a sequential output")
    export.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    take_defaults(export, "export", ExportRequest)
    export.set_defaults(handler=cmd_export)

    serve = commands.add_parser(
        "serve",
        help="serve a checkpoint (or an export) with vLLM's OpenAI-compatible server",
        formatter_class=formatter,
        description="Runs `vllm serve CHECKPOINT --trust-remote-code --model-impl transformers` (plain `vllm serve` "
        "for an export). Options linearpatch does not know go to vllm as they are, e.g. --port 8000 --dtype float32.",
    )
    serve.add_argument("checkpoint", help="a LinearPatch checkpoint or `linearpatch export` folder")
    serve.add_argument(
        "--vllm", help="the vllm executable (default: vllm on PATH, else .venv-serving from `make serving`)"
    )
    serve.set_defaults(handler=cmd_serve)

    push = commands.add_parser(
        "push", help="validate a checkpoint or adapter, write its card, push in one commit", formatter_class=formatter
    )
    push.add_argument("folder", help="a checkpoint or adapter folder")
    push.add_argument("repo_id", help="org/name")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch (default: main)")
    push.add_argument("--commit-message", help="commit message (default: says what was uploaded)")
    push.add_argument("--base-model", help="Hub id of the model it was made from (required for a local adapter)")
    push.set_defaults(handler=cmd_push)

    pull = commands.add_parser(
        "pull", help="download, verify and summarise a LinearPatch repo (works offline)", formatter_class=formatter
    )
    pull.add_argument("repo_id", help="org/name")
    pull.add_argument("local_dir", nargs="?", help="copy into this folder instead of only the HF cache")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull.set_defaults(handler=cmd_pull)
    return parser


_MAIN_PROCESS = None


def _interrupt(signum, frame):
    """SIGTERM behaves like Ctrl-C in the command's own process: unwind, clean staging folders, report. A forked
    child (a library's worker pool; `eval` keeps lm-eval's own in-process) inherits this handler; it ends quietly, as
    SIGTERM's default would end it."""
    if os.getpid() != _MAIN_PROCESS:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.vllm_args = unknown  # `serve` passes the options it does not know to vllm
    from linearpatch.common.errors import LinearPatchError, first_line
    from linearpatch.common.files import ledger

    ledger.reset()
    global _MAIN_PROCESS
    _MAIN_PROCESS = os.getpid()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"\nlinearpatch {args.command}: interrupted; {ledger.summary()}.", file=sys.stderr)
        return 130
    except (LinearPatchError, ValueError, OSError) as error:
        # User-facing errors (bad input, missing files, Hub failures) get one line; bugs keep their traceback.
        print(f"linearpatch {args.command}: error: {first_line(error, mark_more=True)}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
