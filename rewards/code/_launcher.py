"""Sandbox launcher and test harness, run as ``python -I -B _launcher.py`` by the host.

This file is executed in a fresh interpreter, never imported by the host: it must only use
the standard library. The host writes one JSON job on stdin and closes it. The launcher

1. applies the requested isolation (namespaces via ``unshare(2)``, a private mount table with
   fresh tmpfs over world-writable and private directories, a read-only view of the rest),
2. forks so that the worker is inside the new PID namespace: the worker is that namespace's
   ``init``, so every process of the namespace (the program's, and anything it starts) dies
   when the worker ends (a fork server running as root forks the worker straight into a
   fresh namespace and saves this step),
3. sets resource limits (soft = hard, so they cannot be raised back), ``no_new_privs``, drops
   to an unprivileged uid/gid when started as root,
4. judges the program from outside it (below) and streams one JSON line per event to the
   result file descriptor.

Verdicts the program cannot forge. RL optimises whatever the reward lets through, so the
verdict depends only on the program's behaviour:

- The program runs in its own process, which holds nothing but stdin, stdout and stderr
  (every other descriptor is closed before its first line runs), under its own uid, without
  capabilities. Writing result messages anywhere reaches at most the captured stdout/stderr.
- Assert-style tests run in a separate harness process, forked before the program's code
  runs, under another uid (when started as root), not dumpable (so the program can neither
  ptrace it, read its memory, nor open its descriptors through /proc). The harness holds the
  result descriptor. Test code calls the program's functions through ``Remote`` proxies: the
  arguments and the result cross the program's stdin (a socket) as plain data (None, bool,
  int, float, str, bytes, list, tuple, dict, set, frozenset, nested) encoded as tagged JSON,
  and the harness rebuilds them from builtin types. Nothing the program defines (a subclass,
  an ``__eq__`` that always answers True) takes part in a comparison; a value that cannot
  cross as plain data makes the test fail with a message saying so. Exceptions come back as
  builtin exception types carrying the message.
- The tests (and, for stdin/stdout cases, the expected outputs) travel in a separate file
  that the launcher opens and unlinks before any program process exists; only the harness
  reads it, after the program's process was forked. The program therefore never holds them,
  not even in its memory (gc cannot find them).
- Stdin/stdout cases run one fresh program process each, forked from a process that has not
  read the expected outputs; the harness compares the captured output after every case ran.
- Exits, atexit hooks, threads and background processes of the program, trace functions it
  installs: they act in the program's process, which reports nothing. A program that ends
  early only fails its remaining tests.

What this rules out, by design: tests that rely on the program mutating an argument in
place, on identity, or on objects of the program's classes (they fail, never pass).
"""

