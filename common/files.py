"""Writing outputs without losing anything: build in a temporary sibling, then rename into place.

Every output of linearpatch (checkpoint folders, reports, cache shards, plots) goes through this module:

- a staging sibling named `.{name}.tmp-{pid}-{random}` is filled, then renamed onto the target in one step that
  refuses an existing target (Linux `renameat2(RENAME_NOREPLACE)`), so two runs with the same output never both
  "succeed": the second fails with [`OutputExistsError`] and the first one's output stays;
- staging folders left by a killed run (their process is gone) are removed on the next run into the same folder;
- folders are created with the permissions the umask gives, not `mkdtemp`'s 0700;
- a ledger records what was written and what was being written, so an interrupted command can say so.
"""

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LinearPatchError, OutputExistsError, OutputWriteError

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


@dataclass
class OutputLedger:
    """What this process has finished writing, what it is writing now, and partial results kept for a resume."""

    written: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    partial: dict[str, str] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget earlier commands (each CLI command starts with an empty ledger)."""
        self.written.clear()
        self.in_progress.clear()
        self.partial.clear()

    def summary(self) -> str:
        """One line for an interrupted run: what exists, what does not, what resumes."""
        parts = [f"written: {', '.join(self.written)}" if self.written else "nothing was written"]
        if self.in_progress:
            parts.append(f"not written (unfinished, removed): {', '.join(self.in_progress)}")
        parts += [f"{path}: {note}" for path, note in self.partial.items()]
        return "; ".join(parts)


ledger = OutputLedger()


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any expensive work) if `path` exists and `overwrite` is false, or if nothing can be written
    where it would go (a read-only folder or file system, a file where a folder is needed).

    Raises:
        OutputExistsError, OutputWriteError: naming the path and what to do.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it.")
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    """Create and remove a folder where `path`'s staging sibling will go: the one test that holds for every reason a
    write can be refused (permissions, a read-only mount, root or not)."""
    parent = Path(os.path.abspath(path.expanduser())).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputWriteError(f"Cannot write {path}: {parent} is a file, not a folder; choose another output.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".linearpatch-probe-", dir=parent))
    except OSError as error:
        raise OutputWriteError(
            f"Cannot write {path}: {parent} is not writable ({error.strerror}); choose another output."
        ) from None


# What a failed write says: errno values, and safetensors' Rust I/O errors, which carry them as text.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_RUST_IO_ERROR = re.compile(r"I/O error: (?P<reason>.+?) \(os error (?P<errno>\d+)\)")


def write_failure(error: BaseException) -> str | None:
    """Why writing failed (`No space left on device`, ...) if `error` is a failed write, else `None`."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        return error.strerror or os.strerror(error.errno)
    match = _RUST_IO_ERROR.search(str(error))
    if match and int(match["errno"]) in _WRITE_ERRNOS:
        return match["reason"]
    return None


