"""Choose by outcome: score candidate blocks and patch kinds by the pruned model's loss on held-out calibration text,
or by its KL to the dense model there (`--metric kl`, `--score kl`).

The proxies (cosine between X_s and X_{s+n}, Block Influence) say how little a block changes the residual stream;
what a user cares about is how well the pruned, patched model predicts text. `HeldOutScorer` measures that directly,
on calibration windows that were set aside before the calibration pass and are never used to estimate anything
(statistics, patches, Gram matrices):

1. one dense forward over the held-out windows records X_s (the residual stream entering layer s) for the starts to
   be scored, and the dense model's own held-out loss;
2. a candidate (gap [s, e), patch P) is then the dense model with layers 0..e-1 dropped by `prune_layers` (tensors
   shared, nothing copied) and P before its first kept layer, run on `inputs_embeds = X_s`. That is exactly what the
   pruned model computes from layer s on, so a candidate costs the L - e layers after the gap and the LM head, never
   the layers before it.

Cost: scoring k candidate blocks with V patch variants is k x V such tail forwards over the held-out windows (on
average about half a forward each); `--patch auto` has V = 8 (the identity included) and `--metric loss` scores the
k = 4 blocks with the best cosine by default, so the search costs roughly 16 forwards of the held-out windows per
depth on top of the calibration pass (and a second, shorter pass for the Gram matrices of the lstsq candidates).
`bench/`, section `search`, measures it against the default.
"""

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from linearpatch.modeling import family_of, prune_layers

from ..defaults import DEFAULT_CANDIDATES, TEACHER_TOP_K
from ..measurement.calibration import CalibrationStatistics
from ..measurement.capture import logits_source, recording
from ..measurement.closeness import Reference, reference_of, token_closeness, top_predictions
from ..measurement.hadamard import hadamard_supported
from ..measurement.holdout import default_holdout, split_holdout
from ..measurement.perplexity import summed_next_token_nll
from .patches import DEFAULT_RIDGE, estimate_patch

# The ridge values `--patch auto` tries for the least-squares patch, relative to the mean diagonal of X^T X (1e-2 is
# the `lstsq` default), a decade either side of it and one more below.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class PatchVariant:
    """One way to fit a gap's patch: a kind of [`estimate_patch`] (or `none`) and, for `lstsq`, its ridge."""

    kind: str
    ridge: float | None = None

    @property
    def label(self) -> str:
        return self.kind if self.ridge is None else f"{self.kind}(ridge={self.ridge:g})"

    def fit(self, statistics: CalibrationStatistics, start: int, end: int) -> torch.Tensor | None:
        """The patch for gap [start, end), or None for plain pruning."""
        if self.kind == "none":
            return None
        return estimate_patch(statistics, start, end, self.kind, ridge=self.ridge or DEFAULT_RIDGE)

    def fit_matrix(self, statistics: CalibrationStatistics, start: int, end: int) -> torch.Tensor:
        """[`fit`] as a matrix: the identity for `none` (a gap that keeps no patch beside gaps that do)."""
        patch = self.fit(statistics, start, end)
        return torch.eye(statistics.channel_abs_mean.shape[-1]) if patch is None else patch


def patch_variants(patch: str, hidden_size: int | None = None) -> list[PatchVariant]:
    """What `patch` tries: every kind (and the ridge grid of `lstsq`) for `auto`, else the one kind. `auto` leaves
    out the Hadamard patch for a hidden size that has no Hadamard matrix."""
    if patch == "auto":
        kinds = ["hadamard", "diag", "scalar"]
        if hidden_size is not None and not hadamard_supported(hidden_size):
            kinds.remove("hadamard")
        # The identity (no patch) is a candidate too: where every fitted patch scores worse than none, none is kept.
        # Listed last, so that a tie keeps a patch.
        fitted = [PatchVariant(kind) for kind in kinds] + [PatchVariant("lstsq", ridge) for ridge in RIDGE_GRID]
        return [*fitted, PatchVariant("none")]
    return [PatchVariant(patch, DEFAULT_RIDGE if patch == "lstsq" else None)]


def fixed_variant(hidden_size: int) -> PatchVariant:
    """The fixed patch a depth curve compares against: the paper's Hadamard patch, or least squares at the default
    ridge where the width has no Hadamard matrix."""
    return PatchVariant("hadamard") if hadamard_supported(hidden_size) else PatchVariant("lstsq", DEFAULT_RIDGE)


