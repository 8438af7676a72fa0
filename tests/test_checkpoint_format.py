"""The LinearPatch checkpoint format: save -> package-free trust_remote_code load -> same logits, and clear errors."""

import json

import pytest
import torch
from helpers import CASES, build_case, random_patch, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from linearpatch.common.remote_check import logits_without_package
from linearpatch.modeling import (
    LinearPatchConfig,
    LinearPatchForCausalLM,
    contiguous_gaps,
    patch_positions_for,
    prune_layers,
    prune_state_dict,
)


def test_contract_table_reloads_without_package(tmp_path):
    input_ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    checkpoints, expected = [], []
    for name, case in CASES.items():
        _, pruned = build_case(**case)
        with torch.no_grad():
            expected.append(pruned(input_ids).logits.float())
        pruned.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["auto_map"] == {
            "AutoConfig": "configuration_linearpatch.LinearPatchConfig",
            "AutoModel": "modeling_linearpatch.LinearPatchModel",
            "AutoModelForCausalLM": "modeling_linearpatch.LinearPatchForCausalLM",
        }
        assert (tmp_path / name / "modeling_linearpatch.py").exists()
        assert (tmp_path / name / "configuration_linearpatch.py").exists()
        checkpoints.append(tmp_path / name)
    reloaded = logits_without_package(checkpoints, input_ids)
    for name, want, got in zip(CASES, expected, reloaded, strict=True):
        assert (want - got).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("name", list(CASES))
def test_structure_of_pruned_model(name):
    case = CASES[name]
    dense, pruned = build_case(**case)
    kept = 6 - len(case["layers"])
    assert pruned.config.num_hidden_layers == kept == len(pruned.model.layers)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(kept))
    assert pruned.config.original_num_hidden_layers == 6
    assert pruned.config.pruned_layers == case["layers"]
    assert next(pruned.model.layers[0].parameters()).dtype == case["dtype"]
    patch_names = [n for n, _ in pruned.named_parameters() if "linear_patch" in n]
    assert len(patch_names) == len(contiguous_gaps(case["layers"]))
    assert all(p.dtype == torch.float32 for n, p in pruned.named_parameters() if "linear_patch" in n)
    if case["tied"]:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    else:
        assert pruned.lm_head.weight is not pruned.model.embed_tokens.weight


def test_dense_model_is_untouched():
    dense = tiny_llama()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    prune_layers(dense, [1, 2], patches=[random_patch(64, 0)])
    assert dense.config.num_hidden_layers == 6 and len(dense.model.layers) == 6
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    copied = prune_layers(dense, [1, 2], copy=True)
    with torch.no_grad():
        copied.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], dense.model.layers[0].mlp.up_proj.weight)


def forward_skipping_by_hand(dense, input_ids, pruned_layers, patches_after_gap):
    """Dense forward that skips `pruned_layers` and multiplies the residual stream by P (`h @ P`) after each gap,
    written against the dense model's own modules (independent of LinearPatchForCausalLM)."""
    hidden = dense.model.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
    position_embeddings = dense.model.rotary_emb(hidden, position_ids=position_ids)
    gap_ends = {end: patches_after_gap[i] for i, (_, end) in enumerate(contiguous_gaps(pruned_layers))}
    for index, layer in enumerate(dense.model.layers):
        if index in gap_ends and gap_ends[index] is not None:
            hidden = hidden @ gap_ends[index]
        if index in pruned_layers:
            continue
        hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
    end = len(dense.model.layers)
    if end in gap_ends and gap_ends[end] is not None:
        hidden = hidden @ gap_ends[end]
    return dense.lm_head(dense.model.norm(hidden))


@pytest.mark.parametrize("layers", [[2, 3], [0], [5], [0, 1, 4], [1, 3, 5]])
def test_plain_pruning_equals_dense_with_layers_skipped(layers):
    dense = tiny_llama()
    input_ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    pruned = prune_layers(dense, layers, add_patches=False)
    assert not [n for n, _ in pruned.named_parameters() if "linear_patch" in n]
    with torch.no_grad():
        want = forward_skipping_by_hand(dense, input_ids, layers, [None] * len(contiguous_gaps(layers)))
        got = pruned(input_ids).logits
    assert (want - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layers", [[2, 3], [0, 1], [4, 5], [1, 4, 5]])
def test_patch_convention_is_h_times_p_with_non_symmetric_p(layers):
    dense = tiny_llama(tied=False)
    input_ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    patches = [random_patch(64, seed=i, scale=0.3) for i in range(len(contiguous_gaps(layers)))]
    assert not torch.allclose(patches[0], patches[0].T)
    pruned = prune_layers(dense, layers, patches=patches)
    with torch.no_grad():
        want = forward_skipping_by_hand(dense, input_ids, layers, patches)
        transposed = forward_skipping_by_hand(dense, input_ids, layers, [p.T for p in patches])
        got = pruned(input_ids).logits
    assert (want - got).abs().max().item() <= 1e-5
    assert (transposed - got).abs().max().item() > 1e-3


def test_identity_patches_when_none_given():
    dense = tiny_llama()
    pruned = prune_layers(dense, [2, 3])
    assert torch.equal(pruned.model.layers[2].linear_patch.weight, torch.eye(64))
    plain = prune_layers(dense, [2, 3], add_patches=False)
    input_ids = torch.randint(3, 256, (1, 8))
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids).logits, plain(input_ids).logits, atol=1e-6)


@pytest.mark.parametrize("layers", [[2, 3], [4, 5], [0]])
def test_greedy_generate_with_cache_equals_without(layers):
    pruned = prune_layers(tiny_llama(), layers, patches=[random_patch(64, 5)])
    prompt = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    with_cache = pruned.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without_cache = pruned.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert with_cache.shape[1] == 18
    assert torch.equal(with_cache, without_cache)


