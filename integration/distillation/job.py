"""`linearpatch distill` end to end: check every input, plan the run, build the teacher cache in a child process,
train only the patches under `transformers.Trainer`, save a merged checkpoint or a PEFT adapter atomically.

The teacher never enters the training process: it runs in a child that dies with its parent (Linux
`PR_SET_PDEATHSIG`), writing its top-K cache shard by shard, so an interrupted run resumes from the last shard.
"""

import contextlib
import ctypes
import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from linearpatch.common.errors import LinearPatchError, OutputWriteError
from linearpatch.common.files import atomic_directory, clean_stale_staging, ledger, staging_path
from linearpatch.common.names import TEACHER_CACHE_MANIFEST

from ..adapter import base_identity, patch_weights, write_adapter
from ..choices import compute_dtype_name
from ..data import local_text_file
from ..export.folding import FOLD_HOLDERS
from ..export.gguf import plan_gguf
from ..requests import DEFAULT_SHARD_SIZE, DistillRequest
from ..shards import SafetensorsCheckpoint, compute_dtype, dtype_record, parse_size, stored_dtype
from .folded import export_start, target_modules
from .generated import training_windows
from .plan import (
    DistillPlan,
    check_teacher_matches,
    choose_device_map,
    keep_finished,
    load_finished,
    plan_distillation,
    work_folder,
)
from .report import DistillReport
from .streamed import streamed_student, write_streamed_checkpoint
from .teacher_cache import TopKTeacherCache
from .trainer import distill, get_patch_peft_model

log = logging.getLogger("linearpatch")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies, even by SIGKILL
    except (OSError, AttributeError):
        pass


_CHILD = "from linearpatch.integration.distillation.teacher_cache import run_child; run_child()"


