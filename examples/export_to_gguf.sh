#!/usr/bin/env bash
# From a dense model to a quantized GGUF file served by llama.cpp, in four commands:
#
#   1. prune: remove a block of layers, fit the paper's Hadamard patch;
#   2. distill --export: train the fold maps against the dense model, then fold them into the family's stock
#      architecture (LlamaForCausalLM here: no remote code), and write llama.cpp files (--gguf q4_k_m);
#   3. serve: llama-server (built by `make gguf`) on the q4_k_m file, with the OpenAI API;
#   4. one completion request, then the server stops.
#
#   bash examples/export_to_gguf.sh [MODEL] [WORK_FOLDER] [PORT]
#
# Set LINEARPATCH_QUICK=1 for smoke-test sizes. Ollama and LM Studio load the same .gguf file.
set -euo pipefail
MODEL=${1:-smollm2-135m}
WORK=${2:-gguf-example}
PORT=${3:-8090}
mkdir -p "$WORK"

# The paper's patch: `distill --export` trains the maps it folds into. (`--patch auto` may keep a scalar patch, which
# folds into the stock weights exactly and leaves nothing to train: then `linearpatch export` is the whole step.)
linearpatch prune "$MODEL" --num-layers 5 --patch hadamard --output "$WORK/pruned"
linearpatch distill "$WORK/pruned" --teacher "$MODEL" --export --gguf q4_k_m --output "$WORK/stock"
GGUF=$(ls "$WORK"/stock/*Q4_K_M.gguf)
echo "serving $GGUF"

linearpatch serve "$GGUF" --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H "Content-Type: application/json" \
    -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'
echo
