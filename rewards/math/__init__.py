"""Ground-truth rewards for math: extract the final answer, compare it to the reference.

``verify(completion, answer)`` extracts the final answer from a free-form completion (by
default: the last ``\\boxed{}``, then GSM8K's ``#### x``, then "the answer is x", then the
last number), compares plain numbers itself (tolerance, fractions, percentages, thousands
separators) and hands everything else to ``math-verify`` (LaTeX, symbolic equivalence).

math-verify bounds its own time with ``signal.alarm``, which fails off the main thread and
cannot interrupt sympy's C-level arithmetic (``9^9^9^9``, huge factorials). Here it runs in a
small pool of worker processes instead; a check that does not finish within ``timeout_s``
(default 5 s) kills its worker, which is replaced, and counts as not verified. Every call
therefore returns within the bound, from any thread (at worst about twice ``timeout_s``: waiting
for a free worker while stuck ones are replaced is bounded by the same limit).
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from rewards.completions import completion_text

log = logging.getLogger("rewards.math")

__all__ = ["verify", "verify_many", "extract_answer", "math_reward", "VerifierPool", "stats", "warm_up",
           "DEFAULT_ORDER"]

DEFAULT_ORDER = ("boxed", "gsm8k", "answer_is", "last_number")
MAX_ANSWER_CHARS = 2000  # longer extracted answers are not sent to the symbolic checker
_WORKER = str(Path(__file__).with_name("_worker.py"))


# ---------------------------------------------------------------- extraction

def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...}, braces balanced (linear scan)."""
    best = -1
    for tag in ("\\boxed", "\\fbox"):
        best = max(best, text.rfind(tag))
    if best < 0:
        return None
    i = text.find("{", best)
    if i < 0:
        m = re.match(r"\\boxed\s+(\S+)", text[best:])  # \boxed 5
        return m.group(1) if m else None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
        j += 1
    return None


_GSM = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?%?|-?\.\d+%?")


def _last_match(pattern: re.Pattern, text: str):
    m = None
    for m in pattern.finditer(text):
        pass
    return m


def _answer_is(text: str) -> str | None:
    m = _last_match(_ANSWER_IS, text)
    if m is None:
        return None
    rest = text[m.end(): m.end() + 500]
    if rest.startswith("$"):
        end = rest.find("$", 1)
        if end > 0:
            return rest[1:end]
    line = rest.split("\n", 1)[0]
    line = re.split(r"\.(?!\d)", line, maxsplit=1)[0]  # end of sentence (not a decimal point)
    return line.strip() or None


def extract_answer(completion: str, order: Sequence[str] = DEFAULT_ORDER) -> str | None:
    """The final answer of a free-form completion, trying the methods in ``order``."""
    text = completion[-20000:]  # the final answer is at the end; bounds the work
    for method in order:
        if method == "boxed":
            got = _boxed(text)
        elif method == "gsm8k":
            m = _last_match(_GSM, text)
            got = m.group(1).strip() if m else None
        elif method == "answer_is":
            got = _answer_is(text)
        elif method == "last_number":
            m = _last_match(_NUMBER, text)
            got = m.group(0) if m else None
        else:
            raise ValueError(f"unknown extraction method {method!r}; expected one of {DEFAULT_ORDER}")
        if got is not None and got.strip():
            return got.strip()
    return None


# ---------------------------------------------------------------- plain numbers

_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_percent) for plain numbers, fractions and percentages; None otherwise."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\[,!;: ]|\\text\{\s*\}|\s+", "", s)
    s = s.replace("\\%", "%").rstrip(".")
    if s.startswith("\\$"):
        s = s[2:]
    pct = s.endswith("%")
    if pct:
        s = s[:-1]
    m = _FRAC.match(s)
    try:
        if m:
            v = Fraction(int(m.group(2)), int(m.group(3)))
            return (-v if m.group(1) else v), pct
        if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
            s = s.replace(",", "")
        if re.fullmatch(r"-?\d+(\.\d*)?|-?\.\d+|-?\d+/\d+|-?\d+(\.\d+)?[eE][-+]?\d{1,3}", s):
            return Fraction(s), pct
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _close(a: Fraction, b: Fraction, rel: float) -> bool:
    return abs(a - b) <= rel * max(1, abs(b))


def _numeric_verdict(pred: str, gold: str, rel: float) -> bool | None:
    p, g = _as_number(pred), _as_number(gold)
    if p is None or g is None:
        return None
    (pv, pp), (gv, gp) = p, g
    candidates = {pv, pv / 100} if pp else {pv}
    golds = {gv, gv / 100} if gp else {gv}
    if pp != gp:  # "50%" vs "0.5" or "50"
        candidates |= {pv * 100} if gp else set()
    return any(_close(c, x, rel) for c in candidates for x in golds)


# ---------------------------------------------------------------- worker pool

