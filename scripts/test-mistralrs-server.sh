#!/usr/bin/env bash
# Runs the openai-teacher test against a real `mistralrs serve` (crate mistralrs-cli 0.8.1).
# Installing mistralrs-cli is a cold build of about 10-17 minutes, so this test lives outside the
# default test command; the binary is cached under $DISTILL_CACHE/mistralrs-cli.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DISTILL_CACHE:-$here/.cache}"
root="$cache/mistralrs-cli"
if [[ ! -x "$root/bin/mistralrs" ]]; then
  RUSTFLAGS="-C target-cpu=x86-64-v3" cargo install --locked mistralrs-cli --version 0.8.1 --root "$root"
fi
model="$("$here/scripts/fetch-test-model.sh")"
cd "$here"
DISTILL_TEST_MODEL="$model" DISTILL_MISTRALRS_BIN="$root/bin/mistralrs" \
  cargo test --test openai_mistralrs_server -- --ignored --nocapture
