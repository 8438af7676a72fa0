"""`linearpatch export` (issues #11, #12): a folder of the family's stock architecture, loadable without remote code,
exact where the fold is exact, and better than plain pruning where it is not."""

import json

import pytest
import torch
from helpers import FAMILY_OVERRIDES, random_patch, tiny_family, tiny_llama

from linearpatch.cli import main
from linearpatch.common.remote_check import logits_without_package
from linearpatch.integration.export import export_model
from linearpatch.modeling import FAMILIES, prune_layers

QUICK = ["--num-samples", "4", "--seq-len", "32", "--eval-windows", "2", "--eval-corpus", "lee-news"]
INPUT_IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))
# RMSNorm is scale-invariant up to its eps: a scalar fold is exact to about eps / mean(h^2). For a random model's
# tiny residual stream (RMS ~0.02, so eps / mean(h^2) ~ 1e-3) that is the whole error; for a real model's it is
# negligible (see the SmolLM2 test, which keeps its real eps). These fixtures set eps to 1e-12 so that they measure
# the fold's algebra.
REALISTIC = dict(rms_norm_eps=1e-12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama at a realistic activation scale, with a real tokenizer: what the CLI takes as MODEL."""
    path = tmp_path_factory.mktemp("export-dense")
    tiny_llama(vocab_size=len(smollm2_tokenizer), seed=7, **REALISTIC).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
@pytest.mark.parametrize("tied", [True, False])
def test_scalar_patches_and_a_gap_at_layer_0_fold_exactly(tied, family):
    dense = tiny_family(family, tied=tied, **REALISTIC)
    cases = [
        ("scalar", prune_layers(dense, [2, 3, 5], patches=[1.7 * torch.eye(64), 0.6 * torch.eye(64)])),
        ("scalar", prune_layers(dense, [0, 1, 4], patches=[random_patch(64, 1), 1.3 * torch.eye(64)])),
        ("down-proj", prune_layers(dense, [0, 1], patches=[random_patch(64, 2)])),
    ]
    for fold, patched in cases:
        stock, folds = export_model(patched, fold)
        assert all(item["exact"] for item in folds)
        assert type(stock) is FAMILIES[family].dense_causal_lm_class and stock.config.model_type == family
        with torch.no_grad():
            assert (stock(INPUT_IDS).logits - patched(INPUT_IDS).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_down_proj_fold_brings_the_export_closer_to_the_patched_model_than_plain_pruning(family):
    dense = tiny_family(family, **REALISTIC)
    patched = prune_layers(dense, [2, 3], patches=[random_patch(64, 4, scale=0.5)])
    windows = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(5))
    stock, folds = export_model(patched, "down-proj", windows)
    plain = prune_layers(dense, [2, 3], add_patches=False)
    assert not folds[0]["exact"] and folds[0]["relative_error"] < 1
    with torch.no_grad():
        want = patched(windows).logits
        assert (stock(windows).logits - want).abs().mean() < (plain(windows).logits - want).abs().mean()


def _prune(checkpoint, output, *options):
    assert main(["prune", str(checkpoint), *options, "--num-samples", "4", "--seq-len", "32", "--output", output]) == 0


def test_exported_folders_load_without_remote_code_with_the_patched_logits(checkpoint, tmp_path):
    _prune(checkpoint, str(tmp_path / "scalar"), "--layers", "2-3", "--patch", "scalar")
    _prune(checkpoint, str(tmp_path / "start"), "--layers", "0-1")
    assert main(["export", str(tmp_path / "scalar"), "--fold", "scalar", "--output", str(tmp_path / "s"), *QUICK]) == 0
    assert main(["export", str(tmp_path / "start"), "--output", str(tmp_path / "z"), *QUICK]) == 0
    for folder in ("s", "z"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert not list((tmp_path / folder).glob("*.py"))
    stock = logits_without_package([f"stock:{tmp_path / 's'}", f"stock:{tmp_path / 'z'}"], INPUT_IDS)
    patched = logits_without_package([tmp_path / "scalar", tmp_path / "start"], INPUT_IDS)
    for name, got, want in zip(("scalar", "gap at 0"), stock, patched, strict=True):
        assert (got - want).abs().max().item() <= 1e-4, (name, (got - want).abs().max().item(), want.abs().max())
    record = json.loads((tmp_path / "s" / "linearpatch_export.json").read_text())
    assert set(record["perplexity"]) == {"patched", "export", "plain"} and record["folds"][0]["exact"]


def test_export_refuses_bad_input(checkpoint, tmp_path, capsys):
    code = main(["export", str(checkpoint), "--output", str(tmp_path / "x")])
    assert code == 2 and "not a LinearPatch checkpoint" in capsys.readouterr().err
    _prune(checkpoint, str(tmp_path / "p"), "--layers", "2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code = main(["export", str(tmp_path / "p"), "--output", str(tmp_path / "taken")])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert not (tmp_path / "x").exists()


def test_push_takes_an_export_and_says_it_is_folded(checkpoint, tmp_path):
    from linearpatch.hub_tools import model_card, validate_folder

    _prune(checkpoint, str(tmp_path / "p"), "--layers", "2-3")
    assert main(["export", str(tmp_path / "p"), "--output", str(tmp_path / "e"), *QUICK]) == 0
    info = validate_folder(tmp_path / "e")
    card = str(model_card(info, "org/tiny-export"))
    assert info.kind == "export" and "folded approximation" in card and "objective `down-proj`" in card
    assert "trust_remote_code" not in card


def _random_maps(model, positions, seed):
    """A random map per position: full, or diagonal where the family folds only diagonal maps after layer 0."""
    from linearpatch.integration.export.folding import diagonal_maps

    generator = torch.Generator().manual_seed(seed)
    size = model.config.hidden_size
    maps = {}
    for position in positions:
        if position > 0 and diagonal_maps(model.config):
            maps[position] = 1 + 0.3 * torch.randn(size, generator=generator, dtype=torch.float64)
        else:
            noise = 0.2 * torch.randn(size, size, generator=generator, dtype=torch.float64)
            maps[position] = torch.eye(size, dtype=torch.float64) + noise
    return maps


def _random_frames(model, positions, seed):
    """A random rotation times a scale per position (a down-proj-rotated frame)."""
    generator = torch.Generator().manual_seed(seed)
    size = model.config.hidden_size
    frames = {}
    for position in positions:
        rotation, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        frames[position] = (0.5 + torch.rand((), generator=generator, dtype=torch.float64)) * rotation
    return frames


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_map_folds_are_exact_for_every_family(family):
    """The exported model equals the model it folds: the pruned model with each map applied to the MLP output of the
    layer before its gap (the embeddings at layer 0), each frame to the stream after it, and each writer's map to
    that writer's output (`distill --export`'s extra maps, where the family's writers are Linear layers), patches
    bypassed, at every kind of gap, the frames as training leaves them (turned and rescaled away from their fit)."""
    from linearpatch.integration.distillation.folded import fold_trained
    from linearpatch.integration.export import FoldPlan
    from linearpatch.integration.export.folding import attach_fold_maps, diagonal_maps, frame_norm_keys, writer_sites

    dense = tiny_family(family, **REALISTIC)
    # A gap at layer 0, one in the middle, and one that reaches the last layer (its map on the last kept layer).
    patched = prune_layers(dense, [0, 2, 5], patches=[random_patch(64, 1), random_patch(64, 2), random_patch(64, 3)])
    assert patched.config.patch_positions == [0, 1, 3]
    maps = _random_maps(patched, patched.config.patch_positions, seed=4)
    # Where the layout allows, both later gaps also rotate and rescale the stream after them (down-proj-rotated):
    # two frames, so that their composition over the layers after the second gap is checked too.
    frames = _random_frames(patched, [1, 3], seed=5) if FAMILIES[family].residual.rotatable else {}
    norms = {key: patched.get_parameter(key).detach().double() for key in frame_norm_keys(patched.config, 1)}
    sites = writer_sites(patched.config, maps, 2)
    # Both writers of the layers between the first two gaps and the last one, but the one the gap's own map is on.
    expected = ["0.self_attn.o_proj", "1.self_attn.o_proj", "1.mlp.down_proj", "2.self_attn.o_proj"]
    assert sites == ([] if diagonal_maps(patched.config) else expected)
    size, noise = patched.config.hidden_size, torch.Generator().manual_seed(7)
    turn = {site: 0.2 * torch.randn(size, size, generator=noise, dtype=torch.float64) for site in sites}
    writers = {site: torch.eye(size, dtype=torch.float64) + change for site, change in turn.items()}
    handles = attach_fold_maps(patched, maps, frames, writers)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for frame in patched.fold_frames.values():  # as training moves them: the fitted rotation turned further
            frame.weight.copy_(0.1 * torch.randn(frame.weight.shape, generator=generator))
            frame.log_scale += 0.2
        mapped = patched(INPUT_IDS).logits
    plan = FoldPlan(patched.config, [], maps, frames=frames, norms=norms)
    stock, _, difference = fold_trained(patched, handles, plan, INPUT_IDS)
    assert type(stock) is FAMILIES[family].dense_causal_lm_class and not hasattr(patched, "fold_maps")
    assert not hasattr(patched, "fold_frames") and not hasattr(patched, "fold_writers")
    with torch.no_grad():
        assert (stock(INPUT_IDS).logits - mapped).abs().max().item() <= 1e-4
        assert difference <= 1e-4
        # The maps changed the model: the check above is not comparing the pruned model with itself.
        assert (patched(INPUT_IDS).logits - mapped).abs().max().item() > 1e-2


def test_a_trained_frame_stays_a_scaled_rotation_and_starts_at_its_fit():
    """`FoldFrame` keeps `R = c Q0 exp(G - G^T)`: whatever training does to its parameters, `R` is a scale times an
    orthogonal matrix (what folds exactly into the layers after the gap), and it starts at the fitted frame."""
    from linearpatch.integration.export.folding import FoldFrame, split_frame

    generator = torch.Generator().manual_seed(7)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    frame = FoldFrame(1.3 * rotation)
    assert (frame.matrix(torch.float64) - 1.3 * rotation).abs().max() <= 1e-6
    x = torch.randn(3, 16, generator=generator)
    assert (frame(x) - x @ (1.3 * rotation).float()).abs().max() <= 1e-5
    with torch.no_grad():
        frame.weight.copy_(torch.randn(16, 16, generator=generator))
        frame.log_scale.fill_(0.5)
    trained = frame.matrix(torch.float64)
    scale, turned = split_frame(trained)
    assert abs(scale - torch.e**0.5) <= 1e-6
    assert (turned @ turned.T - torch.eye(16, dtype=torch.float64)).abs().max() <= 1e-6
    assert (turned - rotation).abs().max() > 0.1  # it did turn
    loss = frame(x).pow(2).sum()
    loss.backward()
    assert frame.weight.grad.abs().max() > 0 and frame.log_scale.grad != 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_fold_auto_scores_every_objective_and_keeps_the_best(family):
    from linearpatch.integration.export import export_model, heldout_perplexity, split_fit_heldout

    dense = tiny_family(family, **REALISTIC)
    patched = prune_layers(dense, [2, 3], patches=[random_patch(64, 4, scale=0.5)])
    windows = torch.randint(3, 256, (16, 32), generator=torch.Generator().manual_seed(5))
    stock, folds = export_model(patched, "auto", windows, dense=dense)
    (fold,) = folds
    scores = fold["heldout_perplexity"]
    # Gemma 3's normalised writers cannot hold a rotation of the stream: auto leaves that objective out there.
    rotated = ["down-proj-rotated"] if FAMILIES[family].residual.rotatable else []
    assert list(scores) == ["down-proj", "down-proj-dense", "down-proj-cosine", *rotated]
    assert fold["objective"] == min(scores, key=scores.get)
    # The recorded score is the export's own perplexity on the held-out windows.
    _, held_out = split_fit_heldout(windows)
    assert heldout_perplexity(stock, held_out, {}) == pytest.approx(scores[fold["objective"]], rel=1e-4)
    # Without the dense model only the patched objective is left: nothing to compare, nothing held out.
    (without_dense,) = export_model(patched, "auto", windows)[1]
    assert without_dense["objective"] == "down-proj" and "heldout_perplexity" not in without_dense
    if not rotated:  # asked for by name, it is refused with the reason and what to choose instead
        with pytest.raises(ValueError, match="cannot hold.*choose --fold auto or down-proj-dense"):
            export_model(patched, "down-proj-rotated", windows, dense=dense)


def test_fold_auto_by_kl_keeps_the_candidate_closest_to_the_dense_model(tiny_checkpoint, tmp_path, capfd):
    """Issue #34: `--score kl` ranks `auto`'s candidates by their held-out KL to the dense model (each recorded beside
    its perplexity), the recorded KL is the export's own (as `eval` measures it), and without `--fold auto` and a
    dense model it is refused in one line."""
    from linearpatch.integration.defaults import TEACHER_TOP_K
    from linearpatch.integration.export import export_model, split_fit_heldout
    from linearpatch.integration.measurement.closeness import compare_with, reference_of

    dense = tiny_family("llama", **REALISTIC)
    patched = prune_layers(dense, [2, 3], patches=[random_patch(64, 4, scale=0.5)])
    windows = torch.randint(3, 256, (16, 32), generator=torch.Generator().manual_seed(5))
    stock, (fold,) = export_model(patched, "auto", windows, dense=dense, score="kl")
    kls, perplexities = fold["heldout_kl"], fold["heldout_perplexity"]
    assert fold["score"] == "kl" and list(kls) == list(perplexities) and len(kls) == 4
    from linearpatch.integration.export import ExportReport

    shown = ExportReport(None, "auto", None, [2, 3], [2], folds=[fold], num_layers=4).summary()
    assert "held-out KL to the dense model (ranks them): down-proj " in shown
    assert fold["objective"] == min(kls, key=kls.get)
    _, held_out = split_fit_heldout(windows)
    figures, _ = compare_with(stock, reference_of(dense, held_out, TEACHER_TOP_K)[0])
    assert figures["kl"] == pytest.approx(kls[fold["objective"]], rel=1e-4) and figures["kl"] > 0
    assert "heldout_kl" not in export_model(patched, "auto", windows, dense=dense)[1][0]
    pruned = tmp_path / "pruned"
    assert main(["prune", str(tiny_checkpoint), "--layers", "2-3", "--output", str(pruned), *QUICK]) == 0
    refused = ["export", str(pruned), "--fold", "down-proj", "--score", "kl", "--output", str(tmp_path / "e")]
    capfd.readouterr()
    assert main(refused) == 2 and not (tmp_path / "e").exists()
    assert "use --fold auto with the dense model" in capfd.readouterr().err


def test_fold_objectives_fit_their_targets():
    """Least squares reproduces a stream that a map can reach exactly; cosine never ends worse than its start."""
    from linearpatch.integration.export.fitting import fit_map

    generator = torch.Generator().manual_seed(0)
    a, m = torch.randn(512, 16, generator=generator).double(), torch.randn(512, 16, generator=generator).double()
    truth = torch.randn(16, 16, generator=generator).double()
    target = a + m @ truth
    assert torch.allclose(fit_map("down-proj-dense", a, m, target, ridge=0), truth, atol=1e-8)
    scales = fit_map("down-proj-dense", a, m, a + m * 1.5, diagonal=True, ridge=0)
    assert torch.allclose(scales, torch.full((16,), 1.5, dtype=torch.float64))
    noisy = target + 3 * torch.randn(512, 16, generator=generator).double()

    def cosine_distance(transform):
        return 1 - torch.nn.functional.cosine_similarity(a + m @ transform, noisy, dim=1).mean()

    start, refined = fit_map("down-proj-dense", a, m, noisy), fit_map("down-proj-cosine", a, m, noisy)
    assert cosine_distance(refined) < cosine_distance(start)
    with pytest.raises(ValueError, match="Unknown fold objective"):
        fit_map("dense", a, m, target)


def test_rotated_fit_reaches_a_stream_that_no_map_on_the_mlp_output_can():
    """A target that rotates and rescales the whole stream (not only the MLP output's part): down-proj-rotated fits
    it almost exactly, with a frame that is a scale times a rotation, where the map alone cannot."""
    from linearpatch.integration.export.fitting import fit_map, fit_rotated, relative_error
    from linearpatch.integration.export.folding import split_frame

    generator = torch.Generator().manual_seed(1)
    a, m = torch.randn(2048, 16, generator=generator).double(), torch.randn(2048, 16, generator=generator).double()
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    truth = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=generator).double()
    target = 1.7 * (a + m @ truth) @ rotation
    transform, frame = fit_rotated(a, m, target, ridge=0)
    scale, fitted = split_frame(frame)
    assert torch.allclose(fitted @ fitted.T, torch.eye(16, dtype=torch.float64), atol=1e-10)
    assert relative_error(a, m, target, transform, frame) < 1e-3
    assert relative_error(a, m, target, fit_map("down-proj-dense", a, m, target, ridge=0)) > 0.5
    assert scale == pytest.approx(1.7, rel=1e-3)


def test_export_cli_auto_uses_the_dense_model_and_refuses_a_dense_fold_without_one(checkpoint, tmp_path, capsys):
    _prune(checkpoint, str(tmp_path / "p"), "--layers", "2-3")
    output = tmp_path / "e"
    assert main(["export", str(tmp_path / "p"), "--dense", str(checkpoint), "--output", str(output), *QUICK]) == 0
    record = json.loads((output / "linearpatch_export.json").read_text())
    (fold,) = record["folds"]
    assert record["fold"] == "auto" and record["dense"] == str(checkpoint)
    assert set(fold["heldout_perplexity"]) == {"down-proj", "down-proj-dense", "down-proj-cosine", "down-proj-rotated"}
    assert "held-out calibration perplexity" in capsys.readouterr().out
    code = main(["export", str(tmp_path / "p"), "--fold", "down-proj-dense", "--output", str(tmp_path / "x"), *QUICK])
    assert code == 2 and "pass --dense" in capsys.readouterr().err and not (tmp_path / "x").exists()
    code = main(
        [
            "export",
            str(tmp_path / "p"),
            "--dense",
            str(checkpoint),
            "--output",
            str(tmp_path / "y"),
            "--num-samples",
            "1",
        ]
    )
    assert code == 2 and "at least 2" in capsys.readouterr().err


def test_rotated_fold_rounds_shrink_with_the_cube_of_a_wide_stream():
    """Each round is a C x C SVD (27 s at C = 4096 on 2 cores): up to C = 1024 the fit keeps its 100 rounds, beyond it
    the rounds cost about what 100 cost at 1024, and never fewer than 5."""
    from linearpatch.integration.export.fitting import rotated_rounds

    assert [rotated_rounds(width, 100) for width in (576, 1024, 2048, 4096, 8192)] == [100, 100, 12, 5, 5]
    assert rotated_rounds(2048, 3) == 3
