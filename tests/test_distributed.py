"""Data-parallel distillation for real: two CPU processes (gloo) under `accelerate launch` train the same patch as
one process with the same global batch, and each rank reads only its share of the teacher cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_patch, tiny_llama
from safetensors.torch import load_file

from linearpatch.integration.distillation.teacher_cache import build_teacher_cache
from linearpatch.modeling import prune_layers

SCRIPT = Path(__file__).with_name("distributed_distill.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.fixture(scope="module")
def student_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    dense = tiny_llama(num_layers=6, seed=11)
    student = prune_layers(dense, [2, 3], patches=[random_patch(64, seed=1, scale=0.05)])
    student.save_pretrained(root / "student")
    windows = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(4))
    # With the stream entering the patch's layer, as `distill` builds it: every step starts there, on every rank.
    options = dict(top_k=16, shard_windows=4, progress=False, stream_layer=2)
    cache = build_teacher_cache(dense, windows, root / "cache", **options)
    return root / "student", cache.path


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(SCRIPT.parent), **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.skipif(shutil.which(str(ACCELERATE)) is None, reason="accelerate's launcher is not installed")
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_distributed_two_processes_match_one(tmp_path, student_and_cache, streamed):
    """With `streamed` (issue #44), each rank reads its student's layers from the shards, forward and backward."""
    student, cache = student_and_cache
    cpu = {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    arguments = [str(student), str(cache), *(["--streamed"] if streamed else [])]
    run([sys.executable, str(SCRIPT), *arguments, str(tmp_path / "one"), "--per-device-batch", "4"], env=cpu)
    # torchrun's launcher (`--multi_gpu`) with ACCELERATE_USE_CPU: two processes on the CPU with gloo. (`--cpu`
    # alone would start a single process.)
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    port = "29534" if streamed else "29533"
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    run([*launch, str(SCRIPT), *arguments, str(tmp_path / "two"), "--per-device-batch", "2"], env=cpu)

    one, two = load_file(tmp_path / "one" / "patches.safetensors"), load_file(tmp_path / "two" / "patches.safetensors")
    initial = load_file(student / "model.safetensors")
    assert one.keys() == two.keys() and len(one) == 1
    for name in one:
        moved = (one[name] - initial[next(k for k in initial if "linear_patch" in k)]).norm()
        assert moved > 1e-3  # training happened, so agreement means something
        assert (one[name] - two[name]).norm() <= 1e-4 * one[name].norm(), name

    # Three steps of a global batch of 4: one process read 12 windows; each of the two read its own 6.
    read_one = json.loads((tmp_path / "one" / "read-0.json").read_text())
    read_two = [json.loads((tmp_path / "two" / f"read-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(read_one) == 12 and [len(read) for read in read_two] == [6, 6]
    assert not set(read_two[0]) & set(read_two[1])
    assert sorted(read_two[0] + read_two[1]) == sorted(read_one)
