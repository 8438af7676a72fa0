"""Every supported family against the checkpoint contract (issue #12): a pruned checkpoint, reloaded without the
package, gives the logits of the unmodified dense transformers model with those layers skipped and the same patches
applied at each gap (computed independently, with hooks); cached and uncached greedy generation agree."""

import json

import pytest
import torch
from helpers import FAMILY_OVERRIDES, random_patch, tiny_family

from linearpatch.common.remote_check import logits_without_package
from linearpatch.modeling import FAMILIES, GEMMA3_RESIDUAL, contiguous_gaps, prune_layers, pruned_config

FAMILY_NAMES = list(FAMILY_OVERRIDES)
GAPS = {"start": [0, 1], "middle": [2, 3], "end": [4, 5], "two-gaps": [1, 4, 5]}
INPUT_IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def test_the_table_covers_every_built_in_family():
    assert set(FAMILY_NAMES) == set(FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}


def skipped_and_patched(dense, layers, patches, input_ids):
    """Logits of the dense model with `layers` skipped (each returns its input) and `patches[g]` applied to the
    residual stream entering the first layer after gap g (or the final norm), by hooks on stock modules."""
    handles = []

    def skip(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    def patch_with(matrix):
        def pre_hook(module, args, kwargs):
            if args:
                return (args[0] @ matrix, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ matrix}

        return pre_hook

    for index in layers:
        handles.append(dense.model.layers[index].register_forward_hook(skip, with_kwargs=True))
    num_layers = dense.config.num_hidden_layers
    for (_, end), matrix in zip(contiguous_gaps(layers), patches, strict=True):
        target = dense.model.layers[end] if end < num_layers else dense.model.norm
        handles.append(target.register_forward_pre_hook(patch_with(matrix), with_kwargs=True))
    try:
        with torch.no_grad():
            return dense(input_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def saved_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    table = {}
    for family in FAMILY_NAMES:
        for gap_name, layers in GAPS.items():
            dense = tiny_family(family, tied=gap_name in ("middle", "end"), seed=len(table))
            patches = [random_patch(64, seed=10 + g) for g in range(len(contiguous_gaps(layers)))]
            pruned = prune_layers(dense, layers, patches=patches, base_model="tiny", selection_metric="manual")
            path = root / f"{family}-{gap_name}"
            pruned.save_pretrained(path)
            expected = skipped_and_patched(dense, layers, patches, INPUT_IDS)
            table[(family, gap_name)] = (path, pruned, expected)
    return table


def test_checkpoints_reload_without_the_package_with_the_hooked_dense_logits(saved_table):
    keys = list(saved_table)
    loaded = logits_without_package([saved_table[key][0] for key in keys], INPUT_IDS)
    for key, logits in zip(keys, loaded, strict=True):
        path, pruned, expected = saved_table[key]
        assert json.loads((path / "config.json").read_text())["model_type"] == f"linearpatch_{key[0]}"
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5, msg=f"{key}")
        with torch.no_grad():
            torch.testing.assert_close(pruned(INPUT_IDS).logits, expected, rtol=0, atol=1e-5, msg=f"{key}")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cached_and_uncached_greedy_generation_agree(saved_table, family):
    for gap_name in GAPS:
        _, pruned, _ = saved_table[(family, gap_name)]
        prompt = INPUT_IDS[:1]
        kwargs = dict(max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
        cached = pruned.generate(prompt, use_cache=True, **kwargs)
        uncached = pruned.generate(prompt, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached), (family, gap_name)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3_text", "mistral"])
def test_per_layer_config_is_reindexed_to_the_kept_layers(family):
    dense = tiny_family(family).config
    config = pruned_config(dense, [1, 4])
    kept = [0, 2, 3, 5]
    if getattr(dense, "layer_types", None) is not None:
        assert config.layer_types == [dense.layer_types[index] for index in kept]
    if family.startswith("qwen"):
        # Dense: layers 0..2 full, 3..5 sliding. Kept 0, 2 are below max_window_layers=3, kept 3, 5 above.
        assert config.max_window_layers == 2
        assert config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert config.num_hidden_layers == 4 and config.original_num_hidden_layers == 6


def test_a_gemma3_sliding_window_pattern_is_replaced_by_the_sliced_layer_types():
    dense = tiny_family("gemma3_text", layer_types=None, sliding_window_pattern=3).config
    assert dense.layer_types[2] == "full_attention"  # the pattern made every third layer full
    config = pruned_config(dense, [0])
    assert config.layer_types == dense.layer_types[1:]
    assert "sliding_window_pattern" not in config.to_dict()
    reloaded = type(config).from_dict(config.to_dict())
    assert reloaded.layer_types == dense.layer_types[1:]


def test_an_unsupported_family_is_refused_with_the_supported_list():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3, gemma3_text") as error:
        pruned_config(GPT2Config(n_layer=4), [1])
    assert "register_family" in str(error.value)


def test_register_family_adds_a_family_with_the_same_residual_structure(tmp_path, smollm2_tokenizer, monkeypatch):
    from transformers.models.olmo2 import modeling_olmo2 as olmo2

    from linearpatch.cli import main
    from linearpatch.integration.export import export_model
    from linearpatch.modeling import ResidualLayout, register_family

    # As in the README: OLMo 2 normalises each block's output (a plain `w`) before adding it to the stream, and its
    # blocks read the stream as it is.
    residual = ResidualLayout(
        after_attention="mlp",
        mlp_output="post_feedforward_layernorm",
        writers=("post_attention_layernorm", "post_feedforward_layernorm"),
        writer_norm_offset=0.0,
        reads_through_norms=False,
    )
    family = register_family(
        olmo2.Olmo2Config,
        olmo2.Olmo2ForCausalLM,
        olmo2.Olmo2DecoderLayer,
        olmo2.Olmo2RMSNorm,
        olmo2.Olmo2Model,
        residual=residual,
    )
    try:
        assert family.model_type == "linearpatch_olmo2"
        torch.manual_seed(0)
        config = olmo2.Olmo2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            rms_norm_eps=1e-12,  # the scalar fold is exact up to eps / mean(h^2): see test_export.py
        )
        dense = olmo2.Olmo2ForCausalLM(config).eval()
        patches = [random_patch(64, seed=3)]
        pruned = prune_layers(dense, [1, 2], patches=patches)
        pruned.save_pretrained(tmp_path)
        reloaded = family.causal_lm_class.from_pretrained(tmp_path)
        expected = skipped_and_patched(dense, [1, 2], patches, INPUT_IDS)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(INPUT_IDS).logits, expected, rtol=0, atol=1e-5)
        # The export folds into the writers the entry names, and claims exactness only where the entry allows it:
        # a gap at layer 0 (the embeddings) is exact for every family; a scalar fold is not, for OLMo 2, and says so.
        at_start = prune_layers(dense, [0, 1], patches=patches)
        stock, folds = export_model(at_start, "down-proj")
        assert folds[0]["exact"] and type(stock) is olmo2.Olmo2ForCausalLM
        with torch.no_grad():
            assert (stock(INPUT_IDS).logits - at_start(INPUT_IDS).logits).abs().max().item() <= 1e-4
        scaled = prune_layers(dense, [1, 2], patches=[1.7 * torch.eye(64)])
        stock, folds = export_model(scaled, "scalar")
        assert not folds[0]["exact"] and folds[0]["how"].startswith("post_attention_layernorm and post_feedforward")
        with torch.no_grad():
            plain = prune_layers(dense, [1, 2], add_patches=False)(INPUT_IDS).logits
            want = scaled(INPUT_IDS).logits
            assert (stock(INPUT_IDS).logits - want).abs().mean() < (plain - want).abs().mean()

        # The CLI in the same process: prune, then distill (its teacher runs in a child without the registration).
        monkeypatch.setenv("LINEARPATCH_QUICK", "1")
        dense_folder, pruned, distilled = tmp_path / "dense", tmp_path / "pruned", tmp_path / "distilled"
        config.vocab_size = len(smollm2_tokenizer)
        olmo2.Olmo2ForCausalLM(config).save_pretrained(dense_folder)
        smollm2_tokenizer.save_pretrained(dense_folder)
        sizes = ["--num-samples", "4", "--seq-len", "16"]
        prune = ["prune", str(dense_folder), "--layers", "1-2", "--patch", "hadamard", *sizes]
        assert main([*prune, "--output", str(pruned)]) == 0
        assert json.loads((pruned / "config.json").read_text())["model_type"] == "linearpatch_olmo2"
        distill = ["distill", str(pruned), "--teacher", str(dense_folder), "--output", str(distilled), "--top-k", "8"]
        assert main([*distill, *sizes, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
        assert family.causal_lm_class.from_pretrained(distilled).config.patch_kind == "hadamard+distilled"
    finally:
        FAMILIES.pop("olmo2")


# A sixth family is its registry entry and a row here: (copied family, its transformers classes' names, what the
# entry says besides the classes). Each row is a built-in family under new names, registered as a new one would be.
SIXTH_FAMILIES = {
    "qwen2": ("Qwen2DecoderLayer", "Qwen2RMSNorm", "Qwen2Model", {}),
    "gemma3_text": (
        "Gemma3DecoderLayer",
        "Gemma3RMSNorm",
        "Gemma3TextModel",
        dict(residual=GEMMA3_RESIDUAL, logit_softcap_field="final_logit_softcapping"),
    ),
}


@pytest.mark.parametrize("copied", list(SIXTH_FAMILIES))
def test_a_sixth_family_is_one_registry_entry(copied, tmp_path, smollm2_tokenizer, monkeypatch):
    """Issue #21: a family with a known residual structure needs only its registry entry. A renamed copy of a
    built-in family (its own model_type and class names, registered with `register_family` and nothing else) prunes by
    outcome from the CLI (the search runs the head itself at an end gap), reloads as its LinearPatch class, and
    exports to its own stock class exactly where the fold is exact (the folds write where the entry says: without
    the Gemma copy's `residual`, its scalar fold is off by 0.47 in the logits)."""
    import importlib

    from huggingface_hub.dataclasses import strict
    from transformers import AutoConfig, AutoModelForCausalLM

    from linearpatch.cli import main
    from linearpatch.integration.export import export_model
    from linearpatch.modeling import register_family

    source = FAMILIES[copied]
    family_module = importlib.import_module(source.dense_causal_lm_class.__module__)
    layer, norm, base = (getattr(family_module, name) for name in SIXTH_FAMILIES[copied][:3])
    facts = SIXTH_FAMILIES[copied][3]
    model_type = f"{copied}_renamed"
    config_class = strict(type(f"Renamed{source.dense_config_class.__name__}", (source.dense_config_class,), {}))
    config_class.model_type = model_type
    lm_class = type(f"Renamed{source.dense_causal_lm_class.__name__}", (source.dense_causal_lm_class,), {})
    lm_class.config_class = config_class
    # What the user does for their own model anyway, so that transformers loads its dense checkpoints.
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, lm_class, exist_ok=True)
    family = register_family(config_class, lm_class, layer, norm, base, **facts)
    try:
        template = tiny_family(copied, vocab_size=len(smollm2_tokenizer), seed=5, rms_norm_eps=1e-12)
        values = {k: v for k, v in template.config.to_dict().items() if k not in ("model_type", "architectures")}
        dense = lm_class(config_class(**values)).eval()
        dense.load_state_dict(template.state_dict())
        dense_folder, pruned = tmp_path / "dense", tmp_path / "pruned"
        dense.save_pretrained(dense_folder)
        smollm2_tokenizer.save_pretrained(dense_folder)

        monkeypatch.setenv("LINEARPATCH_QUICK", "1")
        sizes = ["--num-samples", "8", "--seq-len", "16", "--eval-windows", "1"]
        prune = ["prune", str(dense_folder), "--layers", "4-5", "--patch", "auto", *sizes, "--output", str(pruned)]
        assert main(prune) == 0
        config = json.loads((pruned / "config.json").read_text())
        assert config["model_type"] == f"linearpatch_{model_type}" and config["pruned_layers"] == [4, 5]
        assert type(AutoModelForCausalLM.from_pretrained(pruned)) is family.causal_lm_class

        input_ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))
        cases = [
            ("scalar", prune_layers(dense, [2, 3, 5], patches=[1.7 * torch.eye(64), 0.6 * torch.eye(64)])),
            ("down-proj", prune_layers(dense, [0, 1], patches=[random_patch(64, 2)])),
        ]
        for fold, patched in cases:
            assert type(patched) is family.causal_lm_class
            stock, folds = export_model(patched, fold)
            assert all(item["exact"] for item in folds) and type(stock) is lm_class
            with torch.no_grad():
                assert (stock(input_ids).logits - patched(input_ids).logits).abs().max().item() <= 1e-4, fold
    finally:
        FAMILIES.pop(model_type)


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory, smollm2_tokenizer):
    """Per family, a tiny random dense checkpoint folder with a real tokenizer: what the CLI takes as MODEL."""
    root = tmp_path_factory.mktemp("family-dense")
    folders = {}
    for index, family in enumerate(name for name in FAMILY_NAMES if name != "llama"):
        folders[family] = root / family
        tiny_family(family, vocab_size=len(smollm2_tokenizer), seed=index, rms_norm_eps=1e-12).save_pretrained(
            folders[family]
        )
        smollm2_tokenizer.save_pretrained(folders[family])
    return folders


