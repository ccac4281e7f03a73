# Shared by the benchmark scripts (sourced, not run): creates the Python venv that holds the
# reference tools, once, under ${DISTILL_CACHE:-<repo>/.cache}/bench-venv.
#
#   bench_venv PIP_SPEC... IMPORT_CHECK
#
# Installs PIP_SPEC... into the venv unless `python -c IMPORT_CHECK` already succeeds there.
# Sets BENCH_PY to the venv's python.

bench_venv() {
    local check="${!#}"
    local specs=("${@:1:$#-1}")
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local venv="${DISTILL_CACHE:-$root/.cache}/bench-venv"
    BENCH_PY="$venv/bin/python"
    if [[ ! -x "$BENCH_PY" ]]; then
        echo "creating venv $venv" >&2
        mkdir -p "$(dirname "$venv")"
        python3 -m venv "$venv" || return 1
    fi
    if ! "$BENCH_PY" -c "$check" 2>/dev/null; then
        echo "installing ${specs[*]} into $venv" >&2
        "$BENCH_PY" -m pip install --quiet --disable-pip-version-check "${specs[@]}" || return 1
        "$BENCH_PY" -c "$check" || return 1
    fi
}

bench_distill_bin() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    DISTILL_BIN="${DISTILL_BIN:-$root/target/debug/distill}"
    if [[ ! -x "$DISTILL_BIN" ]]; then
        echo "error: distill binary not found at $DISTILL_BIN (build it, or set DISTILL_BIN)" >&2
        return 1
    fi
    export DISTILL_BIN
}
