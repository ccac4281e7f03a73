"""Helper for benches/math_checker.sh: distill's math checker vs math-verify, one run.

math-verify is called the way its README shows: `verify(parse(gold), parse(pred))`, one row
at a time in one process (its parse/verify timeouts use SIGALRM, so it cannot run in threads).
MATH-style golds are bare LaTeX (`\\frac{1}{2}`, `(3,-1)`), which math-verify's LaTeX extractor
only finds between `$...$` or in `\\boxed{}`; like its README's own examples, the gold is passed
as `$gold$` when it has neither. Accuracy with the gold passed bare is printed too.

distill is timed as a whole command (process start, reading, checking, writing).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = [
    ("gsm8k", ROOT / "tests" / "fixtures" / "gsm8k_answer_pairs.jsonl"),
    ("math", HERE / "data" / "math_pairs.jsonl"),
    ("forms", HERE / "data" / "math_forms.jsonl"),
]
# Math-Verify's own test cases (tests/fixtures/math_conformance_port.py): agreement with their
# expected verdicts, distill with default options vs math-verify's default verify(parse, parse).
CONFORMANCE = ROOT / "tests" / "fixtures" / "math_conformance.jsonl"


def load_labelled():
    rows = []
    for source, path in SOURCES:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows.append(
                        {"id": r["id"], "source": source, "gold": r["gold"],
                         "pred": r["pred"], "equal": bool(r["equal"]),
                         "category": r.get("category", source)}
                    )
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        sys.exit("error: duplicate ids in labelled rows")
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "gold": r["gold"], "pred": r["pred"]},
                               ensure_ascii=False) + "\n")


def run_distill(bin_, inp, out, workers=None):
    cmd = [bin_, "check", "math", str(inp), "--out", str(out)]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {p.returncode}\n{p.stderr}")
    with open(out, encoding="utf-8") as f:
        verdicts = [json.loads(line) for line in f if line.strip()]
    return dt, verdicts


def mv_gold(gold):
    return gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    bin_ = os.environ["DISTILL_BIN"]
    timing_rows = int(os.environ.get("TIMING_ROWS", "10000"))
    mv_rows = int(os.environ.get("MV_ROWS", "2000"))
    repeats = int(os.environ.get("REPEATS", "3"))
    cores = os.cpu_count() or 1

    from math_verify import parse, verify
    from importlib.metadata import version

    labelled = load_labelled()
    n = len(labelled)
    copies = max(1, math.ceil(timing_rows / n))
    timing = labelled * copies
    mv_copies = min(copies, max(1, math.ceil(mv_rows / n)))
    mv_timing = labelled * mv_copies

    def mv_check(gold, pred):
        try:
            return bool(verify(parse(gold), parse(pred))), False
        except Exception:  # noqa: BLE001 - any failure counts as "not verified"
            return False, True

    # ---- accuracy on the unique labelled rows -------------------------------------------
    lab_in = work / "labelled.jsonl"
    write_jsonl(lab_in, labelled)
    _, d_lab = run_distill(bin_, lab_in, work / "labelled.out.jsonl")
    if [v["id"] for v in d_lab] != [r["id"] for r in labelled]:
        sys.exit("error: distill output rows do not match input rows")
    d_ok = [v["verdict"] == "correct" for v in d_lab]
    mv_ok, mv_err = [], 0
    for r in labelled:
        ok, err = mv_check(mv_gold(r["gold"]), r["pred"])
        mv_ok.append(ok)
        mv_err += err
    mv_raw_ok = [mv_check(r["gold"], r["pred"])[0] for r in labelled]
    truth = [r["equal"] for r in labelled]

    # ---- speed ---------------------------------------------------------------------------
    tim_in = work / "timing.jsonl"
    write_jsonl(tim_in, timing)
    d_runs, d1_runs = [], []
    for _ in range(repeats):
        dt, verdicts = run_distill(bin_, tim_in, work / "timing.out.jsonl")
        if len(verdicts) != len(timing):
            sys.exit("error: distill wrote the wrong number of rows")
        d_runs.append(dt)
        dt1, _ = run_distill(bin_, tim_in, work / "timing1.out.jsonl", workers=1)
        d1_runs.append(dt1)
    # Same verdicts on every copy of a labelled row (no timeouts under load).
    timing_consistent = all(
        (v["verdict"] == "correct") == d_ok[i % n] for i, v in enumerate(verdicts))

    for r in labelled[:20]:  # warm-up: lazy imports and grammar loading, untimed
        mv_check(mv_gold(r["gold"]), r["pred"])
    t0 = time.perf_counter()
    for r in mv_timing:
        mv_check(mv_gold(r["gold"]), r["pred"])
    mv_dt = time.perf_counter() - t0

    d_rate = len(timing) / statistics.median(d_runs)
    d1_rate = len(timing) / statistics.median(d1_runs)
    mv_rate = len(mv_timing) / mv_dt

    # ---- report --------------------------------------------------------------------------
    def acc(pred, subset=None):
        idx = [i for i in range(n) if subset is None or labelled[i]["source"] == subset]
        good = sum(pred[i] == truth[i] for i in idx)
        return f"{good}/{len(idx)} ({100 * good / len(idx):.1f}%)"

    def wrong(pred):
        return [labelled[i]["id"] for i in range(n) if pred[i] != truth[i]]

    # ---- conformance with Math-Verify's test suite -----------------------------------------
    conf = [json.loads(line) for line in open(CONFORMANCE, encoding="utf-8") if line.strip()]
    conf_rows = [{"id": f"c{i}", "gold": c["gold"], "pred": c["pred"]} for i, c in enumerate(conf)]
    write_jsonl(work / "conf.jsonl", conf_rows)
    _, d_conf = run_distill(bin_, work / "conf.jsonl", work / "conf.out.jsonl")
    conf_d = [(v["verdict"] == "correct") == c["expected"] for v, c in zip(d_conf, conf)]
    conf_mv = [mv_check(c["gold"], c["pred"])[0] == c["expected"] for c in conf]

    agree = sum(a == b for a, b in zip(d_ok, mv_ok))
    n_g = sum(r["source"] == "gsm8k" for r in labelled)
    print()
    print(f"math checker: distill vs math-verify {version('math-verify')}")
    print(f"  labelled rows: {n} unique ({n_g} GSM8K completions + {n - n_g} MATH-style pairs "
          f"and answer forms), "
          f"{sum(truth)} equal / {n - sum(truth)} not equal")
    print(f"  timing set: {len(timing)} rows ({copies} copies); math-verify timed on "
          f"{len(mv_timing)} rows ({mv_copies} copies), single process; "
          f"distill median of {repeats} runs, wall time incl. process start; {cores} cores")
    print()
    w = 34
    print(f"  {'':{w}} {'distill':>16} {'math-verify':>16} {'ratio':>8}")
    print(f"  {'rows/s (distill: all cores)':{w}} {d_rate:>16,.0f} {mv_rate:>16,.1f} {d_rate / mv_rate:>7,.0f}x")
    print(f"  {'rows/s (distill: --workers 1)':{w}} {d1_rate:>16,.0f} {mv_rate:>16,.1f} {d1_rate / mv_rate:>7,.0f}x")
    print(f"  {'accuracy, all labelled':{w}} {acc(d_ok):>16} {acc(mv_ok):>16}")
    print(f"  {'accuracy, GSM8K completions':{w}} {acc(d_ok, 'gsm8k'):>16} {acc(mv_ok, 'gsm8k'):>16}")
    print(f"  {'accuracy, MATH-style pairs':{w}} {acc(d_ok, 'math'):>16} {acc(mv_ok, 'math'):>16}")
    print(f"  {'accuracy, answer forms':{w}} {acc(d_ok, 'forms'):>16} {acc(mv_ok, 'forms'):>16}")
    cats = sorted({r["category"] for r in labelled if r["source"] == "forms"})
    cat_ok = True
    for cat in cats:
        idx = [i for i in range(n) if labelled[i]["source"] == "forms" and labelled[i]["category"] == cat]
        dg = sum(d_ok[i] == truth[i] for i in idx)
        mg = sum(mv_ok[i] == truth[i] for i in idx)
        cat_ok &= dg >= mg
        print(f"  {'  forms: ' + cat:{w}} {f'{dg}/{len(idx)}':>16} {f'{mg}/{len(idx)}':>16}")
    nc = len(conf)

    def conf_acc(flags, subset=None):
        idx = [i for i in range(nc) if subset is None or conf[i]["source"].startswith(subset + "::")]
        good = sum(flags[i] for i in idx)
        return f"{good}/{len(idx)} ({100 * good / len(idx):.1f}%)"

    print(f"  {'Math-Verify test suite agreement':{w}} {conf_acc(conf_d):>16} {conf_acc(conf_mv):>16}")
    for f in sorted({c["source"].split("::")[0] for c in conf}):
        print(f"  {'  ' + f:{w}} {conf_acc(conf_d, f):>16} {conf_acc(conf_mv, f):>16}")
    print(f"  {'agreement (same verdict)':{w}} {f'{agree}/{n} ({100 * agree / n:.1f}%)':>16}")
    print()
    print(f"  math-verify with the gold passed bare (no $...$): accuracy {acc(mv_raw_ok)}; "
          f"exceptions in parse/verify: {mv_err}")
    print(f"  distill verdicts identical on every copy in the timing set: "
          f"{'yes' if timing_consistent else 'NO'}")
    dw, mw = wrong(d_ok), wrong(mv_ok)
    print(f"  distill wrong ({len(dw)}): {' '.join(dw) or '-'}")
    print(f"  math-verify wrong ({len(mw)}): {' '.join(mw) or '-'}")
    by_id = {r["id"]: (r, v) for r, v in zip(labelled, d_lab)}
    for i in dw:
        r, v = by_id[i]
        tail = r["pred"][-48:].replace("\n", " ")
        print(f"    {i}: gold `{r['gold']}`  pred `...{tail}`  label {r['equal']}  "
              f"distill {v['verdict']} ({v.get('evidence', {}).get('rule', '?')})")
    speed_ok = d_rate >= 100 * mv_rate
    acc_ok = sum(a == t for a, t in zip(d_ok, truth)) > sum(a == t for a, t in zip(mv_ok, truth))
    print()
    forms_idx = [i for i in range(n) if labelled[i]["source"] == "forms"]
    forms_ok = sum(d_ok[i] == truth[i] for i in forms_idx) >= 0.98 * len(forms_idx)
    conf_ok = sum(conf_d) >= 0.98 * nc
    print(f"  goal distill >= 100x math-verify rows/s: {'met' if speed_ok else 'NOT met'}; "
          f"goal higher accuracy: {'met' if acc_ok else 'NOT met'}")
    print(f"  goal >= 98% on the Math-Verify suite: {'met' if conf_ok else 'NOT met'}; "
          f">= 98% on the answer forms: {'met' if forms_ok else 'NOT met'}; "
          f">= math-verify on every form: {'met' if cat_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