import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (unified syscall table)
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _mount_setattr(path, attr_set=0, attr_clr=0, recursive=False):
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    ret = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                        ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(ret, f"mount_setattr {path}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _inside(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def setup_mounts(job, achieved):
    """Private mount table: fresh /proc, tmpfs over private and world-writable directories,
    the interpreter and the work directory bound back, everything else read-only."""
    workdir = job["workdir"]
    keep = [p for p in job["keep_paths"] if os.path.exists(p)]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # O_PATH fds so that bound-back paths survive being hidden by a tmpfs.
    fds = {}
    for p in keep + [workdir]:
        fds[p] = os.open(p, os.O_PATH)
    hidden = [d for d in job["hide_dirs"] if os.path.isdir(d) and not os.path.islink(d)]
    for d in hidden:
        mode = "1777" if d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") else "755"
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={job['tmpfs_mb']}m,mode={mode}")
    for p in keep + [workdir]:
        if any(_inside(p, d) for d in hidden):
            os.makedirs(p, exist_ok=True)
            _mount(f"/proc/self/fd/{fds[p]}", p, None, MS_BIND | MS_REC)
    for fd in fds.values():
        os.close(fd)
    achieved["hidden_dirs"] = hidden
    try:
        _mount_setattr("/", attr_set=MOUNT_ATTR_RDONLY, recursive=True)
        for d in hidden:
            _mount_setattr(d, attr_clr=MOUNT_ATTR_RDONLY)
        _mount_setattr(workdir, attr_clr=MOUNT_ATTR_RDONLY)
        _mount_setattr("/proc", attr_clr=MOUNT_ATTR_RDONLY)
        achieved["readonly_root"] = True
    except OSError:
        achieved["readonly_root"] = False
    os.chdir(workdir)


def drop_privileges(job, achieved, role):
    """Kernel limits, the role's unprivileged uid (the program's and the harness's differ, so
    the program can neither signal nor inspect the harness), no_new_privs, seccomp."""
    lim = job["limits"]
    pairs = [
        (resource.RLIMIT_CPU, lim["cpu_s"]),
        (resource.RLIMIT_AS, lim["memory_mb"] * 1024 * 1024),
        (resource.RLIMIT_FSIZE, lim["fsize_mb"] * 1024 * 1024),
        (resource.RLIMIT_NOFILE, lim["nofile"]),
        (resource.RLIMIT_CORE, 0),
    ]
    if lim.get("nproc") is not None:
        pairs.append((resource.RLIMIT_NPROC, lim["nproc"]))
    for which, value in pairs:
        resource.setrlimit(which, (value, value))
    achieved["rlimits"] = True
    if job["isolation"].get("drop_uid"):
        uid, gid = (job["uid"], job["gid"]) if role == "program" else (job["harness_uid"], job["harness_gid"])
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        achieved["uid"] = os.getuid()
    try:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
        achieved["no_new_privs"] = True
    except OSError:
        achieved["no_new_privs"] = False
    if role == "harness":
        if job["isolation"].get("userns"):
            drop_capabilities(achieved)
        # Not dumpable: a process of the same uid (or without capabilities) cannot ptrace it,
        # read its memory or open its descriptors through /proc.
        _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")
        achieved["harness_dumpable"] = False
    seccomp = job["isolation"].get("seccomp")
    if seccomp:
        achieved["seccomp"] = apply_seccomp()


def apply_seccomp():
    """Deny syscalls a test program never needs (optional; needs the libseccomp bindings)."""
    try:
        import seccomp  # type: ignore
    except ImportError:
        return False
    import errno
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in ("ptrace", "mount", "umount2", "unshare", "setns", "bpf", "perf_event_open",
                 "keyctl", "add_key", "request_key", "kexec_load", "init_module",
                 "finit_module", "delete_module", "reboot", "swapon", "swapoff", "chroot",
                 "pivot_root", "process_vm_readv", "process_vm_writev", "userfaultfd"):
        try:
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except Exception:
            pass
    for family in (2, 10, 16, 17):  # AF_INET, AF_INET6, AF_NETLINK, AF_PACKET
        f.add_rule(seccomp.ERRNO(errno.EACCES), "socket", seccomp.Arg(0, seccomp.EQ, family))
    f.load()
    return True


# --------------------------------------------------------------------------------------------
# verdicts: the program's process holds only stdin, stdout and stderr; the harness judges

PR_SET_DUMPABLE = 4
PR_SET_SECUREBITS = 28
PR_CAPBSET_DROP = 24
SECURE_NOROOT_ALL = 0x3F  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks
SYS_CAPSET = 126 if os.uname().machine == "x86_64" else 91  # aarch64
IO_OUTPUT_CAP = 4 * 1024 * 1024


class Reporter:
    def __init__(self, fd):
        self.f = os.fdopen(fd, "w", buffering=1, closefd=True)

    def send(self, **event):
        try:
            self.f.write(json.dumps(event) + "\n")
            self.f.flush()
        except Exception:
            pass


def _describe(exc):
    return f"{type(exc).__name__}: {exc}"[:2000]


def _classify(exc):
    return "memory" if isinstance(exc, MemoryError) else None


def drop_capabilities(achieved):
    """Empty every capability set of this process (it may be uid 0 of a user namespace, with
    every capability there) and lock the root exemptions off, so that it cannot ptrace or
    open the descriptors of the harness, nor regain capabilities by exec."""
    try:
        _check(_libc.prctl(PR_SET_SECUREBITS, SECURE_NOROOT_ALL, 0, 0, 0), "securebits")
    except OSError:
        pass  # needs CAP_SETPCAP; without it there is nothing to drop either
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    _check(_libc.syscall(ctypes.c_long(SYS_CAPSET), header, data), "capset")
    achieved["capabilities"] = "none"


def isolate_program(job, keep):
    """In a freshly forked program process: keep only the descriptors in ``keep`` (moved to
    0, 1, 2), leave the harness's process group, drop to the program's uid and capabilities."""
    for target, fd in enumerate(keep):
        if fd != target:
            os.dup2(fd, target)
    os.closerange(3, 1 << 16)
    os.setpgid(0, 0)
    achieved = {}
    drop_privileges(job, achieved, "program")
    if job["isolation"].get("userns") or os.geteuid() == 0:
        drop_capabilities(achieved)
    return achieved


# Plain data crosses between the processes as JSON with type tags, so that the harness only
# ever holds values it built itself from builtin types: nothing the program defines (no
# subclass, no __eq__) takes part in a comparison.
class NotPlainData(TypeError):
    pass


def to_plain(v, depth=0):
    if depth > 100:
        raise NotPlainData("value nested more than 100 levels deep")
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if -(1 << 53) < v < (1 << 53) else {"int": str(v)}
    if t is float:
        return {"float": v.hex()}
    if t is bytes:
        return {"bytes": v.hex()}
    if t is list:
        return [to_plain(x, depth + 1) for x in v]
    if t is tuple:
        return {"tuple": [to_plain(x, depth + 1) for x in v]}
    if t is set or t is frozenset:
        return {t.__name__: [to_plain(x, depth + 1) for x in v]}
    if t is dict:
        return {"dict": [[to_plain(k, depth + 1), to_plain(x, depth + 1)] for k, x in v.items()]}
    raise NotPlainData(f"a value of type {t.__name__} cannot cross as plain data")


def from_plain(v, depth=0):
    if depth > 100:
        raise NotPlainData("value nested more than 100 levels deep")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, list):
        return [from_plain(x, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "int":
            return int(str(x))
        if tag == "float":
            return float.fromhex(str(x))
        if tag == "bytes":
            return bytes.fromhex(str(x))
        if tag in ("tuple", "set", "frozenset", "dict") and isinstance(x, list):
            items = [from_plain(y, depth + 1) for y in x]
            if tag == "tuple":
                return tuple(items)
            if tag == "set":
                return set(items)
            if tag == "frozenset":
                return frozenset(items)
            if all(isinstance(p, list) and len(p) == 2 for p in items):
                return {k: y for k, y in items}
    raise NotPlainData("malformed plain-data message")


class Channel:
    """Length-prefixed JSON messages over one stream socket."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, msg):
        data = json.dumps(msg).encode()
        self.sock.sendall(len(data).to_bytes(4, "big") + data)

    def recv(self):
        head = self._exact(4)
        return json.loads(self._exact(int.from_bytes(head, "big")))

    def _exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)


def serve_program(job):
    """The program's process: run the program, then answer calls into it with plain data.
    Everything here may be rewritten by the program; all it can change is its own answers."""
    import io
    import socket

    chan = Channel(socket.socket(fileno=0))
    sys.stdin = io.StringIO()  # fd 0 is the channel; input() sees an empty stdin
    g = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "solution.py", "exec"), g)
    except BaseException as e:  # noqa: BLE001 - untrusted code
        if isinstance(e, SystemExit):
            chan.send({"loaded": False, "error": "program called exit()", "type": "SystemExit"})
        else:
            chan.send({"loaded": False, "error": _describe(e), "type": type(e).__name__})
        return
    names = {}
    for k, v in list(g.items()):
        if k.startswith("__"):
            continue
        if callable(v):
            names[k] = {"call": True}
        else:
            try:
                names[k] = {"value": to_plain(v)}
            except NotPlainData:
                pass  # modules, instances: not visible to the tests
    sys.stdout.flush()
    chan.send({"loaded": True, "names": names})
    while True:
        try:
            req = chan.recv()
        except EOFError:
            return
        try:
            fn = g[req["call"]]
            out = fn(*from_plain(req["args"]), **from_plain(req["kwargs"]))
            reply = {"ok": to_plain(out)}
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, SystemExit):
                e = RuntimeError("program called exit()")
            reply = {"raise": type(e).__name__, "error": _describe(e)}
        sys.stdout.flush()
        sys.stderr.flush()
        chan.send(reply)


class ProgramEnded(RuntimeError):
    pass


def _remote_error(kind, message):
    """An exception of the program, rebuilt in the harness as a builtin exception type (so a
    test expecting ValueError still works) and never as an object of the program."""
    import builtins

    cls = getattr(builtins, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    try:
        return cls(message)
    except Exception:  # noqa: BLE001 - exception types with other constructors
        return RuntimeError(message)


class Remote:
    """Harness side: a function of the program, called across the channel."""

    def __init__(self, chan, name):
        self._chan, self.__name__ = chan, name

    def __call__(self, *args, **kwargs):
        try:
            req = {"call": self.__name__, "args": to_plain(list(args)), "kwargs": to_plain(dict(kwargs))}
        except NotPlainData as e:
            raise NotPlainData(f"argument of {self.__name__}(): {e}") from None
        try:
            self._chan.send(req)
            reply = self._chan.recv()
        except (EOFError, OSError, ValueError):
            raise ProgramEnded(f"the program's process ended or broke the channel during "
                               f"{self.__name__}()") from None
        if not isinstance(reply, dict):
            raise NotPlainData("malformed reply")
        if "ok" in reply:
            return from_plain(reply["ok"])
        kind = reply.get("raise")
        if kind == "MemoryError":
            raise MemoryError(str(reply.get("error", ""))[:2000])
        raise _remote_error(kind, f"{self.__name__}() raised {str(reply.get('error', ''))[:2000]}")


def _program_exit(pid):
    try:
        p, st = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(st) if p else None


def run_assert(job, rep, secret_fd, base):
    import socket

    tests = None
    total = None
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the program's process, forked before the tests were read
        try:
            isolate_program(job, [theirs.fileno(), 1, 2])
            serve_program(job)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(0)
    theirs.close()
    with os.fdopen(secret_fd, "rb") as f:
        tests = json.loads(f.read())
    achieved = dict(base)
    drop_privileges(job, achieved, "harness")
    rep.send(event="start", isolation=achieved)
    total = 1 if isinstance(tests, str) else len(tests)
    rep.send(event="total", total=total)
    chan = Channel(mine)
    try:
        hello = chan.recv()
    except (EOFError, OSError, ValueError):
        rep.send(event="done", status="error",
                 error=f"program ended before its functions could be tested (exit code {_wait(pid)})")
        return
    if not isinstance(hello, dict) or not hello.get("loaded"):
        kind = hello.get("type") if isinstance(hello, dict) else None
        err = str(hello.get("error", "malformed message") if isinstance(hello, dict) else "malformed message")
        rep.send(event="done", status="memory" if kind == "MemoryError" else "error", error=err[:2000])
        return
    import builtins

    g = {"__name__": "__main__", "__builtins__": builtins}
    names = hello.get("names")
    for k, v in (names.items() if isinstance(names, dict) else ()):
        if not isinstance(k, str) or not isinstance(v, dict):
            continue
        if v.get("call"):
            g[k] = Remote(chan, k)
        elif "value" in v:
            try:
                g[k] = from_plain(v["value"])
            except NotPlainData:
                pass
    if isinstance(tests, str):
        tests = [tests]
    passed, first_error, status = 0, None, "failed"
    for i, t in enumerate(tests):
        try:
            exec(compile(t, f"test_{i}.py", "exec"), g)
            passed += 1
            rep.send(event="test", index=i, ok=True)
        except BaseException as e:  # noqa: BLE001
            rep.send(event="test", index=i, ok=False, error=_describe(e))
            if first_error is None:
                first_error = _describe(e)
                status = _classify(e) or "failed"
    rep.send(event="done", status="passed" if passed == len(tests) else status,
             error=first_error)


def _wait(pid):
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return None


def _same_output(got, want):
    a, b = got.split(), want.split()
    if a == b:
        return True
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if abs(fx - fy) > 1e-6 * max(1.0, abs(fy)):
            return False
    return True


def _run_case(job, code, data):
    """One stdin/stdout case in a fresh program process; returns (exit code, stdout bytes)."""
    import select

    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        rc = 0
        try:
            isolate_program(job, [in_r, out_w, 2])
            import io

            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            try:
                exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
            except SystemExit as e:
                rc = 0 if e.code in (None, 0) else 1
            except MemoryError:
                rc = 3
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                rc = 2
            sys.stdout.flush()
        finally:
            os._exit(rc)
    os.close(in_r)
    os.close(out_w)
    os.set_blocking(in_w, False)
    os.set_blocking(out_r, False)
    out = bytearray()
    rc = None
    writing = bool(data)
    if not writing:
        os.close(in_w)
    while True:
        r, w, _ = select.select([out_r], [in_w] if writing else [], [], 0.05)
        if w:
            try:
                data = data[os.write(in_w, data[:65536]):]
            except BlockingIOError:
                pass
            except BrokenPipeError:  # the program stopped reading: the rest of its input is moot
                data = b""
            if not data:
                writing = False
                os.close(in_w)
        eof = False
        if r:
            try:
                chunk = os.read(out_r, 1 << 16)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                eof = True
            elif chunk and len(out) < IO_OUTPUT_CAP:
                out += chunk
        if eof:
            rc = _wait(pid)
            break
        rc = _program_exit(pid)
        if rc is not None:
            # Drain what is buffered; a background process that keeps stdout open cannot
            # hold the case open.
            while len(out) < IO_OUTPUT_CAP:
                try:
                    chunk = os.read(out_r, 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                out += chunk
            break
    if writing:
        os.close(in_w)
    os.close(out_r)
    try:  # the case's own group (background processes of this case)
        os.killpg(pid, 9)
    except OSError:
        pass
    return rc, bytes(out)


def run_io(job, rep, secret_fd, base):
    cases = job["inputs"]
    try:
        code = compile(job["code"], "solution.py", "exec")
    except BaseException as e:  # noqa: BLE001
        rep.send(event="start", isolation=base)
        rep.send(event="total", total=len(cases))
        rep.send(event="done", status="error", error=_describe(e))
        return
    # Every case runs, in a process forked from this one, before the expected outputs are read.
    runs = [_run_case(job, code, case.encode()) for case in cases]
    with os.fdopen(secret_fd, "rb") as f:
        expected = json.loads(f.read())
    achieved = dict(base)
    drop_privileges(job, achieved, "harness")
    rep.send(event="start", isolation=achieved)
    rep.send(event="total", total=len(cases))
    passed, first_error, status = 0, None, "failed"
    for i, ((rc, got), want) in enumerate(zip(runs, expected)):
        ok = rc == 0 and _same_output(got.decode(errors="replace"), want)
        passed += ok
        err = None if ok else (f"exit code {rc}" if rc != 0 else "wrong answer")
        rep.send(event="test", index=i, ok=ok, error=err)
        if not ok and first_error is None:
            first_error = f"case {i}: {err}"
            status = "memory" if rc == 3 else "failed"
    rep.send(event="done", status="passed" if passed == len(cases) else status, error=first_error)


def worker(job, rep, achieved):
    if job["mode"] == "io":
        run_io(job, rep, job["secret_fd"], achieved)
    else:
        run_assert(job, rep, job["secret_fd"], achieved)


def open_secret():
    """The tests (or expected outputs), as a descriptor of an unlinked file: only the harness
    reads it, after the program's process was forked without it."""
    fd = os.open("secret.json", os.O_RDONLY)
    os.unlink("secret.json")
    return fd


def _close_secret(job):
    try:
        os.close(job["secret_fd"])
    except (OSError, KeyError):
        pass


def _exit_like(status):
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]), "--netns" in sys.argv[3:])
        return
    job = json.loads(sys.stdin.buffer.read())
    job["secret_fd"] = open_secret()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    run_job(job)


