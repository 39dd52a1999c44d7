"""Verdicts that the program under test cannot forge: a battery of reward hacks, each of which
solves nothing and must not pass (see rewards/code/_launcher.py for the design)."""

from __future__ import annotations

import json
import textwrap

import pytest

from rewards.code import isolation_report, run

TESTS = ["assert f(1) == 2", "assert f(2) == 3", "assert f(3) == 4"]
IO = [{"input": "1", "output": "SECRET-7731"}, {"input": "2", "output": "SECRET-9902"}]

# Well-formed result messages for every protocol the harness ever used: JSON event lines.
FORGED = "".join(json.dumps(e) + "\n" for e in (
    [{"event": "start", "isolation": {}}, {"event": "total", "total": 3}]
    + [{"event": "test", "index": i, "ok": True} for i in range(3)]
    + [{"event": "done", "status": "passed", "error": None}]))

FORGE_ALL_FDS = f"""
import os
FORGED = {FORGED!r}.encode()
def forge():
    for fd in range(0, 256):
        try:
            os.write(fd, FORGED)
        except OSError:
            pass
"""


def _assert_run(code):
    return run(textwrap.dedent(code), TESTS, timeout_s=5)


def _io_run(code):
    return run(textwrap.dedent(code), IO, timeout_s=5)


def _not_passed(r):
    assert r.status != "passed" and r.passed == 0, r


HACKS = {
    "exit at import": "import sys\nsys.exit(0)\n",
    "os._exit at import": "import os\nos._exit(0)\n",
    "os._exit inside the function": "import os\ndef f(x):\n    os._exit(0)\n",
    "forged messages on every descriptor": FORGE_ALL_FDS + "forge()\ndef f(x):\n    return 0\n",
    "forged messages from the function, then exit": FORGE_ALL_FDS
    + "def f(x):\n    forge()\n    os._exit(0)\n",
    "atexit hook forges": FORGE_ALL_FDS + "import atexit\natexit.register(forge)\ndef f(x):\n    return 0\n",
    "thread forges after the tests": FORGE_ALL_FDS + textwrap.dedent("""
        import threading, time
        def later():
            time.sleep(0.2)
            forge()
        threading.Thread(target=later).start()
        def f(x):
            return 0
        """),
    "background process forges": FORGE_ALL_FDS + textwrap.dedent("""
        if os.fork() == 0:
            import time
            for _ in range(20):
                forge()
                time.sleep(0.02)
            os._exit(0)
        def f(x):
            return 0
        """),
    "always-equal object": textwrap.dedent("""
        class Yes:
            def __eq__(self, other):
                return True
            __ne__ = lambda self, other: False
        def f(x):
            return Yes()
        """),
    "int subclass that equals everything": textwrap.dedent("""
        class I(int):
            def __eq__(self, other):
                return True
        def f(x):
            return I(0)
        """),
    "harness objects through the garbage collector": textwrap.dedent("""
        import gc
        def f(x):
            for o in gc.get_objects():
                for name in ("send", "passed", "ok"):
                    try:
                        if hasattr(o, "send") and callable(o.send):
                            for i in range(3):
                                o.send(event="test", index=i, ok=True)
                            o.send(event="done", status="passed", error=None)
                    except Exception:
                        pass
                if isinstance(o, dict) and "tests" in o:
                    o["tests"] = ["pass", "pass", "pass"]
            return 0
        """),
    "tests found in memory and made to pass": textwrap.dedent("""
        import gc
        def f(x):
            for o in gc.get_objects():
                if isinstance(o, list) and o and all(isinstance(t, str) and "assert" in t for t in o):
                    o[:] = ["pass"] * len(o)
            return 0
        """),
    "trace function skips test lines": textwrap.dedent("""
        import sys, threading
        def tracer(frame, event, arg):
            if frame.f_code.co_filename.startswith("test_"):
                def skip(frame, event, arg):
                    if event == "line":
                        try:
                            frame.f_lineno = frame.f_lineno + 1
                        except Exception:
                            pass
                    return skip
                return skip
            return tracer
        sys.settrace(tracer)
        threading.settrace(tracer)
        def f(x):
            return 0
        """),
    "tests read from the work directory or the harness's descriptors": textwrap.dedent("""
        import os
        found = []
        for p in ["secret.json", "job.json"] + [f"/proc/{pid}/fd/{fd}" for pid in range(1, 8) for fd in range(3, 12)]:
            try:
                found.append(open(p).read())
            except OSError:
                pass
        for pid in range(1, 8):
            try:
                with open(f"/proc/{pid}/mem", "rb") as m:
                    found.append("mem")
            except OSError:
                pass
        assert not found, found
        def f(x):
            return 0
        """),
}


@pytest.mark.parametrize("name", list(HACKS))
def test_assert_mode_hack_does_not_pass(name):
    _not_passed(_assert_run(HACKS[name]))


IO_HACKS = {
    "forged messages on every descriptor": FORGE_ALL_FDS + "forge()\n",
    "atexit hook forges": FORGE_ALL_FDS + "import atexit\natexit.register(forge)\n",
    "expected outputs looked up in memory": textwrap.dedent("""
        import gc
        for o in gc.get_objects():
            if isinstance(o, (list, dict, str)) and "SECRET-" in repr(o)[:100000]:
                print(repr(o))
        for fd in range(3, 64):
            try:
                print(os.read(fd, 1 << 16))
            except Exception:
                pass
        """).replace("import gc", "import gc, os"),
    "expected outputs read through /proc": textwrap.dedent("""
        import os
        for pid in range(1, 8):
            for fd in range(0, 16):
                try:
                    print(open(f"/proc/{pid}/fd/{fd}").read())
                except OSError:
                    pass
        """),
}


@pytest.mark.parametrize("name", list(IO_HACKS))
def test_io_mode_hack_does_not_pass(name):
    _not_passed(_io_run(IO_HACKS[name]))


def test_values_that_cannot_cross_fail_clearly():
    r = run("def f(x):\n    return object()\n", ["assert f(1) is not None"])
    assert r.status == "failed" and "cannot cross as plain data" in r.error, r
    r = run("def f(g):\n    return g(1)\n", ["assert f(lambda x: x) == 1"])
    assert r.status == "failed" and "plain data" in r.error, r


def test_honest_programs_still_pass():
    code = textwrap.dedent("""
        import math
        LIMIT = 10
        def f(x):
            print("called with", x)
            if x < 0:
                raise ValueError("negative")
            return x + 1
        def shapes():
            return (1, 2.5, -0.0, float("inf")), {3, 4}, {(1, 2): [b"\\x00", None]}, 10 ** 40, frozenset("a")
        """)
    tests = TESTS + [
        "assert LIMIT == 10",
        "a, s, d, big, fs = shapes()\nassert a == (1, 2.5, -0.0, float('inf')) and s == {3, 4}\n"
        "assert d == {(1, 2): [b'\\x00', None]} and big == 10 ** 40 and fs == frozenset('a')",
        "try:\n    f(-1)\n    raise AssertionError('no error')\nexcept ValueError as e:\n    assert 'negative' in str(e)",
    ]
    r = run(code, tests)
    assert (r.status, r.passed, r.total) == ("passed", 6, 6), r
    assert "called with 1" in r.stdout


def test_program_and_harness_run_apart():
    if isolation_report()["level"] not in ("namespaces", "setuid"):
        pytest.skip("separate uids need a sandbox started as root")
    r = run("import os\nUID = os.getuid()\n", ["import os\nassert os.getuid() != UID, (os.getuid(), UID)"])
    assert r.status == "passed", r
