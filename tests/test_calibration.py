"""Calibration statistics, selection metrics and patch estimation against direct dense computations."""

import math

import pytest
import torch
from helpers import tiny_llama

from linearpatch.integration.measurement.calibration import calibrate
from linearpatch.integration.measurement.hadamard import hadamard_matrix
from linearpatch.integration.pruning import prune
from linearpatch.integration.pruning.patches import estimate_patch
from linearpatch.integration.pruning.selection import candidate_scores, parse_layers, select_layers

NUM_LAYERS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=NUM_LAYERS, seed=3)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(5))


def layer_inputs(model, input_ids):
    """X_0..X_L of one batch, by running the dense layers by hand (X_L = the final norm's input)."""
    hidden = model.model.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    embeddings = model.model.rotary_emb(hidden, position_ids=positions)
    inputs = [hidden]
    for layer in model.model.layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
        inputs.append(hidden)
    return torch.stack(inputs).double()  # [L + 1, windows, T, C]


@torch.no_grad()
def test_cosine_metric_matches_hand_computation(model, windows):
    statistics = calibrate(model, windows, distances=(1, 2), progress=False)
    x = layer_inputs(model, windows)
    for distance in (1, 2):
        for start in range(NUM_LAYERS - distance + 1):
            a, b = x[start], x[start + distance]
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            assert statistics.block_cosine(distance)[start].item() == pytest.approx(cos.mean().item(), abs=1e-6)
            angular = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
            assert statistics.block_angular(distance)[start].item() == pytest.approx(angular, abs=1e-6)
    scores = candidate_scores(statistics, 2, "cosine")
    assert sorted(scores) == list(range(NUM_LAYERS - 1))  # starts 0..L-n, including a block ending at L
    best = max(scores, key=scores.get)
    assert select_layers(statistics, 2, "cosine") == [best, best + 1]
    influence = candidate_scores(statistics, 1, "block-influence")
    lowest = sorted(influence, key=influence.get)[:3]
    assert select_layers(statistics, 3, "block-influence") == sorted(lowest)
    angular_scores = candidate_scores(statistics, 2, "angular")
    assert select_layers(statistics, 2, "angular")[0] == min(angular_scores, key=angular_scores.get)


@torch.no_grad()
@pytest.mark.parametrize("gap", [(2, 4), (0, 2), (4, 6), (3, 4)])
def test_scales_and_patch_match_direct_formula(model, windows, gap):
    start, end = gap
    statistics = calibrate(model, windows, distances=(1,), regression_blocks=[gap], batch_size=3, progress=False)
    x = layer_inputs(model, windows)
    rotation = hadamard_matrix(64, dtype=torch.float64)
    before = (x[start] @ rotation).abs().mean(dim=1)  # [windows, C]
    after = (x[end] @ rotation).abs().mean(dim=1)
    scales = (after / before).mean(dim=0)
    expected = rotation @ torch.diag(scales) @ rotation.T
    patch = estimate_patch(statistics, start, end, "hadamard").double()
    assert torch.allclose(patch, expected, atol=1e-6)
    assert torch.allclose(patch, patch.T, atol=1e-6)
    assert torch.linalg.eigvalsh(patch).min() > 0  # symmetric positive definite at initialisation

    diag = (x[end].abs().mean(dim=1) / x[start].abs().mean(dim=1)).mean(dim=0)
    assert torch.allclose(estimate_patch(statistics, start, end, "diag").double(), torch.diag(diag), atol=1e-6)
    scalar = (x[end].abs().mean(dim=(1, 2)) / x[start].abs().mean(dim=(1, 2))).mean()
    assert torch.allclose(
        estimate_patch(statistics, start, end, "scalar").double(),
        scalar * torch.eye(64, dtype=torch.float64),
        atol=1e-6,
    )

    a, b = x[start].reshape(-1, 64), x[end].reshape(-1, 64)
    gram = a.T @ a
    ridge = torch.linalg.solve(gram + 1e-2 * gram.diagonal().mean() * torch.eye(64, dtype=gram.dtype), a.T @ b)
    assert torch.allclose(estimate_patch(statistics, start, end, "lstsq").double(), ridge, atol=1e-5)


