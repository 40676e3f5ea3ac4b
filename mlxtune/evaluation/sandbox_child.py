"""The wrapper that runs ONE candidate program inside the sandbox (see mlxtune/evaluation/sandbox.py).

Started by the parent as ``python -I -B sandbox_child.py CONFIG_JSON`` in the candidate's
working directory. It reads the candidate from an inherited file descriptor, cuts the network
(a new network namespace where the OS allows it), drops root privileges (to a private uid, so
that RLIMIT_NPROC applies), sets the resource limits, installs the audit hook that refuses
writes outside the working directory and network use, runs the candidate, and writes JSON lines
to an inherited result descriptor: ``{"net_guard": "namespace" | "audit hook"}`` first, then
``{"write": path}`` / ``{"program": ...}`` / ``{"network": ...}`` for refused actions, ``{"exc": name, "msg": ..., "line": n}`` for an exception, and
``{"done": true}`` when the program ran to its end. Standard library only; nothing here is
imported by mlxtune itself.
"""

import builtins
import json
import os
import resource
import socket
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
ALLOWED = {"/dev/null", "/dev/stdout", "/dev/stderr"}
# audit event -> ((index of a path argument, index of its dir_fd argument or None), ...)
PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((1, 3),), "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.chflags": ((0, None),), "os.lchflags": ((0, None),), "os.truncate": ((0, None),), "os.utime": ((0, 3),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
    "shutil.copyfile": ((1, None),), "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),),
    "shutil.copytree": ((1, None),), "shutil.move": ((0, None), (1, None)), "shutil.make_archive": ((0, None),),
    "shutil.unpack_archive": ((1, None),), "sqlite3.connect": ((0, None),), "tempfile.mkstemp": ((0, None),),
    "tempfile.mkdtemp": ((0, None),),
}
# Programs started from the candidate would run without the audit hook.
PROGRAM_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "pty.spawn", "os.startfile"}
# Socket events that reach outside the process: an address to connect/bind/send to, a name lookup.
ADDRESS_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}
LOOKUP_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000


class Reporter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, record: dict) -> None:
        try:
            os.write(self.fd, (json.dumps(record) + "\n").encode())
        except Exception:  # the candidate may have closed the descriptor
            pass


