"""math-verify worker process: one JSON request per stdin line, one JSON answer per line.

Runs in its own process so that the host can kill it when a comparison does not finish (sympy
work on inputs such as ``9^9^9^9`` runs in C and cannot be interrupted by a signal handler),
and so that math-verify's ``signal.alarm`` time-outs are never needed off the main thread:
they are disabled here (``parsing_timeout=None``, ``timeout_seconds=None``) and the host's
kill is the time bound.
"""

import json
import resource
import sys
import warnings


def main():
    mem_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    if mem_mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    sys.setrecursionlimit(5000)
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.CRITICAL)  # math-verify logs a warning when its time-outs are off
    from math_verify import parse, verify

    cache = {}

    def parsed(text):
        if text not in cache:
            if len(cache) > 10000:
                cache.clear()
            cache[text] = parse("\\boxed{" + text + "}", parsing_timeout=None)
        return cache[text]

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            gold = parsed(req["gold"])
            pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=None)
            ok = bool(gold) and bool(pred) and verify(
                gold, pred, float_rounding=req.get("float_rounding", 6),
                timeout_seconds=None)
            res = {"ok": bool(ok)}
        except BaseException as e:  # noqa: BLE001 - report, keep serving
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(res) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
