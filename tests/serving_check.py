"""Run in vLLM's own environment (.venv-serving) by tests/test_serving.py: greedy-decode prompts with the offline
`vllm.LLM` API on each checkpoint (a stock export with vLLM's native kernels) and write the generated token ids
as JSON.

usage: serving_check.py OUTPUT.json MAX_TOKENS CHECKPOINT [CHECKPOINT ...] < prompts.json
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    output, max_tokens, *checkpoints = sys.argv[1:]
    prompts = json.load(sys.stdin)
    results = {}
    for checkpoint in checkpoints:
        with open(f"{checkpoint}/config.json") as stream:
            remote_code = "auto_map" in json.load(stream)
        llm = LLM(
            model=checkpoint,
            trust_remote_code=remote_code,
            # A LinearPatch checkpoint runs in the Transformers backend; a stock export in vLLM's native kernels.
            model_impl="transformers" if remote_code else "auto",
            dtype="float32",
            max_model_len=256,
            enforce_eager=True,
            gpu_memory_utilization=0.3,
        )
        generated = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=int(max_tokens)))
        results[checkpoint] = [
            {"prompt_token_ids": list(item.prompt_token_ids), "token_ids": list(item.outputs[0].token_ids)}
            for item in generated
        ]
        del llm
    with open(output, "w") as stream:
        json.dump(results, stream)


if __name__ == "__main__":  # vLLM starts its engine with multiprocessing (spawn): the guard is required
    main()
