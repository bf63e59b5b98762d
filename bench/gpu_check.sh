#!/usr/bin/env bash
# Everything a short GPU window should do, in order of value, each step with its own deadline; every
# result is one JSON line appended to $OUT/gpu_check.jsonl as soon as it exists, so a window that closes
# early still returns what was done. Under 5 minutes on one H100/H200.
#
#   bash bench/gpu_wheels.sh                 # here, once: the wheels the GPU machine lacks, into .whl/
#   bash bench/gpu_check.sh                  # there: installs .whl/ into /tmp/site if deepspeed is missing
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh   # on CPU: the same steps with the tiny model (the test suite)
#
# Steps: 1 environment; 2 smoke (one training step); 3 the GPU tests (pytest -m gpu); 4 throughput rows of
# gpt2 at T=1024, bf16: the compiled plain-PyTorch baseline, gptds ZeRO-2 (fused AdamW, compile: the goal
# row), ZeRO-1, ZeRO-3, AdamW8bit, compile off, activation checkpointing; 5 the real `gptds pretrain` loop
# against the bare engine step; 6 a summary (MFU against 989.5 TFLOP/s and against the ~790 TFLOP/s a bf16
# matmul reaches on the H200). A row that does not fit the remaining time is skipped and says so.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
DRY=${GPU_CHECK_DRY_RUN:-0}
OUT=${OUT:-$REPO/bench/results/gpu-check-$(date +%F)}
mkdir -p "$OUT"
rm -rf "$OUT"/smoke "$OUT"/loop "$OUT"/throughput_* "$OUT"/data  # an earlier check's runs: start afresh
LOG=$OUT/gpu_check.jsonl
: > "$LOG"
BUDGET_S=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 170 || echo 285)}
START=$(date +%s)
PY=${PYTHON:-python3}
[ -x "$REPO/.venv/bin/python" ] && [ "$DRY" = 1 ] && PY=$REPO/.venv/bin/python

if ! "$PY" -c "import deepspeed" 2>/dev/null && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$REPO:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
PY_BIN=$(dirname "$(command -v "$PY")")
export PATH="$PY_BIN:$PATH"

if [ "$DRY" = 1 ]; then
    MODEL=(--model tiny); B=2; T=32; STEPS=3; WARMUP=1; LOOP_STEPS=6; DTYPE=fp32; DS_SUFFIX=_fp32
    LOOP_COMPILE=no-compile; BARE_ROW=zero2-adamw-noac  # on CPU compile only costs start-up: the
    BASELINE=(pytorch-ddp-noac --compile off)          # baseline (a whole-model compile) runs eager there
else
    MODEL=(--model gpt2); B=16; T=1024; STEPS=10; WARMUP=3; LOOP_STEPS=40; DTYPE=bf16; DS_SUFFIX=
    LOOP_COMPILE=compile; BARE_ROW=zero2-adamw-compile-noac
    BASELINE=(pytorch-ddp-compile-noac --compile on)
fi

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
record() { "$PY" -c 'import json, sys; print(json.dumps(json.loads(sys.argv[1])))' "$1" >> "$LOG"; }
# step NAME DEADLINE_S CMD...: runs CMD within min(DEADLINE_S, time left); records status and seconds
step() {
    local name=$1 deadline=$2; shift 2
    local budget; budget=$(left)
    if [ "$budget" -lt 20 ]; then
        record "{\"step\": \"$name\", \"skipped\": \"the check's time budget is spent ($BUDGET_S s)\"}"
        return 1
    fi
    [ "$deadline" -gt "$budget" ] && deadline=$budget
    local t0; t0=$(date +%s)
    timeout --kill-after 10 "$deadline" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    record "{\"step\": \"$name\", \"status\": $status, \"seconds\": $(($(date +%s) - t0)), \"deadline_s\": $deadline, \"timed_out\": $([ $status = 124 ] && echo true || echo false)}"
    return $status
}

