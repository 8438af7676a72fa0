"""The offline lm-eval task `wiki_next_sentence` tells a model that reads from one that does not: dense SmolLM2
against plain pruning of layers 20..24, 60 documents."""

from ..harness import BLOCK, Claim

TITLE = "Offline task separation (SmolLM2, about 3 minutes on 2 CPU cores)"
DEFAULT = False
DENSE_AT_LEAST = 0.40  # acc_norm, chance 0.25
GAP_AT_LEAST = 0.10


def run(device: str, quick: bool) -> dict:
    from linearpatch.integration.evaluation.tasks import lm_eval_tasks
    from linearpatch.integration.models import load_model
    from linearpatch.modeling import prune_layers

    model, tokenizer = load_model("smollm2-135m", device=device)
    plain = prune_layers(model, BLOCK, add_patches=False)
    limit = 16 if quick else 60
    scores = {
        name: lm_eval_tasks(candidate, tokenizer, ["wiki_next_sentence"], limit=limit, batch_size=16)[
            "wiki_next_sentence"
        ]
        for name, candidate in (("dense", model), ("plain", plain))
    }
    return dict(task="wiki_next_sentence", limit=limit, chance=0.25, scores=scores)


def markdown(v: dict) -> list[str]:
    return [
        f"**Offline task** `{v['task']}` ({v['limit']} documents, chance {v['chance']}): acc_norm dense "
        f"{v['scores']['dense']['acc_norm']:.2f}, plain pruned 20..24 {v['scores']['plain']['acc_norm']:.2f}",
        "",
    ]


def checks(v: dict) -> list[Claim]:
    dense, plain = v["scores"]["dense"]["acc_norm"], v["scores"]["plain"]["acc_norm"]
    return [
        Claim(
            f"dense SmolLM2 scores at least {DENSE_AT_LEAST} acc_norm on {v['task']} (chance {v['chance']})",
            dense >= DENSE_AT_LEAST,
            f"{dense:.2f}",
        ),
        Claim(
            f"{v['task']} separates dense from plain pruned 20..24 by at least {GAP_AT_LEAST}",
            dense - plain >= GAP_AT_LEAST,
            f"dense {dense:.2f}, plain {plain:.2f}",
        ),
    ]