def test_hidden_states_and_activation_checkpointing():
    pruned = prune_layers(tiny_llama(), [1, 2], patches=[random_patch(64, 6)])
    input_ids = torch.randint(3, 256, (2, 8))
    output = pruned(input_ids, output_hidden_states=True)
    assert len(output.hidden_states) == pruned.config.num_hidden_layers + 1
    pruned.train()
    pruned.activation_checkpointing_enable()
    loss = pruned(input_ids, labels=input_ids).loss
    loss.backward()
    assert pruned.model.layers[1].linear_patch.weight.grad is not None
    reference = prune_layers(tiny_llama(), [1, 2], patches=[random_patch(64, 6)]).train()
    reference(input_ids, labels=input_ids).loss.backward()
    assert torch.allclose(
        reference.model.layers[1].linear_patch.weight.grad, pruned.model.layers[1].linear_patch.weight.grad, atol=1e-6
    )


def test_auto_classes_are_registered(tmp_path):
    pruned = prune_layers(tiny_llama(), [4, 5], patches=[random_patch(64, 7)])
    pruned.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is LinearPatchConfig
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LinearPatchForCausalLM
    assert torch.equal(loaded.model.norm.linear_patch.weight, pruned.model.norm.linear_patch.weight)


def test_bf16_load_keeps_patch_fp32_unless_disabled(tmp_path):
    pruned = prune_layers(tiny_llama(), [2], patches=[random_patch(64, 8)])
    pruned.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    assert loaded.model.layers[2].linear_patch.weight.dtype == torch.float32
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    low = prune_layers(tiny_llama(), [2], patches=[random_patch(64, 8)], keep_patch_in_fp32=False)
    low.save_pretrained(tmp_path / "b")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    assert loaded.model.layers[2].linear_patch.weight.dtype == torch.bfloat16
    assert not loaded.model.layers[2].linear_patch.compute_in_fp32


def _save(tmp_path, layers=(2, 3)):
    pruned = prune_layers(tiny_llama(), list(layers), patches=[random_patch(64, 9)])
    pruned.save_pretrained(tmp_path)
    return pruned


@pytest.mark.parametrize(
    "drop", ["model.layers.2.linear_patch.weight", "model.layers.3.mlp.down_proj.weight"], ids=["patch", "layer"]
)
def test_checkpoint_missing_weights_is_refused(tmp_path, drop):
    _save(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[drop]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert drop in str(error.value)


def test_checkpoint_whose_config_disagrees_with_weights_is_refused(tmp_path):
    _save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # Claims one more kept layer (and one fewer pruned) than the weights hold.
    config.update(num_hidden_layers=5, pruned_layers=[2], patch_positions=[2])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its config"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    config.update(num_hidden_layers=3, pruned_layers=[1, 2, 3], patch_positions=[1])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config has no place for"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors_is_refused(tmp_path):
    _save(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)safetensor|incomplete|deserializ|invalid|truncat"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(num_hidden_layers=4, pruned_layers=[2, 2]), "duplicate"),
        (dict(num_hidden_layers=4, original_num_hidden_layers=6, pruned_layers=[2, 9]), r"\[9\] outside"),
        (dict(num_hidden_layers=0, original_num_hidden_layers=2, pruned_layers=[0, 1]), "all 2 layers"),
        (dict(num_hidden_layers=4, pruned_layers=[2, 3], patch_positions=[7]), r"patch_positions.*\[7\]"),
        (dict(num_hidden_layers=5, original_num_hidden_layers=6, pruned_layers=[2, 3]), "disagrees"),
    ],
)
def test_invalid_config_names_field_and_value(values, message):
    with pytest.raises(Exception, match=message):
        LinearPatchConfig(hidden_size=64, num_attention_heads=4, **values)


def test_config_derives_patch_positions_from_gaps():
    assert contiguous_gaps([0, 1, 5, 6, 7]) == [(0, 2), (5, 8)]
    assert patch_positions_for([0, 1, 5, 6, 7]) == [0, 3]
    assert patch_positions_for([28, 29]) == [28]
    config = LinearPatchConfig(num_hidden_layers=25, pruned_layers=[20, 21, 22, 23, 24])
    assert config.original_num_hidden_layers == 30 and config.patch_positions == [20]


@pytest.mark.parametrize(
    "layers, message",
    [([6], "out of range"), ([0, 1, 2, 3, 4, 5], "Pruning all 6"), ([1, 1], "duplicates"), ([], "No layers")],
)
def test_prune_layers_rejects_bad_layers(layers, message):
    with pytest.raises(ValueError, match=message):
        prune_layers(tiny_llama(), layers)


def test_prune_layers_rejects_non_llama_and_bad_patches():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        prune_layers(gpt2, [0])
    with pytest.raises(ValueError, match="2 patch matrices for 1 gaps"):
        prune_layers(tiny_llama(), [2], patches=[torch.eye(64), torch.eye(64)])
    with pytest.raises(ValueError, match=r"shape \(32, 32\)"):
        prune_layers(tiny_llama(), [2], patches=[torch.eye(32)])


def test_prune_state_dict_reindexes():
    state = {f"model.layers.{i}.w": torch.tensor(float(i)) for i in range(5)} | {"model.norm.weight": torch.ones(1)}
    out = prune_state_dict(state, [1, 3], 5)
    assert {k: v.item() for k, v in out.items() if "layers" in k} == {
        "model.layers.0.w": 0.0,
        "model.layers.1.w": 2.0,
        "model.layers.2.w": 4.0,
    }
    assert "model.norm.weight" in out and len(state) == 6
