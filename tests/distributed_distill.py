"""Distil a pruned checkpoint's patches from a teacher cache, in one process or under `accelerate launch`.

Run by tests/test_distributed.py: `python tests/distributed_distill.py STUDENT CACHE OUT --per-device-batch B`, or the
same under `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true (torchrun's launcher, gloo
on the CPU: `--cpu` alone starts one process). Rank 0 writes the trained patches to OUT/patches.safetensors;
every rank writes the cache windows it read to OUT/read-RANK.json.
"""

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from linearpatch.integration.distillation import teacher_cache, trainer
from linearpatch.integration.distillation.streamed import streamed_student
from linearpatch.modeling import LinearPatchForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("student")
    parser.add_argument("cache")
    parser.add_argument("output")
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--streamed", action="store_true", help="the student's layers read from its shards")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    read: list[int] = []
    original = teacher_cache.TeacherCacheDataset.__getitem__

    def logged(self, index):
        read.append(int(index))
        return original(self, index)

    teacher_cache.TeacherCacheDataset.__getitem__ = logged
    cache = teacher_cache.TopKTeacherCache.open(args.cache)
    with contextlib.ExitStack() as stack:
        if args.streamed:
            student = stack.enter_context(streamed_student(args.student, torch.float32, "cpu"))
        else:
            student = LinearPatchForCausalLM.from_pretrained(args.student)
        model = trainer.distill(
            student,
            cache,
            output / "work",
            place_model_on_device=not args.streamed,
            per_device_train_batch_size=args.per_device_batch,
            max_steps=args.steps,
            learning_rate=1e-2,  # large enough that the patches move measurably in three steps
            lr_scheduler_type="constant",
            disable_tqdm=True,
        )
    from accelerate import PartialState

    state = PartialState()
    assert state.num_processes == int(os.environ.get("WORLD_SIZE", 1)), "not data-parallel"
    (output / f"read-{rank}.json").write_text(json.dumps(read))
    if rank == 0:
        patches = {
            name: parameter.detach().clone().contiguous()
            for name, parameter in model.named_parameters()
            if parameter.requires_grad
        }
        save_file(patches, str(output / "patches.safetensors"))
    # Every rank waits for the others, then leaves the process group: a rank that exits with gloo's threads still
    # running can abort ("terminate called without an active exception", seen once in CI under load).
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
