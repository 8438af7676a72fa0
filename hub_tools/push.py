"""Push a validated LinearPatch checkpoint or adapter to the Hub, in one commit, with a generated model card."""

import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import OfflineModeIsEnabled

from linearpatch.common.names import ADAPTER_CONFIG, CONFIG_FILE, is_repo_id

from .card import model_card
from .connection import hub_errors
from .validate import InvalidCheckpointError, check_imports, validate_folder


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    token: str | None = None,
) -> str:
    r"""
    Validate `folder`, generate its model card and push everything as a single commit to `repo_id`.

    One commit means an interrupted push leaves no partial revision: either every file lands or none does, and
    running it again is safe.

    Args:
        folder (`str` or `Path`): a LinearPatch checkpoint (from `linearpatch prune`/`distill`) or PEFT adapter.
        repo_id (`str`): `org/name`.
        private (`bool`, *optional*, defaults to `False`): create the repository private.
        revision (`str`, *optional*): branch to push to (created if missing); default `main`.
        commit_message (`str`, *optional*).
        base_model (`str`, *optional*): Hub id of the model this was made from; required for an adapter whose
            `base_model_name_or_path` is a local path, and overrides a checkpoint's recorded `base_model`.
        token (`str`, *optional*): Hub token (default: the logged-in one).

    Returns:
        `str`: the commit URL.
    """
    folder = Path(folder)
    if not is_repo_id(repo_id):
        raise InvalidCheckpointError(f"{repo_id!r} is not a Hub repo id (org/name).")
    if base_model is not None and not is_repo_id(base_model):
        raise InvalidCheckpointError(f"--base-model {base_model!r} must be a Hub repo id (org/name).")
    overrides: dict[str, bytes] = {}
    adapter_config = folder / ADAPTER_CONFIG
    if adapter_config.exists() and base_model:
        values = json.loads(adapter_config.read_text())
        values["base_model_name_or_path"] = base_model
        overrides[ADAPTER_CONFIG] = json.dumps(values, indent=2).encode()
    info = validate_folder(folder, check_import=False, adapter_config_override=overrides.get(ADAPTER_CONFIG))
    if info.kind == "model" and base_model:
        info.config["base_model"] = base_model
        values = json.loads((folder / CONFIG_FILE).read_text())
        values["base_model"] = base_model
        overrides[CONFIG_FILE] = json.dumps(values, indent=2).encode()
    card = model_card(info, repo_id)
    overrides["README.md"] = str(card).encode()
    # The cheap checks are done; offline mode is said before the import check, which starts a clean interpreter.
    with hub_errors("push to", repo_id):
        if constants.HF_HUB_OFFLINE:
            raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
    check_imports(info)

    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=overrides.get(name, str(folder / name)))
        for name in info.files
        if name not in ("README.md",)
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=overrides["README.md"]))
    api = HfApi(token=token)
    kind = {"adapter": "adapter", "export": "stock-architecture export"}.get(info.kind, "LinearPatch checkpoint")
    with hub_errors("push to", repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {kind} ({len(operations)} files) with linearpatch",
            revision=revision,
        )
    return commit.commit_url


__all__ = ["push_to_hub"]
