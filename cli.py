"""The `linearpatch` command line: prune, distill, eval, report, export, serve, push, pull.

Each command's parser is generated from its request's fields (`linearpatch.integration.requests`: flag, help, choices
and default live there); the command builds the request, calls one function with it (in `linearpatch.integration` or
`linearpatch.hub_tools`) and prints the report it returns. Bad input ends with one line on stderr that names the
problem and the fix (exit 2); an interrupt (Ctrl-C, SIGTERM) says what was and was not written (exit 130).
"""

import argparse
import dataclasses
import os
import signal
import sys
import types


class _HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, unless the help text already says it (or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # `is`, not `in`: 0 == False, and a default of 0 is worth showing.
        shown = action.option_strings and not any(action.default is x for x in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _value_type(annotation):
    """The flag type of a field annotated `int`, `float | None`, ...; `None` (text) for anything else."""
    kinds = set(annotation.__args__) - {type(None)} if isinstance(annotation, types.UnionType) else {annotation}
    return kinds.pop() if len(kinds) == 1 and kinds <= {int, float} else None


def cli_fields(request_class) -> list[dataclasses.Field]:
    """The fields of `request_class` that have an argument (all but those marked `cli=False`)."""
    return [field for field in dataclasses.fields(request_class) if field.metadata.get("cli", True) is not False]


def add_request_arguments(parser: argparse.ArgumentParser, request_class) -> None:
    """One argument per field of `request_class` (see [`cli_fields`]), as its metadata describes it."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in cli_fields(request_class):
        meta = field.metadata
        settings = {"help": meta.get("help")}
        for key in ("choices", "nargs", "metavar", "action"):
            if key in meta:
                settings[key] = meta[key]
        default = None if field.default is dataclasses.MISSING else field.default
        if meta.get("positional"):
            parser.add_argument(field.name, **settings, **({"default": default} if meta.get("nargs") == "?" else {}))
            continue
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        if field.type is bool and not meta.get("negatable"):
            settings["action"] = "store_true"
        elif meta.get("negatable"):
            settings["action"] = argparse.BooleanOptionalAction
        else:
            settings["type"] = meta.get("type") or _value_type(field.type)
            if "choices" not in settings:  # named after the flag, not the field it sets
                settings.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[meta["group"]]
        else:
            target = parser
            if meta.get("required"):
                settings["required"] = True
        # argparse gives a list back for nargs: a tuple default is shown (and returned) as one.
        settings["default"] = list(default) if isinstance(default, tuple) else default
        target.add_argument(flag, dest=field.name, **settings)


def request_from(args: argparse.Namespace, request_class):
    """The request the parsed flags make: each field's value from the argument of its name."""
    return request_class(**{field.name: getattr(args, field.name) for field in cli_fields(request_class)})


def cmd_prune(request) -> int:
    from linearpatch.integration.pruning import prune_checkpoint

    report = prune_checkpoint(request)
    print(report.summary())
    return 0


def cmd_distill(request) -> int:
    from linearpatch.integration.distillation import distill_checkpoint

    print(distill_checkpoint(request).summary())
    return 0


def cmd_eval(request) -> int:
    from linearpatch.integration.evaluation import evaluate_checkpoints

    print(evaluate_checkpoints(request).summary())
    return 0


def cmd_report(request) -> int:
    from linearpatch.integration.evaluation import plot_checkpoint

    print(plot_checkpoint(request).summary())
    return 0


def cmd_export(request) -> int:
    from linearpatch.integration.export import export_checkpoint

    print(export_checkpoint(request).summary())
    return 0


def cmd_serve(request) -> int:
    from linearpatch.integration.serving import serve

    return serve(request)


def cmd_push(request) -> int:
    from linearpatch.hub_tools import push_to_hub

    url = push_to_hub(**request.options())
    print(f"Pushed {request.folder} to {request.repo_id}: {url}")
    return 0


def cmd_pull(request) -> int:
    from linearpatch.hub_tools import pull

    print(pull(**request.options()))
    return 0


def _commands() -> dict[str, tuple]:
    """Command -> (its request class, its handler, its `--help` line, its description)."""
    from linearpatch.integration import requests

    return {
        "prune": (requests.PruneRequest, cmd_prune, "drop layers and fit a training-free LinearPatch per gap", None),
        "distill": (
            requests.DistillRequest,
            cmd_distill,
            "train only the patches from the dense model's top-K logits",
            None,
        ),
        "eval": (
            requests.EvalRequest,
            cmd_eval,
            "compare models: lm-eval accuracy, retained performance, perplexity",
            None,
        ),
        "report": (
            requests.ReportRequest,
            cmd_report,
            "write the figures next to a checkpoint: selection heatmap, magnitudes, closeness by cut",
            None,
        ),
        "export": (
            requests.ExportRequest,
            cmd_export,
            "fold the patches into the family's stock architecture (LlamaForCausalLM, Qwen3ForCausalLM, ...) for "
            "engines without remote code",
            None,
        ),
        "serve": (
            requests.ServeRequest,
            cmd_serve,
            "serve a checkpoint or export with vLLM, or a .gguf with llama-server (OpenAI API)",
            "Runs `vllm serve CHECKPOINT --trust-remote-code --model-impl transformers` (plain `vllm serve` for an "
            "export), or `llama-server --model FILE.gguf` for a GGUF file (`make gguf` builds it). Options "
            "linearpatch does not know go to the server as they are, e.g. --port 8000 --dtype float32.",
        ),
        "push": (
            requests.PushRequest,
            cmd_push,
            "validate a checkpoint or adapter, write its card, push in one commit",
            None,
        ),
        "pull": (
            requests.PullRequest,
            cmd_pull,
            "download, verify and summarise a LinearPatch repo (works offline)",
            None,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    from linearpatch import __version__

    parser = argparse.ArgumentParser(
        prog="linearpatch",
        description="Prune decoder layers of Llama, Mistral, Qwen2, Qwen3 and Gemma 3 LLMs and revive them with "
        "LinearPatch.",
        epilog="LINEARPATCH_QUICK=1 shrinks every default size to a smoke test; explicit flags still win.",
    )
    parser.add_argument("--version", action="version", version=f"linearpatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (request_class, handler, summary, description) in _commands().items():
        command = subparsers.add_parser(name, help=summary, description=description, formatter_class=_HelpFormatter)
        add_request_arguments(command, request_class)
        command.set_defaults(handler=handler, request_class=request_class)
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
    if unknown and args.command != "serve":  # `serve` passes the options it does not know to the server
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from linearpatch.common.errors import LinearPatchError, first_line
    from linearpatch.common.files import ledger

    ledger.reset()
    global _MAIN_PROCESS
    _MAIN_PROCESS = os.getpid()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        # The request checks its own options as it is made: a contradiction is refused before any work.
        request = request_from(args, args.request_class)
        if args.command == "serve":
            request = dataclasses.replace(request, extra=tuple(unknown))
        return args.handler(request)
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
