"""Export a LinearPatch checkpoint to its family's stock architecture (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...),
for engines that refuse remote code.

A patch `h <- h P` on the residual stream cannot be folded exactly into the neighbouring weights in general (RMSNorm
commutes only with scalars and orthogonal maps), so the export folds it, exactly where it can and approximately
elsewhere, and measures what that costs:

- a gap at layer 0: the patch acts on the token embeddings, so `embed_tokens <- embed_tokens @ P` is exact (the head
  is untied first if it was tied);
- `scalar` (Prune&Comp): a scalar patch r before kept layer p equals dividing what every kept layer from p on writes
  into the residual stream by r (the writers of the family's `ResidualLayout`: `o_proj` and `down_proj`; in Gemma 3
  the `(1 + w)` of the norms after them, in OLMo 2 their `w`): the
  stream after the gap is then the patched one divided by r, and every later layer and the final norm read it
  through a scale-invariant RMSNorm. Exact up to RMSNorm's eps (relative error about
  eps / mean(h^2) of the stream after the gap, which is large in real models, so below 1e-6 there); for any other
  patch r is its mean scale `trace(P) / C` (an approximation). Dividing after the gap rather than multiplying the
  embeddings and the layers before it keeps the eps error away from the small early-layer streams;
- `down-proj` (ReplaceMe-style): the patched stream entering kept layer p is `(a + m) P`, with `a` the stream after
  the attention of layer p-1 and `m` its MLP output. A C x C matrix T fitted by ridge least squares on calibration
  text so that `a + m T ~= (a + m) P` is folded into that layer's `down_proj` (`W <- T^T W`). Where the MLP output
  passes through a norm after `down_proj` (Gemma 3, OLMo 2), T is diagonal and folded into that norm's weight.

`linearpatch_export.json` beside the weights records held-out perplexity of the patched checkpoint, the export and
plain pruning, side by side.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import atomic_directory
from linearpatch.common.names import EXPORT_RECORD
from linearpatch.modeling import family_of

from .choices import FOLDS
from .data import local_text_file, token_windows
from .defaults import calibration_sizes, perplexity_sizes
from .layerwise import choose_sequential
from .measurement.capture import run_until
from .requests import ExportRequest
from .shards import SafetensorsCheckpoint, parse_size

# Config fields that only a LinearPatch checkpoint has.
_LINEARPATCH_FIELDS = (
    "original_num_hidden_layers",
    "pruned_layers",
    "patch_positions",
    "keep_patch_in_fp32",
    "base_model",
    "selection_metric",
    "patch_kind",
    "auto_map",
    "architectures",
    "model_type",
    "transformers_version",
)


@dataclass
class ExportReport:
    r"""
    What `export_checkpoint` did (saved as `linearpatch_export.json`).

    Args:
        source (`str`): the LinearPatch checkpoint's Hub id, when it has one. fold (`str`): `down-proj` or `scalar`.
        base_model (`str`): the dense model the checkpoint was pruned from.
        pruned_layers (`list[int]`), patch_positions (`list[int]`): from the checkpoint.
        folds (`list[dict]`): per patch: position, how it was folded, and whether exactly.
        perplexity (`dict`): held-out perplexity per corpus of `patched`, `export` and `plain` pruning (empty when
            skipped: a sequential export, or `eval_windows=0`).
        calibration (`dict`): the windows `down-proj` was fitted on.
        architecture (`str`): the stock class written, e.g. `Qwen3ForCausalLM`.
        output (`str`), seconds (`float`).
        num_layers (`int`): the kept layers (a patch at this position acts before the final norm).
    """

    source: str | None
    fold: str
    base_model: str | None
    pruned_layers: list[int]
    patch_positions: list[int]
    folds: list[dict] = field(default_factory=list)
    perplexity: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    architecture: str = ""
    output: str = ""
    seconds: float = 0.0
    num_layers: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        """Each fold, the held-out comparison and where the model went: what `linearpatch export` prints."""
        lines = []
        for fold in self.folds:
            exact = "exact" if fold["exact"] else f"approximate (fit error {fold.get('relative_error', 0):.3f})"
            where = "the final norm" if fold["position"] >= self.num_layers else f"kept layer {fold['position']}"
            lines.append(f"patch before {where}: {fold['how']}, {exact}")
        if self.perplexity:  # skipped by a sequential export
            corpora = list(next(iter(self.perplexity.values())))
            lines += ["| model | " + " | ".join(corpora) + " |", "|---|" + "---|" * len(corpora)]
            for name, values in self.perplexity.items():
                lines.append(f"| {name} | " + " | ".join(f"{values[c]:.2f}" for c in corpora) + " |")
        lines.append(f"Wrote a stock {self.architecture} (no remote code) to {self.output} (report: {EXPORT_RECORD})")
        return "\n".join(lines)


def _patch_matrices(model) -> dict[int, torch.Tensor]:
    """Kept-layer position -> P (float64) of a LinearPatch model."""
    config = model.config
    patches = {}
    for position in config.patch_positions:
        owner = model.model.norm if position == config.num_hidden_layers else model.model.layers[position]
        patches[position] = owner.linear_patch.weight.detach().double()
    return patches


def stock_config(config) -> PreTrainedConfig:
    """The family's own config (`LlamaConfig`, `Qwen3Config`, ...) of a LinearPatch config: same kept layers (and
    per-layer fields), no LinearPatch fields, no remote code."""
    family = family_of(config)
    values = {key: value for key, value in config.to_dict().items() if key not in _LINEARPATCH_FIELDS}
    stock = family.dense_config_class(**values)
    stock.architectures = [family.dense_causal_lm_class.__name__]
    return stock


def stock_model(config) -> PreTrainedModel:
    """An uninitialised stock causal LM of `config`'s family (build it under `no_init_weights`)."""
    return family_of(config).dense_causal_lm_class(config)


