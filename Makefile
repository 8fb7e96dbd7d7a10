# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out/smollm2-135m-executorch
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup demo test test-slow test-emulator emulator bench clean

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
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m "slow and not emulator"

# The arm64 emulator `slmc validate --on qemu-arm64` runs check bundles in: the host tools
# from Debian (installed here when root), then slmc builds the root filesystem once
# (cached by a content hash under ~/.cache/slmc/devices; a second call does nothing).
EMULATOR_TOOLS := qemu-aarch64-static debootstrap aarch64-linux-gnu-ld readelf adb
emulator: setup
	@missing=$$(for t in $(EMULATOR_TOOLS); do command -v $$t >/dev/null || echo $$t; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			qemu-user-static debootstrap binutils binutils-aarch64-linux-gnu adb >/dev/null; fi
	$(BIN)/slmc device setup qemu-arm64

test-emulator: emulator
	$(BIN)/python -m pytest -q -m "emulator and not slow" tests/test_device.py tests/test_device_by_block.py

bench: setup
	$(BIN)/python bench/compile.py

clean:
	rm -rf out .pytest_cache
