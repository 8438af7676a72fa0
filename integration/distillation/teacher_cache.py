"""Offline top-K teacher cache: run the dense model once, store per-token top-K log-probabilities and indices.

The training process never holds the teacher: it reads these shards. A cache folder is named by a hash of everything
that determines its content (teacher weights and config, token windows, K, value dtype), so a changed input never
reuses a stale cache. Shards are written atomically and listed in `manifest.json` with their SHA-256; a build
resumes after the last complete shard, and a corrupt or truncated shard is detected and rebuilt, never trained on.

Run as `python -m linearpatch.integration.distillation.teacher_cache TEACHER WINDOWS.safetensors CACHE_ROOT --top-k K`
to build a cache in a separate process (what `linearpatch distill` does).
"""

import argparse
import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from linearpatch.common.files import (
    clean_stale_staging,
    read_cache_record,
    rebuilding,
    save_tensors_atomically,
    sha256_file,
    write_text_atomically,
)
from linearpatch.common.names import CONFIG_FILE, TEACHER_CACHE_MANIFEST

from ..defaults import TEACHER_TOP_K
from ..measurement.capture import logits_source

FORMAT_VERSION = 1


def index_dtype(vocab_size: int) -> torch.dtype:
    """Smallest integer dtype that holds every vocabulary index (int16, uint16 or int32; never int64)."""
    if vocab_size <= 2**15:
        return torch.int16
    if vocab_size <= 2**16:
        return torch.uint16
    return torch.int32