class HeldOutScorer:
    r"""
    Held-out perplexity of pruned, patched variants of a dense model, each computed from the dense model's stored
    residual stream at the gap (see the module docstring).

    With `closeness`, the dense forward also keeps the dense model's top-K next-token predictions, and every
    candidate is measured by its KL to them as well (`measurement/closeness.py`), from the same tail forward.

    Args:
        model: the dense causal LM, in memory (its weights are shared by every candidate, never copied).
        input_ids (`torch.LongTensor` of shape `(windows, seq_len)`): the held-out windows.
        batch_size (`int`, *optional*, defaults to 4): windows per forward.
        progress (`bool`, *optional*, defaults to `True`): a progress bar per scoring round.
        closeness (`bool`, *optional*, defaults to `False`): also measure each candidate's KL to the dense model.
    """

    def __init__(
        self, model, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True, closeness: bool = False
    ):
        self.model = model
        self.input_ids = input_ids
        self.batch_size = batch_size
        self.progress = progress
        self.closeness = closeness
        self.num_layers = model.config.num_hidden_layers
        self.device = next(model.parameters()).device
        self.hidden: dict[int, torch.Tensor] = {}
        self.dense_perplexity: float | None = None
        self.reference: Reference | None = None
        self.forwards = 0

    def _batches(self):
        for first in range(0, len(self.input_ids), self.batch_size):
            yield slice(first, first + self.batch_size)

    @torch.no_grad()
    def prepare(self, starts) -> None:
        """Record X_s of the held-out windows for every start in `starts` not yet recorded (one dense forward,
        which also gives the dense perplexity the first time)."""
        missing = sorted(set(starts) - set(self.hidden))
        if not missing and self.dense_perplexity is not None:
            return
        layers = self.model.model.layers
        nll, predictions = 0.0, []
        with recording({start: layers[start] for start in missing}, to_cpu=False) as parts:
            for rows in self._batches():
                batch = self.input_ids[rows].to(self.device)
                logits = self.model(input_ids=batch, use_cache=False).logits
                nll += summed_next_token_nll(logits, batch)
                if self.closeness and self.reference is None:
                    predictions.append(top_predictions(logits, TEACHER_TOP_K))
        self.forwards += 1
        self.hidden.update({start: torch.cat(chunks) for start, chunks in parts.items()})
        self.dense_perplexity = math.exp(nll / self.input_ids[:, 1:].numel())
        if predictions:
            log_probs, token_ids, rest = (torch.cat(parts) for parts in zip(*predictions, strict=True))
            self.reference = Reference(self.input_ids, log_probs, token_ids, rest)

    def perplexity(self, start: int, end: int, patch: torch.Tensor | None) -> float:
        """Held-out perplexity of the dense model with layers [start, end) removed and `patch` (None: no patch)
        applied to the residual stream at the gap."""
        return self.measure(start, end, patch)["loss"]

    def measure_many(self, start: int, end: int, patches: list[torch.Tensor | None]) -> list[dict[str, float]]:
        """[`measure`] of each of `patches` at the gap [start, end)."""
        return [self.measure(start, end, patch) for patch in patches]

    @torch.no_grad()
    def measure(self, start: int, end: int, patch: torch.Tensor | None) -> dict[str, float]:
        """The held-out outcomes (see `choices.OUTCOMES`) of the dense model with layers [start, end) removed and
        `patch` (None: no patch) at the gap: `loss` (its perplexity) and, with `closeness`, `kl` (to the dense
        model, nats per token)."""
        self.prepare([start])
        patches = None if patch is None else [patch]
        if end < self.num_layers:
            # The kept layers after the gap, with the patch before the first of them, fed X_start.
            tail = prune_layers(self.model, range(end), patches=patches, add_patches=patch is not None)

            def logits_of(hidden):
                return tail(inputs_embeds=hidden, use_cache=False).logits

        else:
            # A gap that reaches the last layer: its patch sits before the final norm, which is all that is left.
            tail = prune_layers(self.model, range(start, end), patches=patches, add_patches=patch is not None)
            softcap = family_of(tail.config).logit_softcap(tail.config)  # applied after the head (Gemma's)

            def logits_of(hidden):
                logits = tail.lm_head(tail.model.norm(hidden))
                return logits if softcap is None else torch.tanh(logits / softcap) * softcap

        nll, kl = 0.0, 0.0
        for rows in self._batches():
            logits = logits_of(self.hidden[start][rows])
            nll += summed_next_token_nll(logits, self.input_ids[rows])
            if self.reference is not None:
                kl += float(token_closeness(self.reference, rows, logits)["kl"].sum())
        self.forwards += 1
        outcomes = dict(loss=math.exp(nll / self.input_ids[:, 1:].numel()))
        if self.reference is not None:
            outcomes["kl"] = kl / self.input_ids.numel()
        return outcomes

    def release(self, keep=()) -> None:
        """Forget the recorded X_s of every start not in `keep`."""
        for start in [start for start in self.hidden if start not in set(keep)]:
            del self.hidden[start]