def zygote(sock_fd, netns=False):
    """Fork server: each request (a work directory holding ``job.json``, plus the write ends
    of the stdout, stderr and result pipes) gets a fresh child forked from this clean,
    pre-initialised interpreter, which then isolates itself exactly like a directly launched
    one. Saves the interpreter start-up (tens of ms) per execution. The server itself never
    runs untrusted code. Messages: host -> {"id", "workdir", "pid_ns"} + 3 fds; server ->
    {"id", "pid"} or {"id", "error"}, and {"exit": pid, "status": wait status} when a child
    ends."""
    import select
    import signal
    import socket

    sock = socket.socket(fileno=sock_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.set_wakeup_fd(wake_w)
    children = set()
    shared_netns = False
    if netns:
        # One empty network namespace (loopback down) for all executions of this server:
        # creating one per execution costs ~20 ms of kernel time.
        shared_netns = _libc.unshare(ctypes.c_int(CLONE_NEWNET)) == 0
    # Where this server may create PID namespaces (it runs as root), the child it forks for an
    # execution is itself init of a fresh one: unshare(CLONE_NEWPID) moves only the *next*
    # child into a new namespace, and setns back to our own afterwards re-arms it. This saves
    # the intermediate launcher process (a fork and an exit per execution, ~10% of the cost).
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)

    def send(msg):
        try:
            sock.send(json.dumps(msg).encode())
        except OSError:
            pass

    def reap():
        while children:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            children.discard(pid)
            send({"exit": pid, "status": st})

    send({"hello": True, "netns": shared_netns})
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            reap()
        if sock not in ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, 65536, 3)
        except OSError:
            data, fds = b"", []
        if not data:  # the host is gone: take every child with us
            for pid in list(children):
                try:
                    os.killpg(pid, 9)
                except OSError:
                    pass
            os._exit(0)
        req = json.loads(data)
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            send({"id": req["id"], "error": f"expected 3 fds, got {len(fds)}"})
            continue
        new_pid_ns = bool(req.get("pid_ns")) and _libc.unshare(ctypes.c_int(CLONE_NEWPID)) == 0
        pid = -1
        try:
            pid = os.fork()
        except OSError as e:
            for fd in fds:
                os.close(fd)
            send({"id": req["id"], "error": str(e)})
            continue
        finally:
            if new_pid_ns and pid != 0 and _libc.setns(own_pid_ns, CLONE_NEWPID) != 0:
                os._exit(75)  # cannot re-arm: the host starts a fresh server
        if pid == 0:
            try:
                os.setsid()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                for target, fd in zip((1, 2, 3), fds):
                    os.dup2(fd, target)
                os.closerange(4, 1 << 16)
                os.chdir(req["workdir"])
                with open("job.json", "rb") as f:
                    job = json.loads(f.read())
                os.unlink("job.json")
                job["result_fd"] = 3
                job["isolation"]["pid_ns_entered"] = new_pid_ns
                job["secret_fd"] = open_secret()
            except BaseException:  # noqa: BLE001
                os._exit(72)
            run_job(job)
            os._exit(0)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        send({"id": req["id"], "pid": pid})
        reap()


