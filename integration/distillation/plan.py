"""The distillation plan: what a `distill` run trains on and how, decided before the teacher runs: the training
windows, the teacher cache's root, the work folder and resume point, the student's device map and the Trainer's
settings."""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from linearpatch.common.errors import CheckpointMismatchError, LinearPatchError
from linearpatch.common.files import staging_path

from ..data import TokenWindows, token_windows
from ..defaults import Sizes
from ..layerwise import available_memory, choose_sequential, memory_limit
from ..requests import DistillRequest
from ..resolution import ModelRef
from ..shards import format_size

log = logging.getLogger("linearpatch")

# In the work folder (OUTPUT.work): the trained patches and the log of a run whose output is not written yet.
FINISHED_ADAPTER = "finished-adapter"


def keep_finished(model, history: list[dict], folder: Path) -> None:
    """Save the trained patches (a few MB) before the output is written, so that a failed write loses no training."""
    try:
        staging = staging_path(folder)
        model.save_pretrained(staging)
        (staging / "log_history.json").write_text(json.dumps(history))
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(folder)
    except Exception as error:  # the disk may already be full: the output write says so next
        log.warning("linearpatch: could not keep the finished training in %s (%s)", folder, error)
        shutil.rmtree(staging, ignore_errors=True)


def load_finished(student, folder: Path):
    """The model and log of a finished training kept by [`keep_finished`]."""
    from peft import PeftModel

    from ..adapter import quiet_peft

    with quiet_peft():
        model = PeftModel.from_pretrained(student, str(folder))
    return model, json.loads((folder / "log_history.json").read_text())


@dataclass
class DistillPlan:
    r"""
    What a `distill` run will do.

    Args:
        windows (`TokenWindows`): the training windows.
        work_dir (`Path`): Trainer checkpoints and a finished training (`OUTPUT.work` by default).
        trainer_dir (`Path`): where the Trainer writes (`work_dir` when its checkpoints are kept, else a staging
            folder).
        keep_work (`bool`): whether the Trainer's checkpoints are kept (`--save-steps`, `--resume`).
        from_finished (`bool`): a resumed run whose training finished: the output is written from it.
        device_map (`dict`): `load_model` arguments for the student (a spread over devices when it does not fit).
        overrides (`dict`): the Trainer's arguments from the recipe.
        streamed (`bool`): the student is trained with its layers read from the shards ([`streamed_student`]).
    """

    windows: TokenWindows
    work_dir: Path
    trainer_dir: Path
    keep_work: bool
    from_finished: bool
    device_map: dict
    overrides: dict
    streamed: bool = False

    @property
    def finished(self) -> Path:
        return self.work_dir / FINISHED_ADAPTER


def work_folder(request: DistillRequest) -> Path:
    """The work folder of `request`: `--work-dir`, else `OUTPUT.work` beside the output."""
    output = Path(request.output)
    return Path(request.work_dir) if request.work_dir else output.with_name(f"{output.name}.work")


def plan_distillation(
    request: DistillRequest, tokenizer, config, device: str, student_bytes: int, windows: TokenWindows | None = None
) -> DistillPlan:
    """The plan of `request` for a student of `config` (`student_bytes` in its dtype) on `device`, training on
    `windows` when given (the teacher's own text), else on windows cut from `request.data`."""
    if windows is None:
        sizes = Sizes.resolve("distillation", device, request.num_samples, request.seq_len, config)
        windows = token_windows(request.data, tokenizer, sizes.num_samples, sizes.seq_len, seed=request.seed)
    work_dir = work_folder(request)
    from_finished = request.resume and (work_dir / FINISHED_ADAPTER).exists()
    if from_finished:
        log.warning("linearpatch: %s holds finished training: writing the output from it, without training.", work_dir)
    keep_work = bool(request.save_steps) or request.resume
    output = Path(request.output)
    trainer_dir = work_dir if keep_work else staging_path(output.parent / f"{output.name}.work")
    streamed = choose_sequential(student_bytes, device, request.sequential, request.max_memory, "student")
    if streamed and request.export:
        raise LinearPatchError(
            "distill --export trains the export's maps on a student held whole, which does not fit here "
            "(--max-memory or --sequential): distill without --export (layer by layer), then `linearpatch export` "
            "the result, which also runs layer by layer."
        )
    overrides = trainer_overrides(request, device)
    if streamed:
        # The student loads each layer onto the device itself, and checkpoints every layer already.
        overrides.update(place_model_on_device=False, activation_checkpointing=False)
    device_map = {} if streamed else choose_device_map(student_bytes, device, request.max_memory)
    return DistillPlan(windows, work_dir, trainer_dir, keep_work, from_finished, device_map, overrides, streamed)


def trainer_overrides(request: DistillRequest, device: str) -> dict:
    """The Trainer's arguments from the request's recipe (see [`distillation_arguments`])."""
    overrides = dict(
        learning_rate=request.lr,
        num_train_epochs=request.epochs,
        per_device_train_batch_size=request.batch_size,
        gradient_accumulation_steps=request.gradient_accumulation_steps,
        seed=request.seed,
        data_seed=request.seed,
        bf16=request.bf16,
        activation_checkpointing=request.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if request.save_steps else "no",
        save_steps=request.save_steps or 500,
        use_cpu=device == "cpu",
    )
    if request.max_steps:
        overrides["max_steps"] = request.max_steps
    return overrides


def check_teacher_matches(teacher: "str | ModelRef", student_config, student_tokenizer) -> None:
    """Refuse a teacher whose vocabulary differs from the student's, from configs and tokenizers only.

    Raises:
        CheckpointMismatchError: naming both vocabularies.
    """
    from ..models import check_same_base, check_same_vocabulary, load_config, load_tokenizer

    teacher_config = load_config(teacher, kind="dense")
    check_same_vocabulary(
        f"The teacher {teacher}",
        teacher_config.vocab_size,
        "the student",
        student_config.vocab_size,
        "distillation compares logits token by token, so use the dense model the checkpoint was pruned from "
        f"({student_config.base_model or 'see its config'}).",
    )
    check_same_base(student_config, teacher_config, teacher, "teacher")
    if load_tokenizer(teacher).get_vocab() != student_tokenizer.get_vocab():
        raise CheckpointMismatchError(
            f"The teacher {teacher} and the student have different tokenizers (same size, different tokens): use the "
            "dense model the checkpoint was pruned from."
        )


def choose_device_map(model_bytes: int, device: str, max_memory: str | None) -> dict:
    """`load_model` arguments for a student of `model_bytes`: none when it fits the device (then `accelerate launch`
    runs data-parallel copies), else `device_map="auto"` with the device capped at `max_memory` and the rest on the
    CPU (accelerate's big-model inference moves each layer's weights in as it runs)."""
    limit = memory_limit(device, max_memory)
    if model_bytes <= limit or torch.device(device).type == "cpu":
        return {}  # the CPU is the last tier: there is nowhere to spread to but disk
    log.warning(
        "linearpatch: the student (%s) does not fit in %s on %s: spreading it with device_map='auto'.",
        format_size(model_bytes),
        format_size(limit),
        device,
    )
    gpu = torch.device(device).index or 0
    return dict(device_map="auto", max_memory={gpu: limit, "cpu": available_memory("cpu")})


__all__ = [
    "FINISHED_ADAPTER",
    "DistillPlan",
    "check_teacher_matches",
    "keep_finished",
    "load_finished",
    "choose_device_map",
    "plan_distillation",
    "trainer_overrides",
    "work_folder",
]