def model_fingerprint(model) -> str:
    """SHA-256 of the model's config and every weight's bytes: the teacher's identity."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    teacher_fingerprint: str,
    input_ids: torch.Tensor,
    top_k: int,
    value_dtype: torch.dtype,
    stream_layer: int | None = None,
) -> str:
    """Hash of all the cache's inputs (teacher, exact token windows (so also seed and length), K, value dtype, and the
    layer whose input stream it also holds, if any)."""
    digest = hashlib.sha256()
    parts = (teacher_fingerprint, str(tuple(input_ids.shape)), str(top_k), str(value_dtype), str(FORMAT_VERSION))
    if stream_layer is not None:
        parts += (f"stream entering layer {stream_layer}",)
    for part in parts:
        digest.update(part.encode())
    digest.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass
class TopKTeacherCache:
    r"""
    A finished cache folder: `shard-XXXXX.safetensors` files holding `input_ids` (int32), `values` (top-K teacher
    log-probabilities, fp16/bf16) and `indices` (smallest integer type), each `[windows, seq_len, K]`.

    Args:
        path (`Path`): the cache folder.
        manifest (`dict`): its manifest (inputs, shards with SHA-256, sizes).
    """

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "TopKTeacherCache":
        """Open a complete cache; with `verify`, every shard's SHA-256 is checked.

        Raises:
            ValueError: if the cache is incomplete or a shard is missing or corrupt.
        """
        path = Path(path)
        manifest_path = path / TEACHER_CACHE_MANIFEST
        if not manifest_path.exists():
            raise ValueError(f"{path} is not a teacher cache (no {TEACHER_CACHE_MANIFEST}).")
        manifest = read_cache_record(manifest_path, "the teacher cache's manifest")
        if manifest is None or not manifest.get("complete"):
            raise ValueError(f"The teacher cache {path} is incomplete; build it again to resume.")
        if verify:
            for shard in manifest["shards"]:
                file = path / shard["file"]
                if not file.exists() or sha256_file(file) != shard["sha256"]:
                    raise ValueError(f"Teacher cache shard {file} is missing or corrupt; rebuild the cache.")
        return cls(path, manifest)

    @property
    def num_windows(self) -> int:
        return sum(shard["windows"] for shard in self.manifest["shards"])

    @property
    def bytes_per_token(self) -> float:
        return self.manifest["bytes_per_token"]

    def __len__(self) -> int:
        return self.num_windows

    def shard_files(self) -> list[Path]:
        return [self.path / shard["file"] for shard in self.manifest["shards"]]


# The stored log-probabilities' dtype: fp16 halves the cache against fp32, and top-K log-probabilities need no more.
VALUE_DTYPE = torch.float16


@contextlib.contextmanager
def stream_recording(teacher, layer: int | None):
    """While inside, a copy of what enters decoder layer `layer` of `teacher` (in memory or layer by layer, whose
    activations are overwritten in place) is appended to the yielded list, in the order the windows run."""
    streams: list[torch.Tensor] = []
    if layer is None:
        yield streams
        return

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        streams.append(hidden.detach().to("cpu", copy=True))

    handle = teacher.model.layers[layer].register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield streams
    finally:
        handle.remove()


def finished_shards(manifest_path: Path) -> dict[str, dict]:
    """The shards a cache's manifest lists as written (file -> entry), each to be reused only if its SHA-256 still
    checks out. A damaged manifest, or damaged entries in it, list nothing: one warning line, and those shards are
    computed again."""
    manifest = read_cache_record(manifest_path, "the teacher cache's manifest")
    if manifest is None:
        return {}
    shards = manifest.get("shards")
    entries = shards if isinstance(shards, list) else []
    valid = [
        shard
        for shard in entries
        if isinstance(shard, dict)
        and isinstance(shard.get("file"), str)
        and isinstance(shard.get("windows"), int)
        and isinstance(shard.get("sha256"), str)
    ]
    if len(valid) != len(entries) or not isinstance(shards, list):
        rebuilding("the teacher cache's manifest", manifest_path, "shard entries without file, windows or sha256")
        return {}
    return {shard["file"]: shard for shard in valid}


def build_teacher_cache(
    teacher,
    input_ids: torch.Tensor,
    cache_root: str | Path,
    top_k: int = TEACHER_TOP_K,
    shard_windows: int = 64,
    batch_size: int = 1,
    progress: bool = True,
    stream_layer: int | None = None,
) -> TopKTeacherCache:
    """Run `teacher` over `input_ids` `[windows, seq_len]` once and store the top-`top_k` log-probabilities, and with
    `stream_layer` the residual stream entering that decoder layer (`stream`, in the teacher's compute dtype): the
    student's own stream at its first patch, where every training step then starts.

    `teacher` may be a [`layerwise_model`] (a teacher larger than the device): each shard's windows then go through
    the decoder layers one layer at a time, and the final norm, the LM head and the top-K run `batch_size` windows
    at a time.

    Returns the cache at `cache_root/<key>`, reusing it if complete; otherwise resumes after the last shard whose
    hash checks out (rebuilding corrupt ones).
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"Teacher cache needs a non-empty (windows, seq_len) tensor; got {tuple(input_ids.shape)}.")
    vocab_size = teacher.config.vocab_size
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be in 1..{vocab_size} (the vocabulary size).")
    layerwise = getattr(teacher, "layerwise", None)
    if layerwise is not None:  # its weights are in the shards: their bytes are its identity
        teacher_fingerprint = checkpoint_fingerprint(layerwise.checkpoint.folder, layerwise.dtype)
    else:
        teacher_fingerprint = model_fingerprint(teacher)
    value_dtype = VALUE_DTYPE
    key = cache_key(teacher_fingerprint, input_ids, top_k, value_dtype, stream_layer)
    path = Path(cache_root) / key
    path.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(path)  # half-written shards of a killed build
    indices_dtype = index_dtype(vocab_size)
    num_windows, seq_len = input_ids.shape
    plan = [(start, min(start + shard_windows, num_windows)) for start in range(0, num_windows, shard_windows)]
    manifest_path = path / TEACHER_CACHE_MANIFEST
    done = finished_shards(manifest_path)
    value_bytes = torch.finfo(value_dtype).bits // 8
    index_bytes = torch.iinfo(indices_dtype).bits // 8
    manifest = dict(
        format=FORMAT_VERSION,
        key=key,
        teacher=teacher_fingerprint,
        teacher_name=getattr(teacher.config, "_name_or_path", ""),
        vocab_size=vocab_size,
        top_k=top_k,
        num_windows=num_windows,
        seq_len=seq_len,
        value_dtype=str(value_dtype).removeprefix("torch."),
        index_dtype=str(indices_dtype).removeprefix("torch."),
        bytes_per_token=top_k * (value_bytes + index_bytes),
        full_vocabulary_bytes_per_token=vocab_size * value_bytes,
        shards=[],
        complete=False,
    )
    if stream_layer is not None:
        stream_dtype = next(parameter.dtype for parameter in teacher.parameters() if parameter.is_floating_point())
        per_token = teacher.config.hidden_size * stream_dtype.itemsize
        manifest.update(stream_layer=stream_layer, stream_bytes_per_token=per_token)
        if not done:
            from ..shards import format_size

            size = format_size(per_token * input_ids.numel())
            print(
                f"teacher cache: also the stream entering layer {stream_layer}, {size} ({num_windows} windows x "
                f"{seq_len} tokens x {per_token} bytes), written to {path}"
            )
    bar = tqdm(total=num_windows, desc="teacher top-k cache", unit="window", disable=not progress)
    for number, (start, end) in enumerate(plan):
        name = f"shard-{number:05d}.safetensors"
        previous = done.get(name)
        file = path / name
        if previous and previous["windows"] == end - start:
            if file.exists() and sha256_file(file) == previous["sha256"]:
                manifest["shards"].append(previous)
                bar.update(end - start)
                continue
            rebuilding("the teacher cache's shard", file, "missing, or its SHA-256 is not the manifest's")
        values, indices = [], []
        with (
            torch.no_grad(),
            stream_recording(teacher, stream_layer) as streams,
            logits_source(teacher, input_ids[start:end]) as logits_of,
        ):
            for first in range(start, end, batch_size):
                batch = slice(first - start, min(first + batch_size, end) - start)
                log_probs = torch.log_softmax(logits_of(batch).float(), dim=-1)
                top = log_probs.topk(top_k, dim=-1)
                values.append(top.values.to(value_dtype).cpu())
                indices.append(top.indices.to(torch.int32).cpu().to(indices_dtype))
                bar.update(batch.stop - batch.start)
        tensors = {
            "input_ids": input_ids[start:end].to(torch.int32).contiguous(),
            "values": torch.cat(values).contiguous(),
            "indices": torch.cat(indices).contiguous(),
        }
        if stream_layer is not None:
            tensors["stream"] = torch.cat(streams).contiguous()
        save_tensors_atomically(tensors, file)
        manifest["shards"].append(dict(file=name, windows=end - start, sha256=sha256_file(file)))
        _write_manifest(manifest_path, manifest)  # after each shard: an interrupted build resumes from here
    bar.close()
    manifest["complete"] = True
    _write_manifest(manifest_path, manifest)
    return TopKTeacherCache.open(path, verify=False)


