"""Issue #34: closeness to the dense model in `eval`: KL, top-1 and top-10 agreement, greedy generation agreement,
checked against a direct computation on tiny models."""

import copy
import json

import pytest
import torch
from helpers import tiny_llama

from linearpatch.integration.measurement.closeness import (
    compare_with,
    generation_agreement,
    greedy_continuations,
    reference_of,
)
from linearpatch.integration.measurement.perplexity import chunked_perplexity

WINDOWS = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(0))


def _changed(model, seed: int, scale: float = 0.0, noise: float = 0.0):
    """`model` with its final norm's weight scaled by `1 + scale` (its logits times `1 + scale`: the head reads the
    norm's output linearly) and noised: a known change of its next-token distributions only."""
    changed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = changed.model.norm.weight
        weight.mul_(1 + scale).add_(noise * torch.randn(weight.shape, generator=generator))
    return changed


def _direct(model, candidate, windows):
    """KL(model || candidate) over the whole vocabulary, top-1 and top-10 agreement, position by position."""
    kl, top1, top10 = [], [], []
    with torch.no_grad():
        for window in windows:
            p = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            q = torch.log_softmax(candidate(window[None]).logits[0].double(), -1)
            for position in range(len(window)):
                kl.append(float((p[position].exp() * (p[position] - q[position])).sum()))
                top1.append(float(p[position].argmax() == q[position].argmax()))
                mine, theirs = set(q[position].topk(10).indices.tolist()), set(p[position].topk(10).indices.tolist())
                top10.append(len(mine & theirs) / 10)
    return sum(kl) / len(kl), sum(top1) / len(top1), sum(top10) / len(top10)


def test_the_baseline_against_itself_is_0_nats_and_agrees_everywhere():
    model = tiny_llama()
    reference, perplexity = reference_of(model, WINDOWS, top_k=5)  # a small K: the rest bucket is used
    assert perplexity == pytest.approx(chunked_perplexity(model, WINDOWS), rel=1e-9)
    figures, again = compare_with(model, reference)
    assert figures == dict(kl=0.0, top1=1.0, top10=1.0) and again == perplexity
    continuations = greedy_continuations(model, WINDOWS[:, :6], 8)
    assert generation_agreement(continuations, continuations) == dict(identical_prefix=8.0, identical_tokens=1.0)


@pytest.mark.parametrize("scale, noise", [(0.7, 0.0), (0.0, 0.5)])
def test_closeness_of_a_known_change_matches_a_direct_computation(scale, noise):
    """A sharper head (logits x 1.7: same ranking, so full agreement, and a KL > 0) and a noised head (some
    predictions change): the figures equal a direct computation over the whole vocabulary when K covers it, and a
    smaller K gives a lower bound of the KL."""
    model = tiny_llama()
    candidate = _changed(model, seed=1, scale=scale, noise=noise)
    kl, top1, top10 = _direct(model, candidate, WINDOWS)
    exact, _ = compare_with(candidate, reference_of(model, WINDOWS, top_k=model.config.vocab_size)[0])
    assert exact["kl"] == pytest.approx(kl, rel=1e-4) and kl > 1e-3
    assert exact["top1"] == pytest.approx(top1) and exact["top10"] == pytest.approx(top10)
    if noise:
        assert top1 < 1 and top10 < 1  # the check above is not comparing a model that agrees everywhere
    else:
        assert top1 == top10 == 1
    bound, _ = compare_with(candidate, reference_of(model, WINDOWS, top_k=10)[0])
    assert 0 < bound["kl"] <= kl + 1e-9 and bound["top1"] == exact["top1"] and bound["top10"] == exact["top10"]


def test_greedy_continuations_follow_the_model_and_agreement_counts_prefix_and_tokens():
    model = tiny_llama()
    prompts = WINDOWS[:2, :5]
    continuations = greedy_continuations(model, prompts, 6)
    sequence = prompts.clone()
    with torch.no_grad():  # without a cache, one token at a time
        for _ in range(6):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(continuations, sequence[:, 5:])
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    other = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4], [7, 2, 3, 4]])
    figures = generation_agreement(other, reference)
    assert figures["identical_prefix"] == pytest.approx((2 + 4 + 0) / 3)
    assert figures["identical_tokens"] == pytest.approx(10 / 12)


def test_eval_reports_closeness_for_each_model(tiny_checkpoint, tmp_path):
    """`compare_models` (what `linearpatch eval` runs): the baseline against itself is 0 nats apart and agrees
    everywhere, and a changed model is measured as the direct computation says, in the JSON and the table."""
    from linearpatch.integration.evaluation import compare_models
    from linearpatch.integration.models import load_model

    model, tokenizer = load_model(str(tiny_checkpoint))
    changed = tmp_path / "changed"
    _changed(model, seed=2, noise=0.5).save_pretrained(changed)
    tokenizer.save_pretrained(changed)
    sizes = dict(corpora=["lee-news"], perplexity_windows=2, seq_len=16, generation_prompts=2, generation_tokens=8)
    result = compare_models([str(tiny_checkpoint), str(changed)], str(tiny_checkpoint), tasks=[], **sizes, log=print)
    baseline, itself, other = result.data["models"]
    assert baseline["closeness"] == {} and baseline["generation"] == {}
    assert itself["closeness"]["lee-news"] == dict(kl=0.0, top1=1.0, top10=1.0)
    assert itself["generation"] == dict(identical_prefix=8.0, identical_tokens=1.0)
    from linearpatch.integration.measurement.perplexity import held_out_windows

    windows = held_out_windows(tokenizer, ["lee-news"], 2, 16)["lee-news"].input_ids
    kl, top1, top10 = _direct(model, load_model(str(changed))[0], windows)
    # The tiny model's 256 tokens are more than the 100 kept: the KL is a lower bound here (exact above).
    assert 0 < other["closeness"]["lee-news"]["kl"] <= kl
    assert other["closeness"]["lee-news"]["top1"] == pytest.approx(top1) and top1 < 1
    assert other["closeness"]["lee-news"]["top10"] == pytest.approx(top10)
    assert other["perplexity"]["lee-news"] == pytest.approx(chunked_perplexity(load_model(str(changed))[0], windows))
    assert "KL lee-news" in result.table and "gen prefix" in result.table and "top-10 %" in result.table
    settings = result.data["settings"]
    assert settings["generation_prompts"] == 2 and settings["generation_tokens"] == 8
    written = json.loads(result.to_json())["models"][2]
    assert written["closeness"] == other["closeness"] and written["generation"] == other["generation"]