@torch.no_grad()
def _stream_at(model, position: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, m) of kept layer `position - 1` for every token of `input_ids`: the stream after its attention and its
    MLP output, in float64, `[tokens, C]`. `model` may be a [`layerwise_model`]: every window then goes through the
    layers up to `position - 1` one layer at a time."""
    layers = model.model.layers
    layer = layers[position - 1]
    where = family_of(model.config).residual
    captured = {}

    def before_mlp(module, args):
        captured.setdefault("a", []).append(args[0].detach().cpu())

    def mlp_output(module, args, output):
        captured.setdefault("m", []).append(output.detach().cpu())

    # The norm before the MLP reads the residual after attention; `mlp_output` produces what the MLP adds to it.
    handles = [
        layer.get_submodule(where.after_attention).register_forward_pre_hook(before_mlp),
        layer.get_submodule(where.mlp_output).register_forward_hook(mlp_output),
    ]
    layerwise = getattr(model, "layerwise", None)
    after = layers[position] if position < len(layers) else model.model.norm  # the layers after it are not needed
    try:
        if layerwise is None:
            for window in input_ids:
                run_until(model.model, after, input_ids=window[None].to(model.device), use_cache=False)
        else:
            try:  # every window at once, through the layers up to this one, each loaded once
                run_until(model.model, after, input_ids=input_ids.to(layerwise.device), use_cache=False)
            finally:
                layerwise.close_bar()
    finally:
        for handle in handles:
            handle.remove()
    size = model.config.hidden_size
    a = torch.cat([x.reshape(-1, size) for x in captured["a"]]).double()
    m = torch.cat([x.reshape(-1, size) for x in captured["m"]]).double()
    return a, m


def plan_folds(
    config, patches: dict[int, torch.Tensor], fold: str, stream_at=None, ridge: float = 1e-3
) -> tuple[dict[str, list], list[dict]]:
    """How to fold every patch (see the module docstring), as functions of single tensors: a pure plan that applies
    to a state dict in memory or to tensors streamed from the shards one by one.

    Args:
        config: the LinearPatch config.
        patches (`dict[int, torch.Tensor]`): kept-layer position -> P (float64).
        fold (`str`): `down-proj` or `scalar`.
        stream_at (`callable`, *optional*): `position -> (a, m)` (see [`_stream_at`]), needed by `down-proj` for gaps
            after layer 0.
        ridge (`float`, *optional*, defaults to 1e-3): `down-proj` regulariser, relative to the mean diagonal of
            m^T m.

    Returns:
        `(transforms, described)`: state-dict key -> the functions to apply to that tensor, in order; and a
        description of each fold.
    """
    if fold not in FOLDS:
        raise LinearPatchError(f"Unknown fold {fold!r}: choose one of {', '.join(FOLDS)}.")
    where = family_of(config).residual
    offset = where.writer_norm_offset
    transforms: dict[str, list] = {}

    def add(key: str, function) -> None:
        transforms.setdefault(key, []).append(function)

    described = []
    for position in sorted(patches):
        patch = patches[position]
        size = patch.shape[0]
        if position == 0:
            add("model.embed_tokens.weight", lambda t, p=patch: (t.double() @ p).to(t.dtype))
            described.append(dict(position=0, how="embed_tokens @ P", exact=True))
            continue
        scalar = torch.allclose(patch, patch.diagonal().mean() * torch.eye(size, dtype=patch.dtype), atol=1e-6)
        if fold == "scalar" or scalar and fold == "down-proj":
            ratio = float(patch.diagonal().mean())
            for index in range(position, config.num_hidden_layers):
                for name in where.writers:
                    prefix = f"model.layers.{index}.{name}"
                    if offset is not None:  # output = normalised(x) * (offset + w)
                        add(f"{prefix}.weight", lambda t, r=ratio: ((offset + t.double()) / r - offset).to(t.dtype))
                    else:
                        for key in (f"{prefix}.weight", f"{prefix}.bias"):
                            add(key, lambda t, r=ratio: (t.double() / r).to(t.dtype))
            how = f"{' and '.join(where.writers)} from kept layer {position} on divided by the scalar {ratio:.6g}"
            described.append(dict(position=position, how=how, exact=scalar and where.reads_through_norms))
            continue
        if stream_at is None:
            raise LinearPatchError("The down-proj fold needs calibration windows (input_ids).")
        a, m = stream_at(position)
        patched = (a + m) @ patch
        target = patched - a
        # Every later layer reads the stream through RMSNorm, so what matters is each token's error relative to its
        # own norm; unweighted least squares would fit the few massive-activation tokens and nothing else.
        weight = 1.0 / patched.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12)
        if offset is not None:
            # The MLP output leaves through a norm: only a per-channel T (into its `offset + w`) can be folded.
            prefix = f"model.layers.{position - 1}.{where.mlp_output}"
            gram = (m * m * weight).sum(dim=0)
            scales = (m * target * weight).sum(dim=0) / (gram + ridge * gram.mean())
            transform = torch.diag(scales)
            add(f"{prefix}.weight", lambda t, s=scales: ((offset + t.double()) * s - offset).to(t.dtype))
        else:
            prefix = f"model.layers.{position - 1}.{where.writers[-1]}"
            gram = m.T @ (m * weight)
            damping = ridge * gram.diagonal().mean()
            transform = torch.linalg.solve(gram + damping * torch.eye(size, dtype=gram.dtype), m.T @ (target * weight))
            add(f"{prefix}.weight", lambda t, f=transform: (f.T @ t.double()).to(t.dtype))
            add(f"{prefix}.bias", lambda t, f=transform: (t.double() @ f).to(t.dtype))
        residual = float(((m @ transform - target) * weight.sqrt()).norm() / (target * weight.sqrt()).norm())
        how = f"{prefix.removeprefix('model.layers.')} (kept layer {position - 1})"
        described.append(dict(position=position, how=how, exact=False, relative_error=residual))
    return transforms, sorted(described, key=lambda item: item["position"])


def apply_folds(tensor: torch.Tensor, functions: list) -> torch.Tensor:
    for function in functions:
        tensor = function(tensor)
    return tensor


def fold_state_dict(model, fold: str, input_ids: torch.Tensor | None = None, ridge: float = 1e-3) -> tuple[dict, list]:
    """The state dict of the stock (family) equivalent of the LinearPatch `model` with every patch folded (see
    [`plan_folds`]), and a description of each fold.

    Args:
        model (`PreTrainedModel`): the LinearPatch causal LM (not modified).
        fold (`str`): `down-proj` or `scalar`.
        input_ids (`torch.LongTensor`, *optional*): calibration windows, needed by `down-proj` for gaps after layer 0.
        ridge (`float`, *optional*, defaults to 1e-3): `down-proj` regulariser.
    """
    config = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".linear_patch." not in k}
    if config.tie_word_embeddings:  # the head's own copy; only a fold at layer 0 makes it differ (and unties)
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    stream_at = None if input_ids is None else lambda position: _stream_at(model, position, input_ids)
    transforms, described = plan_folds(config, _patch_matrices(model), fold, stream_at, ridge)
    for key, functions in transforms.items():
        if key in state:
            state[key] = apply_folds(state[key], functions)
    return state, described


def export_model(
    model, fold: str = "down-proj", input_ids: torch.Tensor | None = None
) -> tuple[PreTrainedModel, list]:
    """A stock causal LM of the family (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...) equivalent (exactly or
    approximately, see [`fold_state_dict`]) to the LinearPatch `model`."""
    state, described = fold_state_dict(model, fold, input_ids)
    config = stock_config(model.config)
    # Still tied unless the embeddings were folded (a gap at layer 0), which needs the head's own copy.
    untie = 0 in model.config.patch_positions
    config.tie_word_embeddings = model.config.tie_word_embeddings and not untie
    config.dtype = state["model.embed_tokens.weight"].dtype
    with torch.device(state["model.embed_tokens.weight"].device), no_init_weights():
        stock = stock_model(config)
    missing, unexpected = stock.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise LinearPatchError(
            f"Folded weights do not fit a stock {type(stock).__name__}: missing {missing}, unexpected {unexpected}."
        )
    if config.tie_word_embeddings:
        stock.tie_weights()
    stock.generation_config = model.generation_config
    return stock.eval(), described


def export_checkpoint(checkpoint: str, output: str | Path, **options) -> ExportReport:
    r"""
    `linearpatch export`: write a folder of the family's stock architecture (`model_type: llama`, `qwen3`, ...; no
    `auto_map`, no remote code) that any engine loads, with the patches folded into the weights, and measure what
    the fold costs.

    Args:
        checkpoint (`str`): a LinearPatch checkpoint.
        output (`str` or `Path`): the folder to create.
        fold (`str`, *optional*, defaults to `"down-proj"`): `down-proj` (least-squares fold into the previous layer's
            MLP) or `scalar` (Prune&Comp; exact for scalar patches). A gap at layer 0 is always folded exactly into
            the embeddings.
        calibration (`str`), num_samples (`int`), seq_len (`int`), seed (`int`): text for the `down-proj` fit.
        eval_corpora (`list[str]`), eval_windows (`int`): held-out perplexity of patched, export and plain pruning
            (`eval_windows=0` skips the comparison).
        sequential (`bool`, *optional*): never hold the checkpoint whole: the `down-proj` fit runs the layers one at
            a time from the shards, and the folded tensors are streamed to the output in shards of
            `max_shard_size` (with an index). By default chosen when the checkpoint does not fit `max_memory` (the
            device's free memory). The held-out comparison, which needs whole models, is then skipped (logged).
        max_memory (`str` or `int`, *optional*), max_shard_size (`str` or `int`, *optional*): see
            `linearpatch prune`.
        Other keywords: the fields of [`ExportRequest`], which hold every default.

    Returns:
        `ExportReport`
    """
    return _export_checkpoint_job(**ExportRequest(checkpoint=checkpoint, output=output, **options).options())


def _export_checkpoint_job(
    *,
    checkpoint,
    output,
    fold,
    calibration,
    num_samples,
    seq_len,
    seed,
    eval_corpora,
    eval_windows,
    device,
    overwrite,
    progress,
    sequential,
    max_memory,
    max_shard_size,
) -> ExportReport:
    """The job of [`export_checkpoint`]: the fields of [`ExportRequest`] as keywords, without defaults."""
    from .measurement.perplexity import held_out_windows
    from .models import fit_context, load_tokenizer, portable_model_id
    from .opening import open_job

    started = time.perf_counter()
    if fold not in FOLDS:
        raise LinearPatchError(f"Unknown fold {fold!r}: choose one of {', '.join(FOLDS)}.")
    inputs = {"calibration text": local_text_file(calibration)}
    inputs |= {f"evaluation text {corpus}": local_text_file(corpus) for corpus in eval_corpora if eval_windows != 0}
    job = open_job(checkpoint, "checkpoint", output, overwrite, device, inputs)
    output, device, config = job.output, job.device, job.config
    needs_fit = fold == "down-proj" and any(p > 0 for p in config.patch_positions)
    eval_windows = perplexity_sizes(device).num_samples if eval_windows is None else eval_windows
    tokenizer = load_tokenizer(checkpoint)
    sizes, held_out = calibration_sizes(device), perplexity_sizes(device)
    windows = None
    if needs_fit:
        num_samples = sizes.num_samples if num_samples is None else num_samples
        seq_len = fit_context(config, seq_len, sizes.seq_len)
        windows = token_windows(calibration, tokenizer, num_samples, seq_len, seed=seed)
    checkpoint_weights = SafetensorsCheckpoint(job.model_path)
    sequential = choose_sequential(
        checkpoint_weights.nbytes(torch.float32), device, sequential, max_memory, "checkpoint"
    )
    evaluation = {}
    if eval_windows and not sequential:
        eval_seq_len = fit_context(config, None, held_out.seq_len)
        evaluation = held_out_windows(tokenizer, eval_corpora, eval_windows, eval_seq_len)
    if sequential:
        pipeline = SequentialExport(checkpoint_weights, config, device, progress, parse_size(max_shard_size))
    else:
        pipeline = InMemoryExport(checkpoint, device)
    described = pipeline.fold(fold, windows)
    report = ExportReport(
        source=portable_model_id(checkpoint),
        fold=fold,
        base_model=config.base_model,
        pruned_layers=list(config.pruned_layers),
        patch_positions=list(config.patch_positions),
        folds=described,
        perplexity=pipeline.compare(evaluation, progress),
        calibration=windows.describe() if windows is not None else {},
        architecture=family_of(config).dense_causal_lm_class.__name__,
        output=str(output),
        num_layers=config.num_hidden_layers,
    )
    report.seconds = round(time.perf_counter() - started, 2)
    with atomic_directory(output, overwrite) as staging:
        pipeline.write(staging, tokenizer, {EXPORT_RECORD: report.to_json()})
    return report


class InMemoryExport:
    """The export job's pipeline for a checkpoint that fits: loaded whole, folded into a stock model
    ([`export_model`]), compared side by side with the patched model and plain pruning, saved."""

    def __init__(self, checkpoint: str, device: str):
        from .models import load_model

        self.device = device
        self.patched, _ = load_model(checkpoint, device=device, kind="checkpoint")
        self.stock = None

    def fold(self, fold: str, windows) -> list[dict]:
        self.stock, described = export_model(self.patched, fold, windows.input_ids if windows is not None else None)
        return described

    def compare(self, evaluation: dict, progress: bool) -> dict:
        """Held-out perplexity of the patched model, the export and plain pruning (the patched weights, no patch)."""
        from .measurement.perplexity import perplexity_table

        if not evaluation:
            return {}
        patched = self.patched
        plain_state = {k: v for k, v in patched.state_dict().items() if ".linear_patch." not in k}
        with torch.device(self.device), no_init_weights():
            plain = stock_model(stock_config(patched.config))
        plain.load_state_dict(plain_state, strict=not patched.config.tie_word_embeddings, assign=True)
        plain.tie_weights()
        return perplexity_table(
            {"patched": patched, "export": self.stock, "plain": plain.eval()}, evaluation, progress
        )

    def write(self, staging: Path, tokenizer, records: dict[str, str]) -> None:
        from .models import write_checkpoint_files

        write_checkpoint_files(staging, self.stock, tokenizer, records)


class SequentialExport:
    """The export job's pipeline for a checkpoint that does not fit: never held whole. The fold is planned from the
    patches (and, for `down-proj`, from a layer-by-layer pass up to each gap), then every tensor is read, folded and
    written in turn, in shards of `max_shard_size`. The held-out comparison, which needs whole models, is skipped."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, config, device: str, progress: bool, max_shard_size: int):
        import logging

        logging.getLogger("linearpatch").warning(
            "linearpatch: sequential export: the held-out comparison of patched, export and plain pruning needs whole "
            "models and is skipped; run `linearpatch eval` on the output where it fits."
        )
        self.checkpoint, self.config, self.device = checkpoint, config, device
        self.progress, self.max_shard_size = progress, max_shard_size
        self.plan, self.stock = [], None

    def fold(self, fold: str, windows) -> list[dict]:
        from linearpatch.modeling.pruning import patch_key

        from .layerwise import layerwise_model

        checkpoint, config = self.checkpoint, self.config
        patches = {
            position: checkpoint.read(patch_key(config, position)).double() for position in config.patch_positions
        }
        needs_fit = fold == "down-proj" and any(position > 0 for position in patches)
        with layerwise_model(checkpoint.folder, device=self.device, progress=self.progress) as model:
            stream_at = (lambda position: _stream_at(model, position, windows.input_ids)) if needs_fit else None
            transforms, described = plan_folds(config, patches, fold, stream_at)
        stock = stock_config(config)
        untie = 0 in config.patch_positions
        stock.tie_word_embeddings = config.tie_word_embeddings and not untie
        stock.dtype = torch.float32
        with torch.device("meta"):
            expected = stock_model(stock).state_dict().keys()
        sources = {key: key for key in checkpoint.keys() if ".linear_patch." not in key}
        if config.tie_word_embeddings and untie:
            sources["lm_head.weight"] = "model.embed_tokens.weight"  # the head keeps the unfolded embeddings
        for key in expected:
            if key == "lm_head.weight" and stock.tie_word_embeddings:
                continue
            if key not in sources:
                raise LinearPatchError(
                    f"{checkpoint.folder} has no {key!r}: the checkpoint does not match its config."
                )
            # Folded tensors are read whole; the others (most of them) stream in blocks.
            transform = (
                (lambda tensor, functions=transforms[key]: apply_folds(tensor, functions))
                if key in transforms
                else None
            )
            self.plan.append((key, checkpoint.pending(sources[key], torch.float32, transform)))
        self.stock = stock
        return described

    def compare(self, evaluation: dict, progress: bool) -> dict:
        return {}

    def write(self, staging: Path, tokenizer, records: dict[str, str]) -> None:
        from transformers import GenerationConfig

        from .models import write_checkpoint_files
        from .shards import write_sharded_safetensors

        write_sharded_safetensors(staging, self.plan, max_shard_size=self.max_shard_size, progress=self.progress)
        self.stock.save_pretrained(staging)
        try:
            GenerationConfig.from_pretrained(self.checkpoint.folder).save_pretrained(staging)
        except OSError:
            pass
        write_checkpoint_files(staging, None, tokenizer, records)


__all__ = [
    "EXPORT_RECORD",
    "FOLDS",
    "ExportReport",
    "InMemoryExport",
    "SequentialExport",
    "apply_folds",
    "export_checkpoint",
    "export_model",
    "fold_state_dict",
    "plan_folds",
]
