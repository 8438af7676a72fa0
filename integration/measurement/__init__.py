"""Measurements of a model that more than one stage makes: the calibration pass over the dense model (pruning
chooses and fits from it, `report` draws it), the Hadamard transform it measures in, perplexity (the search, the
export comparison and `eval` score with it) and closeness to a baseline (`eval`, `prune --metric kl`). Below every
stage: it imports only loading and data."""

from .calibration import CalibrationStatistics, calibrate
from .perplexity import chunked_perplexity, corpus_perplexity, summed_next_token_nll

__all__ = ["CalibrationStatistics", "calibrate", "chunked_perplexity", "corpus_perplexity", "summed_next_token_nll"]