def drop_root(uid: int, report: Reporter) -> None:
    """Become ``uid`` keeping only CAP_DAC_READ_SEARCH (to read the Python installation, e.g.
    under /root), with no_new_privs so setuid programs cannot give privileges back."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted set across setresuid
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        report({"setup_error": f"cannot switch to uid {uid} ({e}); run as a normal user instead of root"})
        os._exit(70)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    read_search = 1 << 2  # CAP_DAC_READ_SEARCH; data = effective, permitted, inheritable (x2 words)
    if libc.capset(header, (ctypes.c_uint32 * 6)(read_search, read_search, 0, 0, 0, 0)) != 0:
        libc.capset(header, (ctypes.c_uint32 * 6)(0, 0, 0, 0, 0, 0))  # not grantable here: keep none
    libc.prctl(8, 0, 0, 0, 0)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    try:
        open(os.__file__, "rb").close()
    except OSError:
        report({"setup_error": f"uid {uid} cannot read the Python installation ({os.path.dirname(os.__file__)}) and "
                "this system does not let the sandbox keep CAP_DAC_READ_SEARCH; run as a normal user, or install "
                "Python where other users can read it"})
        os._exit(70)


def cut_network() -> str:
    """Move this process into a new network namespace: its only device is a loopback that is
    down, so nothing (ctypes and C extensions included) reaches the host or beyond. Root needs
    CAP_SYS_ADMIN; a normal user needs unprivileged user namespaces (a new one that maps only
    its own uid and gid, so file access and RLIMIT_NPROC are unchanged). Returns the protection
    in force: "namespace", or "audit hook" where the OS refuses (macOS, locked-down containers)."""
    if not sys.platform.startswith("linux"):
        return "audit hook"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:  # a user namespace would leave the private uid that drop_root switches to unmapped
        return "namespace" if libc.unshare(CLONE_NEWNET) == 0 else "audit hook"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:  # atomic: on failure neither was created
        return "audit hook"
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            break  # unmapped ids only show as "nobody" inside; the network is cut all the same
    return "namespace"


def numeric_host(host: object) -> bool:
    """True for None or an IP address literal: looking it up asks no name server."""
    if host is None:
        return True
    try:
        host = os.fsdecode(host)
    except TypeError:
        return False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            pass
    return False


def network_use(event: str, args: tuple, work: str) -> "str | None":
    """What a socket event would reach, or None when it stays inside the sandbox: a unix socket
    path in the working directory, a lookup of a numeric address, a send on a connected socket."""
    what = event[len("socket."):]
    if event in LOOKUP_EVENTS:
        if event in ("socket.getaddrinfo", "socket.gethostbyname") and numeric_host(args[0]):
            return None
        return f"{what} {args[0]!r}"
    if event not in ADDRESS_EVENTS:
        return None  # creating a socket, socketpair, gethostname ...
    address = args[1] if len(args) > 1 else None
    if address is None and event == "socket.sendmsg":
        return None
    if isinstance(address, (str, bytes)) and address and address[:1] not in ("\0", b"\0"):
        if outside(address, None, work) is None:
            return None
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{what} {address[0]}:{address[1]}"
    return f"{what} {address!r}"


def set_limits(config: dict) -> None:
    def limit(which: int, soft: int, hard: int) -> None:
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS
            pass

    limit(resource.RLIMIT_CORE, 0, 0)
    limit(resource.RLIMIT_CPU, config["cpu"], config["cpu"] + 1)  # SIGXCPU first, SIGKILL a second later
    limit(resource.RLIMIT_AS, config["memory"], config["memory"])
    limit(resource.RLIMIT_FSIZE, config["fsize"], config["fsize"])
    limit(resource.RLIMIT_NPROC, config["nproc"], config["nproc"])


def outside(path: object, dir_fd: object, work: str) -> "str | None":
    """The resolved path when it lies outside ``work`` (symlinks followed), else None."""
    if path is None or isinstance(path, int):
        return None  # a file descriptor: opening it was checked
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return None
    if path in ALLOWED or path in ("", ":memory:"):
        return None
    if not os.path.isabs(path):
        base = os.getcwd()
        if isinstance(dir_fd, int) and dir_fd >= 0:
            try:
                base = os.readlink(f"/proc/self/fd/{dir_fd}")
            except OSError:
                return f"<dir fd {dir_fd}>/{path}"
        path = os.path.join(base, path)
    real = os.path.realpath(path)
    return None if real == work or real.startswith(work + os.sep) else real


def make_hook(work: str, report: Reporter):
    busy = [False]  # the checks themselves must not be checked

    def hook(event: str, args: tuple) -> None:
        if busy[0]:
            return
        if event == "open":
            if not (isinstance(args[2], int) and args[2] & WRITE_FLAGS):
                return
            checks = ((0, None),)
        elif event in PATH_EVENTS:
            checks = PATH_EVENTS[event]
        elif event in PROGRAM_EVENTS:
            report({"program": f"{event} {args[0]!r}"[:300]})
            raise PermissionError(f"mlxtune sandbox: code under test may not start other programs ({event})")
        elif event.startswith("socket."):
            busy[0] = True
            try:
                used = network_use(event, args, work)
            finally:
                busy[0] = False
            if used:
                report({"network": used[:300]})
                raise PermissionError(13, f"mlxtune sandbox: network access is refused ({used[:100]})")
            return
        else:
            return
        busy[0] = True
        try:
            bad = None
            for i, fd_i in checks:
                bad = bad or outside(args[i], args[fd_i] if fd_i is not None and fd_i < len(args) else None, work)
        finally:
            busy[0] = False
        if bad:
            report({"write": bad, "event": event})
            raise PermissionError(13, "mlxtune sandbox: writing outside the working directory is refused", bad)

    return hook


def run(code: object, report: Reporter, main_pid: int) -> None:
    scope = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(code, scope)
    except SystemExit:
        sys.stdout.flush()
        raise  # exits with its code and without a "done" record: an early exit 0 is not a pass
    except BaseException as e:
        if os.getpid() != main_pid:  # a forked child of the candidate: only the first process reports
            os._exit(1)
        try:
            name, line, tb = type(e).__name__, None, e.__traceback__
            while tb is not None:
                if tb.tb_frame.f_code.co_filename == "<candidate>":
                    line = tb.tb_lineno
                tb = tb.tb_next
            scope.clear()  # free the candidate's memory before formatting (after a MemoryError)
            report({"exc": name, "msg": str(e)[:300], "line": line})
        except BaseException:
            os.write(report.fd, b'{"exc": "MemoryError", "msg": ""}\n')
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(1)
    sys.stdout.flush()
    if os.getpid() != main_pid:
        os._exit(0)
    report({"done": True})


def main(config: dict) -> None:
    report = Reporter(config["res_fd"])
    with open(config["src_fd"], encoding="utf-8") as f:
        source = f.read()
    # before dropping root, which needs CAP_SYS_ADMIN for it; the hook below also refuses sockets
    report({"net_guard": cut_network() if config["netns"] else "audit hook"})
    if config["uid"] is not None:
        drop_root(config["uid"], report)
    set_limits(config)
    sys.dont_write_bytecode = True
    sys.argv = ["<candidate>"]
    try:
        code = compile(source, "<candidate>", "exec")
    except (SyntaxError, ValueError) as e:
        report({"exc": type(e).__name__, "msg": str(e.msg if isinstance(e, SyntaxError) else e)[:300],
                "line": getattr(e, "lineno", None)})
        os._exit(1)
    del source
    sys.addaudithook(make_hook(config["work"], report))
    run(code, report, os.getpid())


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
