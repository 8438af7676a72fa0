"""`linearpatch distill` end to end: check every input, build the teacher cache in a child process, train only the
patches under `transformers.Trainer`, save a merged checkpoint or a PEFT adapter atomically.

The teacher never enters the training process: it runs in a child that dies with its parent (Linux
`PR_SET_PDEATHSIG`), writing its top-K cache shard by shard, so an interrupted run resumes from the last shard.
"""

import ctypes
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from linearpatch.common.errors import CheckpointMismatchError, LinearPatchError, OutputWriteError
from linearpatch.common.files import (
    atomic_directory,
    clean_stale_staging,
    ledger,
    staging_path,
)
from linearpatch.common.names import DISTILL_RECORD, EXPORT_RECORD, TEACHER_CACHE_MANIFEST
from linearpatch.modeling import family_of

from ..adapter import base_identity, patch_weights, write_adapter
from ..data import local_text_file, token_windows
from ..defaults import distillation_sizes, perplexity_sizes
from ..folding import FOLD_MAPS, attach_fold_maps
from ..layerwise import available_memory, memory_limit
from ..requests import DistillRequest
from ..shards import SafetensorsCheckpoint, format_size
from .folded import target_modules
from .teacher_cache import TopKTeacherCache
from .trainer import distill, get_patch_peft_model

log = logging.getLogger("linearpatch")


@dataclass
class DistillReport:
    r"""
    What `distill_checkpoint` did (saved as `linearpatch_distill.json` beside the result; the model card reads it).

    Args:
        teacher (`str`): the dense model. top_k (`int`): K. data (`dict`): the training windows.
        epochs (`float`), lr (`float`), batch_size (`int`), gradient_accumulation_steps (`int`),
        temperature (`float`): the recipe.
        cache (`str`): the teacher cache's key. bytes_per_token (`int`): its size per token.
        output (`str`): where the result was written. kind (`str`): `merged`, `adapter` or `export`.
        train_loss (`float`): mean training loss. steps (`int`): optimiser steps.
        perplexity (`dict`): with `export`, held-out perplexity per corpus of the patched checkpoint, the
            training-free and the distilled export, and plain pruning.
    """

    teacher: str
    top_k: int
    data: dict
    epochs: float
    lr: float
    batch_size: int
    gradient_accumulation_steps: int
    temperature: float
    cache: str
    bytes_per_token: int
    output: str = ""
    kind: str = "merged"
    train_loss: float | None = None
    steps: int = 0
    log: list[dict] = field(default_factory=list)
    perplexity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """What was trained and written: what `linearpatch distill` prints."""
        loss = f", final loss {self.train_loss:.4f}" if self.train_loss is not None else ""
        lines = []
        if self.perplexity:
            corpora = list(next(iter(self.perplexity.values())))
            lines += ["| model | " + " | ".join(corpora) + " |", "|---|" + "---|" * len(corpora)]
            for name, values in self.perplexity.items():
                lines.append(f"| {name} | " + " | ".join(f"{values[c]:.2f}" for c in corpora) + " |")
        what = "a stock model (no remote code)" if self.kind == "export" else self.kind
        lines.append(
            f"Distilled {self.data['num_windows']} windows in {self.steps} steps{loss} "
            f"({self.bytes_per_token} cache bytes/token); {what} written to {self.output}"
        )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies, even by SIGKILL
    except (OSError, AttributeError):
        pass


_CHILD = "from linearpatch.integration.distillation.teacher_cache import run_child; run_child()"