# 1 environment
"$PY" - >> "$LOG" 2>> "$OUT/environment.log" <<'EOF'
import contextlib, json, platform, sys, torch
out = {"step": "environment", "python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for name in ("deepspeed", "bitsandbytes", "transformers", "tiktoken", "flash_attn"):
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its accelerator choice on import
            out[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001
        out[name] = f"missing ({type(e).__name__})"
print(json.dumps(out))
EOF

# 2 smoke: one training step on the device, prepared data from the bundled text
DATA=$OUT/data
"$PY" -m gptds prepare text --input gptds/assets/tinyshakespeare.txt --output_dir "$DATA" --num_workers 4 \
    --val_fraction 0.1 --overwrite > "$OUT/prepare.log" 2>&1
step smoke 90 "$PY" -m gptds pretrain --data_dir "$DATA" --log_dir "$OUT/smoke" --model tiny -B 2 -T 32 \
    --max_steps 1 --eval_interval 0 --hellaswag_interval 0 --generate_interval 0 --checkpoint_interval 0 \
    --deepspeed_config "zero2$DS_SUFFIX"

# 3 the GPU tests (on CPU they are skipped, and the dry run says so)
step gpu_tests 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu -s tests/test_gpu.py
grep -E "passed|failed|skipped|host syncs" "$OUT/gpu_tests.log" | tail -3 | sed 's/"/\\"/g' | while read -r line; do
    record "{\"step\": \"gpu_tests_summary\", \"line\": \"$line\"}"; done

# 4 throughput rows, most valuable first; each in its own process and deadline
row() {
    local name=$1 deadline=$2; shift 2
    step "row_$name" "$deadline" "$PY" bench/throughput.py "${MODEL[@]}" --batch_size "$B" --context_length "$T" \
        --pad_vocab_to_multiple_of 64 --dtype "$DTYPE" --steps "$STEPS" --warmup_steps "$WARMUP" --rounds 1 \
        --interleave off --results_dir "$OUT/throughput_$name" --rows "$name" "$@" || return 0
    "$PY" - "$OUT/throughput_$name" "$name" >> "$LOG" <<'EOF'
import json, sys
from pathlib import Path
report = json.loads(next(Path(sys.argv[1]).glob("throughput-*.json")).read_text())
row = next(r for r in report["rows"] if r["name"] == sys.argv[2])
H200_BF16_MATMUL = 790e12  # what a large bf16 matmul reaches on this H200 (device notes, 2026-10-28)
flops = report["flops_per_token"] * row["tokens_per_second"]
print(json.dumps({"step": "row", "row": row["name"], "tokens_per_second": row["tokens_per_second"],
                  "step_time_ms": row["step_time_ms"], "mfu_vs_989_5": row["mfu"],
                  "mfu_vs_790": round(flops / H200_BF16_MATMUL, 4) if report["device"] != "cpu" else None,
                  "peak_memory_mb": max(row.get("peak_memory_mb_per_rank") or [0]), "device": report["device"]}))
EOF
}
COMPILED=100; EAGER=60  # seconds: a compiled row pays torch.compile once (the blocks' graph is cached after)
row "${BASELINE[0]}" $COMPILED "${BASELINE[@]:1}" --activation_checkpointing off
row zero2-adamw-compile-noac $COMPILED --stages 2 --optimizers adamw --compile_gptds on --activation_checkpointing off
row zero3-adamw-noac $EAGER --stages 3 --optimizers adamw --activation_checkpointing off
row zero1-adamw-noac $EAGER --stages 1 --optimizers adamw --activation_checkpointing off
row zero2-adamw8bit-compile-noac $COMPILED --stages 2 --optimizers adamw8bit --compile_gptds on \
    --activation_checkpointing off
row zero2-adamw-noac $EAGER --stages 2 --optimizers adamw --activation_checkpointing off
row zero2-adamw-compile-ac $COMPILED --stages 2 --optimizers adamw --compile_gptds on --activation_checkpointing on

# 5 the real loop: tokens/s from its own metrics.jsonl, against the bare engine row of the same settings
if step loop 90 "$PY" -m gptds pretrain --data_dir "$DATA" --log_dir "$OUT/loop" "${MODEL[@]}" -B "$B" -T "$T" \
        --max_steps "$LOOP_STEPS" --log_interval 5 --eval_interval 0 --hellaswag_interval 0 --generate_interval 0 \
        --checkpoint_interval 0 --optimizer adamw --deepspeed_config "zero2$DS_SUFFIX" --pad_vocab_to_multiple_of 64 \
        "--$LOOP_COMPILE"; then
    "$PY" - "$OUT/loop/metrics.jsonl" "$BARE_ROW" >> "$LOG" <<'EOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_second"' in line]
steady = [r["tokens_per_second"] for r in records[1:]] or [records[-1]["tokens_per_second"]]
print(json.dumps({"step": "row", "row": "gptds-pretrain-loop", "compare_with": sys.argv[2], "tokens_per_second":
                  round(statistics.median(steady), 1), "mfu_vs_989_5": records[-1].get("mfu")}))
EOF
fi

# 6 summary: the goals, from the rows above
"$PY" - "$LOG" "${BASELINE[0]}" > "$OUT/summary.json" <<'EOF'
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1])]
rows = {r["row"]: r for r in lines if r.get("step") == "row"}
def ratio(a, b):
    return round(rows[a]["tokens_per_second"] / rows[b]["tokens_per_second"], 3) if a in rows and b in rows else None
goals = {
    "zero2_compiled_vs_compiled_baseline (>= 1.0)": ratio("zero2-adamw-compile-noac", sys.argv[2]),
    "zero2_mfu_vs_989_5 (>= 0.45)": rows.get("zero2-adamw-compile-noac", {}).get("mfu_vs_989_5"),
    "zero3_step_time_vs_zero1 (<= 1.15)": ratio("zero1-adamw-noac", "zero3-adamw-noac"),
    "activation_checkpointing_step_time_vs_off (<= 1.35)": ratio("zero2-adamw-compile-noac", "zero2-adamw-compile-ac"),
    "loop_step_time_vs_bare_engine (<= 1.03)": ratio(rows.get("gptds-pretrain-loop", {}).get("compare_with", ""),
                                                     "gptds-pretrain-loop"),
}
skipped = [r for r in lines if "skipped" in r]
print(json.dumps({"goals": goals, "rows": rows, "skipped": skipped,
                  "failed_steps": [r["step"] for r in lines if r.get("status") not in (None, 0)]}, indent=1))
EOF
cat "$OUT/summary.json"
echo "gpu_check: $(wc -l < "$LOG") records in $LOG, $(( $(date +%s) - START )) s"
