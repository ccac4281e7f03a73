#!/usr/bin/env bash
# Side-by-side LoRA SFT training throughput: distill vs PyTorch + transformers + peft.
#
# Setup (both trainers): SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to f32),
# batch 4 x 512 tokens, LoRA r=16 alpha=32 dropout=0 (BENCH_LORA_DROPOUT) on q/k/v/o/gate/up/down_proj,
# AdamW, 2 threads; 1 warm-up step + BENCH_TIMED_STEPS (3) timed steps.
# Reports tokens/s, peak RSS, distill/PyTorch ratio and the fraction of torch's
# f32 matmul peak reached (FLOPs/token = 6 x 134.5e6).
#
# Env: DISTILL_CACHE (default <repo>/.cache), DISTILL_BIN (default target/debug/distill,
# or target/release/distill when present), BENCH_THREADS (2), BENCH_SKIP_BS1=1 to skip the
# --batch-size 1 --grad-accum 4 run, BENCH_LORA_DROPOUT (0; e.g. 0.05, both trainers).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${DISTILL_CACHE:-$ROOT/.cache}"
VENV="$CACHE/bench-venv-torch"
PY="$VENV/bin/python"
HERE="$ROOT/benches"
THREADS="${BENCH_THREADS:-2}"
TIMED="${BENCH_TIMED_STEPS:-3}"   # timed steps after one warm-up step, both trainers
MODEL_DIR="${BENCH_MODEL_DIR:-$CACHE/models/smollm2-135m-instruct}"
GGUF_FILE="${BENCH_GGUF_FILE:-SmolLM2-135M-Instruct.Q4_1.gguf}"
GGUF="$MODEL_DIR/$GGUF_FILE"
if [[ -z "${DISTILL_BIN:-}" ]]; then
  if [[ -x "$ROOT/target/release/distill" ]]; then DISTILL_BIN="$ROOT/target/release/distill"
  else DISTILL_BIN="$ROOT/target/debug/distill"; fi
fi
DROPOUT="${BENCH_LORA_DROPOUT:-0}"
export BENCH_MODEL_DIR="$MODEL_DIR" BENCH_GGUF_FILE="$GGUF_FILE" BENCH_THREADS="$THREADS" BENCH_TIMED_STEPS="$TIMED"
export BENCH_LORA_DROPOUT="$DROPOUT"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" RAYON_NUM_THREADS="$THREADS"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

[[ -f "$GGUF" ]] || { echo "model not found: $GGUF" >&2; exit 1; }
[[ -x "$DISTILL_BIN" ]] || { echo "distill binary not found: $DISTILL_BIN" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time (GNU time) is required" >&2; exit 1; }

# PyTorch venv: the default PyPI wheel first; if that fails, torch without its CUDA
# dependencies plus the pure-Python packages it imports (CPU use only).
if ! "$PY" -c "import torch, transformers, peft, gguf" 2>/dev/null; then
  echo "== creating $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  if ! "$VENV/bin/pip" install -q torch transformers peft gguf; then
    "$VENV/bin/pip" install -q --no-deps torch
    "$VENV/bin/pip" install -q filelock typing-extensions sympy networkx jinja2 fsspec mpmath \
      transformers peft gguf
  fi
  "$PY" -c "import torch; torch.ones(2) @ torch.ones(2)" >/dev/null
fi

RES="${BENCH_RESULTS:-$(mktemp -d -t distill-train-bench.XXXXXX)}"
mkdir -p "$RES"
echo "== results in $RES" >&2
echo "== distill binary: $DISTILL_BIN" >&2

echo "== torch matmul peak" >&2
"$PY" "$HERE/train_throughput.py" matmul > "$RES/matmul.json"

echo "== pytorch + peft training" >&2
"$PY" "$HERE/train_throughput.py" torch-train > "$RES/torch_train.json" 2> "$RES/torch_train.err" \
  || { echo "pytorch run failed, see $RES/torch_train.err" >&2; tail -5 "$RES/torch_train.err" >&2; }

echo "== traces" >&2
"$PY" "$HERE/train_throughput.py" make-traces "$RES/traces.jsonl" | tee "$RES/traces.json" >&2

run_distill() {  # tag batch_size grad_accum
  local tag="$1" bs="$2" ga="$3"
  echo "== distill --batch-size $bs --grad-accum $ga" >&2
  rm -rf "$RES/distill_$tag"
  /usr/bin/time -v -o "$RES/distill_$tag.time" \
    "$DISTILL_BIN" train --model "$GGUF" --data "$RES/traces.jsonl" --out "$RES/distill_$tag" \
      --max-steps "$((1 + TIMED))" --batch-size "$bs" --grad-accum "$ga" --lora-r 16 --lora-alpha 32 \
      --lora-dropout "$DROPOUT" \
      --max-len 600 --quiet > "$RES/distill_$tag.log" 2>&1 \
    || { echo "distill ($tag) failed, see $RES/distill_$tag.log" >&2; tail -5 "$RES/distill_$tag.log" >&2; }
}
run_distill bs4 4 1
[[ "${BENCH_SKIP_BS1:-0}" == 1 ]] || run_distill bs1 1 4

echo
"$PY" "$HERE/train_throughput.py" report "$RES"