def build_cache_in_subprocess(
    teacher: str,
    input_ids: torch.Tensor,
    cache_root: str | Path,
    top_k: int,
    device: str | None = None,
    dtype: str = "float32",
    sequential: bool | None = None,
    max_memory: str | None = None,
) -> TopKTeacherCache:
    """Build (or reuse/resume) the teacher cache in a child process, so the teacher never enters this one.

    A teacher larger than `max_memory` (by default the device's free memory), or any teacher with `sequential=True`,
    is run layer by layer from its safetensors shards.

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
        command = [sys.executable, "-c", _CHILD, teacher, str(windows)]
        command += [str(cache_root), "--top-k", str(top_k), "--dtype", dtype, "--result", str(result)]
        if device:
            command += ["--device", device]
        command += ["--sequential", {None: "auto", True: "yes", False: "no"}[sequential]]
        if max_memory is not None:
            command += ["--max-memory", str(max_memory)]
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


def check_teacher_matches(teacher: str, student_config, student_tokenizer) -> None:
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


def distill_checkpoint(checkpoint: str, teacher: str, output: str | Path, **options) -> DistillReport:
    r"""
    `linearpatch distill`: train only the patches of `checkpoint` from `teacher`'s top-K logits and save the result.

    Args:
        checkpoint (`str`): a LinearPatch checkpoint (folder or Hub id).
        teacher (`str`): the dense model it was pruned from.
        output (`str` or `Path`): folder for the merged checkpoint (or the adapter with `adapter_only`).
        num_samples (`int`, *optional*), seq_len (`int`, *optional*): training windows (defaults: see
            `linearpatch.integration.defaults`).
        save_steps (`int`, *optional*, defaults to 0): keep a Trainer checkpoint every N steps in `work_dir`
            (default `OUTPUT.work`, beside the output), so that `resume=True` continues an interrupted run; the
            work folder is removed once the output is written.
        cache_dir (`str` or `Path`, *optional*): teacher cache root (default `~/.cache/linearpatch/teacher-cache`).
        sequential_teacher (`bool`, *optional*): build the teacher cache layer by layer; by default only when the
            teacher does not fit `max_memory`.
        max_memory (`str`, *optional*): memory a model may use on the device (e.g. `80GB`); defaults to its free
            memory. A student larger than this is loaded with `device_map="auto"` (layers spread over the GPUs and
            the CPU by accelerate).
        Other keywords: the fields of [`DistillRequest`] (the recipe among them: paper AdamW lr 1e-4, weight decay
            1e-4, cosine to lr/20, batch 1, one epoch), which hold every default.

    Returns:
        `DistillReport`
    """
    return _distill_checkpoint_job(
        **DistillRequest(checkpoint=checkpoint, teacher=teacher, output=output, **options).options()
    )


def _distill_checkpoint_job(
    *,
    checkpoint,
    teacher,
    output,
    top_k,
    data,
    num_samples,
    seq_len,
    epochs,
    lr,
    batch_size,
    gradient_accumulation_steps,
    max_steps,
    temperature,
    seed,
    bf16,
    activation_checkpointing,
    save_steps,
    resume,
    work_dir,
    cache_dir,
    adapter_only,
    dtype,
    device,
    overwrite,
    sequential_teacher,
    max_memory,
    export,
    eval_corpora,
    eval_windows,
) -> DistillReport:
    """The job of [`distill_checkpoint`]: the fields of [`DistillRequest`] as keywords, without defaults."""
    from ..models import cache_dir as default_cache_dir
    from ..models import fit_context, load_model, load_tokenizer, resolve_model, write_checkpoint_files
    from ..opening import open_job

    check_recipe(num_samples, seq_len, top_k, epochs, max_steps, lr, temperature)
    if export and adapter_only:
        raise LinearPatchError(
            "--export writes a stock model with the trained maps folded in, --adapter-only writes only an adapter: "
            "choose one."
        )
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir() / "teacher-cache"
    output = Path(output)
    work_dir = Path(work_dir) if work_dir else output.with_name(f"{output.name}.work")
    inputs = {
        "teacher": resolve_model(teacher),
        "teacher cache": cache_root,
        "work folder": work_dir if work_dir.exists() else None,
        "training text": local_text_file(data),
    }
    if export and eval_windows != 0:
        inputs |= {f"evaluation text {corpus}": local_text_file(corpus) for corpus in eval_corpora}
    job = open_job(checkpoint, "checkpoint", output, overwrite, device, inputs)
    device, student_config = job.device, job.config
    if not student_config.patch_positions:
        raise LinearPatchError(f"{checkpoint} was pruned without patches (patch 'none'): there is nothing to train.")
    if not 1 <= top_k <= student_config.vocab_size:
        raise LinearPatchError(f"--top-k {top_k} must be in 1..{student_config.vocab_size} (the vocabulary size).")
    if resume and not work_dir.exists():
        raise LinearPatchError(f"--resume: there is no work folder {work_dir} to resume from; run without --resume.")
    student_tokenizer = load_tokenizer(checkpoint)
    check_teacher_matches(teacher, student_config, student_tokenizer)
    sizes = distillation_sizes(device)
    num_samples = sizes.num_samples if num_samples is None else num_samples
    seq_len = fit_context(student_config, seq_len, sizes.seq_len)
    windows = token_windows(data, student_tokenizer, num_samples, seq_len, seed=seed)
    finished = work_dir / FINISHED_ADAPTER
    from_finished = resume and finished.exists()
    if from_finished:
        log.warning("linearpatch: %s holds finished training: writing the output from it, without training.", work_dir)

    student_bytes = SafetensorsCheckpoint(job.model_path).nbytes(getattr(torch, dtype))
    spread = choose_device_map(student_bytes, device, max_memory)
    cache = build_cache_in_subprocess(
        teacher, windows.input_ids, cache_root, top_k, device, dtype, sequential_teacher, max_memory
    )
    folded = None
    if export:  # the training-free start; the teacher is held only while it is fitted, layer by layer if need be
        folded = _export_start(checkpoint, teacher, data, seed, student_config, student_tokenizer, device, spread)
    # The student (pruned checkpoint) is the only model this process trains.
    student, tokenizer = load_model(checkpoint, dtype=dtype, device=device, kind="checkpoint", **spread)
    identity = base_identity(student)
    weights_of = patch_weights
    if folded is not None:
        folded.handles = attach_fold_maps(student, folded.plan.maps, folded.plan.frames)
        weights_of = _map_weights
        if not from_finished:  # a finished training is loaded onto the bare student below
            student = get_patch_peft_model(student, target_modules=target_modules(folded.plan.maps))
    keep_work = bool(save_steps) or resume
    overrides = dict(
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        activation_checkpointing=activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        use_cpu=device == "cpu",
    )
    if max_steps:
        overrides["max_steps"] = max_steps
    trainer_dir = work_dir if keep_work else staging_path(output.parent / f"{output.name}.work")
    initial = {name: tensor.detach().clone() for name, tensor in weights_of(student).items()}
    if from_finished:
        model, history = _load_finished(student, finished)
    else:
        try:
            model, history = distill(
                student,
                cache,
                trainer_dir,
                temperature,
                resume_from_checkpoint=resume or None,
                return_history=True,
                **overrides,
            )
        except BaseException:
            if keep_work and any(work_dir.glob("checkpoint-*")):
                ledger.partial[str(work_dir)] = (
                    "the Trainer checkpoints are kept: run the same command with --resume to continue"
                )
            raise
        finally:
            if not keep_work:
                shutil.rmtree(trainer_dir, ignore_errors=True)
    check_trained(model, initial, lr, weights_of)
    if not from_finished:  # a resumed run's finished training is already there
        _keep_finished(model, history, finished)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    summary = next((entry for entry in history if "train_loss" in entry), {})
    report = DistillReport(
        teacher=teacher,
        top_k=top_k,
        data=windows.describe(),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        temperature=temperature,
        cache=cache.manifest["key"],
        bytes_per_token=cache.bytes_per_token,
        output=str(output),
        kind="adapter" if adapter_only else "export" if export else "merged",
        train_loss=summary.get("train_loss", losses[-1] if losses else None),
        steps=max((entry.get("step", 0) for entry in history), default=0),
        log=[entry for entry in history if "loss" in entry],
    )
    try:
        with atomic_directory(output, overwrite) as staging:
            if adapter_only:
                base = resolve_model(checkpoint)
                local = Path(base).exists()
                base_path = str(Path(base).resolve()) if local else checkpoint
                # A local path works on this machine; `linearpatch push --base-model ORG/NAME` replaces it for the
                # Hub.
                write_adapter(model, staging, identity, None if local else checkpoint, base_path, report.to_dict())
                tokenizer.save_pretrained(staging)
                (staging / DISTILL_RECORD).write_text(report.to_json())
            elif folded is not None:
                folded.write(staging, model.merge_and_unload(), tokenizer, report, windows, eval_corpora, eval_windows)
            else:
                merged = model.merge_and_unload()
                merged.config.patch_kind = f"{merged.config.patch_kind or 'hadamard'}+distilled"
                write_checkpoint_files(staging, merged, tokenizer, {DISTILL_RECORD: report.to_json()})
    except OutputWriteError as error:
        if not finished.exists():
            raise
        ledger.partial[str(work_dir)] = "the finished training is kept"
        raise OutputWriteError(
            f"{error} The finished training is kept in {work_dir}: run the same command with --resume to write the "
            "output without training again."
        ) from error
    shutil.rmtree(work_dir, ignore_errors=True)  # the result is safe; checkpoints and finished training are not needed
    return report


def check_recipe(
    num_samples: int | None,
    seq_len: int | None,
    top_k: int,
    epochs: float,
    max_steps: int,
    lr: float,
    temperature: float,
) -> None:
    """Refuse a recipe that cannot train (before the teacher cache is built).

    Raises:
        LinearPatchError: naming the option and a valid value.
    """
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("top_k", top_k)):
        if value is not None and value < 1:
            raise LinearPatchError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")
    if not temperature > 0:
        raise LinearPatchError(
            f"--temperature {temperature} must be above 0: the logits are divided by it (1, the paper's, is usual)."
        )
    if not lr > 0:
        raise LinearPatchError(f"--lr {lr} must be above 0 (the paper's is 1e-4).")
    if not epochs > 0 and not max_steps:
        raise LinearPatchError(f"--epochs {epochs} trains for zero steps: give a number above 0 (or --max-steps N).")


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
    """The fold maps of a `distill --export` student by position (`fold_maps.19`): the frozen start, or with
    `trained=True` the adapter's trained copies."""
    weights = {}
    for key, tensor in model.state_dict().items():
        match = re.search(rf"(?:^|\.)({FOLD_MAPS}\.\d+)\.", key)
        if match and (".ln_tuning_layers." in key) == trained:
            weights[match[1]] = tensor
    return weights


