"""Push and pull LinearPatch checkpoints and adapters, with validation and generated model cards."""

from .card import model_card, parameter_counts
from .connection import HubUnavailableError
from .pull import PullSummary, pull
from .push import push_to_hub
from .validate import CheckpointInfo, InvalidCheckpointError, validate_folder

__all__ = [
    "CheckpointInfo",
    "HubUnavailableError",
    "InvalidCheckpointError",
    "PullSummary",
    "model_card",
    "parameter_counts",
    "pull",
    "push_to_hub",
    "validate_folder",
]