# Llama runs the same commands in test_cli.py, test_distill.py and test_export.py.
@pytest.mark.parametrize("family", [name for name in FAMILY_NAMES if name != "llama"])
def test_prune_distill_and_export_from_the_cli(family, family_checkpoints, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from linearpatch.cli import main

    monkeypatch.setenv("LINEARPATCH_QUICK", "1")  # smoke-test sizes for every default (evaluation windows included)
    dense = family_checkpoints[family]
    pruned, distilled, exported = tmp_path / "pruned", tmp_path / "distilled", tmp_path / "exported"
    sizes = ["--num-samples", "4", "--seq-len", "32"]
    prune = ["prune", str(dense), "--num-layers", "2", *sizes, "--eval-windows", "1", "--output", str(pruned)]
    assert main(prune) == 0
    config = json.loads((pruned / "config.json").read_text())
    assert config["model_type"] == f"linearpatch_{family}" and len(config["pruned_layers"]) == 2
    assert config["architectures"] == [FAMILIES[family].causal_lm_class.__name__]

    distill = ["distill", str(pruned), "--teacher", str(dense), "--output", str(distilled), "--top-k", "8"]
    distill += ["--num-samples", "4", "--seq-len", "16", "--lr", "1e-2", "--cache-dir", str(tmp_path / "cache")]
    assert main([*distill, "--device", "cpu"]) == 0
    before = AutoModelForCausalLM.from_pretrained(pruned)
    after = AutoModelForCausalLM.from_pretrained(distilled)
    assert after.config.model_type == f"linearpatch_{family}" and after.config.patch_kind.endswith("+distilled")
    changed = [
        not torch.equal(parameter, after.get_parameter(name))
        for name, parameter in before.named_parameters()
        if "linear_patch" in name
    ]
    assert changed and all(changed)  # only the patches trained, and every one of them moved

    export = ["export", str(distilled), "--output", str(exported), *sizes, "--eval-windows", "1"]
    assert main([*export, "--eval-corpus", "lee-news"]) == 0
    stock_config = json.loads((exported / "config.json").read_text())
    assert stock_config["model_type"] == family and "auto_map" not in stock_config
    assert stock_config["architectures"] == [FAMILIES[family].dense_causal_lm_class.__name__]
    assert stock_config.get("layer_types") == config.get("layer_types")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_metric_and_patch_kind_prunes_every_family(family):
    from linearpatch.integration.data import TokenWindows
    from linearpatch.integration.pruning import PATCH_KINDS, prune

    dense = tiny_family(family, num_layers=6, seed=3)
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    windows = TokenWindows(ids, source="random", sampling="random", seed=1, total_tokens=ids.numel())
    family_class = FAMILIES[family].causal_lm_class
    with torch.no_grad():
        plain = prune_layers(dense, [2, 3], add_patches=False)(ids).logits
    for metric in ("cosine", "angular", "block-influence"):
        pruned, report = prune(dense, None, num_layers=2, metric=metric, calibration=windows, progress=False)
        assert type(pruned) is family_class and len(report.pruned_layers) == 2, metric
    for kind in PATCH_KINDS:
        pruned, report = prune(dense, None, layers=[2, 3], patch=kind, calibration=windows, progress=False)
        assert type(pruned) is family_class and pruned.config.patch_kind == kind
        with torch.no_grad():
            logits = pruned(ids).logits
        if kind == "none":
            torch.testing.assert_close(logits, plain, rtol=0, atol=0)
        else:
            assert not torch.allclose(logits, plain), kind  # the patch acts on the stream
