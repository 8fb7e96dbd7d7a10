# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out/smollm2-135m-executorch
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed

# torch first and pinned: the CPU build of 2.13.0 is what executorch 1.5.1 needs,
# and asking for it by itself keeps pip from resolving a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The main job: built-in SmolLM2-135M-Instruct -> ExecuTorch .pte, validated against
# slmc's reference executor, then text from ExecuTorch's stock LLM runner.
demo: setup
	$(BIN)/slmc compile default --target executorch --backend xnnpack --max-seq-len 512 -o $(OUT) --validate
	$(BIN)/slmc run $(OUT) --prompt "$(PROMPT)" --max-new-tokens 48

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m "not slow and not emulator and not macos"

test-slow: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m "slow"

bench: setup
	$(BIN)/python bench/compile.py

clean:
	rm -rf out .pytest_cache
