"""Pull a LinearPatch checkpoint or adapter, verify it byte for byte, and summarise it."""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.constants import HF_HUB_OFFLINE

from linearpatch.common.files import sha256_file
from linearpatch.common.names import EXPORT_RECORD

from .connection import hub_errors
from .validate import CheckpointInfo, InvalidCheckpointError, validate_folder


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the Hub reports for files not stored in LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_against_hub(repo_id: str, folder: Path, revision: str | None = None, token: str | None = None) -> int:
    """Compare every file with the hash the Hub reports (LFS sha256, else git blob id); return files checked."""
    info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True)
    checked = 0
    for sibling in info.siblings:
        local = folder / sibling.rfilename
        if not local.exists():
            raise InvalidCheckpointError(f"{sibling.rfilename} of {repo_id} is missing from the download.")
        if sibling.lfs is not None:
            ok = sha256_file(local) == sibling.lfs.sha256
        else:
            ok = sibling.blob_id is None or git_blob_sha1(local) == sibling.blob_id
        if not ok:
            raise InvalidCheckpointError(f"{sibling.rfilename} of {repo_id} does not match the Hub's hash.")
        checked += 1
    return checked


def verify_against_cache(folder: Path) -> int:
    """Offline: each file of an HF-cache snapshot links to a blob named by its hash (sha256 for LFS files, git blob
    id otherwise); check the content against that name. Returns files checked (0 outside the cache layout)."""
    checked = 0
    for link in folder.rglob("*"):
        if not link.is_symlink():
            continue
        blob = Path(os.path.realpath(link))
        expected = blob.name
        actual = sha256_file(blob) if len(expected) == 64 else git_blob_sha1(blob)
        if actual != expected:
            raise InvalidCheckpointError(f"Cached file {link.name} is corrupt (hash {actual} != {expected}).")
        checked += 1
    return checked


@dataclass
class PullSummary:
    r"""
    What was pulled.

    Args:
        repo_id (`str`), path (`Path`), kind (`str`: `model` or `adapter`).
        verified_files (`int`): files whose hashes were checked.
        details (`dict`): for a model: dense/kept layers, pruned layers, patch positions and kind, parameters;
            for an adapter: its base model and target modules.
    """

    repo_id: str
    path: Path
    kind: str
    verified_files: int
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.repo_id} -> {self.path} ({self.kind}, {self.verified_files} files verified)"]
        lines += [f"  {key}: {value}" for key, value in self.details.items()]
        return "\n".join(lines)


def _describe(info: CheckpointInfo) -> dict:
    if info.kind == "adapter":
        return {"base model": info.config["base_model_name_or_path"], "targets": info.config.get("target_modules")}
    if info.kind == "export":
        export = json.loads((info.path / EXPORT_RECORD).read_text())
        return {
            "architecture": f"{info.config.get('architectures')} (stock, no remote code)",
            "kept layers": info.config.get("num_hidden_layers"),
            "pruned layers": export.get("pruned_layers"),
            "fold": export.get("fold"),
            "base model": export.get("base_model"),
        }
    from linearpatch.modeling import LinearPatchForCausalLM

    model = LinearPatchForCausalLM.from_pretrained(info.path)  # refuses weights that do not match the config
    config = model.config
    return {
        "dense layers": config.original_num_hidden_layers,
        "kept layers": config.num_hidden_layers,
        "pruned layers": config.pruned_layers,
        "patches": f"{len(config.patch_positions)} at kept positions {config.patch_positions} ({config.patch_kind})",
        "parameters": sum(p.numel() for p in model.parameters()),
        "base model": config.base_model,
    }


def pull(repo_id: str, local_dir: str | Path | None = None, revision: str | None = None, token: str | None = None):
    """Download `repo_id` (or reuse the HF cache, also offline), verify hashes and contents, load, summarise.

    Returns:
        `PullSummary`
    """
    with hub_errors("pull", repo_id):
        path = Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir, token=token))
        if HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            verified = verify_against_cache(path)
        else:
            verified = verify_against_hub(repo_id, path, revision, token)
    info = validate_folder(path)
    return PullSummary(repo_id, path, info.kind, verified, _describe(info))


__all__ = ["PullSummary", "git_blob_sha1", "pull", "verify_against_cache", "verify_against_hub"]
