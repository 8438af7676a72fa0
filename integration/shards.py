"""Safetensors checkpoints read and written one tensor at a time, for models larger than memory.

`SafetensorsCheckpoint` checks a (sharded) checkpoint folder up front: the index names only shards that exist, every
shard is as long as its header says, and every indexed tensor is in its shard. Tensors are then read one by one with
plain file reads. Only the safetensors header (JSON) is parsed: nothing is unpickled. `safe_open` would memory-map the
whole shard, and every page it touches counts towards the process's resident memory until the file is closed.

`write_sharded_safetensors` writes tensors that do not exist yet: each shard's header is computed from the shapes and
dtypes, then each tensor is produced, written and dropped. Peak memory is one tensor, and the files are ordinary
safetensors shards with the `model.safetensors.index.json` that `save_pretrained` writes.
"""

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from linearpatch.common.errors import CheckpointMismatchError
from linearpatch.common.names import WEIGHTS_FILE

from .choices import compute_dtype_name

SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Headers are small (a few hundred KB for 70B models); a larger length means the file is not safetensors.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its shard, dtype name (`F32`, `BF16`...), shape and byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse one shard's header; check that the file holds every byte it announces.

    Raises:
        CheckpointMismatchError: for a file that is not safetensors or is truncated (naming the file and the fix).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointMismatchError(f"{path} is not a safetensors file ({size} bytes): download it again.")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointMismatchError(
                f"{path} is truncated or not a safetensors file (header of {length} bytes in a {size}-byte file): "
                "download it again."
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointMismatchError(
                f"{path} has a corrupt safetensors header ({error}): download it again."
            ) from error
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if info.get("dtype") not in DTYPES:
            raise CheckpointMismatchError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
        start, end = info["data_offsets"]
        entries[name] = TensorEntry(path, info["dtype"], tuple(info["shape"]), data_start + start, data_start + end)
    needed = max((entry.end for entry in entries.values()), default=data_start)
    if size < needed:
        raise CheckpointMismatchError(
            f"{path} is truncated or corrupt: its header describes {needed} bytes but the file has {size}. "
            "Download or copy the shard again."
        )
    return entries, metadata


class SafetensorsCheckpoint:
    r"""
    The weights of a checkpoint folder (`model.safetensors`, or shards listed by `model.safetensors.index.json`),
    checked up front and read one tensor at a time.

    Args:
        folder (`str` or `Path`): the checkpoint folder.

    Raises:
        CheckpointMismatchError: no safetensors weights, a shard missing from the folder, a truncated or corrupt
            shard, or an index entry whose tensor is not in its shard. Nothing has been read or written yet.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_file = self.folder / SAFE_WEIGHTS_INDEX_NAME
        single = self.folder / WEIGHTS_FILE
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointMismatchError(f"{index_file} is not a safetensors index ({error}).") from error
            shards = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, shards = None, [WEIGHTS_FILE]
        else:
            raise CheckpointMismatchError(
                f"{self.folder} has no safetensors weights ({WEIGHTS_FILE} or {SAFE_WEIGHTS_INDEX_NAME}): "
                "linearpatch never loads pickled (.bin) weights; convert them with "
                "`save_pretrained(..., safe_serialization=True)` in a trusted environment."
            )
        missing = [shard for shard in shards if not (self.folder / shard).is_file()]
        if missing:
            raise CheckpointMismatchError(
                f"{self.folder}: {len(missing)} shard(s) named in {SAFE_WEIGHTS_INDEX_NAME} are missing "
                f"({', '.join(missing)}): download the checkpoint again."
            )
        self.entries: dict[str, TensorEntry] = {}
        for shard in shards:
            entries, _ = read_header(self.folder / shard)
            if weight_map is None:
                self.entries.update(entries)
                continue
            for name in entries.keys() & {key for key, file in weight_map.items() if file == shard}:
                self.entries[name] = entries[name]
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.entries))
            if absent:
                raise CheckpointMismatchError(
                    f"{self.folder}: {len(absent)} tensor(s) of {SAFE_WEIGHTS_INDEX_NAME} are not in their shards "
                    f"(first: {absent[0]!r} in {weight_map[absent[0]]}): the shards and index do not match."
                )

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, dtype: torch.dtype | None = None, prefix: str = "") -> int:
        """Bytes of all tensors (those whose names start with `prefix`), as stored or converted to floating `dtype`."""
        total = 0
        for name, entry in self.entries.items():
            if not name.startswith(prefix):
                continue
            stored = DTYPES[entry.dtype]
            target = dtype if dtype is not None and stored.is_floating_point else stored
            total += entry.numel * target.itemsize
        return total

    def floating_dtype(self) -> torch.dtype:
        """The dtype the model is stored in: the floating dtype that holds the most elements (a checkpoint's float32
        patch beside bf16 weights does not count), float32 when there is no floating tensor."""
        counts: dict[torch.dtype, int] = {}
        for entry in self.entries.values():
            stored = DTYPES[entry.dtype]
            if stored.is_floating_point:
                counts[stored] = counts.get(stored, 0) + entry.numel
        return max(counts, key=counts.get) if counts else torch.float32

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read from its shard (floating tensors cast to `dtype` when given)."""
        entry = self.entries[name]
        buffer = bytearray(entry.end - entry.start)
        with open(entry.file, "rb") as handle:
            handle.seek(entry.start)
            if handle.readinto(buffer) != len(buffer):
                raise CheckpointMismatchError(f"{entry.file} ended while reading {name!r}: download it again.")
        stored = DTYPES[entry.dtype]
        tensor = torch.frombuffer(buffer, dtype=stored) if buffer else torch.empty(0, dtype=stored)
        tensor = tensor.reshape(entry.shape)
        if dtype is not None and stored.is_floating_point and stored != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def read_rows(
        self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Rows `rows` (sorted, unique indices along the first axis) of one tensor, reading only those bytes: the
        embedding rows of the tokens in use, for example, instead of a whole 128k-token vocabulary."""
        entry = self.entries[name]
        stored = DTYPES[entry.dtype]
        row_bytes = (entry.end - entry.start) // entry.shape[0]
        out = torch.empty((len(rows), *entry.shape[1:]), dtype=stored)
        flat = out.view(-1).view(torch.uint8).numpy()
        rows = rows.tolist()
        with open(entry.file, "rb") as handle:
            first = 0
            while first < len(rows):
                last = first  # extend over a run of consecutive rows: one read per run
                while last + 1 < len(rows) and rows[last + 1] == rows[last] + 1:
                    last += 1
                if not (0 <= rows[first] and rows[last] < entry.shape[0]):
                    raise IndexError(f"Rows {rows[first]}..{rows[last]} are outside {name!r} {entry.shape}.")
                handle.seek(entry.start + rows[first] * row_bytes)
                view = memoryview(flat)[first * row_bytes : (last + 1) * row_bytes]
                if handle.readinto(view) != len(view):
                    raise CheckpointMismatchError(f"{entry.file} ended while reading {name!r}: download it again.")
                first = last + 1
        if dtype is not None and stored.is_floating_point and stored != dtype:
            out = out.to(dtype)
        return out.to(device)

    def pending(
        self, name: str, dtype: torch.dtype | None = None, transform: Callable | None = None, by_rows: bool = False
    ) -> "PendingTensor":
        """Tensor `name` to be written later: floating tensors in `dtype` (when given), read in blocks of rows, or
        whole and passed through `transform` (which keeps shape and dtype) when there is one; with `by_rows` (a
        transform that treats each row alone), block by block, so that a large matrix is never transformed whole."""
        entry = self.entries[name]
        stored = DTYPES[entry.dtype]
        target = dtype if dtype is not None and stored.is_floating_point else stored
        if transform is None:
            return PendingTensor(target, entry.shape, lambda: self.read_blocks(name, target))
        if by_rows and len(entry.shape) == 2:
            columns = entry.shape[1]

            def blocks() -> Iterator[torch.Tensor]:
                for block in self.read_blocks(name, target):
                    yield transform(block.view(-1, columns)).reshape(-1)

            return PendingTensor(target, entry.shape, blocks)
        return PendingTensor(target, entry.shape, lambda: transform(self.read(name, target)))

    def read_blocks(
        self, name: str, dtype: torch.dtype | None = None, block_bytes: int = 16 * 1024**2
    ) -> Iterator[torch.Tensor]:
        """One tensor as consecutive blocks of rows of about `block_bytes` each (flattened), so that streaming it
        never holds more than a block."""
        entry = self.entries[name]
        if len(entry.shape) < 2 or entry.end - entry.start <= block_bytes:
            yield self.read(name, dtype).reshape(-1)
            return
        rows_per_block = max(1, block_bytes // ((entry.end - entry.start) // entry.shape[0]))
        for first in range(0, entry.shape[0], rows_per_block):
            rows = torch.arange(first, min(first + rows_per_block, entry.shape[0]))
            yield self.read_rows(name, rows, dtype).reshape(-1)


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its dtype and shape are known now; `produce()` makes it when its turn comes, whole or as
    consecutive pieces (an iterable of tensors whose bytes, concatenated, are the tensor's)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor | Iterable[torch.Tensor]]

    def cast(self, dtype: torch.dtype) -> "PendingTensor":
        """The same tensor written in floating `dtype` (cast piece by piece when it is produced)."""
        if dtype == self.dtype or not self.dtype.is_floating_point:
            return self

        def produce():
            made = self.produce()
            if isinstance(made, torch.Tensor):
                return made.to(dtype)
            return (piece.to(dtype) for piece in made)

        return PendingTensor(dtype, self.shape, produce)

    @property
    def nbytes(self) -> int:
        count = self.dtype.itemsize
        for size in self.shape:
            count *= size
        return count


def compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The dtype a model computes in: a named `--dtype` (or a torch dtype), or `COMPUTE_DTYPE` for `auto`."""
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, compute_dtype_name(dtype))


def stored_dtype(dtype: str | torch.dtype, source: "SafetensorsCheckpoint") -> torch.dtype:
    """The dtype an output is written in: a named `--dtype`, or for `auto` the dtype `source` (the model the output
    comes from) is stored in, so that a bf16 model stays bf16 on disk whatever it computed in."""
    return source.floating_dtype() if dtype == "auto" else compute_dtype(dtype)


def dtype_record(dtype: str | torch.dtype, storage: torch.dtype) -> dict[str, str]:
    """What a report records of the dtypes: the one computed in, and the one written."""
    return dict(compute=str(compute_dtype(dtype)).removeprefix("torch."), stored=str(storage).removeprefix("torch."))


def refuse_non_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse to write (or use) a floating tensor with NaN or inf entries: corrupt weights, or a diverged result.

    Raises:
        CheckpointMismatchError: naming the tensor; the output being written is then removed whole.
    """
    if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
        raise CheckpointMismatchError(
            f"{name} holds NaN or inf values: the weights it comes from are corrupt (download or copy them again). "
            "Nothing was written."
        )


def _write_shard(path: Path, tensors: list[tuple[str, PendingTensor]], metadata: dict[str, str], bar) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, pending in tensors:
        header[name] = {
            "dtype": DTYPE_NAMES[pending.dtype],
            "shape": list(pending.shape),
            "data_offsets": [offset, offset + pending.nbytes],
        }
        offset += pending.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, pending in tensors:
            produced = pending.produce()
            if isinstance(produced, torch.Tensor):
                if tuple(produced.shape) != pending.shape:
                    raise ValueError(f"{name}: produced shape {tuple(produced.shape)}, announced {pending.shape}.")
                produced = [produced]
            written = 0
            for piece in produced:
                if piece.dtype != pending.dtype:
                    raise ValueError(f"{name}: produced {piece.dtype}, announced {pending.dtype}.")
                refuse_non_finite(name, piece)
                data = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                handle.write(memoryview(data))
                written += data.nbytes
                del piece, data
            if written != pending.nbytes:
                raise ValueError(f"{name}: produced {written} bytes, announced {pending.nbytes}.")
            bar.update(written)


def write_sharded_safetensors(
    folder: str | Path,
    tensors: Iterable[tuple[str, PendingTensor]],
    max_shard_size: int = 5 * 1024**3,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> list[str]:
    """Write `tensors` into `folder` as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards of at
    most `max_shard_size` bytes (a single larger tensor gets its own shard) plus `model.safetensors.index.json`.

    Returns:
        `list[str]`: the file names written.
    """
    folder = Path(folder)
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[list[tuple[str, PendingTensor]]] = [[]]
    size = 0
    for name, pending in tensors:
        if shards[-1] and size + pending.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, pending))
        size += pending.nbytes
    total = sum(pending.nbytes for shard in shards for _, pending in shard)
    bar = tqdm(total=total, desc="writing weights", unit="B", unit_scale=True, disable=not progress)
    if len(shards) == 1:
        _write_shard(folder / WEIGHTS_FILE, shards[0], metadata, bar)
        bar.close()
        return [WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        _write_shard(folder / name, shard, metadata, bar)
        weight_map.update({tensor_name: name for tensor_name, _ in shard})
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, SAFE_WEIGHTS_INDEX_NAME]


def parse_size(text: str | int) -> int:
    """`200MB`, `1.5GiB`, `80GB` or a byte count -> bytes (decimal units for KB/MB/GB/TB, binary for KiB/MiB...)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    unit = value[len(number) :].strip()
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError) as error:
        raise ValueError(f"Cannot read the size {text!r}: write e.g. 200MB, 1.5GiB or 80GB.") from error


def format_size(count: int) -> str:
    """Bytes as a short human string (`538.1 MB`)."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count} B"


__all__ = [
    "DTYPES",
    "PendingTensor",
    "SafetensorsCheckpoint",
    "TensorEntry",
    "compute_dtype",
    "dtype_record",
    "format_size",
    "parse_size",
    "read_header",
    "refuse_non_finite",
    "stored_dtype",
    "write_sharded_safetensors",
]
