"""`distill --data generated`: the teacher writes its own training text.

Distilling on text the dense model generates itself recovers more of a pruned model's behaviour than training on a
corpus (arXiv 2410.09982). Here the teacher continues prompts cut from the calibration corpus (random windows of it,
seeded; never the evaluation text) by sampling (`--gen-temperature`, `--gen-top-p`, no top-k cut), each to the
training window length, with the end-of-text token held off. Every setting that shapes the text (the teacher's
weights, the prompts, the sampling settings and seed) keys a cache beside the teacher cache, so a second run on the
same recipe reads the text back; a cache that was cut short (no manifest, or tokens that do not match it) is generated
again, never trained on. The windows say where they came from (`source`, `sampling="generated"`), which the report
and the card show.
"""

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import read_cache_record, rebuilding, write_text_atomically

from ..data import TokenWindows, token_fingerprint, token_windows
from ..defaults import Sizes
from ..requests import DEFAULT_CALIBRATION, DEFAULT_EVAL_CORPORA, DistillRequest
from .teacher_cache import checkpoint_fingerprint

log = logging.getLogger("linearpatch")

# `--data` value that asks for the teacher's own text.
GENERATED = "generated"
# Prompts continued per `generate` call.
BATCH = 16


@dataclass(frozen=True)
class GenerationRecipe:
    r"""
    What shapes the teacher's text (everything the cache is keyed on, but the teacher's weights).

    Args:
        prompts_from (`str`): the corpus the prompts are cut from (the calibration text, never evaluation text).
        num_windows (`int`), seq_len (`int`): the training windows: prompt plus continuation.
        prompt_len (`int`): tokens of each prompt.
        temperature (`float`), top_p (`float`): sampling settings.
        seed (`int`): seed of the prompt offsets and of the sampling.
    """

    prompts_from: str
    num_windows: int
    seq_len: int
    prompt_len: int
    temperature: float
    top_p: float
    seed: int

    def check(self, evaluation_corpora) -> None:
        """Refuse prompts from evaluation text and sizes that leave nothing to generate."""
        if self.prompts_from in set(evaluation_corpora):
            raise LinearPatchError(
                f"The prompts of --data {GENERATED} would come from {self.prompts_from}, which is evaluation text: "
                "generated training text must not start from it. Use the calibration corpus."
            )
        if self.prompt_len >= self.seq_len:
            raise LinearPatchError(
                f"--seq-len {self.seq_len} leaves nothing to generate after a {self.prompt_len}-token prompt: use a "
                f"longer --seq-len."
            )
        if not 0 < self.top_p <= 1 or not self.temperature > 0:
            raise LinearPatchError(
                f"--gen-top-p must be in (0, 1] and --gen-temperature above 0 (got {self.top_p}, {self.temperature})."
            )


