"""The model card as a pure function of a checkpoint folder's config and reports."""

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open

from linearpatch.common.names import DISTILL_RECORD, EVAL_FILES, EXPORT_RECORD, PRUNE_RECORD, is_repo_id
from linearpatch.common.reporting import markdown_table, values_table

from .validate import CheckpointInfo, InvalidCheckpointError, find_local_paths

TRANSFORMERS_RANGE = ">=5.0,<6"
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def parameter_counts(info: CheckpointInfo) -> dict[str, int]:
    """Parameters of the pruned model, of its patches, and of the dense model it came from (from the safetensors
    headers: no weights are loaded). Tied embeddings are counted once."""
    total = patches = per_layer = 0
    for name in info.files:
        if not name.endswith(".safetensors"):
            continue
        with safe_open(str(info.path / name), framework="pt") as weights:
            for key in weights.keys():
                count = 1
                for size in weights.get_slice(key).get_shape():
                    count *= size
                total += count
                if "linear_patch" in key:
                    patches += count
                elif key.startswith("model.layers.0."):
                    per_layer += count
    dense = total - patches + per_layer * len(info.config.get("pruned_layers", []))
    return {"pruned": total, "patches": patches, "dense": dense}


def model_card(info: CheckpointInfo, repo_id: str) -> ModelCard:
    """Build the card of a validated folder (see `validate_folder`) to be pushed as `repo_id`.

    Raises:
        InvalidCheckpointError: if the card would reveal a local filesystem path.
    """
    if info.kind == "adapter":
        card = _adapter_card(info, repo_id)
    elif info.kind == "export":
        card = _export_card(info, repo_id)
    else:
        card = _model_card(info, repo_id)
    leaks = find_local_paths(str(card))
    if leaks:
        raise InvalidCheckpointError(
            f"The model card would reveal local paths {leaks[:3]}: pass --base-model ORG/NAME (the Hub id of the "
            "model this was made from) or fix the recorded metadata before pushing."
        )
    return card


def _usage(repo_id: str, adapter: bool) -> str:
    if adapter:
        return (
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
            "model = model.merge_and_unload()  # a plain LinearPatch checkpoint again\n```\n"
        )
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=False)  # a stock tokenizer\n'
        "```\n\n"
        f"Needs `transformers{TRANSFORMERS_RANGE}` and `torch`; the `linearpatch` package is not required "
        "(the modeling code ships in this repository and imports only torch and transformers).\n"
    )


