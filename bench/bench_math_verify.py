"""Math verifier vs plain math-verify on the same inputs: throughput, and time-out behaviour.

    python bench/bench_math_verify.py [--n 400] [--timeout 5]

Plain math-verify is called the documented way (``verify(parse(gold), parse(pred))``) on the
main thread, where its ``signal.alarm`` time-outs work; each pathological input is run in a
child process with an outer wall-clock limit so that a hang cannot stop the benchmark. It is
also called from a worker thread, where its time-outs cannot be used at all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHOLOGICAL = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{(10^{10^{10}})!}",
    "\\boxed{1000000!}",
    "\\boxed{" + "(" * 400 + "x" + ")" * 400 + "}",
]


def inputs(n: int, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = i % 4
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        if k == 0:  # integers, GSM8K style
            rows.append((f"Adding up we get {a} + {b}.\n#### {a + b}", str(a + b)))
        elif k == 1:  # fractions vs decimals
            rows.append((f"So the result is \\boxed{{\\frac{{{a}}}{{{b}}}}}.", str(round(a / b, 6)) if i % 8 == 1 else f"{a}/{b}"))
        elif k == 2:  # symbolic
            rows.append((f"The answer is $\\boxed{{(x+{a})^2}}$", f"x^2+{2 * a}x+{a * a}"))
        else:  # wrong answers
            rows.append((f"Therefore \\boxed{{{a}\\sqrt{{{b}}}}}", f"{a + 1}\\sqrt{{{b}}}"))
    return rows


def plain(completion: str, answer: str) -> bool:
    from math_verify import parse, verify

    return verify(parse("\\boxed{" + answer + "}"), parse(completion))


def _plain_child(completion, answer, q):
    t = time.perf_counter()
    try:
        ok = plain(completion, answer)
        q.put(("ok" if ok else "false", time.perf_counter() - t))
    except Exception as e:  # noqa: BLE001
        q.put((f"{type(e).__name__}", time.perf_counter() - t))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--outer", type=float, default=30.0, help="wall limit for plain math-verify on one input")
    args = ap.parse_args()

    from rewards.math import stats, verify_many

    rows = inputs(args.n)
    comps, answers = [c for c, _ in rows], [a for _, a in rows]
    import math_verify  # noqa: F401  # import cost outside the timings

    verify_many(comps[:4], answers[:4])  # start the worker pool outside the timings
    out = {}
    t = time.perf_counter()
    ref = [plain(c, a) for c, a in rows]
    dt = time.perf_counter() - t
    out["plain_math_verify"] = {"checks_per_s": round(len(rows) / dt, 1), "true": sum(ref)}
    t = time.perf_counter()
    ours = verify_many(comps, answers, timeout_s=args.timeout)
    dt2 = time.perf_counter() - t
    out["rewards_math"] = {"checks_per_s": round(len(rows) / dt2, 1), "true": sum(ours)}
    out["agreement"] = round(sum(a == b for a, b in zip(ref, ours)) / len(rows), 4)
    print(f"normal inputs (n={len(rows)}): plain math-verify {out['plain_math_verify']['checks_per_s']}/s, "
          f"rewards.math {out['rewards_math']['checks_per_s']}/s (ratio {dt / dt2:.2f}x), "
          f"agreement {out['agreement']:.1%}")

    # time-outs: plain math-verify in a child process (main thread, its own alarm) with an outer limit
    ctx = mp.get_context("spawn")
    patho = []
    for bad in PATHOLOGICAL:
        q = ctx.Queue()
        p = ctx.Process(target=_plain_child, args=(bad, "5", q))
        t = time.perf_counter()
        p.start()
        p.join(args.outer)
        if p.is_alive():
            p.kill()
            p.join()
            plain_res = f"did not finish in {args.outer:.0f}s (killed)"
        else:
            r, _ = q.get() if not q.empty() else ("crashed", 0)
            plain_res = f"{r} after {time.perf_counter() - t:.1f}s"
        # ours, from a worker thread
        res = {}

        def run():
            t0 = time.perf_counter()
            res["v"] = verify_many([bad], ["5"], timeout_s=args.timeout)[0]
            res["dt"] = time.perf_counter() - t0

        th = threading.Thread(target=run)
        th.start()
        th.join()
        ours_res = f"{res['v']} after {res['dt']:.1f}s"
        patho.append({"input": bad[:40], "plain_math_verify_main_thread": plain_res, "rewards_math_thread": ours_res})
        print(f"{bad[:32]:<34} plain: {plain_res:<36} ours (thread): {ours_res}")

    # plain math-verify from a thread, with its default time-outs on
    err = {}

    def in_thread():
        try:
            plain("\\boxed{2}", "2")
            err["r"] = "ok"
        except Exception as e:  # noqa: BLE001
            err["r"] = f"{type(e).__name__}: {str(e)[:80]}"

    th = threading.Thread(target=in_thread)
    th.start()
    th.join()
    print("plain math-verify called from a thread:", err["r"])
    out["pathological"] = patho
    out["plain_in_thread"] = err["r"]
    out["stats"] = stats()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
