"""A model whose weights stay on disk: one decoder layer on the device at a time, for models larger than it.

[`layerwise_model`] builds the family's own causal LM (dense, or a LinearPatch checkpoint's) with empty (meta) weights
and real buffers (RoPE), then makes its modules load their weights from the safetensors shards when they run and drop
them afterwards:

- the embedding loads the rows of the tokens in use for the forward, then is freed;
- each decoder layer loads, pushes every window's hidden states through itself in chunks of `chunk_size` windows
  (the layer's own forward, so attention masks, RoPE and sliding windows are the family's), writes the results into
  an activation store and is freed; while it computes, a background thread reads the next layer's weights (the
  reads release the GIL), so that a pass runs at the speed of its compute, not of compute plus reading;
- the final norm and the LM head are loaded explicitly by whoever needs them ([`LayerwiseModel.load`]).

The activation store, one `(windows, seq_len, C)` tensor per layer boundary, is kept on the device when it fits the
memory budget, else in CPU memory, else in a memory-mapped file on disk (a message says so). A forward over all
windows at once is then exactly what the in-memory model computes one batch at a time, with peak memory of about
two layers (the one computing and the one being read) plus the activations. Each shard byte is read once per pass.
Calibration ([`calibrate`] with `batch_size` = all windows) and the teacher cache run over it unchanged.
"""

import contextlib
import ctypes
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .shards import SafetensorsCheckpoint, format_size, parse_size

logger = logging.getLogger("linearpatch")


def available_memory(device: str | torch.device) -> int:
    """Free memory of `device` in bytes: `MemAvailable` of /proc/meminfo for the CPU, `mem_get_info` for CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_limit(device: str, max_memory: str | int | None) -> int:
    """Bytes a model may take on `device`: `max_memory` when given, else nine tenths of its free memory (the rest is
    for activations)."""
    return parse_size(max_memory) if max_memory is not None else int(available_memory(device) * 0.9)


def choose_sequential(
    model_bytes: int,
    device: str,
    sequential: bool | None,
    max_memory: str | int | None,
    what: str = "model",
) -> bool:
    """Whether to run a model layer by layer: as asked, or (`sequential=None`) when its `model_bytes` exceed
    [`memory_limit`]. The automatic choice is logged; an explicit `sequential=False` with a `max_memory` the model
    exceeds is an error."""
    from linearpatch.common.errors import LinearPatchError

    limit = memory_limit(device, max_memory)
    source = "--max-memory" if max_memory is not None else f"free memory of {device}"
    if sequential is None:
        sequential = model_bytes > limit
        if sequential:
            logger.warning(
                "linearpatch: the %s (%s) does not fit in %s (%s): running it layer by layer (--sequential).",
                what,
                format_size(model_bytes),
                format_size(limit),
                source,
            )
    elif not sequential and max_memory is not None and model_bytes > limit:
        raise LinearPatchError(
            f"The {what} ({format_size(model_bytes)}) does not fit in --max-memory {format_size(limit)}, and "
            "--sequential was turned off: allow more memory or run it sequentially."
        )
    return sequential


def _to_chunk(value, part: slice, batch: int, device: torch.device):
    """A layer argument for the windows `part`: batch-first tensors (ndim >= 2, first dim = all windows) are sliced,
    other tensors moved, tuples, lists and dicts (Gemma's per-layer-type RoPE) handled element by element."""
    if isinstance(value, torch.Tensor):
        if value.ndim >= 2 and value.shape[0] == batch and batch > 1:
            value = value[part]
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to_chunk(item, part, batch, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_chunk(item, part, batch, device) for key, item in value.items()}
    return value


_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc). A layer's many per-window temporaries fragment the heap; without
    this, resident memory grows by tens of MB per layer although nothing is alive."""
    if _libc():
        _libc().malloc_trim(0)


def _map_large_allocations(threshold: int = 256 * 1024) -> None:
    """Serve allocations above `threshold` from their own memory maps, returned to the OS when freed (glibc). By
    default glibc raises this threshold as large blocks are freed, and the per-window activations of a layer then
    pile up in a fragmented heap: peak memory is what a sequential pass is for."""
    if _libc():
        _libc().mallopt(_M_MMAP_THRESHOLD, threshold)


def _release(module: torch.nn.Module) -> None:
    """Put `module`'s parameters back on the meta device (its buffers stay) and return the memory."""
    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is not None:
                submodule._parameters[name] = torch.nn.Parameter(parameter.to("meta"), requires_grad=False)
    _trim_heap()


