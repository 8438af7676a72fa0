"""The requests of the commands that open no model to change it: `serve`, `push` and `pull` (see `requests.py`, which
re-exports them beside the others). Importable without torch or transformers."""

from dataclasses import dataclass

from .options import Request, option


@dataclass(frozen=True)
class ServeRequest(Request):
    """`linearpatch serve` ([`serve`]): options it does not know go to the server as they are (`extra`)."""

    checkpoint: str = option(positional=True, help="a checkpoint or export folder (vLLM), or a .gguf (llama-server)")
    vllm: str | None = option(
        None, help="the vllm executable (default: vllm on PATH, else .venv-serving from `make serving`)"
    )
    extra: tuple[str, ...] = option((), cli=False)


@dataclass(frozen=True)
class PushRequest(Request):
    """`linearpatch push` ([`push_to_hub`])."""

    folder: str = option(positional=True, help="a checkpoint or adapter folder")
    repo_id: str = option(positional=True, help="org/name")
    private: bool = option(False, help="create the repository private")
    revision: str | None = option(None, help="branch (default: main)")
    commit_message: str | None = option(None, help="commit message (default: says what was uploaded)")
    base_model: str | None = option(None, help="Hub id of the model it was made from (required for a local adapter)")


@dataclass(frozen=True)
class PullRequest(Request):
    """`linearpatch pull` ([`pull`])."""

    repo_id: str = option(positional=True, help="org/name")
    local_dir: str | None = option(
        None, positional=True, nargs="?", help="copy into this folder instead of only the HF cache"
    )
    revision: str | None = option(None, help="branch, tag or commit (default: main)")


__all__ = ["PullRequest", "PushRequest", "ServeRequest"]
