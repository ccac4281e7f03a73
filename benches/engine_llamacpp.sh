#!/usr/bin/env bash
# Batched inference speed of llama.cpp (through llama-cpp-python), the peer for distill's batched
# inference engine, on a GGUF model with the low-level batch API:
#   - prompt processing tok/s: one 512-token prompt (llama.cpp's pp512), and S different
#     ~60-token chat prompts prefilled together at S = 1, 8, 32;
#   - greedy decode tok/s (aggregate over sequences) at S = 1, 8, 32, one token per sequence per
#     llama_decode step, each sequence with its own prompt and seq_id, EOS ignored;
#   - time to first token (the prefill of all S prompts) and the process's peak RSS.
# Sanity checks: prints the start of sequence 0's greedy text, and compares sequence 0's greedy
# tokens at S=1 and S=8.
#
#   benches/engine_llamacpp.sh [--model PATH] [--max-tokens N (64)] [--threads N]
#                              [--seqs 1,8,32] [--pp-tokens 512] [--pp-repeats 3] [--verbose]
#
# Each S runs in its own context (n_seq_max = S, KV cache for S x (prompt + max-tokens)), in
# order, so the cumulative peak RSS printed beside a row is that of the largest context so far.
# About a minute after the first install on 2 cores.
#
# Environment:
#   BENCH_GGUF       GGUF model (default: .cache/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf)
#   BENCH_THREADS    n_threads and n_threads_batch (default: 2)
#   DISTILL_CACHE    cache dir for the Python venv and models (default: .cache)
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs for the first install, which compiles llama.cpp
#                    from source (default: 2)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/venv.sh"

cache="${DISTILL_CACHE:-$here/../.cache}"
export BENCH_GGUF="${BENCH_GGUF:-$cache/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
export BENCH_THREADS="${BENCH_THREADS:-2}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

bench_venv 'llama-cpp-python==0.3.36' 'numpy' 'import llama_cpp, numpy'

"$BENCH_PY" "$here/engine_llamacpp.py" "$@"