def checkpoint_fingerprint(folder: str | Path, dtype: torch.dtype) -> str:
    """SHA-256 of a checkpoint folder's config, compute dtype and weight files (read in blocks): the identity of a
    teacher that is run layer by layer and never held whole."""
    folder = Path(folder)
    digest = hashlib.sha256(str(dtype).encode())
    for file in sorted(folder.glob("*.safetensors")) + [folder / CONFIG_FILE]:
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def _write_manifest(path: Path, manifest: dict) -> None:
    write_text_atomically(path, json.dumps(manifest, indent=2))


class TeacherCacheDataset(torch.utils.data.Dataset):
    """Windows of a [`TopKTeacherCache`] as training examples: `input_ids`, `teacher_values`, `teacher_indices`.

    Shards are opened lazily (memory-mapped by safetensors), so the dataset costs no memory up front.
    """

    def __init__(self, cache: TopKTeacherCache):
        self.cache = cache
        self.with_stream = cache.manifest.get("stream_layer") is not None
        self.locations = []
        for shard_index, shard in enumerate(cache.manifest["shards"]):
            self.locations.extend((shard_index, row) for row in range(shard["windows"]))
        self._files = cache.shard_files()

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard_index, row = self.locations[index]
        with safe_open(str(self._files[shard_index]), framework="pt") as shard:
            example = {
                "input_ids": shard.get_slice("input_ids")[row].to(torch.long),
                "teacher_values": shard.get_slice("values")[row].float(),
                "teacher_indices": shard.get_slice("indices")[row].to(torch.long),
            }
            if self.with_stream:
                example["stream"] = shard.get_slice("stream")[row]
            return example


