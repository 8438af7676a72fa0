"""Serving: `linearpatch serve` runs vLLM's OpenAI-compatible server on a checkpoint or an export (`engine`)."""

from .engine import CPU_KV_CACHE_GIB, SERVING_VENV, cpu_defaults, find_vllm, is_cpu_build, serve, serve_command

__all__ = ["CPU_KV_CACHE_GIB", "SERVING_VENV", "cpu_defaults", "find_vllm", "is_cpu_build", "serve", "serve_command"]
