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
- a map fold (ReplaceMe-style; see `export/folding.py`): a C x C map T on the MLP output `m` of kept layer p-1, folded
  exactly into its `down_proj` (`W <- T^T W`; a diagonal T into the norm after it in Gemma 3 and OLMo 2), fitted on
  calibration text so that `a + m T` (`a` the stream after that layer's attention) reproduces an objective:
  `down-proj` the patched stream `(a + m) P`, `down-proj-dense` and `down-proj-cosine` the dense model's stream
  after the removed block (least squares, or cosine distance), which skips the patch's own approximation;
  `down-proj-rotated` fits, with the map, a rotation and scale of the stream after the gap, folded exactly (up to
  RMSNorm's eps) into every layer after it and the head (Llama-like layouts; the head is untied). `auto` (the
  default) fits every objective per gap, scores each on held-out calibration windows (one in eight, as `--patch
  auto` does) and keeps the best; a scalar patch's exact scalar fold is then a candidate too.

`linearpatch_export.json` beside the weights records every candidate's score, and held-out perplexity of the patched
checkpoint, the export and plain pruning, side by side.

The stage's rooms: `plan` (the [`FoldPlan`] and how it is made), `stock` (the stock architecture and the folded state
dict), `fitting` (each gap's map and frame fitted), `folding` (the maps and frames: held, attached, folded),
`scoring` (a candidate fold's held-out outcomes), `report` ([`ExportReport`]) and `job` ([`export_checkpoint`] and its
two pipelines).
"""

from linearpatch.common.names import EXPORT_RECORD

from ..choices import FOLDS
from ..measurement.holdout import split_fit_heldout
from .job import InMemoryExport, SequentialExport, export_checkpoint, resolve_dense
from .plan import (
    FoldPlan,
    dense_streams,
    export_model,
    fold_models,
    fold_state_dict,
    plan_folds,
    plan_model_folds,
)
from .report import ExportReport
from .scoring import heldout_perplexity
from .stock import apply_folds, apply_plan, plain_model, stock_config, stock_from_state

__all__ = [
    "EXPORT_RECORD",
    "FOLDS",
    "ExportReport",
    "FoldPlan",
    "InMemoryExport",
    "SequentialExport",
    "apply_folds",
    "apply_plan",
    "dense_streams",
    "export_checkpoint",
    "export_model",
    "fold_models",
    "fold_state_dict",
    "heldout_perplexity",
    "plain_model",
    "plan_folds",
    "plan_model_folds",
    "resolve_dense",
    "split_fit_heldout",
    "stock_config",
    "stock_from_state",
]
