"""Run untrusted Python against tests, one fresh isolated process per execution.

Isolation is detected once, on first use, by probing the launcher with the strongest
configuration first and falling back (see ``LEVELS``). ``isolation_report()`` says which one
is in use. Nothing here relies on the program being polite: limits are set by the kernel
(rlimits with soft = hard, namespaces, an unprivileged uid), and the host kills the whole
process group at the wall-clock deadline.

Levels, strongest first:

``namespaces``  (started as root) new network, PID, mount, IPC and UTS namespaces; a fresh
    /proc; tmpfs over /tmp, /var/tmp, /dev/shm, /run, /root and /home (the interpreter and
    the work directory are bound back); the rest of the file system read-only; a per-slot
    unprivileged uid/gid; rlimits incl. the process cap; no_new_privs.
``userns``      (not root, unprivileged user namespaces allowed) the same namespaces and
    mounts inside a new user namespace, rlimits (the process cap is counted per user
    namespace), no_new_privs. No uid change is needed: the process has no host privileges.
``setuid``      (root, namespaces refused, e.g. a container without CAP_SYS_ADMIN) per-slot
    unprivileged uid, rlimits, no_new_privs, stray processes of the slot's uid killed after
    each run. Fallback: the network is NOT isolated.
``rlimits``     (not root, no user namespaces) rlimits and process-group kill only; the
    process cap is not applied (it would count the user's own processes). Fallback: no
    network or file-system isolation; do not run hostile code at this level.

When the ``seccomp`` Python bindings of libseccomp are importable, a filter denying socket
families other than AF_UNIX, ptrace, mount, unshare, bpf and similar is added at every level.
bubblewrap is detected and reported but not needed: the launcher sets up the same namespaces
itself (bwrap would add a process and ~10 ms per execution).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("rewards.code")

LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
STATUSES = ("passed", "failed", "timeout", "memory", "error")

LEVELS: dict[str, dict[str, bool]] = {
    "namespaces": dict(net_ns=True, pid_ns=True, mount_ns=True, ipc_ns=True, drop_uid=True),
    "userns": dict(userns=True, net_ns=True, pid_ns=True, mount_ns=True, ipc_ns=True),
    "setuid": dict(drop_uid=True),
    "rlimits": dict(),
}
HIDE_DIRS = ["/tmp", "/var/tmp", "/dev/shm", "/run", "/root", "/home"]


@dataclass
class CodeResult:
    """Outcome of one execution."""

    status: str  # passed | failed | timeout | memory | error
    passed: int  # tests passed
    total: int  # tests run (assert snippets or stdin/stdout cases)
    stdout: str  # captured, capped
    stderr: str  # captured, capped
    duration_s: float
    error: str | None = None  # first failure / error message
    isolation: str = ""  # isolation level used

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SandboxConfig:
    """Limits applied to every execution (the keyword arguments of ``run`` override some)."""

    nproc: int = 32  # processes/threads of the sandbox user
    nofile: int = 128  # open files
    fsize_mb: int = 32  # largest file written
    tmpfs_mb: int = 64  # size of each private tmpfs
    output_cap: int = 64 * 1024  # bytes of stdout/stderr kept
    output_kill: int = 16 * 1024 * 1024  # bytes of output after which the run is killed
    uid_base: int | None = None  # first uid of the per-slot unprivileged users
    workers: int | None = None  # concurrent executions; default 2 * os.cpu_count()
    python: str = sys.executable
    level: str | None = None  # force an isolation level (must work) instead of detecting
    zygote: bool = True  # fork executions from a pre-started launcher (saves interpreter start-up)
    extra: dict = field(default_factory=dict)


def _seccomp_available() -> bool:
    try:
        import seccomp  # type: ignore  # noqa: F401
        return True
    except ImportError:
        return False


class _Zygote:
    """Host side of the launcher's fork server (see ``_launcher.zygote``)."""

    def __init__(self, python: str, env: dict[str, str], netns: bool = False):
        import socket

        self._socket_mod = socket
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = parent
        self.proc = subprocess.Popen(
            [python, "-I", "-B", LAUNCHER, "--zygote", str(child.fileno())] + (["--netns"] if netns else []),
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd="/", env=env, start_new_session=True, close_fds=True)
        child.close()
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._pids: dict[int, Any] = {}
        self._exits: dict[int, int] = {}
        self._forgotten: set[int] = set()
        self._next = 0
        self.alive = True
        self.netns: bool | None = None  # whether the server made the shared network namespace
        threading.Thread(target=self._reader, daemon=True, name="sandbox-zygote").start()

    def _reader(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self.alive = False
                    self._cond.notify_all()
                    return
                msg = json.loads(data)
                if "hello" in msg:
                    self.netns = bool(msg.get("netns"))
                elif "exit" in msg:
                    if msg["exit"] in self._forgotten:
                        self._forgotten.discard(msg["exit"])
                    else:
                        self._exits[msg["exit"]] = msg["status"]
                else:
                    self._pids[msg["id"]] = msg.get("pid", msg.get("error", "no pid"))
                self._cond.notify_all()

    def ready(self, timeout: float = 30.0) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self.netns is not None or not self.alive, timeout)
            return self.alive and self.netns is not None

    def spawn(self, workdir: str, fds: list[int], pid_ns: bool, timeout: float = 30.0) -> int:
        with self._cond:
            self._next += 1
            rid = self._next
        with self._send_lock:
            self._socket_mod.send_fds(self.sock, [json.dumps({"id": rid, "workdir": workdir, "pid_ns": pid_ns}).encode()], fds)
        with self._cond:
            if not self._cond.wait_for(lambda: rid in self._pids or not self.alive, timeout):
                raise RuntimeError("sandbox fork server did not answer")
            if rid not in self._pids:
                raise RuntimeError("sandbox fork server died")
            pid = self._pids.pop(rid)
        if not isinstance(pid, int):
            raise RuntimeError(f"sandbox fork server could not fork: {pid}")
        return pid

    def wait(self, pid: int, timeout: float | None) -> int | None:
        """Wait status of ``pid`` once it ended, or None on time-out."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or not self.alive, timeout)
            return self._exits.pop(pid, None)

    def forget(self, pid: int) -> None:
        """The caller will not wait for ``pid`` (its result is complete); drop its exit."""
        with self._cond:
            if self._exits.pop(pid, None) is None:
                self._forgotten.add(pid)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Sandbox:
    """A pool of execution slots (one uid each) sized to the machine."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        # Two slots per CPU: much of an execution's latency is kernel work that waits rather
        # than computes (namespace set-up and teardown), so 2x keeps the CPUs busy (measured:
        # 164 HumanEval runs on 2 CPUs, 56 exec/s with 2 slots, 97 with 4, 100 with 8).
        self.workers = self.config.workers or int(os.environ.get("POSTTRAIN_SANDBOX_WORKERS", "0")) \
            or 2 * (os.cpu_count() or 1)
        base = self.config.uid_base
        if base is None:
            base = int(os.environ.get("POSTTRAIN_SANDBOX_UID_BASE", "0")) or (
                1_000_000 + (os.getpid() % 4000) * 256)
        self.uid_base = base  # slot i uses uids base + 2i (program) and base + 2i + 1 (harness)
        self._slots: queue.Queue[int] = queue.Queue()
        for i in range(self.workers):
            self._slots.put(i)
        self._level: str | None = None
        self._report: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._keep_paths = self._interpreter_paths()
        self._zygote: _Zygote | None = None
        self._zygote_lock = threading.Lock()

    # ---------------------------------------------------------------- detection
    def _interpreter_paths(self) -> list[str]:
        out = subprocess.run(
            [self.config.python, "-I", "-c",
             "import sys,json;print(json.dumps([sys.base_prefix,sys.prefix,sys.exec_prefix]"
             "+[p for p in sys.path if p]))"],
            capture_output=True, text=True, env={"PATH": os.defpath}, timeout=60)
        paths = json.loads(out.stdout) if out.returncode == 0 else [sys.base_prefix, sys.prefix]
        paths.append(os.path.dirname(os.path.realpath(self.config.python)))
        real = sorted({os.path.realpath(p) for p in paths if os.path.isabs(p) and os.path.exists(p)})
        return [p for p in real if not any(p != q and p.startswith(q + "/") for q in real)]

    def level(self) -> str:
        with self._lock:
            if self._level is None:
                self._detect()
            return self._level  # type: ignore[return-value]

    def _detect(self) -> None:
        root = os.geteuid() == 0
        candidates = [self.config.level] if self.config.level else (
            ["namespaces", "setuid", "rlimits"] if root else ["userns", "rlimits"])
        tried = {}
        probe = "import fractions, decimal, socket\nx = 1"
        for name in candidates:
            self._level = name
            r = self._execute(probe, ["assert x == 1"], "assert", 10.0, 256, slot=0)
            tried[name] = r.status if r.status == "passed" else f"{r.status}: {r.error}"
            if r.status == "passed":
                break
        else:
            self._level = None
            raise RuntimeError(f"no sandbox isolation level works here: {tried}")
        self._report = {
            "level": self._level,
            "settings": dict(LEVELS[self._level]),
            "achieved": self._last_achieved,
            "network_isolated": LEVELS[self._level].get("net_ns", False),
            "unprivileged_uid": LEVELS[self._level].get("drop_uid", False) or not root,
            "bubblewrap": shutil.which("bwrap") is not None,
            "seccomp": _seccomp_available(),
            "workers": self.workers,
            "probes": tried,
        }
        msg = f"code sandbox isolation: {self._level} ({self._report['achieved']})"
        (log.warning if self._level in ("setuid", "rlimits") else log.info)(msg)

    def isolation_report(self) -> dict[str, Any]:
        self.level()
        return dict(self._report or {})

    # ---------------------------------------------------------------- execution
    def run(self, code: str, tests, *, mode: str = "assert", timeout_s: float = 10.0,
            memory_mb: int = 512) -> CodeResult:
        level = self.level()
        slot = self._slots.get()
        try:
            r = self._execute(code, tests, mode, timeout_s, memory_mb, slot)
        finally:
            self._slots.put(slot)
        r.isolation = level
        return r

    _last_achieved: dict[str, Any] = {}

    def _get_zygote(self, env: dict[str, str]) -> _Zygote:
        with self._zygote_lock:
            if self._zygote is None or not self._zygote.alive:
                if self._zygote is not None:
                    log.warning("sandbox fork server ended; restarting it")
                iso = LEVELS[self._level]  # type: ignore[index]
                self._zygote = _Zygote(self.config.python, env,
                                       netns=bool(iso.get("net_ns") and iso.get("drop_uid")))
                if not self._zygote.ready():
                    raise RuntimeError("sandbox fork server did not start")
            return self._zygote

    def close(self) -> None:
        """Stop the fork server (it also stops by itself when this process exits)."""
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None

    def _execute(self, code, tests, mode, timeout_s, memory_mb, slot) -> CodeResult:
        cfg = self.config
        iso = dict(LEVELS[self._level])  # type: ignore[index]
        iso["seccomp"] = _seccomp_available()
        root = os.geteuid() == 0
        # Two uids per slot: the program's, and the harness's that judges it.
        uid = gid = self.uid_base + 2 * slot
        harness_uid = uid + 1
        nproc = cfg.nproc if (iso.get("drop_uid") or iso.get("userns")) else None
        if mode == "io":  # inputs go with the program; expected outputs only to the harness
            inputs, secret = [c["input"] for c in tests], [c["output"] for c in tests]
        else:
            inputs, secret = None, tests
        job = {
            "code": code, "inputs": inputs, "mode": mode, "isolation": iso,
            "uid": uid, "gid": gid, "harness_uid": harness_uid, "harness_gid": harness_uid,
            "keep_paths": self._keep_paths, "hide_dirs": HIDE_DIRS,
            "tmpfs_mb": cfg.tmpfs_mb,
            "limits": {"cpu_s": int(timeout_s) + 1, "memory_mb": int(memory_mb),
                       "fsize_mb": cfg.fsize_mb, "nofile": cfg.nofile, "nproc": nproc},
        }
        start = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="posttrain-sbx-")
        pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, results
        readers = [r for r, _ in pipes]
        writers = [w for _, w in pipes]
        proc = None
        pid = None
        rc: int | None = None
        zyg: _Zygote | None = None
        out, err, res = bytearray(), bytearray(), bytearray()
        timed_out = killed_for_output = False
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        try:
            if root and iso.get("drop_uid"):
                os.chown(workdir, uid, gid)
            os.chmod(workdir, 0o700)
            job["workdir"] = os.path.realpath(workdir)
            # Owned by the host (root, or the user) with mode 0600; the launcher opens and
            # unlinks it before any process of the program exists.
            fd = os.open(os.path.join(workdir, "secret.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(secret).encode())
            if cfg.zygote:
                zyg = self._get_zygote(env)
                job["isolation"]["net_ns_inherited"] = bool(zyg.netns)
                fd = os.open(os.path.join(workdir, "job.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(json.dumps(job).encode())
                pid = zyg.spawn(job["workdir"], writers, pid_ns=bool(iso.get("pid_ns")))
            else:
                job["result_fd"] = writers[2]
                proc = subprocess.Popen(
                    [cfg.python, "-I", "-B", LAUNCHER], stdin=subprocess.PIPE, stdout=writers[0],
                    stderr=writers[1], cwd=workdir, env=env, pass_fds=(writers[2],),
                    start_new_session=True, close_fds=True)
                pid = proc.pid
                try:
                    proc.stdin.write(json.dumps(job).encode())  # type: ignore[union-attr]
                    proc.stdin.close()  # type: ignore[union-attr]
                except BrokenPipeError:
                    pass
            for w in writers:
                os.close(w)
            writers = []
            deadline = start + timeout_s + 0.5  # + start-up
            sel = selectors.DefaultSelector()
            streams = {readers[0]: out, readers[1]: err, readers[2]: res}
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ)
            total_out = 0
            while streams:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(min(left, 1.0)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        streams.pop(key.fd)
                        continue
                    buf = streams[key.fd]
                    if key.fd == readers[2]:
                        if len(buf) < 4 * 1024 * 1024:
                            buf += chunk
                    else:
                        total_out += len(chunk)
                        if len(buf) < cfg.output_cap:
                            buf += chunk[: cfg.output_cap - len(buf)]
                if total_out > cfg.output_kill:
                    killed_for_output = True
                    break
            sel.close()
            finished = b'"event": "done"' in res
            if zyg is not None and finished and not timed_out and not killed_for_output:
                # Every pipe is closed, so every process of the execution has exited or closed
                # its output; the exit status adds nothing. Not waiting for it skips the
                # kernel's namespace teardown (tens of ms), which happens after the pipes close.
                zyg.forget(pid)
                rc = 0
            elif not timed_out and not killed_for_output:
                left = max(0.1, deadline - time.monotonic())
                if zyg is not None:
                    st = zyg.wait(pid, left)
                    if st is None:
                        timed_out = True
                    else:
                        rc = os.waitstatus_to_exitcode(st)
                else:
                    try:
                        rc = proc.wait(left)  # type: ignore[union-attr]
                    except subprocess.TimeoutExpired:
                        timed_out = True
        except RuntimeError as e:  # the fork server failed
            return CodeResult(status="error", passed=0, total=0, stdout="", stderr="",
                              duration_s=time.monotonic() - start, error=f"sandbox: {e}")
        finally:
            if pid is not None and rc is None:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                if zyg is not None:
                    zyg.wait(pid, 5.0)
            if proc is not None:
                proc.wait()
                rc = proc.returncode if rc is None else rc
                if proc.stdin is not None:
                    proc.stdin.close()
            if root and iso.get("drop_uid") and not iso.get("pid_ns"):
                _kill_uid(uid)
                _kill_uid(harness_uid)
            for fd in readers + writers:
                os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
        duration = time.monotonic() - start
        return self._result(res, out, err, rc, timed_out, killed_for_output, duration)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        proc.wait()

    def _result(self, res, out, err, rc, timed_out, killed_for_output, duration) -> CodeResult:
        total = passed = 0
        status, error, done = None, None, False
        ok_tests: set[int] = set()
        for line in bytes(res).decode(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "start":
                self._last_achieved = ev.get("isolation", {})
            elif kind == "total":
                total = int(ev.get("total", 0))
            elif kind == "test":
                if ev.get("ok"):
                    ok_tests.add(int(ev.get("index", -1)))
                elif error is None:
                    error = ev.get("error")
            elif kind == "done" and not done:
                done = True
                status = ev.get("status")
                error = ev.get("error") or error
        passed = min(len(ok_tests), total)
        stderr = bytes(err).decode(errors="replace")
        if timed_out:
            status, error = "timeout", error or "wall-clock time limit exceeded"
        elif killed_for_output:
            status, error = "failed", "output limit exceeded"
        elif not done:
            if "MemoryError" in stderr:
                status = "memory"
            elif rc is not None and rc in (128 + signal.SIGXCPU, -signal.SIGXCPU, 128 + signal.SIGKILL):
                status = "timeout"
            else:
                status = "error"
            error = error or f"program ended without a result (exit code {rc})"
        if status not in STATUSES:
            status = "error"
        if status == "passed" and passed != total:
            status = "failed"
        return CodeResult(status=status, passed=passed, total=total,
                          stdout=bytes(out).decode(errors="replace"), stderr=stderr,
                          duration_s=duration, error=error)


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid`` (only used at levels without a PID namespace)."""
    for _ in range(3):
        found = False
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                found = True
                                os.kill(int(p), signal.SIGKILL)
                            break
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)
