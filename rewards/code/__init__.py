"""Code execution feedback: run generated Python against tests in an isolated sandbox.

>>> from rewards.code import run
>>> run("def add(a, b):\\n    return a + b", ["assert add(1, 2) == 3"]).status
'passed'

Tests are either assert-style (a string of test code, or a list of snippets, each counted)
or stdin/stdout cases (a list of ``{"input": ..., "output": ...}``), each case run in a
fresh process with the output compared token by token (numbers with tolerance).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from rewards.code.sandbox import CodeResult, Sandbox, SandboxConfig
from rewards.completions import completion_text

__all__ = ["CodeResult", "Sandbox", "SandboxConfig", "run", "run_many", "isolation_report",
           "extract_code", "code_reward", "get_sandbox"]

_sandbox: Sandbox | None = None
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def get_sandbox() -> Sandbox:
    """The process-wide sandbox (created, and isolation detected, on first use)."""
    global _sandbox, _pool
    with _lock:
        if _sandbox is None:
            _sandbox = Sandbox()
            _pool = ThreadPoolExecutor(_sandbox.workers * 2, thread_name_prefix="sandbox")
        return _sandbox


def isolation_report() -> dict[str, Any]:
    """Which isolation level is used here and what it consists of."""
    return get_sandbox().isolation_report()


def _mode(tests) -> tuple[str, Any]:
    if isinstance(tests, str):
        return "assert", tests
    tests = list(tests)
    if tests and all(isinstance(t, dict) for t in tests):
        cases = [{"input": str(t.get("input", "")), "output": str(t.get("output", ""))} for t in tests]
        return "io", cases
    if not all(isinstance(t, str) for t in tests):
        raise TypeError("tests must be a string, a list of strings, or a list of "
                        "{'input', 'output'} dicts")
    return "assert", tests


def run(code: str, tests: str | list[str] | list[dict], timeout_s: float = 10,
        memory_mb: int = 512) -> CodeResult:
    """Run ``code`` then ``tests`` in a fresh sandboxed process; see the module docstring."""
    mode, tests = _mode(tests)
    return get_sandbox().run(code, tests, mode=mode, timeout_s=timeout_s, memory_mb=memory_mb)


def run_many(codes: Sequence[str], tests: Sequence, timeout_s: float = 10,
             memory_mb: int = 512) -> list[CodeResult]:
    """Run many executions in parallel (bounded by the sandbox's slots)."""
    get_sandbox()
    futs = [_pool.submit(run, c, t, timeout_s, memory_mb) for c, t in zip(codes, tests)]  # type: ignore[union-attr]
    return [f.result() for f in futs]


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last ```python (or ```py) fenced block; else the last fenced block; else the text."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        # an unterminated fence (generation cut off): take everything after it
        m = re.search(r"```[ \t]*(?:python|py)?[^\n]*\n", completion)
        return completion[m.end():] if m else completion
    py = [b for lang, b in blocks if lang.lower() in ("python", "py", "python3")]
    return (py or [b for _, b in blocks])[-1]


def code_reward(prompts, completions, tests=None, io=None, entry_point=None, *,
                mode: str = "fraction", timeout_s: float = 10, memory_mb: int = 512,
                **_: Any) -> list[float | None]:
    """TRL-style reward: fraction of tests passed (``mode="fraction"``) or 1/0 (``"all"``).

    Columns: ``tests`` (str, list of str, or list of {"input","output"}) and/or ``io``
    (stdin/stdout cases); ``entry_point`` (optional) appends ``check(entry_point)`` to
    HumanEval-style tests that define ``check`` but do not call it. Samples without tests get
    ``None`` (the reward does not apply).
    """
    n = len(completions)
    jobs: list[tuple[int, str, Any]] = []
    for i in range(n):
        t = tests[i] if tests is not None else None
        if io is not None and io[i]:
            t = io[i]
        if t is None or (not isinstance(t, str) and len(t) == 0):
            continue
        if isinstance(t, str) and entry_point is not None and entry_point[i] \
                and "def check(" in t and f"check({entry_point[i]})" not in t:
            t = t + f"\ncheck({entry_point[i]})\n"
        jobs.append((i, extract_code(completion_text(completions[i])), t))
    out: list[float | None] = [None] * n
    results = run_many([c for _, c, _ in jobs], [t for _, _, t in jobs], timeout_s, memory_mb)
    for (i, _, _), r in zip(jobs, results):
        out[i] = (1.0 if r.status == "passed" else 0.0) if mode == "all" else r.fraction
    return out
