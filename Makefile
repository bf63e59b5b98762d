# The two commands for a fresh machine (README):
#   make demo   set up .venv if missing, then pretrain on the bundled text, fine-tune on the bundled conversations
#               (multi-turn OpenAssistant threads and Dolly records as one-turn chats), and ask the chat model a question
#   make test   set up .venv if missing, then run the whole test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gptds-installed
RANKS ?= 2
# One PATH for every command: DeepSpeed's JIT ops (compiled with ninja) rebuild when a different ninja runs.
export PATH := $(abspath $(BIN)):$(PATH)
# CPU-only machines install the CPU build of torch explicitly: an unpinned torch pulls several GB of CUDA packages.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

DEMO_QUESTION ?= What is the capital of France?

.PHONY: demo test lint setup clean-runs

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install torch==2.13.0; \
	else $(BIN)/pip install torch==2.13.0+cpu || $(BIN)/pip install torch==2.13.0+cpu --index-url $(TORCH_CPU_INDEX); fi
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/deepspeed --num_gpus $(RANKS) --no_local_rank --module gptds pretrain --auto_resume
	$(BIN)/deepspeed --num_gpus $(RANKS) --no_local_rank --module gptds finetune --auto_resume \
		--pretrained_checkpoint runs/pretrain/checkpoints
	$(BIN)/gptds chat --checkpoint runs/finetune/checkpoints --message "$(DEMO_QUESTION)" --max_new_tokens 40

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gptds tests bench

clean-runs:
	rm -rf runs
