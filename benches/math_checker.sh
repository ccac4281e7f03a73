#!/usr/bin/env bash
# Math answer checker: `distill check math` against math-verify (Hugging Face's reference
# verifier, used by lighteval and open-r1), side by side in one run.
#
#   benches/math_checker.sh
#
# Environment:
#   DISTILL_BIN      distill binary (default: target/debug/distill)
#   DISTILL_CACHE    cache dir for the Python venv (default: .cache)
#   TIMING_ROWS      size of the timing set (default: 10000)
#   MV_ROWS          rows math-verify is timed on (default: 2000; rounded up to whole copies of
#                    the labelled set so the mix of rows is the same as distill's)
#   REPEATS          distill timing runs, median reported (default: 3)
#
# Labelled rows: tests/fixtures/gsm8k_answer_pairs.jsonl (GSM8K golds vs whole completions)
# plus benches/data/math_pairs.jsonl (MATH-style answers) and benches/data/math_forms.jsonl (answer
# forms of reasoning models: relations, matrices, several boxes, labelled answers, equations,
# number formats, long completions, dataset oddities; accuracy printed per form). Accuracy is
# computed on those unique rows; speed on the labelled rows repeated up to TIMING_ROWS. Agreement
# with Math-Verify's own test suite (tests/fixtures/math_conformance.jsonl) is printed too.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/venv.sh"

bench_distill_bin
# math-verify needs an ANTLR runtime matching its LaTeX grammar: the antlr4_13_2 extra. Some pip
# versions warn that the extra is not provided (its metadata spells it antlr4-13-2), so the
# runtime is also pinned explicitly.
bench_venv 'math-verify[antlr4_13_2]==0.9.0' 'antlr4-python3-runtime==4.13.2' \
    'import math_verify, antlr4'

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$BENCH_PY" "$here/math_checker.py" --work "$work"