def build_cache_in_subprocess(
    request: DistillRequest,
    input_ids: torch.Tensor,
    cache_root: str | Path,
    device: str | None = None,
    stream_layer: int | None = None,
) -> TopKTeacherCache:
    """Build (or reuse/resume) the teacher cache of `request` (its teacher, K, dtype, `--sequential-teacher` and
    `--max-memory`) over `input_ids` in a child process, so the teacher never enters this one; with `stream_layer`,
    the cache also holds the stream entering that layer.

    A teacher larger than `--max-memory` (by default the device's free memory), or any teacher with
    `--sequential-teacher`, is run layer by layer from its safetensors shards.

    The child is ended if this process ends (interrupt, kill); the token windows it reads are staged inside
    `cache_root` and removed after, or by the next run if this one was killed.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(cache_root)
    scratch = staging_path(cache_root / "teacher-input")
    scratch.mkdir()
    try:
        windows, result = scratch / "windows.safetensors", scratch / "cache-path.txt"
        save_file({"input_ids": input_ids.contiguous()}, str(windows))
        # Not `-m ...teacher_cache`: the package imports that module first, and runpy then warns that it runs twice.
        command = [sys.executable, "-c", _CHILD, request.teacher, str(windows), str(cache_root)]
        # The child computes in the named dtype (`auto`: float32), which keys the cache: `auto` reuses float32's.
        dtype = compute_dtype_name(request.dtype)
        command += ["--top-k", str(request.top_k), "--dtype", dtype, "--result", str(result)]
        if device:
            command += ["--device", device]
        command += ["--sequential", {None: "auto", True: "yes", False: "no"}[request.sequential_teacher]]
        if request.max_memory is not None:
            command += ["--max-memory", str(request.max_memory)]
        if stream_layer is not None:
            command += ["--stream-layer", str(stream_layer)]
        child = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            code = child.wait()
        except BaseException:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
            if any(cache_root.glob(f"*/{TEACHER_CACHE_MANIFEST}")):
                ledger.partial[str(cache_root)] = (
                    "the teacher cache keeps its finished shards and resumes on the next run"
                )
            raise
        if code != 0:
            raise LinearPatchError(f"Building the teacher cache failed (exit {code}); see the messages above.")
        return TopKTeacherCache.open(result.read_text().strip())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def distill_checkpoint(
    request: DistillRequest | str, teacher: str | None = None, output: str | Path | None = None, **options
) -> DistillReport:
    r"""
    `linearpatch distill`: train only the patches of a checkpoint from the teacher's top-K logits and save the result
    (a merged checkpoint, a PEFT adapter with `adapter_only`, or a stock export with `export`).

    The recipe defaults to the paper's (AdamW lr 1e-4, weight decay 1e-4, cosine to lr/20, batch 1, one epoch).
    With `save_steps`, a Trainer checkpoint is kept every N steps in the work folder (`OUTPUT.work` by default), so
    that `resume=True` continues an interrupted run; it is removed once the output is written. A teacher larger than
    `max_memory` builds its cache layer by layer; a student larger than it is spread with `device_map="auto"`.

    Args:
        request ([`DistillRequest`] or `str`): the request, or the checkpoint's name (then `teacher`, `output` and
            `options`, the request's other fields, make the request).

    Returns:
        `DistillReport`
    """
    if not isinstance(request, DistillRequest):
        request = DistillRequest(checkpoint=request, teacher=teacher, output=output, **options)
    from ..models import cache_dir as default_cache_dir
    from ..models import load_model, load_tokenizer, open_model
    from ..opening import open_job

    cache_root = Path(request.cache_dir) if request.cache_dir else default_cache_dir() / "teacher-cache"
    output, work_dir = Path(request.output), work_folder(request)
    teacher = open_model(request.teacher, kind="dense", check_files=False)
    inputs = {
        "teacher": teacher.path,
        "teacher cache": cache_root,
        "work folder": work_dir if work_dir.exists() else None,
        "training text": local_text_file(request.data),
    }
    if request.export and request.eval_windows != 0:
        inputs |= {f"evaluation text {corpus}": local_text_file(corpus) for corpus in request.eval_corpora}
    job = open_job(request.checkpoint, "checkpoint", output, request.overwrite, request.device, inputs)
    device, student_config = job.device, job.config
    if not student_config.patch_positions:
        raise LinearPatchError(
            f"{request.checkpoint} was pruned without patches (patch 'none'): there is nothing to train."
        )
    if not 1 <= request.top_k <= student_config.vocab_size:
        raise LinearPatchError(
            f"--top-k {request.top_k} must be in 1..{student_config.vocab_size} (the vocabulary size)."
        )
    if request.resume and not work_dir.exists():
        raise LinearPatchError(f"--resume: there is no work folder {work_dir} to resume from; run without --resume.")
    student_tokenizer = load_tokenizer(job.model)
    check_teacher_matches(teacher, student_config, student_tokenizer)
    # `--export --gguf`: refused now, not after the training.
    gguf = plan_gguf(student_config, request.gguf, request.imatrix)
    student_weights = SafetensorsCheckpoint(job.model_path)
    student_bytes = student_weights.nbytes(compute_dtype(request.dtype))
    storage = stored_dtype(request.dtype, student_weights)
    generated = training_windows(request, student_tokenizer, student_config, device, cache_root)
    plan = plan_distillation(request, student_tokenizer, student_config, device, student_bytes, generated)
    windows = plan.windows
    stream_layer = first_trained_layer(request, student_config)
    cache = build_cache_in_subprocess(request, windows.input_ids, cache_root, device, stream_layer)
    folded = None
    if (
        request.export
    ):  # the training-free start; the teacher is held only while it is fitted, layer by layer if need be
        folded = export_start(request, job.model, teacher, student_tokenizer, device, plan.device_map, gguf)
    # The student (pruned checkpoint) is the only model this process trains: whole, or read layer by layer.
    stack = contextlib.ExitStack()
    if plan.streamed:
        opened = streamed_student(job.model.path, compute_dtype(request.dtype), device, request.max_memory)
        student, tokenizer = stack.enter_context(opened), student_tokenizer
    else:
        student, tokenizer = load_model(
            job.model, dtype=request.dtype, device=device, kind="checkpoint", **plan.device_map
        )
    with stack:
        return _train_and_write(request, job, plan, student, tokenizer, cache, folded, storage)


def stream_savings(cache, student: SafetensorsCheckpoint, request: DistillRequest) -> dict:
    """What the cached stream saved each step: the layers before it, not run, and their weights, not read."""
    layer = cache.manifest.get("stream_layer")
    if layer is None:
        return {}
    prefixes = tuple(f"model.layers.{index}." for index in range(layer))
    numel = sum(entry.numel for name, entry in student.entries.items() if name.startswith(prefixes))
    tokens = request.batch_size * cache.manifest["seq_len"]
    return dict(
        layer=layer,
        bytes=cache.manifest["stream_bytes_per_token"] * cache.manifest["num_windows"] * cache.manifest["seq_len"],
        layers_skipped=layer,
        bytes_saved_per_step=sum(student.nbytes(compute_dtype(request.dtype), prefix) for prefix in prefixes),
        flops_saved_per_step=2 * numel * tokens,
    )


def first_trained_layer(request: DistillRequest, config) -> int | None:
    """Where every training step can start: the first patch's layer (the dense model's index: no layer before the
    first gap is removed), whose input stream the teacher cache then also stores. `None` without `--stream-cache`
    and for `--export`, whose maps start at the writers before the gap."""
    if not request.stream_cache or request.export:
        return None
    return min(config.patch_positions)


def _train_and_write(
    request: DistillRequest, job, plan: DistillPlan, student, tokenizer, cache, folded, storage: torch.dtype
) -> DistillReport:
    """Train the student's patches (or the export's maps), then write what the request asks for in `storage`."""
    from ..models import write_checkpoint_files

    output, work_dir, windows = Path(request.output), plan.work_dir, plan.windows
    identity = base_identity(student)
    weights_of = patch_weights
    if folded is not None:
        folded.attach(student)
        weights_of = _map_weights
        if not plan.from_finished:  # a finished training is loaded onto the bare student below
            student = get_patch_peft_model(student, target_modules=target_modules(student))
    initial = {name: tensor.detach().clone() for name, tensor in weights_of(student).items()}
    if plan.from_finished:
        model, history = load_finished(student, plan.finished)
    else:
        model, history = _train(student, cache, request, plan)
    check_trained(model, initial, request.lr, weights_of)
    if not plan.from_finished:  # a resumed run's finished training is already there
        keep_finished(model, history, plan.finished)
    report = _report(request, windows, cache, history)
    report.dtype = dtype_record(request.dtype, storage)
    report.streamed = plan.streamed
    report.stream = stream_savings(cache, SafetensorsCheckpoint(job.model_path), request)
    try:
        with atomic_directory(output, request.overwrite) as staging:
            if request.adapter_only:
                base = job.model.path
                local = Path(base).exists()
                base_path = str(Path(base).resolve()) if local else request.checkpoint
                # A local path works on this machine; `linearpatch push --base-model ORG/NAME` replaces it for the
                # Hub.
                hub_id = None if local else request.checkpoint
                write_adapter(model, staging, identity, hub_id, base_path, report.to_dict())
                tokenizer.save_pretrained(staging)
                (staging / report.record).write_text(report.to_json())
            elif folded is not None:
                folded.write(staging, model.merge_and_unload(), tokenizer, report, windows, request, storage)
            else:
                merged = model.merge_and_unload()
                merged.config.patch_kind = f"{merged.config.patch_kind or 'hadamard'}+distilled"
                files = {report.record: report.to_json()}
                if plan.streamed:  # the weights never were in memory: streamed from the shards, patches replaced
                    source = SafetensorsCheckpoint(job.model_path)
                    shard_size = parse_size(DEFAULT_SHARD_SIZE)
                    write_streamed_checkpoint(staging, source, merged, storage, shard_size, progress=True)
                    write_checkpoint_files(staging, None, tokenizer, files)
                else:
                    write_checkpoint_files(staging, merged, tokenizer, files, dtype=storage)
    except OutputWriteError as error:
        if not plan.finished.exists():
            raise
        ledger.partial[str(work_dir)] = "the finished training is kept"
        raise OutputWriteError(
            f"{error} The finished training is kept in {work_dir}: run the same command with --resume to write the "
            "output without training again."
        ) from error
    shutil.rmtree(work_dir, ignore_errors=True)  # the result is safe; checkpoints and finished training are not needed
    return report


def _train(student, cache, request: DistillRequest, plan: DistillPlan):
    """Train the student's patches (or maps) on the teacher cache; keep the Trainer's checkpoints when asked."""
    try:
        return distill(
            student,
            cache,
            plan.trainer_dir,
            request.temperature,
            resume_from_checkpoint=request.resume or None,
            return_history=True,
            **plan.overrides,
        )
    except BaseException:
        if plan.keep_work and any(plan.work_dir.glob("checkpoint-*")):
            ledger.partial[str(plan.work_dir)] = (
                "the Trainer checkpoints are kept: run the same command with --resume to continue"
            )
        raise
    finally:
        if not plan.keep_work:
            shutil.rmtree(plan.trainer_dir, ignore_errors=True)


def _report(request: DistillRequest, windows, cache, history: list[dict]) -> DistillReport:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    summary = next((entry for entry in history if "train_loss" in entry), {})
    return DistillReport(
        teacher=request.teacher,
        top_k=request.top_k,
        data=windows.describe(),
        epochs=request.epochs,
        lr=request.lr,
        batch_size=request.batch_size,
        gradient_accumulation_steps=request.gradient_accumulation_steps,
        temperature=request.temperature,
        cache=cache.manifest["key"],
        bytes_per_token=cache.bytes_per_token,
        output=str(request.output),
        kind="adapter" if request.adapter_only else "export" if request.export else "merged",
        train_loss=summary.get("train_loss", losses[-1] if losses else None),
        steps=max((entry.get("step", 0) for entry in history), default=0),
        log=[entry for entry in history if "loss" in entry],
    )


def check_trained(model, initial: dict[str, torch.Tensor], lr: float, weights_of=patch_weights) -> None:
    """Refuse a training result that must not be written: non-finite patches, or patches no step changed.

    Args:
        weights_of (`callable`, *optional*): `(model, trained=False) -> {name: tensor}` of what was trained (the
            patches; the fold maps for `--export`).

    Raises:
        LinearPatchError: saying what happened and what to change.
    """
    trained = weights_of(model, trained=True)
    bad = [name for name, tensor in trained.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise LinearPatchError(
            f"Training diverged: the patch {bad[0]} holds NaN or inf, so nothing was written. Lower --lr (now {lr})."
        )
    if trained.keys() != initial.keys() or all(torch.equal(trained[n].cpu(), initial[n].cpu()) for n in initial):
        raise LinearPatchError("No training step changed the patches, so nothing was written: raise --epochs or --lr.")


def _map_weights(model, trained: bool = False) -> dict[str, torch.Tensor]:
    """The fold maps', frames' and writers' maps' parameters of a `distill --export` student (`fold_maps.20.weight`,
    `fold_frames.20.log_scale`, `fold_writers.17-self_attn-o_proj.weight`, ...): the frozen start, or with
    `trained=True` the adapter's trained copies."""
    weights = {}
    for key, tensor in model.named_parameters():  # not a frame's fixed rotation, a buffer
        match = re.search(rf"(?:^|\.)((?:{'|'.join(FOLD_HOLDERS)})\.[\w-]+)\..*?(\w+)$", key)
        if match and (".ln_tuning_layers." in key) == trained:
            weights[f"{match[1]}.{match[2]}"] = tensor.detach()
    return weights


__all__ = [
    "DistillReport",
    "build_cache_in_subprocess",
    "check_teacher_matches",
    "check_trained",
    "choose_device_map",
    "distill_checkpoint",
]
