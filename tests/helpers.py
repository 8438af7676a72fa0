"""What the tests share (imported as `from helpers import ...`): tiny real Llama models and patches, and the checks of
a command's outcome (one-line errors, leftovers, folder digests)."""

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# The one SmolLM2 prune of the suite (issue #20): what only the real model shows (its real RMSNorm eps, reload without
# the package, vLLM == transformers, sequential == in memory) is checked on this folder. Quality on SmolLM2 is measured
# by the bench (`python -m bench --check`), not here. Two gaps: a patch before kept layer 20 and one before the final
# norm, so every test on it sees both kinds of patch position.
SMOLLM2_PRUNE = ["prune", "smollm2-135m", "--layers", "20-24,29", "--num-samples", "4", "--seq-len", "128"]


def tiny_llama(num_layers: int = 6, tied: bool = True, hidden_size: int = 64, seed: int = 0, **overrides):
    """A real (random-weight) LlamaForCausalLM small enough to run in milliseconds."""
    torch.manual_seed(seed)
    values = dict(
        vocab_size=256,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**values)).eval()
    # Random init gives near-identical layers; spread the norms so that layer choice and scales are not degenerate.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    return model


def random_patch(size: int, seed: int, scale: float = 0.2) -> torch.Tensor:
    """A non-symmetric matrix near the identity, to tell `h @ P` from `h @ P.T`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.eye(size) + scale * torch.randn(size, size, generator=generator)


# The checkpoint contract table: gaps at the start, middle and end, two gaps, tied and untied heads, fp32 and bf16.
CASES = {
    "tied-fp32-middle": dict(tied=True, dtype=torch.float32, layers=[2, 3]),
    "untied-fp32-start": dict(tied=False, dtype=torch.float32, layers=[0, 1]),
    "tied-fp32-end": dict(tied=True, dtype=torch.float32, layers=[4, 5]),
    "untied-fp32-two-gaps": dict(tied=False, dtype=torch.float32, layers=[1, 4, 5]),
    "tied-bf16-middle": dict(tied=True, dtype=torch.bfloat16, layers=[2, 3]),
    "untied-bf16-start-and-end": dict(tied=False, dtype=torch.bfloat16, layers=[0, 5]),
}


def build_case(tied, dtype, layers, seed=0):
    """A dense tiny Llama and its pruned LinearPatch model with random non-symmetric patches (one per gap)."""
    from linearpatch.modeling import contiguous_gaps, prune_layers

    dense = tiny_llama(num_layers=6, tied=tied, seed=seed).to(dtype)
    num_gaps = len(contiguous_gaps(layers))
    patches = [random_patch(dense.config.hidden_size, seed=10 + index) for index in range(num_gaps)]
    return dense, prune_layers(dense, layers, patches=patches, base_model="tiny", selection_metric="manual")


# Per family: what makes its tiny model exercise the family's quirks. Sliding windows shorter than the test inputs
# make a wrongly re-indexed `layer_types` / `max_window_layers` change the logits.
FAMILY_OVERRIDES = {
    "llama": {},
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),  # biased q/k/v
    "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),  # q/k norms
    # sqrt(C) embedding scale, pre/post feed-forward norms, (1 + w) norms, alternating sliding/full attention.
    "gemma3_text": dict(
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        query_pre_attn_scalar=16,
    ),
}


def tiny_family(model_type: str, num_layers: int = 6, tied: bool = True, seed: int = 0, **overrides):
    """A real (random-weight) dense causal LM of a supported family, seeded, with non-degenerate norms and biases."""
    from linearpatch.modeling import FAMILIES

    family = FAMILIES[model_type]
    values = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(FAMILY_OVERRIDES[model_type])
    values.update(overrides)
    torch.manual_seed(seed)
    model = family.dense_causal_lm_class(family.dense_config_class(**values)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 2.0)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    return model


# The smallest calibration of a command on the tiny models.
QUICK = ["--num-samples", "4", "--seq-len", "32"]


def run_cli(*arguments: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "linearpatch.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def folder_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("linearpatch ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.suffix == ".work")


@contextlib.contextmanager
def serving(command: list[str], port: int, log: Path, timeout: float, **popen):
    """Run a server (`command`, its own process group, output to `log`) until its /health answers on `port`, yield,
    then stop it (Ctrl-C, then kill): `linearpatch serve` with vLLM or llama-server."""
    import json
    import signal
    import time
    import urllib.request

    with open(log, "w") as stream:
        server = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert server.poll() is None, log.read_text()[-4000:]
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"the server did not start in {timeout} s"
                    time.sleep(1)

            def ask(path: str, body: dict, wait: float = 300) -> dict:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
                )
                return json.loads(urllib.request.urlopen(request, timeout=wait).read())

            yield ask
        finally:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