def run_job(job):
    rep = Reporter(job["result_fd"])
    iso = job["isolation"]
    achieved = {}
    try:
        flags = 0
        if iso.get("userns"):
            flags |= CLONE_NEWUSER
        if iso.get("net_ns") and not iso.get("net_ns_inherited"):
            flags |= CLONE_NEWNET
        if iso.get("pid_ns") and not iso.get("pid_ns_entered"):
            flags |= CLONE_NEWPID
        if iso.get("mount_ns"):
            flags |= CLONE_NEWNS
        if iso.get("ipc_ns"):
            flags |= CLONE_NEWIPC | CLONE_NEWUTS
        if flags:
            uid, gid = os.getuid(), os.getgid()
            _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
            if iso.get("userns"):
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"0 {uid} 1")
                _write("/proc/self/gid_map", f"0 {gid} 1")
        achieved.update({k: bool(iso.get(k)) for k in ("userns", "net_ns", "pid_ns", "mount_ns")})
        if iso.get("pid_ns"):
            if not iso.get("pid_ns_entered"):
                pid = os.fork()
                if pid:  # the launcher: wait for init of the new namespace, exit like it
                    rep.f.close()
                    _close_secret(job)
                    _, st = os.waitpid(pid, 0)
                    _exit_like(st)
            # init (pid 1): set up the mount table and run the worker itself. When init exits
            # the kernel kills every process left in the namespace (the program's, and
            # anything it started), so the verdict is final once the worker returns. Init
            # also cannot be signalled from inside the namespace, which the harness wants.
            if iso.get("mount_ns"):
                setup_mounts(job, achieved)
            try:
                worker(job, rep, achieved)
            except BaseException as e:  # noqa: BLE001
                rep.send(event="done", status="error", error="sandbox worker: " + _describe(e))
                os._exit(70)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if iso.get("mount_ns"):
            setup_mounts(job, achieved)
        worker(job, rep, achieved)
    except BaseException as e:  # noqa: BLE001
        rep.send(event="done", status="error", error="sandbox setup: " + _describe(e))
        sys.stdout.flush()
        os._exit(71)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
