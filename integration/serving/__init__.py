"""Serving: `linearpatch serve` runs vLLM's OpenAI-compatible server on a checkpoint or an export, or llama.cpp's
`llama-server` on a GGUF file (`engine`)."""

from .engine import (
    CPU_KV_CACHE_GIB,
    SERVING_VENV,
    cpu_defaults,
    find_vllm,
    is_cpu_build,
    is_gguf,
    llama_server_command,
    serve,
    serve_command,
)

__all__ = [
    "CPU_KV_CACHE_GIB",
    "SERVING_VENV",
    "cpu_defaults",
    "find_vllm",
    "is_cpu_build",
    "is_gguf",
    "llama_server_command",
    "serve",
    "serve_command",
]
