"""Pruning: the calibration pass, block selection, patch estimation (Hadamard and the baselines), `prune`."""

from ..measurement.calibration import CalibrationStatistics, calibrate
from .cuts import closeness_by_cut
from .job import PruneReport, prune, prune_checkpoint, prune_model
from .patches import PATCH_CHOICES, PATCH_KINDS, estimate_patch
from .plan import check_prune_arguments
from .selection import METRICS, SELECTION_METRICS, candidate_scores, parse_layers, select_layers

__all__ = [
    "METRICS",
    "PATCH_CHOICES",
    "PATCH_KINDS",
    "SELECTION_METRICS",
    "CalibrationStatistics",
    "PruneReport",
    "calibrate",
    "candidate_scores",
    "check_prune_arguments",
    "closeness_by_cut",
    "estimate_patch",
    "parse_layers",
    "prune",
    "prune_checkpoint",
    "prune_model",
    "select_layers",
]
