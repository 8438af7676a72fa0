"""What `linearpatch export --fold down-proj` keeps of the patch: held-out perplexity of the patched checkpoint, its
stock-architecture export and plain pruning, SmolLM2 with layers 20..24 removed (16 x 256 fit windows, 4 x 512
held-out windows per corpus)."""

from ..harness import BLOCK, Claim, evaluation_windows, per_corpus, perplexities

TITLE = "Stock export (SmolLM2, about 3 minutes on 2 CPU cores)"
DEFAULT = False


def run(device: str, quick: bool) -> dict:
    from transformers import LlamaForCausalLM

    import linearpatch
    from linearpatch.integration.data import token_windows
    from linearpatch.integration.export import export_model, stock_config
    from linearpatch.integration.models import load_model

    model, tokenizer = load_model("smollm2-135m", device=device)
    calibration = token_windows("wikipedia-calibration", tokenizer, 4 if quick else 16, 256, seed=0)
    patched, _ = linearpatch.prune(model, tokenizer, layers=BLOCK, calibration=calibration, progress=False)
    exported, folds = export_model(patched, "down-proj", calibration.input_ids)
    plain = LlamaForCausalLM(stock_config(patched.config))
    plain.load_state_dict({k: v for k, v in patched.state_dict().items() if ".linear_patch." not in k}, strict=False)
    plain.tie_weights()
    evaluation = evaluation_windows(tokenizer, 2 if quick else 4)
    perplexity = {
        name: perplexities(candidate, evaluation)
        for name, candidate in (("patched", patched), ("export", exported), ("plain", plain.eval()))
    }
    return dict(folds=folds, perplexity=perplexity)


def markdown(v: dict) -> list[str]:
    corpora = list(v["perplexity"]["patched"])
    lines = ["**Stock export** (`--fold down-proj`, SmolLM2, layers 20..24; held-out perplexity, 4 x 512 tokens)", ""]
    lines += ["| model | " + " | ".join(corpora) + " |", "|---|" + "---|" * len(corpora)]
    lines += [
        f"| {name} | " + " | ".join(f"{values[c]:.2f}" for c in corpora) + " |"
        for name, values in v["perplexity"].items()
    ]
    return [*lines, ""]


def checks(v: dict) -> list[Claim]:
    perplexity = v["perplexity"]
    corpora = list(perplexity["plain"])
    return [
        Claim(
            "the down-proj export beats plain pruning on held-out text",
            all(perplexity["export"][c] < perplexity["plain"][c] for c in corpora),
            "export " + per_corpus(perplexity["export"], 1) + "; plain " + per_corpus(perplexity["plain"], 1),
        )
    ]
