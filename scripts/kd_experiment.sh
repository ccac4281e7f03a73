#!/usr/bin/env bash
# Response and feature distillation on the quickstart task: CE vs CE+KD vs CE+KD+features, for
# the full student and for one cut from the teacher with `distill prune`, at the quickstart's
# steps and data. Prints the table the README shows ("Response and feature distillation").
#
#   scripts/quickstart.sh            # first: the quickstart's kept traces and baseline eval
#   scripts/kd_experiment.sh         # then this (about 25 minutes on 2 cores)
#
# Environment: DATA (training traces, default the kept ones), STEPS (optimizer steps instead
# of 3 epochs), STUDENTS ("full pruned"), LAYERS (kept by the pruned student, default 26),
# OUT (default runs/kd), MODES (default "ce ce+kd ce+kd+feat"; "ce+kd+full" trains every
# weight of the kept layers instead of LoRA, at FULL_LR, default 5e-5). The recovery table of
# the README:
#   OUT=runs/kd-recovery DATA=runs/quickstart/traces.jsonl STEPS=100 STUDENTS=pruned \
#     MODES="ce ce+kd ce+kd+feat ce+kd+full" scripts/kd_experiment.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --quiet
D=target/debug/distill
M=.cache/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
Q=${QUICKSTART:-runs/quickstart}
OUT=${OUT:-runs/kd}
LAYERS=${LAYERS:-26}
KEPT=${DATA:-$Q/filtered/kept.jsonl}
HELD=$Q/eval-base/traces.jsonl   # the teacher's own answers to the held-out problems
STUDENTS=${STUDENTS:-full pruned}
MODES=${MODES:-ce ce+kd ce+kd+feat}
for f in "$KEPT" "$HELD"; do
  [ -f "$f" ] || { echo "missing $f: run scripts/quickstart.sh first" >&2; exit 1; }
done
mkdir -p "$OUT"
$D label --quiet --model "$M" --traces "$KEPT" --out "$OUT/labels-train"
$D label --quiet --model "$M" --traces "$HELD" --out "$OUT/labels-held"
[ -f "$OUT/pruned/config.json" ] || $D prune --model "$M" --layers "$LAYERS" --out "$OUT/pruned"

TRAIN=(--data "$KEPT" --epochs 3 --lr 3e-4 --batch-size 8 --warmup-steps 4 --seed 1 --quiet)
[ -n "${STEPS:-}" ] && TRAIN+=(--max-steps "$STEPS")
EVAL=(--dataset datasets/arith_heldout.jsonl --preset gsm8k --prompt short --max-tokens 64
      --concurrency 64 --quiet --kl-traces "$HELD" --kl-labels "$OUT/labels-held")

for student in $STUDENTS; do
  base=$M; [ $student = pruned ] && base=$OUT/pruned
  [ -f "$OUT/$student-base/distance.json" ] ||
    $D eval --model "$base" "${EVAL[@]}" --out-dir "$OUT/$student-base" >/dev/null
  for mode in $MODES; do
    name=$student-${mode//+/-}
    case $mode in
      ce) flags=(--loss ce) ;;
      ce+kd) flags=(--loss ce+kd --kd-alpha 0.5 --soft-labels "$OUT/labels-train") ;;
      ce+kd+feat) flags=(--loss ce+kd --kd-alpha 0.5 --soft-labels "$OUT/labels-train"
                         --teacher "$M" --feature-layers 4 --feature-loss cosine) ;;
      ce+kd+full) flags=(--loss ce+kd --kd-alpha 0.5 --soft-labels "$OUT/labels-train"
                         --full-finetune --lr "${FULL_LR:-5e-5}") ;;
    esac
    # LoRA runs leave an adapter to evaluate on the base; full-parameter runs a whole model.
    if [ $mode = ce+kd+full ]; then done_file=model.safetensors; model=(--model "$OUT/$name")
    else done_file=adapter_model.safetensors; model=(--model "$base" --adapter "$OUT/$name"); fi
    [ -f "$OUT/$name/$done_file" ] ||
      $D train --model "$base" --out "$OUT/$name" "${TRAIN[@]}" "${flags[@]}" 2>/dev/null
    [ -f "$OUT/eval-$name/distance.json" ] ||
      $D eval "${model[@]}" "${EVAL[@]}" --out-dir "$OUT/eval-$name" >/dev/null
  done
done

python3 - "$OUT" "$STUDENTS" "$MODES" <<'PY'
import json, sys, statistics
out, students, modes = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def row(label, ev, train=None, ce_tps=None):
    s = json.load(open(f"{out}/{ev}/summary.json"))
    d = json.load(open(f"{out}/{ev}/distance.json"))
    lo, hi = s["pass@1_ci95"]
    tps = ""
    if train:
        m = [json.loads(l) for l in open(f"{out}/{train}/metrics.jsonl")]
        t = statistics.mean(x["tokens_per_s"] for x in m)
        tps = f"{t:.0f}" + (f" ({t / ce_tps:.2f}×)" if ce_tps else "")
        row.tps = t
    k = d["kl"]
    print(f"| {label} | {100*s['pass@1']:.1f}% [{100*lo:.1f}, {100*hi:.1f}] | "
          f"{k['mean']:.3f} [{k['lo']:.3f}, {k['hi']:.3f}] | {d['perplexity']['mean']:.2f} | {tps} |")
print("| student | held-out pass@1 [95% CI] | KL(teacher ‖ student) nats/token [95% CI] | perplexity | train tokens/s |")
print("|---|---|---|---|---|")
labels = {"ce": "CE", "ce+kd": "CE+KD", "ce+kd+feat": "CE+KD+features",
          "ce+kd+full": "CE+KD, full-parameter"}
for st in students:
    row(f"{st}, untrained", f"{st}-base")
    ce = None
    for mode in modes:
        name = f"{st}-{mode.replace('+', '-')}"
        row(f"{st}, {labels[mode]}", f"eval-{name}", name, ce)
        if mode == "ce":
            ce = row.tps
m = json.load(open(f"{out}/labels-train/labels.json"))
print(f"\nsoft labels: top-{m['k']}, {m['bytes_per_token']:.0f} bytes/token ({m['positions']} positions)")
PY