def refuse_overlap(output: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output that is, contains, or lies inside any of `inputs` (role -> local path).

    Writing a pruned model over (or into) the dense model, the teacher, the checkpoint being distilled or the teacher
    cache would destroy the input, with `--overwrite` even before the new output exists.

    Raises:
        LinearPatchError: naming the clashing input and what to do.
    """
    target = Path(output).expanduser().resolve()
    for role, source in inputs.items():
        if source is None or not Path(source).expanduser().exists():
            continue  # a Hub id or an embedded name that is not converted yet: nothing local to protect
        source = Path(source).expanduser().resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = "is" if target == source else ("is inside" if source in target.parents else "contains")
            raise LinearPatchError(
                f"The output {output} {relation} the {role} {source}: that would overwrite the input. "
                "Choose an output folder outside it."
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(directory: str | Path) -> list[Path]:
    """Remove staging leftovers (`.*.tmp-PID-*`, `.*.old-PID-*`) of processes that no longer run in `directory`."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _STAGING.match(entry.name)
        if match and int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def staging_path(path: str | Path, kind: str = "tmp") -> Path:
    """A fresh sibling name for `path` that [`clean_stale_staging`] recognises once this process is gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


_libc = None


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with [`OutputExistsError`] if `target` exists (atomically on Linux)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018  (probe: glibc >= 2.28)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        at_fdcwd, rename_noreplace = -100, 1
        result = _libc.renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise OutputExistsError(
                f"{target} was created by another run while this one worked; its output was kept and this run's "
                "was discarded. Choose another --output, or pass --overwrite to replace it."
            )
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(target))
    # No renameat2: a plain rename still refuses a non-empty folder, and the window is as small as it gets.
    if target.exists():
        raise OutputExistsError(f"{target} was created by another run while this one worked; choose another --output.")
    os.rename(source, target)


def _make_directory(path: Path) -> None:
    path.mkdir(parents=True)
    path.chmod(0o777 & ~_umask())


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it becomes `path` in one rename.

    Without `overwrite`, an existing `path` (also one created by another run meanwhile) is never replaced. If the
    block fails, the temporary folder is removed and an existing `path` is left as it was.

    Raises:
        OutputExistsError: if `path` exists and `overwrite` is false, before or after the block.
    """
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(path.parent)
    staging = staging_path(path)
    _make_directory(staging)
    ledger.in_progress.append(str(path))
    try:
        try:
            yield staging
        except Exception as error:
            reason = write_failure(error)
            if reason is None:
                raise
            raise OutputWriteError(
                f"Could not write {path}: {reason}. The partial output was removed and nothing else changed; free "
                "space (or choose another output) and run the command again."
            ) from error
        if overwrite and path.exists():
            retired = staging_path(path, "old")
            os.rename(path, retired)
            try:
                rename_no_replace(staging, path)
            except BaseException:
                os.rename(retired, path)  # put the old output back rather than lose both
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            rename_no_replace(staging, path)
        ledger.written.append(str(path))
    finally:
        ledger.in_progress.remove(str(path))
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_text_atomically(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write one text file through a temporary sibling and a rename (readers never see half a file)."""
    path = Path(path)
    staging = staging_path(path)
    staging.write_text(text)
    try:
        if overwrite:
            os.replace(staging, path)
        else:
            rename_no_replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def save_tensors_atomically(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write one safetensors file through a temporary sibling and a rename (readers never see half a file; a failed
    write leaves nothing behind)."""
    from safetensors.torch import save_file

    path = Path(path)
    staging = staging_path(path)
    try:
        save_file(tensors, str(staging), metadata=metadata)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def rebuilding(what: str, where: str | Path, why: object) -> None:
    """The one warning line a damaged cache gets before it is rebuilt: what it is, where, and what was wrong. A cache
    only saves time: a damaged one is never used, and never ends a run."""
    logging.getLogger("linearpatch").warning("linearpatch: %s %s is damaged (%s): rebuilding it.", what, where, why)


def read_cache_record(path: str | Path, what: str, kind: type = dict) -> dict | list | None:
    """A cache's JSON record (its manifest): `None` when there is none, and also, after one [`rebuilding`] line, when
    it cannot be read or parsed or is not a `kind`; the caller then rebuilds what it describes."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        rebuilding(what, path, error)
        return None
    if not isinstance(record, kind):
        rebuilding(what, path, f"a JSON {type(record).__name__}, not a {kind.__name__}")
        return None
    return record


def write_files_atomically(directory: str | Path, files: dict[str, str], overwrite: bool = False) -> None:
    """Write text files into `directory` (created if needed), each through a temporary file and a rename; refuse to
    replace an existing file unless `overwrite`. Nothing is written if any target exists."""
    directory = Path(directory)
    for name in files:
        check_output(directory / name, overwrite)
    if not directory.exists():
        _make_directory(directory)
    clean_stale_staging(directory)
    for name, text in files.items():
        write_text_atomically(directory / name, text, overwrite)
        ledger.written.append(str(directory / name))


__all__ = [
    "OutputLedger",
    "atomic_directory",
    "check_output",
    "clean_stale_staging",
    "ledger",
    "read_cache_record",
    "rebuilding",
    "refuse_overlap",
    "rename_no_replace",
    "sha256_file",
    "staging_path",
    "write_failure",
    "write_files_atomically",
    "write_text_atomically",
]