@dataclass
class _FoldedExport:
    """`distill --export`'s state: the training-free plan it starts from and, once attached, the maps' hooks."""

    plan: object
    calibration: dict
    source: str | None
    handles: list = field(default_factory=list)

    def write(self, staging: Path, merged, tokenizer, report, windows, eval_corpora, eval_windows) -> None:
        """Fold the trained maps into a stock model, compare it on held-out text, and write it with both records."""
        from ..export import ExportReport, plain_model
        from ..measurement.perplexity import held_out_windows, perplexity_table
        from ..models import fit_context, write_checkpoint_files
        from .folded import fold_trained

        config = merged.config
        stock, maps, difference = fold_trained(merged, self.handles, self.plan, windows.input_ids[:1])
        perplexity = {}
        if eval_windows != 0:
            device = next(merged.parameters()).device
            sizes = perplexity_sizes(device.type)
            count = sizes.num_samples if eval_windows is None else eval_windows
            evaluation = held_out_windows(tokenizer, eval_corpora, count, fit_context(config, None, sizes.seq_len))
            start = self.plan.stock(merged)
            models = {"patched": merged, "training-free export": start, "export": stock, "plain": plain_model(merged)}
            perplexity = perplexity_table(models, evaluation, progress=True)
            report.perplexity = perplexity
        described = [
            dict(entry, how=entry["how"] + " (distilled)") if entry["position"] in maps else entry
            for entry in self.plan.described
        ]
        record = ExportReport(
            source=self.source,
            fold="auto",
            base_model=config.base_model,
            pruned_layers=list(config.pruned_layers),
            patch_positions=list(config.patch_positions),
            folds=described,
            perplexity=perplexity,
            calibration=self.calibration,
            architecture=family_of(config).dense_causal_lm_class.__name__,
            output=report.output,
            num_layers=config.num_hidden_layers,
            dense=report.teacher,
            distilled=dict(
                training={key: value for key, value in report.to_dict().items() if key != "log"},
                fold_check_max_logit_difference=difference,
            ),
        )
        write_checkpoint_files(
            staging, stock, tokenizer, {DISTILL_RECORD: report.to_json(), EXPORT_RECORD: record.to_json()}
        )


