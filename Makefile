# The two commands for a fresh machine (README):
#   make demo   set up .venv if missing, then pretrain on the bundled text, fine-tune on the bundled conversations
#               (multi-turn OpenAssistant threads and Dolly records as one-turn chats), and ask the chat model a question
#   make test   set up .venv if missing, then run the whole test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gptds-installed
# What demo and test need first: the installed virtualenv (SETUP= skips it, for a virtualenv made otherwise).
SETUP ?= $(STAMP)
RANKS ?= 2
# One PATH for every command: DeepSpeed's JIT ops (compiled with ninja) rebuild when a different ninja runs.
export PATH := $(abspath $(BIN)):$(PATH)
# CPU-only machines install the CPU build of torch explicitly: an unpinned torch pulls several GB of CUDA packages.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# DeepSpeed's launcher, quiet: --log_level error drops its set-up lines (INFO) and its one-host warning that there
# is no hostfile; errors still show. DS_ACCELERATOR names the accelerator, so that no process announces that it
# guessed one (the ranks' own third-party notices are gptds's to hold back: --verbose or GPTDS_VERBOSE=1 shows them).
DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
LAUNCH = DS_ACCELERATOR=$(DS_ACCELERATOR) $(BIN)/deepspeed --log_level error --num_gpus $(RANKS) --no_local_rank \
	$(if $(MASTER_PORT),--master_port $(MASTER_PORT))
# Extra flags for both training runs, e.g. a quick check: DEMO_FLAGS="--model tiny --max_steps 2".
DEMO_FLAGS ?=
# One epoch of the bundled conversations moves the mini model towards them only at a pretraining-like learning
# rate: at fine-tuning's default (3e-5, for pretrained GPT-2 sizes) it still answers in Shakespeare's words
# (measured on the Dolly records: validation loss 8.86 at 3e-5, 8.17 at 1e-3).
DEMO_FINETUNE_FLAGS ?= --lr 1e-3
# Written when both runs have finished: `make demo` again only shows the answer.
DEMO_DONE := runs/.demo-complete

# The demo's last stage asks the chat model a question (`gptds chat --message`, its reply alone on stdout).
# Sampled, not greedy: a 7M-parameter model trained for minutes repeats a word or newlines greedily; temperature 0.8
# among the 40 likeliest tokens, with tokens already used made less likely and no end of turn before 8 tokens,
# gives words.
DEMO_QUESTION := What is the capital of France?
DEMO_ANSWER = $(BIN)/gptds chat --checkpoint runs/finetune/checkpoints --message "$(DEMO_QUESTION)" \
	--max_new_tokens 40 --temperature 0.8 --top_k 40 --repetition_penalty 1.3 --min_new_tokens 8

.PHONY: demo test lint setup clean-runs

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install torch==2.13.0; \
	else $(BIN)/pip install torch==2.13.0+cpu || $(BIN)/pip install torch==2.13.0+cpu --index-url $(TORCH_CPU_INDEX); fi
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo: $(SETUP)
	@if [ -e $(DEMO_DONE) ]; then \
		echo "The demo's runs are complete (runs/pretrain, runs/finetune): \`make clean-runs\` starts over."; \
	else \
		set -e; \
		echo "== 1/3 pretraining on the bundled text: deepspeed --module gptds pretrain (runs/pretrain)"; \
		$(LAUNCH) --module gptds pretrain --auto_resume $(DEMO_FLAGS); \
		echo "== 2/3 fine-tuning a chat model on the bundled conversations: deepspeed --module gptds finetune (runs/finetune)"; \
		$(LAUNCH) --module gptds finetune --auto_resume --pretrained_checkpoint runs/pretrain/checkpoints \
			$(DEMO_FINETUNE_FLAGS) $(DEMO_FLAGS); \
		touch $(DEMO_DONE); \
	fi
	@echo "== 3/3 the chat model answers a question: gptds chat"
	@# The demo's last lines, whatever its last stage: the question, then the answer (leading blanks dropped).
	@answer=$$($(DEMO_ANSWER)) && printf '\nQuestion: %s\n' "$(DEMO_QUESTION)" && \
		printf '%s\n' "$$answer" | sed '/./,$$!d' | sed '1s/^[[:space:]]*/Answer:   /; 2,$$s/^/          /'

test: $(SETUP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gptds tests bench

clean-runs:
	rm -rf runs
