"""Fetch transformers' own common model tests (ModelTesterMixin) for the installed transformers version, from its
source distribution on PyPI, into FOLDER/transformers_tests (run by `make setup`; tests/test_transformers_common.py
imports them from there).

    python tests/fetch_transformers_tests.py FOLDER

The source distribution holds tests/test_modeling_common.py, but not the two modules it imports besides transformers
(tests/generation/test_utils.py and tests/exporters/test_export.py): they are stood in for by empty mixins here. So the
generation and torch.export checks of transformers do not run; linearpatch's own tests cover generation (cached and
uncached greedy decoding, every family) and serving.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MODULES = ("test_modeling_common.py",)
STAND_INS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
}


def main() -> None:
    import transformers

    target = Path(sys.argv[1]) / "transformers_tests"
    version = transformers.__version__
    if (target / "VERSION").is_file() and (target / "VERSION").read_text().strip() == version:
        return
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
            + [f"transformers=={version}", "-d", scratch],
            check=True,
        )
        (archive,) = Path(scratch).glob("transformers-*.tar.gz")
        staging = Path(scratch) / "transformers_tests"
        staging.mkdir()
        with tarfile.open(archive) as source:
            for name in MODULES:
                member = source.getmember(f"transformers-{version}/tests/{name}")
                (staging / name).write_bytes(source.extractfile(member).read())
        for name, text in STAND_INS.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
            (staging / name).parent.joinpath("__init__.py").touch()
        (staging / "__init__.py").touch()
        (staging / "VERSION").write_text(version + "\n")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), target)
    print(f"transformers {version}: common model tests in {target}")


if __name__ == "__main__":
    main()