def training_windows(request: DistillRequest, tokenizer, config, device: str, cache_root: Path) -> TokenWindows | None:
    """The teacher's own text for `request` when it asks for it (`--data generated`), else `None` (the corpus is cut
    into windows by the plan): as many windows, as long, as the corpus would give, from prompts of the calibration
    corpus as long as `eval`'s generation prompts."""
    if request.data != GENERATED:
        return None
    sizes = Sizes.resolve("distillation", device, request.num_samples, request.seq_len, config)
    prompt_len = Sizes.resolve("generation", device, None, None, config).seq_len
    recipe = GenerationRecipe(
        DEFAULT_CALIBRATION,
        sizes.num_samples,
        sizes.seq_len,
        min(prompt_len, sizes.seq_len // 2),
        request.gen_temperature,
        request.gen_top_p,
        request.seed,
    )
    recipe.check((*DEFAULT_EVAL_CORPORA, *request.eval_corpora))
    return generated_windows(
        request.teacher,
        tokenizer,
        recipe,
        cache_root,
        device,
        request.dtype,
        request.max_memory,
        request.sequential_teacher,
    )


def generated_windows(
    teacher: str,
    tokenizer,
    recipe: GenerationRecipe,
    cache_root: Path,
    device: str,
    dtype: str,
    max_memory: str | None = None,
    layer_by_layer: bool | None = None,
):
    """The teacher's own text as training windows: read from the cache under `cache_root/generated/<key>`, or
    generated there (the teacher is loaded only then, and released after).

    Raises:
        LinearPatchError: when the text must be generated and the teacher does not fit `max_memory` (or is to run
            `layer_by_layer`): sampling needs it whole.
    """
    from ..models import load_model, resolve_model
    from ..shards import compute_dtype

    prompts = token_windows(recipe.prompts_from, tokenizer, recipe.num_windows, recipe.prompt_len, seed=recipe.seed)
    identity = checkpoint_fingerprint(resolve_model(teacher), compute_dtype(dtype))
    key = hashlib.sha256(json.dumps([identity, prompts.fingerprint, asdict(recipe)], sort_keys=True).encode())
    folder = Path(cache_root) / GENERATED / key.hexdigest()[:32]
    input_ids = _read(folder, recipe)
    if input_ids is None:
        refuse_unless_whole(teacher, device, dtype, max_memory, layer_by_layer)
        model, _ = load_model(teacher, dtype=dtype, device=device, kind="dense")
        try:
            input_ids = generate(model, prompts.input_ids, recipe)
        finally:
            model.to("meta")  # released before the student is loaded
        _write(folder, input_ids, recipe, teacher)
    source = f"{GENERATED} by {teacher} from prompts of {recipe.prompts_from}"
    return TokenWindows(input_ids, source=source, sampling=GENERATED, seed=recipe.seed, total_tokens=input_ids.numel())


@torch.no_grad()
def generate(model, prompts: torch.Tensor, recipe: GenerationRecipe, progress: bool = True) -> torch.Tensor:
    """Each prompt continued by sampling to `recipe.seq_len` tokens; batch `b` is sampled with seed `seed + b`, so
    the text does not depend on how many batches ran before."""
    device = next(model.parameters()).device
    windows = []
    for index, first in enumerate(tqdm(range(0, len(prompts), BATCH), desc="teacher text", disable=not progress)):
        batch = prompts[first : first + BATCH].to(device)
        torch.manual_seed(recipe.seed + index)
        new = recipe.seq_len - recipe.prompt_len
        windows.append(
            model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                do_sample=True,
                temperature=recipe.temperature,
                top_p=recipe.top_p,
                top_k=0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=model.generation_config.pad_token_id or 0,
            ).cpu()
        )
    return torch.cat(windows)


def refuse_unless_whole(teacher: str, device: str, dtype: str, max_memory: str | None, layer_by_layer: bool | None):
    """Refuse `--data generated` for a teacher that does not fit (or is to run layer by layer), before it loads:
    sampling continues every prompt token by token, which needs the whole model."""
    from ..layerwise import memory_limit
    from ..models import resolve_model
    from ..shards import SafetensorsCheckpoint, compute_dtype, format_size

    size = SafetensorsCheckpoint(resolve_model(teacher)).nbytes(compute_dtype(dtype))
    limit = memory_limit(device, max_memory)
    if layer_by_layer or size > limit:
        where = "--sequential-teacher" if layer_by_layer else f"{format_size(limit)} ({max_memory or 'free memory'})"
        raise LinearPatchError(
            f"--data generated samples the teacher's text with the teacher held whole ({format_size(size)}), which "
            f"does not fit {where}: give --data a text file or corpus instead (e.g. --data wikipedia-calibration)."
        )


def _read(folder: Path, recipe: GenerationRecipe) -> torch.Tensor | None:
    """The cached windows, or `None` when there are none or they were cut short (then they are generated again)."""
    manifest_path, tokens_path = folder / "manifest.json", folder / "tokens.safetensors"
    if not manifest_path.exists():
        if folder.exists():
            log.warning("linearpatch: %s holds no complete generated text: generating it again.", folder)
        return None
    manifest = read_cache_record(manifest_path, "the generated text's manifest")
    if manifest is None:
        return None
    try:
        input_ids = load_file(tokens_path)["input_ids"]
    except Exception as error:  # a file cut short or missing: safetensors refuses it
        rebuilding("the generated text", tokens_path, error)
        return None
    expected = (recipe.num_windows, recipe.seq_len)
    if tuple(input_ids.shape) != expected or token_fingerprint(input_ids) != manifest.get("sha256"):
        rebuilding("the generated text", folder, "its tokens do not match their manifest")
        return None
    return input_ids


def _write(folder: Path, input_ids: torch.Tensor, recipe: GenerationRecipe, teacher: str) -> None:
    """The tokens first, the manifest last: a run stopped in between leaves no manifest, so nothing is reused."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    staging = folder / "tokens.safetensors.partial"
    save_file({"input_ids": input_ids.contiguous()}, str(staging))
    staging.replace(folder / "tokens.safetensors")
    manifest = dict(
        teacher=teacher, recipe=asdict(recipe), sha256=token_fingerprint(input_ids), shape=list(input_ids.shape)
    )
    write_text_atomically(folder / "manifest.json", json.dumps(manifest, indent=2))


__all__ = ["BATCH", "GENERATED", "GenerationRecipe", "generate", "generated_windows", "training_windows"]