def _export_start(checkpoint, teacher, data, seed, config, tokenizer, device, spread) -> _FoldedExport:
    """The training-free fold `distill --export` starts from: `--fold auto` on the export's calibration windows of
    `data`, fitted to the teacher (the dense model), held whole only when the student fits the device."""
    from ..defaults import calibration_sizes
    from ..models import fit_context, portable_model_id, resolve_model
    from .folded import training_free_plan

    sizes = calibration_sizes(device)
    windows = token_windows(data, tokenizer, sizes.num_samples, fit_context(config, None, sizes.seq_len), seed=seed)
    plan = training_free_plan(checkpoint, resolve_model(teacher), windows, device, sequential=bool(spread))
    if not plan.maps:
        raise LinearPatchError(
            "Every patch of this checkpoint folds exactly into the stock weights (a scalar patch), so there is no map "
            "to train: run `linearpatch export`, or `linearpatch distill` without --export to train the patches."
        )
    return _FoldedExport(plan, windows.describe(), portable_model_id(checkpoint))


# In the work folder (OUTPUT.work): the trained patches and the log of a run whose output is not written yet.
FINISHED_ADAPTER = "finished-adapter"


def _keep_finished(model, history: list[dict], folder: Path) -> None:
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


def _load_finished(student, folder: Path):
    """The model and log of a finished training kept by [`_keep_finished`]."""
    from peft import PeftModel

    from ..adapter import quiet_peft

    with quiet_peft():
        model = PeftModel.from_pretrained(student, str(folder))
    return model, json.loads((folder / "log_history.json").read_text())


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
    "DistillReport",
    "build_cache_in_subprocess",
    "check_recipe",
    "check_teacher_matches",
    "check_trained",
    "choose_device_map",
    "distill_checkpoint",
]