@torch.no_grad()
def test_massive_channels_are_scaled_on_their_own(windows):
    """A channel carrying a massive activation on every token (as Gemma 3's do) is found in every layer from the
    embeddings on, and the Hadamard patch scales it by its own ratio while the rotation covers the other channels:
    P = E H diag(d_rest) H^T E + diag(r_M), with d_rest from the stream with the channel zeroed."""
    massive_model = tiny_llama(num_layers=NUM_LAYERS, seed=3)
    channel = 17
    massive_model.model.embed_tokens.weight[:, channel] = 500.0  # about 10^4 x the other channels' mean |x|
    statistics = calibrate(massive_model, windows, distances=(1,), batch_size=3, progress=False)
    assert statistics.massive_channels.nonzero()[:, 1].unique().tolist() == [channel]
    assert statistics.massive_channels[:, channel].all()
    x = layer_inputs(massive_model, windows)
    rotation = hadamard_matrix(64, dtype=torch.float64)
    keep = torch.ones(64, dtype=torch.float64)
    keep[channel] = 0
    start, end = 1, 4
    rest = ((x[end] * keep) @ rotation).abs().mean(dim=1) / ((x[start] * keep) @ rotation).abs().mean(dim=1)
    expected = keep[:, None] * (rotation @ torch.diag(rest.mean(dim=0)) @ rotation.T) * keep[None, :]
    expected[channel, channel] = (x[end][..., channel].abs().mean(1) / x[start][..., channel].abs().mean(1)).mean()
    patch = estimate_patch(statistics, start, end, "hadamard").double()
    torch.testing.assert_close(patch, expected, rtol=1e-5, atol=1e-6)
    assert patch[channel].count_nonzero() == 1 and patch[:, channel].count_nonzero() == 1
    # The paper's formula rotates the massive channel into every scale; this patch differs from it.
    whole = ((x[end] @ rotation).abs().mean(dim=1) / (x[start] @ rotation).abs().mean(dim=1)).mean(dim=0)
    assert (patch - rotation @ torch.diag(whole) @ rotation.T).abs().max() > 1e-2
    # The massive channels are decided by the first window alone: any batching finds the same ones.
    again = calibrate(massive_model, windows, distances=(1,), batch_size=1, progress=False)
    assert torch.equal(again.massive_channels, statistics.massive_channels)
    torch.testing.assert_close(again.rotated_rest_abs_mean, statistics.rotated_rest_abs_mean)


def test_prune_uses_statistics_and_reports(model, windows):
    pruned, report = prune(model, None, num_layers=2, calibration=_as_windows(windows), progress=False)
    assert report.metric == "cosine" and len(report.pruned_layers) == 2
    assert set(report.candidate_scores) == set(range(NUM_LAYERS - 1))
    assert pruned.config.pruned_layers == report.pruned_layers
    assert pruned.config.selection_metric == "cosine" and pruned.config.patch_kind == "hadamard"
    assert report.scales[0]["hadamard"]["min"] > 0
    assert report.scales[0]["massive_channels"] == []  # a random tiny model has none: the paper's patch exactly
    plain, plain_report = prune(model, None, layers=[0, 5], patch="none", progress=False)
    assert plain_report.metric == "manual" and plain_report.calibration == {}
    assert not [n for n, _ in plain.named_parameters() if "linear_patch" in n]
    lstsq, lstsq_report = prune(
        model, None, num_layers=1, patch="lstsq", calibration=_as_windows(windows), progress=False
    )
    assert len(lstsq_report.gaps) == 1


def _as_windows(input_ids):
    from linearpatch.integration.data import TokenWindows

    return TokenWindows(input_ids, "test", "random", 0, input_ids.numel())


def test_bad_arguments_are_clear(model, windows):
    with pytest.raises(ValueError, match="exactly one of"):
        prune(model, None, num_layers=2, layers=[1])
    with pytest.raises(ValueError, match="Cannot prune 6 of 6"):
        prune(model, None, num_layers=6, calibration=_as_windows(windows))
    with pytest.raises(ValueError, match="out of range"):
        prune(model, None, layers=[9])
    with pytest.raises(ValueError, match="Unknown patch kind"):
        prune(model, None, layers=[1], patch="magic")
    with pytest.raises(ValueError, match="Unknown metric"):
        prune(model, None, num_layers=1, metric="random")
    with pytest.raises(ValueError, match="non-empty"):
        calibrate(model, torch.zeros(0, 8, dtype=torch.long), progress=False)


def test_parse_layers():
    assert parse_layers("20-24") == [20, 21, 22, 23, 24]
    assert parse_layers("0-1,28-29") == [0, 1, 28, 29]
    assert parse_layers("3,7") == [3, 7]
    with pytest.raises(ValueError, match="Cannot read layers"):
        parse_layers("24-20")