class LayerwiseHeldOutScorer(HeldOutScorer):
    r"""
    [`HeldOutScorer`] for a dense model run layer by layer ([`layerwise_model`]): the dense forward records X_s as
    each layer runs, and the candidates of a gap run together, the held-out windows once per candidate stacked into
    one batch, through the layers after the gap, each loaded once; so scoring a gap's V variants reads the tail's
    weights once, not V times. Same figures as in memory (the same layers on the same inputs).
    """

    @torch.no_grad()
    def prepare(self, starts) -> None:
        missing = sorted(set(starts) - set(self.hidden))
        if not missing and self.dense_perplexity is not None:
            return
        layerwise = self.model.layerwise
        parts: dict[int, list[torch.Tensor]] = {start: [] for start in missing}

        def observe(index, rows, inputs, outputs):
            if index in parts:
                parts[index].append(inputs.clone())  # the pass writes the layer's output over its input next

        layerwise.observer = observe
        try:
            reference, self.dense_perplexity = reference_of(self.model, self.input_ids, TEACHER_TOP_K)
        finally:
            layerwise.observer = None
        self.reference = reference if self.closeness else None
        self.forwards += 1
        self.hidden.update({start: torch.cat(chunks) for start, chunks in parts.items()})

    def measure(self, start: int, end: int, patch: torch.Tensor | None) -> dict[str, float]:
        return self.measure_many(start, end, [patch])[0]

    @torch.no_grad()
    def measure_many(self, start: int, end: int, patches: list[torch.Tensor | None]) -> list[dict[str, float]]:
        from linearpatch.modeling.modeling_linearpatch import LinearPatch

        self.prepare([start])
        hidden = self.hidden[start]
        stacked = []
        for patch in patches:
            if patch is None:
                stacked.append(hidden)
                continue
            module = LinearPatch(patch.shape[0]).to(hidden.device)  # applied as the pruned model applies it
            module.weight.data.copy_(patch)
            stacked.append(module(hidden))
        nll, kl = self._variant_sums(torch.cat(stacked), end, len(patches))
        self.forwards += len(patches)
        tokens = self.input_ids[:, 1:].numel()
        outcomes = [dict(loss=math.exp(value / tokens)) for value in nll]
        if self.reference is not None:
            for outcome, value in zip(outcomes, kl, strict=True):
                outcome["kl"] = value / self.input_ids.numel()
        return outcomes

    def _variant_sums(self, hidden: torch.Tensor, first_layer: int, variants: int) -> tuple[list, list]:
        """Summed NLL and KL to the reference of each variant's rows of `hidden` (variant-major), run from
        `first_layer` on."""
        count = len(self.input_ids)
        labels = self.input_ids.repeat(variants, 1)
        nll, kl = [0.0] * variants, [0.0] * variants
        with logits_source(self.model, labels, hidden, first_layer) as logits_of:
            for row in range(len(labels)):
                logits = logits_of(slice(row, row + 1)).float()
                variant, window = divmod(row, count)
                nll[variant] += summed_next_token_nll(logits, labels[row : row + 1])
                if self.reference is not None:
                    closeness = token_closeness(self.reference, slice(window, window + 1), logits)
                    kl[variant] += float(closeness["kl"].sum())
        return nll, kl


@dataclass
class GapChoice:
    """The patch chosen for one gap, with every variant's held-out perplexity (`scores`) and, where measured, KL to
    the dense model (`kl_scores`)."""

    start: int
    end: int
    variant: PatchVariant
    perplexity: float | None
    scores: dict[str, float]
    kl_scores: dict[str, float] = field(default_factory=dict)

    @property
    def kl(self) -> float | None:
        """The chosen variant's held-out KL to the dense model, if measured."""
        return self.kl_scores.get(self.variant.label)

    def outcome(self, name: str) -> float:
        """The chosen variant's held-out `loss` (perplexity) or `kl`."""
        return self.perplexity if name == "loss" else self.kl

    def to_dict(self) -> dict:
        measured = dict(heldout_kl=self.kl, kl_scores=self.kl_scores) if self.kl_scores else {}
        return dict(
            gap=[self.start, self.end],
            kind=self.variant.kind,
            ridge=self.variant.ridge,
            label=self.variant.label,
            heldout_perplexity=self.perplexity,
            scores=self.scores,
            **measured,
        )


def score_gap(
    scorer: HeldOutScorer,
    statistics: CalibrationStatistics,
    gap: tuple[int, int],
    variants: list[PatchVariant],
    bar=None,
    by: str = "loss",
) -> GapChoice:
    """Fit every variant for `gap` (`[start, end)`) on the calibration statistics, measure each on the held-out
    windows and keep the lowest `by` (`loss` or `kl`; the first listed on a tie)."""
    start, end = gap
    measured = scorer.measure_many(start, end, [variant.fit(statistics, start, end) for variant in variants])
    outcomes = {variant.label: outcome for variant, outcome in zip(variants, measured, strict=True)}
    if bar is not None:
        bar.update(len(variants))
    best = min(variants, key=lambda variant: outcomes[variant.label][by])
    scores = {label: measured["loss"] for label, measured in outcomes.items()}
    kl_scores = {label: measured["kl"] for label, measured in outcomes.items() if "kl" in measured}
    return GapChoice(start, end, best, scores[best.label], scores, kl_scores)


def scoring_bar(total: int, progress: bool, description: str = "held-out scoring"):
    return tqdm(total=total, desc=description, unit="model", disable=not progress)


__all__ = [
    "DEFAULT_CANDIDATES",
    "RIDGE_GRID",
    "GapChoice",
    "HeldOutScorer",
    "LayerwiseHeldOutScorer",
    "default_holdout",
    "PatchVariant",
    "fixed_variant",
    "patch_variants",
    "score_gap",
    "split_holdout",
]
