"""Sandbox launcher and test harness, run as ``python -I -B _launcher.py`` by the host.

This file is executed in a fresh interpreter, never imported by the host: it must only use
the standard library. The host writes one JSON job on stdin and closes it. The launcher

1. applies the requested isolation (namespaces via ``unshare(2)``, a private mount table with
   fresh tmpfs over world-writable and private directories, a read-only view of the rest),
2. forks so that the worker is inside the new PID namespace (its ``init`` process dies with
   the launcher, and every process of the namespace dies with ``init``),
3. sets resource limits (soft = hard, so they cannot be raised back), ``no_new_privs``, drops
   to an unprivileged uid/gid when started as root,
4. runs the untrusted program and its tests in the worker and streams one JSON line per event
   to the result file descriptor.

Limitation (shared by every in-process harness): the program runs in the same interpreter as
the harness, so a deliberately adversarial program can forge its own test results. The
isolation protects the host; it does not make the pass/fail signal tamper-proof.
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


def drop_privileges(job, achieved):
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
        uid, gid = job["uid"], job["gid"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        achieved["uid"] = os.getuid()
    try:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
        achieved["no_new_privs"] = True
    except OSError:
        achieved["no_new_privs"] = False
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
# harness (runs in the worker, as the unprivileged user)

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


def run_assert(job, rep):
    g = {"__name__": "solution", "__builtins__": __builtins__}
    tests = job["tests"]
    total = 1 if isinstance(tests, str) else len(tests)
    rep.send(event="total", total=total)
    try:
        exec(compile(job["code"], "solution.py", "exec"), g)
    except BaseException as e:  # noqa: BLE001 - untrusted code
        if isinstance(e, SystemExit):
            rep.send(event="done", status="error", error="program called exit()")
        else:
            rep.send(event="done", status=_classify(e) or "error", error=_describe(e))
        return
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


def run_io(job, rep):
    cases = job["tests"]
    rep.send(event="total", total=len(cases))
    try:
        code = compile(job["code"], "solution.py", "exec")
    except BaseException as e:  # noqa: BLE001
        rep.send(event="done", status="error", error=_describe(e))
        return
    passed, first_error, status = 0, None, "failed"
    for i, case in enumerate(cases):
        with open(f"in_{i}.txt", "w") as f:
            f.write(case["input"])
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # one fresh process per case, fds redirected at the OS level
            rc = 0
            try:
                fin = os.open(f"in_{i}.txt", os.O_RDONLY)
                fout = os.open(f"out_{i}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fin, 0)
                os.dup2(fout, 1)
                sys.stdin = open(0, "r", closefd=False)
                sys.stdout = open(1, "w", closefd=False)
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
        _, st = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(st)
        try:
            with open(f"out_{i}.txt", errors="replace") as f:
                got = f.read(4 * 1024 * 1024)
        except OSError:
            got = ""
        ok = rc == 0 and _same_output(got, case["output"])
        passed += ok
        err = None if ok else (f"exit code {rc}" if rc != 0 else "wrong answer")
        rep.send(event="test", index=i, ok=ok, error=err)
        if not ok and first_error is None:
            first_error = f"case {i}: {err}"
            status = "memory" if rc == 3 else "failed"
    rep.send(event="done", status="passed" if passed == len(cases) else status, error=first_error)


def worker(job, rep, achieved):
    drop_privileges(job, achieved)
    rep.send(event="start", isolation=achieved)
    if job["mode"] == "io":
        run_io(job, rep)
    else:
        run_assert(job, rep)


def _exit_like(status):
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]), "--netns" in sys.argv[3:])
        return
    job = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    run_job(job)


def zygote(sock_fd, netns=False):
    """Fork server: each request (a work directory holding ``job.json``, plus the write ends
    of the stdout, stderr and result pipes) gets a fresh child forked from this clean,
    pre-initialised interpreter, which then isolates itself exactly like a directly launched
    one. Saves the interpreter start-up (tens of ms) per execution. The server itself never
    runs untrusted code. Messages: host -> {"id", "workdir"} + 3 fds; server -> {"id", "pid"}
    or {"id", "error"}, and {"exit": pid, "status": wait status} when a child ends."""
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
        try:
            pid = os.fork()
        except OSError as e:
            for fd in fds:
                os.close(fd)
            send({"id": req["id"], "error": str(e)})
            continue
        if pid == 0:
            try:
                os.setsid()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                for target, fd in zip((1, 2, 3), fds):
                    os.dup2(fd, target)
                for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
                    if int(fd) > 3:
                        try:
                            os.close(int(fd))
                        except OSError:
                            pass
                os.chdir(req["workdir"])
                with open("job.json", "rb") as f:
                    job = json.loads(f.read())
                os.unlink("job.json")
                job["result_fd"] = 3
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
        if iso.get("pid_ns"):
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
            pid = os.fork()
            if pid:  # the launcher: wait for init of the new namespace, exit like it
                rep.f.close()
                _, st = os.waitpid(pid, 0)
                _exit_like(st)
            # init (pid 1): set up the mount table, run the worker, exit with it; when init
            # exits the kernel kills every process left in the namespace.
            if iso.get("mount_ns"):
                setup_mounts(job, achieved)
            sys.stdout.flush()
            wpid = os.fork()
            if wpid == 0:
                try:
                    worker(job, rep, achieved)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
                except BaseException as e:  # noqa: BLE001
                    rep.send(event="done", status="error", error="sandbox worker: " + _describe(e))
                    os._exit(70)
            rep.f.close()
            while True:
                try:
                    p, st = os.wait()
                except ChildProcessError:
                    os._exit(0)
                if p == wpid:
                    _exit_like(st)
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
