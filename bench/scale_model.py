"""A random-weight model of a large Llama's exact shape (issue #33), for measuring what each stage costs at the size
users prune: cost does not depend on the weights. Written once, shard by shard with bounded memory (one slab of rows
at a time, never a whole tensor in fp32), into bf16 safetensors shards of at most 2 GB, and cached under
linearpatch's cache; it gets the SmolLM2 tokenizer (ids below 49152 of the 128256-row vocabulary are used).

    python -m bench.scale_model [--shape llama-3-8b] [--folder PATH]   # writes it (about 3 minutes), prints where
"""

import argparse
import json
import shutil
from pathlib import Path

# Meta-Llama-3-8B's config.json, every field that shapes the weights or the compute.
LLAMA_3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SHAPES = {
    "llama-3-8b": LLAMA_3_8B,
    # Llama-3.2-3B's layout (tied head, 28 layers, 6.4 GB of bf16): the "3B-shaped" model of issue #44.
    "llama-3.2-3b": dict(
        LLAMA_3_8B,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        tie_word_embeddings=True,
    ),
    # The same layout at a size the tests can write (the writer's own test).
    "tiny": dict(
        LLAMA_3_8B,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=2048,
    ),
}
MAX_SHARD_SIZE = 2 * 1000**3  # the 2 GB, as the Hub writes shard sizes
SLAB_ELEMENTS = 32 * 2**20  # elements generated at a time: 128 MiB of fp32, whatever the tensor's size
STD = 0.02  # Llama's initializer_range: activations keep a sane scale through 32 random layers


def shapes_of(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of the Llama of `config` (a `LlamaConfig`), in the order `save_pretrained` writes them: the
    family's own model, built on the meta device (no memory), says which."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        weights = LlamaForCausalLM(config).state_dict()
    return [(name, tuple(tensor.shape)) for name, tensor in weights.items()]


def _producer(name: str, shape: tuple[int, ...], seed: int):
    """The pieces of one tensor: ones for a norm, else N(0, STD) in bf16, one slab of rows at a time (seeded per
    tensor, so the model is the same on every machine and at every shard size)."""
    import torch

    def produce():
        if len(shape) == 1:
            yield torch.ones(shape, dtype=torch.bfloat16)
            return
        generator = torch.Generator().manual_seed(seed)
        rows = max(1, SLAB_ELEMENTS // shape[1])
        for first in range(0, shape[0], rows):
            slab = torch.randn((min(rows, shape[0] - first), shape[1]), generator=generator) * STD
            yield slab.to(torch.bfloat16)

    return produce


def write_scale_model(
    folder: Path, shape: str = "llama-3-8b", max_shard_size: int = MAX_SHARD_SIZE, progress: bool = True
) -> Path:
    r"""
    Write a random-weight Llama of the shape `shape` (a key of `SHAPES`) into `folder`, unless it is there already.

    Args:
        folder (`Path`): where the model goes; written beside it under a temporary name and renamed into place.
        shape (`str`, *optional*, defaults to `"llama-3-8b"`): the config.
        max_shard_size (`int`, *optional*, defaults to 2 GB): bytes per shard.
        progress (`bool`, *optional*, defaults to `True`): a progress bar over the bytes written.

    Returns:
        `Path`: `folder`.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from linearpatch.common.files import rename_no_replace, staging_path
    from linearpatch.integration.models import resolve_model
    from linearpatch.integration.shards import PendingTensor, write_sharded_safetensors

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    staging = staging_path(folder)
    staging.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
        config = LlamaConfig(
            **SHAPES[shape],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            dtype="bfloat16",
        )
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tensors = [
            (name, PendingTensor(torch.bfloat16, size, _producer(name, size, seed)))
            for seed, (name, size) in enumerate(shapes_of(config))
        ]
        write_sharded_safetensors(staging, tensors, max_shard_size, progress=progress)
        rename_no_replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def default_folder(shape: str = "llama-3-8b") -> Path:
    """Where the model of `shape` is cached: `<linearpatch cache>/scale/<shape>-random`."""
    from linearpatch.integration.embedded import cache_dir

    return cache_dir() / "scale" / f"{shape}-random"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3-8b")
    parser.add_argument("--folder", type=Path, help="default: under linearpatch's cache")
    args = parser.parse_args(argv)
    folder = write_scale_model(args.folder or default_folder(args.shape), args.shape)
    index = folder / "model.safetensors.index.json"
    total = json.loads(index.read_text())["metadata"]["total_size"] if index.exists() else None
    print(f"{folder} ({total / 1e9:.2f} GB of weights)" if total else str(folder))


if __name__ == "__main__":
    main()
