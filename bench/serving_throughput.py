"""Run in vLLM's own environment (.venv-serving) by `python -m bench --sections serving`: greedy generation
throughput of each model folder with the offline `vllm.LLM` API, one engine at a time, after a warm-up call.

usage: serving_throughput.py OUTPUT.json SPEC.json   (SPEC: {"prompts": [...], "max_tokens": N, "repeats": R,
       "models": [{"name": ..., "path": ..., "impl": "transformers" | "auto"}, ...]})
"""

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams

    output, spec_path = sys.argv[1:]
    spec = json.loads(open(spec_path).read())
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    results = {}
    for model in spec["models"]:
        started = time.perf_counter()
        llm = LLM(
            model=model["path"],
            trust_remote_code=model["impl"] == "transformers",
            model_impl=model["impl"],
            max_model_len=512,
            gpu_memory_utilization=0.3,
            enforce_eager=spec.get("enforce_eager", False),
        )
        startup = time.perf_counter() - started
        llm.generate(spec["prompts"], params)  # warm-up
        seconds = []
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            outputs = llm.generate(spec["prompts"], params)
            seconds.append(time.perf_counter() - started)
        tokens = sum(len(item.outputs[0].token_ids) for item in outputs)
        best = sorted(seconds)[len(seconds) // 2]
        results[model["name"]] = dict(
            tokens=tokens, seconds=best, tokens_per_second=tokens / best, startup_seconds=startup, impl=model["impl"]
        )
        del llm
    with open(output, "w") as stream:
        json.dump(results, stream, indent=2)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