class _Worker:
    def __init__(self, memory_mb: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-B", _WORKER, str(memory_mb)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        self.buf = b""
        self.ready = False

    def readline(self, deadline: float | None) -> dict | None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                if not sel.select(left):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.kill()
        self.proc.wait()
        for s in (self.proc.stdin, self.proc.stdout):
            if s is not None:
                s.close()


class VerifierPool:
    """Persistent math-verify worker processes with a per-call time limit."""

    def __init__(self, size: int | None = None, memory_mb: int = 4096, start_timeout_s: float = 120):
        self.size = size or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.start_timeout_s = start_timeout_s
        self._idle: list[_Worker] = []
        self._cond = threading.Condition()
        self._live = 0
        self.timeouts = 0
        self.errors = 0
        self.calls = 0

    def _spawn(self) -> _Worker:
        w = _Worker(self.memory_mb)
        hello = w.readline(time.monotonic() + self.start_timeout_s)
        if not hello or not hello.get("ready"):
            w.kill()
            raise RuntimeError("math-verify worker failed to start (is math-verify installed?)")
        return w

    def _acquire(self, wait_s: float | None = None) -> _Worker | None:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._live < self.size:
                    self._live += 1
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
        try:
            return self._spawn()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _release(self, w: _Worker | None) -> None:
        with self._cond:
            if w is None:
                self._live -= 1
            else:
                self._idle.append(w)
            self._cond.notify()

    def warm_up(self, count: int | None = None) -> int:
        """Start idle workers up front (a worker takes about half a second to import math-verify),
        so the first checks of a run do not pay for it. Returns the number of idle workers."""
        want = min(self.size, count or self.size)
        while True:
            with self._cond:
                if self._live >= want or self._live >= self.size:
                    return len(self._idle)
                self._live += 1
            try:
                w = self._spawn()
            except BaseException:
                with self._cond:
                    self._live -= 1
                raise
            self._release(w)

    def _respawn(self) -> None:
        try:
            w = self._spawn()
        except Exception:  # noqa: BLE001
            log.exception("could not restart a math-verify worker")
            w = None
        self._release(w)

    def check(self, pred: str, gold: str, timeout_s: float = 5.0, float_rounding: int = 6) -> bool:
        # bounded twice: waiting for a free worker (e.g. while killed ones are replaced) and
        # the comparison itself, so a call returns within about 2 * timeout_s at worst
        w = self._acquire(wait_s=max(timeout_s, self.start_timeout_s if self._live == 0 else 0))
        self.calls += 1
        if w is None:
            self.timeouts += 1
            log.warning("math check gave up: no free math-verify worker within %.1fs", timeout_s)
            return False
        try:
            w.proc.stdin.write((json.dumps({"pred": pred, "gold": gold, "float_rounding": float_rounding})  # type: ignore[union-attr]
                                + "\n").encode())
            w.proc.stdin.flush()  # type: ignore[union-attr]
            res = w.readline(time.monotonic() + timeout_s)
        except (BrokenPipeError, OSError, ValueError):
            res = None
        if res is None:
            self.timeouts += 1
            log.warning("math check timed out after %.1fs (worker replaced): pred=%.80r gold=%.80r",
                        timeout_s, pred, gold)
            w.kill()
            # replace the worker in the background so that the next call finds one ready
            threading.Thread(target=self._respawn, daemon=True).start()
            return False
        self._release(w)
        if res.get("error"):
            self.errors += 1
        return bool(res.get("ok"))

    def close(self) -> None:
        with self._cond:
            for w in self._idle:
                w.kill()
            self._live -= len(self._idle)
            self._idle.clear()


_pool: VerifierPool | None = None
_threads: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _get_pool() -> VerifierPool:
    global _pool, _threads
    with _lock:
        if _pool is None:
            _pool = VerifierPool()
            _threads = ThreadPoolExecutor(max(4, _pool.size * 2), thread_name_prefix="mathverify")
        return _pool


def stats() -> dict[str, int]:
    p = _get_pool()
    return {"calls": p.calls, "timeouts": p.timeouts, "errors": p.errors}


# ---------------------------------------------------------------- public API

def verify(completion: str, answer: str, *, order: Sequence[str] = DEFAULT_ORDER,
           timeout_s: float = 5.0, rel_tol: float = 1e-6, symbolic: bool = True) -> bool:
    """Whether the final answer in ``completion`` equals the reference ``answer``.

    Finishes within about ``timeout_s`` seconds from any thread (a stuck check counts as
    False and is logged); see the module docstring.
    """
    pred = extract_answer(completion_text(completion), order)
    if pred is None:
        return False
    gold = str(answer).strip()
    gold_boxed = _boxed(gold)
    if gold_boxed is not None:
        gold = gold_boxed
    gold = gold.split("####")[-1].strip() if "####" in gold else gold
    verdict = _numeric_verdict(pred, gold, rel_tol)
    if verdict is not None:
        return verdict
    if pred.strip("$ ") == gold.strip("$ "):
        return True
    if not symbolic or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    return _get_pool().check(pred.strip("$ "), gold.strip("$ "), timeout_s)


def verify_many(completions: Sequence, answers: Sequence, **kw: Any) -> list[bool]:
    """``verify`` over many pairs, in parallel across the worker pool."""
    _get_pool()
    futs = [_threads.submit(verify, c, a, **kw) for c, a in zip(completions, answers)]  # type: ignore[union-attr]
    return [f.result() for f in futs]


def warm_up() -> None:
    """Start the math-verify workers now rather than at the first symbolic check."""
    _get_pool().warm_up()


def math_reward(prompts, completions, answer=None, *, order: Sequence[str] = DEFAULT_ORDER,
                timeout_s: float = 5.0, **_: Any) -> list[float | None]:
    """TRL-style reward: 1.0 when the completion's final answer matches the ``answer`` column
    (``None`` for rows without an answer)."""
    if answer is None:
        raise ValueError("the math reward needs an 'answer' column")
    idx = [i for i, a in enumerate(answer) if a is not None and str(a).strip() != ""]
    ok = verify_many([completions[i] for i in idx], [answer[i] for i in idx], order=order,
                     timeout_s=timeout_s)
    out: list[float | None] = [None] * len(completions)
    for i, v in zip(idx, ok):
        out[i] = 1.0 if v else 0.0
    return out


math_reward.warm_up = warm_up  # CombinedReward.warm_up calls this before training starts