class LayerwiseModel:
    r"""
    The on-demand weights of a model built by [`layerwise_model`] (available as `model.layerwise`).

    Args:
        checkpoint (`SafetensorsCheckpoint`): the dense weights.
        model (`PreTrainedModel`): the skeleton (meta parameters, real buffers).
        dtype (`torch.dtype`), device (`torch.device`): compute dtype and device.
        chunk_size (`int`): windows per layer forward.
        memory_budget (`int`): bytes the activation store may use on the device before it moves to the CPU (and from
            the CPU's available memory to disk).
        progress (`bool`): a progress bar over layers.
    """

    def __init__(self, checkpoint, model, dtype, device, chunk_size, memory_budget, progress):
        self.checkpoint = checkpoint
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.progress = progress
        self.spill_dir: tempfile.TemporaryDirectory | None = None
        self.store_location: str | None = None
        self._bar = None
        self._stores = 0
        self._padding_idx = None
        # Set by calibrate: `observer(layer, windows, input_chunk, output_chunk)` sees every chunk, and `in_place`
        # writes a layer's output over its input (one activation tensor instead of two).
        self.observer = None
        self.in_place = False
        self.read_ahead = True  # read the next layer while one computes (off when two layers exceed --max-memory)
        self._reader = None  # the prefetching thread, started with the first prefetch
        self._prefetched: tuple | None = None  # (module name, future of its weights)

    def load(self, name: str) -> torch.nn.Module:
        """Load the weights of the module `name` (e.g. `model.norm`, `lm_head`) onto the device; return it."""
        module = self.model.get_submodule(name)
        state = self.take(name)
        expected = {key for key, _ in module.named_parameters()}
        if set(state) != expected:
            from linearpatch.common.errors import CheckpointMismatchError

            raise CheckpointMismatchError(
                f"{self.checkpoint.folder}: the weights of {name} do not fit the config "
                f"(missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)})."
            )
        module.load_state_dict(state, strict=True, assign=True)
        return module

    def _read_state(self, name: str) -> dict[str, torch.Tensor]:
        """The weights of module `name` from the shards, in the compute dtype, on the device."""
        prefix = name + "."
        state = {
            # Patches stay in fp32 whatever the compute dtype, as `from_pretrained` keeps them.
            key[len(prefix) :]: self.checkpoint.read(key, None if "linear_patch" in key else self.dtype, self.device)
            for key in self.checkpoint.keys()
            if key.startswith(prefix)
        }
        if not state and name == "lm_head" and self.model.config.tie_word_embeddings:
            state = {"weight": self.checkpoint.read("model.embed_tokens.weight", self.dtype, self.device)}
        return state

    def take(self, name: str, read=None) -> dict[str, torch.Tensor]:
        """The weights of module `name` as `read(name)` (default: [`_read_state`]) gives them: the ones [`prefetch`]
        read ahead with the same `read` if it was this module, else read now. A read ahead of another module (a pass
        that stopped early) is dropped, once it ends."""
        read = read or self._read_state
        if self._prefetched is not None:
            prefetched, future = self._prefetched
            self._prefetched = None
            if prefetched == (name, read):
                return future.result()
        return read(name)

    def prefetch(self, name: str, read=None) -> None:
        """Start `read(name)` (default: [`_read_state`], the weights of module `name`) in a background thread, for
        the next [`take`] of it: the file reads (which release the GIL) overlap with the current layer's compute, at
        the cost of one more layer in memory."""
        read = read or self._read_state
        if self._reader is None:
            from concurrent.futures import ThreadPoolExecutor

            self._reader = ThreadPoolExecutor(1, thread_name_prefix="linearpatch-prefetch")
        self._prefetched = ((name, read), self._reader.submit(read, name))

    def release(self, module: torch.nn.Module) -> None:
        _release(module)

    def new_store(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An activation tensor of `shape`: on the device if the budget allows three of them (a layer's input, its
        output and one older boundary for the statistics), else in CPU memory, else memory-mapped on disk."""
        count = 1
        for size in shape:
            count *= size
        nbytes = count * dtype.itemsize
        if self.device.type != "cpu" and 3 * nbytes <= self.memory_budget:
            location = "device"
        elif 3 * nbytes <= (available_memory("cpu") if self.device.type != "cpu" else self.memory_budget):
            location = "cpu"
        else:
            location = "disk"
        if location != self.store_location:
            self.store_location = location
            if location == "disk":
                self.spill_dir = self.spill_dir or tempfile.TemporaryDirectory(prefix="linearpatch-activations-")
                logger.warning(
                    "linearpatch: the activations (%s per layer) do not fit in memory: they spill to memory-mapped "
                    "files in %s, which is slower.",
                    format_size(nbytes),
                    self.spill_dir.name,
                )
        if location == "disk":
            self._stores += 1
            path = Path(self.spill_dir.name) / f"activations-{self._stores}.bin"
            return torch.from_file(str(path), shared=True, size=count, dtype=dtype).view(shape)
        return torch.empty(shape, dtype=dtype, device=self.device if location == "device" else "cpu")

    def install(self) -> None:
        """Make the embedding and the decoder layers load their weights when called, and free them after."""
        base = self.model.model

        def load_embedding(module, args):
            # Only the rows of the tokens in use, and the ids renumbered to them: for a 128k vocabulary that is a
            # small part of the embedding.
            input_ids = args[0]
            rows, inverse = torch.unique(input_ids, return_inverse=True)
            weight = self.checkpoint.read_rows("model.embed_tokens.weight", rows.cpu(), self.dtype, self.device)
            module.weight = torch.nn.Parameter(weight, requires_grad=False)
            # padding_idx only shapes gradients, and refers to the full vocabulary.
            module.padding_idx, self._padding_idx = None, module.padding_idx
            return (inverse.reshape(input_ids.shape).to(self.device), *args[1:])

        def free_embedding(module, args, output):
            module.padding_idx = self._padding_idx
            self.release(module)

        base.embed_tokens.register_forward_pre_hook(load_embedding)
        base.embed_tokens.register_forward_hook(free_embedding)
        for index, layer in enumerate(base.layers):
            layer.forward = self._chunked_forward(layer, index)

    def _chunked_forward(self, layer: torch.nn.Module, index: int):
        own_forward = layer.forward

        def forward(hidden_states: torch.Tensor, *args, **kwargs):
            batch = hidden_states.shape[0]
            if index == 0 or self._bar is None:
                self.close_bar()
                self._bar = tqdm(
                    total=len(self.model.model.layers), desc="layers", unit="layer", disable=not self.progress
                )
            self.load(f"model.layers.{index}")
            if self.read_ahead and index + 1 < len(self.model.model.layers):
                self.prefetch(f"model.layers.{index + 1}")
            try:
                output = hidden_states if self.in_place else self.new_store(hidden_states.shape, hidden_states.dtype)
                for first in range(0, batch, self.chunk_size):
                    part = slice(first, min(first + self.chunk_size, batch))
                    result = own_forward(
                        hidden_states[part].to(self.device),
                        *_to_chunk(args, part, batch, self.device),
                        **_to_chunk(kwargs, part, batch, self.device),
                    )
                    result = result[0] if isinstance(result, tuple) else result
                    if self.observer is not None:
                        self.observer(index, part, hidden_states[part], result)
                    output[part] = result.to(output.device)
            finally:
                self.release(layer)
            self._bar.update(1)
            return output

        return forward

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        self._prefetched = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        if self.spill_dir is not None:
            self.spill_dir.cleanup()
            self.spill_dir = None


@contextlib.contextmanager
def layerwise_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    chunk_size: int = 1,
    memory_budget: int | None = None,
    progress: bool = True,
    max_memory: str | int | None = None,
) -> Iterator[torch.nn.Module]:
    r"""
    The dense causal LM of the checkpoint folder `path`, with its weights left in the safetensors shards and loaded
    one module at a time (see the module docstring). Use it like the model in memory for a forward over all windows
    at once: `model.model(input_ids=all_windows)`.

    Args:
        path (`str` or `Path`): a dense checkpoint folder of a supported family, or a LinearPatch checkpoint.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): compute dtype.
        device (`str`, *optional*, defaults to `"cpu"`): compute device.
        chunk_size (`int`, *optional*, defaults to 1): windows per decoder-layer forward.
        memory_budget (`int`, *optional*): bytes for the activation store on the device (CPU: before it spills to
            disk); defaults to half the device's free memory.
        progress (`bool`, *optional*, defaults to `True`): a progress bar over layers.
        max_memory (`str` or `int`, *optional*): what the model may hold on the device (`--max-memory`): the layers
            in memory (two while the next one is read ahead, one when two do not fit) and the activation store share
            it, and activations past it go to the CPU or to disk. Without it, `memory_budget` alone bounds them.

    Yields:
        `PreTrainedModel`: the skeleton, with `model.layerwise` the [`LayerwiseModel`] that loads its weights.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from linearpatch.modeling import family_of

    checkpoint = SafetensorsCheckpoint(path)
    _map_large_allocations()
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    config.dtype = dtype
    family = family_of(config)
    # A dense model, or a LinearPatch checkpoint (its patches load with the layer or final norm that holds them).
    causal_lm = family.causal_lm_class if config.model_type == family.model_type else family.dense_causal_lm_class
    with init_empty_weights(include_buffers=False):
        model = causal_lm(config)
    device = torch.device(device)
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    model.eval()
    if memory_budget is None:
        memory_budget = available_memory(device) // 2
    read_ahead = True
    if max_memory is not None:
        limit = parse_size(max_memory)
        layer = max(checkpoint.nbytes(dtype, f"model.layers.{i}.") for i in range(config.num_hidden_layers))
        read_ahead = 2 * layer <= limit
        if layer > limit:
            logger.warning(
                "linearpatch: one decoder layer (%s) is larger than --max-memory (%s): it is loaded whole anyway, one "
                "at a time.",
                format_size(layer),
                format_size(limit),
            )
        memory_budget = min(memory_budget, max(limit - (2 if read_ahead else 1) * layer, 0))
    layerwise = LayerwiseModel(checkpoint, model, dtype, device, chunk_size, memory_budget, progress)
    layerwise.read_ahead = read_ahead
    layerwise.install()
    model.layerwise = layerwise
    try:
        yield model
    finally:
        layerwise.close()
        # glibc cannot go back to its dynamic threshold; its ceiling (32 MiB) is where a long-running process ends up
        # anyway, and keeps later allocations off the slow path of one memory map each.
        _map_large_allocations(32 * 1024 * 1024)


__all__ = ["LayerwiseModel", "available_memory", "choose_sequential", "layerwise_model", "memory_limit"]