def _model_card(info: CheckpointInfo, repo_id: str) -> ModelCard:
    config = info.config
    base_model = config.get("base_model")
    pruned = config.get("pruned_layers", [])
    # The dense family: `linearpatch_qwen3` -> `qwen3` (Hub tag and wording).
    family = str(config.get("model_type", "linearpatch_llama")).removeprefix("linearpatch_")
    counts = parameter_counts(info)
    report = _read_json(info.path / PRUNE_RECORD) or {}
    distill = _read_json(info.path / DISTILL_RECORD)
    evaluation = (info.path / EVAL_FILES[1]).read_text() if (info.path / EVAL_FILES[1]).exists() else None
    data = ModelCardData(
        base_model=base_model if is_repo_id(base_model) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=KNOWN_LICENSES.get(base_model),
        tags=["linearpatch", "custom_code", "layer-pruning", family],
    )
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A layer-pruned {'`' + base_model + '`' if base_model else f'{family} model'} revived with "
        "[LinearPatch](https://arxiv.org/abs/2505.24680): one C x C matrix on the residual stream after each gap.",
        "",
        "## Pruning",
        "",
        f"- Removed decoder layers: `{pruned}` of {config.get('original_num_hidden_layers')} "
        f"({config.get('num_hidden_layers')} kept)",
        f"- Selection metric: `{config.get('selection_metric')}`; patch: `{config.get('patch_kind')}` at kept-layer "
        f"positions `{config.get('patch_positions')}` (applied as `h @ P`)",
        f"- Parameters: {counts['pruned'] / 1e6:.1f}M vs {counts['dense'] / 1e6:.1f}M dense "
        f"({100 * (1 - counts['pruned'] / counts['dense']):.1f}% fewer; patches add {counts['patches'] / 1e6:.2f}M)",
    ]
    calibration = report.get("calibration") or {}
    if calibration:
        source = calibration.get("source", "")
        source = Path(source).name if Path(source).exists() else source
        lines.append(
            f"- Calibration: {calibration.get('num_windows')} windows x {calibration.get('seq_len')} tokens of "
            f"`{source}` (seed {calibration.get('seed')}, sha256 `{calibration.get('sha256', '')[:16]}`)"
        )
    holdout = report.get("holdout") or {}
    if holdout:
        chosen = "; ".join(
            f"gap {choice['gap']}: `{choice['label']}` {choice['heldout_perplexity']:.2f} (of "
            + ", ".join(f"{label} {value:.2f}" for label, value in choice["scores"].items())
            + ")"
            for choice in report.get("patch_choices", [])
        )
        lines.append(
            f"- Chosen by held-out perplexity on {holdout.get('num_windows')} more calibration windows, never used "
            f"to fit (dense: {holdout.get('dense_perplexity', float('nan')):.2f}): {chosen}"
        )
        if holdout.get("target_ppl_ratio"):
            lines.append(
                f"- Depth: the most layers within {holdout['target_ppl_ratio']:g}x the dense held-out perplexity "
                f"({len(report.get('depth_curve', []))} depths tried; see `linearpatch_report.json`)"
            )
    if distill:
        data_info = distill.get("data", {})
        lines += [
            "",
            "## Distillation",
            "",
            f"Only the patches were trained, by top-{distill['top_k']} logit distillation from "
            f"`{distill['teacher'] if is_repo_id(distill['teacher']) else base_model}` on "
            f"{data_info.get('num_windows')} windows x {data_info.get('seq_len')} tokens of "
            f"{_data_source(data_info)}; lr {distill['lr']}, "
            f"{distill['epochs']} epoch(s), temperature {distill['temperature']}.",
        ]
    if evaluation:
        lines += ["", "## Evaluation", "", evaluation.strip()]
    lines += ["", "## Usage", "", _usage(repo_id, adapter=False)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _data_source(data: dict) -> str:
    """The training text as the card names it: the teacher's own generated text, or the corpus (a local file by its
    name only)."""
    source = str(data.get("source", "unknown text"))
    if data.get("sampling") == "generated":
        return f"text the teacher generated itself (prompts of `{source.rsplit(' ', 1)[-1]}`, seed {data.get('seed')})"
    return f"`{Path(source).name if Path(source).exists() else source}`"


def _export_card(info: CheckpointInfo, repo_id: str) -> ModelCard:
    export = _read_json(info.path / EXPORT_RECORD)
    base_model = export.get("base_model")
    source = export.get("source") if is_repo_id(export.get("source")) else None
    family = info.config.get("model_type", "llama")
    architecture = (info.config.get("architectures") or ["LlamaForCausalLM"])[0]
    data = ModelCardData(
        base_model=base_model if is_repo_id(base_model) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=KNOWN_LICENSES.get(base_model),
        tags=["linearpatch", "layer-pruning", family, *(["gguf"] if export.get("gguf") else [])],
    )
    origin = f"the LinearPatch checkpoint `{source}`" if source else "a LinearPatch checkpoint"
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A stock `{architecture}` (no remote code) exported from {origin} of "
        f"{'`' + base_model + '`' if base_model else f'a {family} model'}: decoder layers "
        f"`{export.get('pruned_layers')}` "
        f"were removed and the LinearPatch matrices folded into the weights with the `{export.get('fold')}` fold"
        f"{' and distilled' if export.get('distilled') else ''}.",
        "",
        "**This is a folded approximation of the patched checkpoint**: a patch before the first layer, or a scalar "
        "patch, folds exactly; any other gap gets a map on the MLP output of the layer before it, folded exactly into "
        "that layer's weights but fitted (or trained) to stand in for the patch, so its outputs differ from the "
        "patched checkpoint's (see the perplexity table).",
        "",
        "## Folds",
        "",
    ]
    for fold in export.get("folds", []):
        objective = f", objective `{fold['objective']}`" if "objective" in fold else ""
        exact = "exact" if fold["exact"] else "approximate"
        lines.append(f"- before kept layer {fold['position']}: {fold['how']} ({exact}{objective})")
        scores = fold.get("heldout_perplexity")
        if scores:
            shown = ", ".join(f"`{name}` {value:.2f}" for name, value in scores.items())
            lines.append(f"  - held-out calibration perplexity of each candidate: {shown}")
    distilled = export.get("distilled") or {}
    if distilled:
        training = distilled.get("training", {})
        teacher = training.get("teacher")
        teacher = f"`{teacher}`'s" if is_repo_id(teacher) else "the dense model's"  # never a local path
        lines += [
            "",
            f"The maps were then distilled from {teacher} top-{training.get('top_k')} logits "
            f"({training.get('steps')} steps on {training.get('data', {}).get('num_windows')} windows of "
            f"{_data_source(training.get('data', {}))}), starting "
            "from the best training-free fold.",
        ]
    perplexity = export.get("perplexity", {})
    if perplexity:
        lines += ["", "## Held-out perplexity", "", values_table(perplexity)]
    lines += [
        "",
        "## Usage",
        "",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```',
        *_gguf_section(export.get("gguf") or {}, repo_id),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _gguf_section(gguf: dict, repo_id: str) -> list[str]:
    """The GGUF files (`export --gguf`): each with its type, size and llama-perplexity beside transformers' on the
    same text, llama.cpp's limits, and how llama.cpp and Ollama pull one."""
    if not gguf:
        return []
    reference = gguf.get("reference") or {}
    corpora = list(reference)
    rows = []
    for entry in gguf["files"]:
        measured = entry.get("perplexity", {})
        shown = [f"{measured[corpus]:.2f}" if corpus in measured else "-" for corpus in corpora]
        matrix = "yes" if entry.get("imatrix") else "no"
        rows.append([f"`{entry['file']}`", entry["type"].upper(), f"{entry['bytes'] / 1e6:.1f} MB", matrix, *shown])
    if reference:
        stored = "this repository's safetensors"
        rows.append([f"transformers, {stored}", "", "", "", *(f"{reference[c]:.2f}" for c in corpora)])
    matrix = gguf.get("imatrix")
    matrix_line = (
        f"The files with *yes* under imatrix were quantized with llama.cpp's importance matrix `{matrix['file']}` "
        f"(in this repository), computed by `llama-imatrix` on {matrix['num_windows']} windows of "
        f"{matrix['seq_len']} tokens of {matrix['source']} (seed {matrix['seed']}), the text the weights were fitted "
        "on."
        if matrix
        else None
    )
    measured = (
        f"Perplexity: `llama-perplexity` on {gguf.get('windows')} windows of {gguf.get('seq_len')} tokens per corpus, "
        "each scored on its second half; the last row is transformers on the same text, scored the same way."
        if corpora
        else "The files were not measured."
    )
    # The file most users want: 4-bit K-quant, else the smallest i-quant of 4 bits, else the first.
    example = next(
        (entry for kind in ("q4_k_m", "iq4_xs") for entry in gguf["files"] if entry["type"] == kind), gguf["files"][0]
    )
    tag = example["type"].upper()
    return [
        "",
        "## GGUF files (llama.cpp, Ollama, LM Studio)",
        "",
        "Converted from these weights by llama.cpp's own `convert_hf_to_gguf.py` and quantized by `llama-quantize`.",
        "",
        markdown_table(["file", "type", "size", "imatrix", *corpora], rows),
        "",
        measured,
        *(["", matrix_line] if matrix_line else []),
        *([""] if gguf.get("notes") else []),
        *(f"**Note:** {note}" for note in gguf.get("notes", [])),
        "",
        f"Recommended: `{example['file']}`.",
        "",
        f"```sh\nllama-server -hf {repo_id}:{tag}\nollama run hf.co/{repo_id}:{tag}\n```",
    ]


def _adapter_card(info: CheckpointInfo, repo_id: str) -> ModelCard:
    base = info.config["base_model_name_or_path"]
    data = ModelCardData(
        base_model=base,
        base_model_relation="adapter",
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["linearpatch", "custom_code", "peft", "ln_tuning"],
    )
    body = (
        f"# {repo_id.split('/')[-1]}\n\nA PEFT adapter holding trained LinearPatch matrices for [`{base}`]"
        f"(https://huggingface.co/{base}): only the patches were trained (top-K logit distillation).\n\n"
        f"## Usage\n\n{_usage(repo_id, adapter=True)}"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


__all__ = ["model_card", "parameter_counts"]