def main(argv: list[str] | None = None) -> None:
    """Build a cache in this (separate) process: the teacher lives and dies here."""
    parser = argparse.ArgumentParser(
        prog="linearpatch teacher cache", description="Build an offline top-K teacher cache."
    )
    parser.add_argument("teacher")
    parser.add_argument("windows", help="safetensors file with an `input_ids` [windows, seq_len] tensor")
    parser.add_argument("cache_root")
    parser.add_argument("--top-k", type=int, default=TEACHER_TOP_K)
    parser.add_argument("--shard-windows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--result", help="write the cache folder's path to this file")
    parser.add_argument("--sequential", choices=["auto", "yes", "no"], default="auto", help="layer by layer")
    parser.add_argument("--max-memory", help="memory the teacher may use on the device, e.g. 200MB")
    parser.add_argument("--stream-layer", type=int, help="also store the stream entering this decoder layer")
    args = parser.parse_args(argv)
    from ..layerwise import choose_sequential, layerwise_model
    from ..models import load_model, resolve_device, resolve_model
    from ..shards import SafetensorsCheckpoint

    input_ids = load_file(args.windows)["input_ids"]
    dtype = getattr(torch, args.dtype)
    device = resolve_device(args.device)
    folder = resolve_model(args.teacher)
    sequential = {"auto": None, "yes": True, "no": False}[args.sequential]
    sequential = choose_sequential(
        SafetensorsCheckpoint(folder).nbytes(dtype), device, sequential, args.max_memory, "teacher"
    )
    with contextlib.ExitStack() as stack:
        if sequential:
            teacher = stack.enter_context(layerwise_model(folder, dtype, device, max_memory=args.max_memory))
        else:
            # `distill_checkpoint` checked the teacher (`kind="dense"`) in the parent, where `register_family` may
            # have added its family; this process only runs it.
            teacher, _ = load_model(args.teacher, dtype=args.dtype, device=device, kind="teacher")
        cache = build_teacher_cache(
            teacher,
            input_ids,
            args.cache_root,
            args.top_k,
            args.shard_windows,
            args.batch_size,
            stream_layer=args.stream_layer,
        )
    print(
        f"teacher cache: {cache.path} ({cache.num_windows} windows, {cache.bytes_per_token} bytes/token; "
        f"full vocabulary would be {cache.manifest['full_vocabulary_bytes_per_token']})"
    )
    if args.result:
        Path(args.result).write_text(str(cache.path))


def run_child() -> None:
    """Entry point of the child process `build_cache_in_subprocess` starts."""
    try:
        main()
    except KeyboardInterrupt:  # the parent reports the interrupt; finished shards stay for the resume
        raise SystemExit(130) from None


if __name__ == "__main__":
    run_child()


__all__ = [
    "TeacherCacheDataset",
    "TopKTeacherCache",
    "build_teacher_cache",
    "cache_key",
    "checkpoint_fingerprint",
    "index_dtype",
    "model_fingerprint",
]
