"""Run generated code in a separate, limited process, for pass@k.

Each candidate program gets:

- its own process: ``python -I -B`` (isolated mode: no user site-packages, no PYTHON*
  variables, no script folder on sys.path; no .pyc writes) running the wrapper
  ``mlxtune/evaluation/sandbox_child.py``, in a new session and process group; on timeout, and after
  every run, the whole group is killed;
- a wall-clock timeout, and in the child ``setrlimit`` limits: CPU seconds (timeout + 1),
  address space (``memory_mb``), file size (``max_file_mb``), processes/threads
  (``max_processes``) and no core dumps;
- a fresh temporary working directory (also its HOME and TMPDIR), deleted afterwards;
- a stripped environment (PATH, LANG, HOME, TMPDIR and thread-count variables only), stdin
  from /dev/null, and stdout/stderr captured into a private file (truncated, never printed);
- an audit hook (``sys.addaudithook``) installed before the candidate runs that refuses, and
  reports, writes outside the working directory: opening a file for writing, creating,
  removing, renaming, linking, chmod/chown/utime, shutil copies and rmtree, sqlite databases,
  and starting other programs (os.system, subprocess, os.exec*, posix_spawn), whose code would
  run without the hook. The outcome then says "write outside sandbox: <path>".
- as root, which ignores RLIMIT_NPROC: the wrapper switches to a private unprivileged uid
  (one per concurrent run, from 59000 up, checked unused) before the candidate runs, keeping
  only CAP_DAC_READ_SEARCH so it can still read the Python installation (e.g. under /root),
  with no_new_privs set; every process left with that uid is killed after the run.
- no network: on Linux the wrapper moves into a new network namespace before the candidate
  runs (as root with CAP_SYS_ADMIN; as a normal user inside a new user namespace that maps only
  its own uid, where unprivileged user namespaces are allowed). Its only device is a loopback
  that is down, so no connection reaches the host or beyond, whatever the code. Where the OS
  refuses (macOS, containers without CAP_SYS_ADMIN or user namespaces) only the audit hook
  below guards the network. ``Outcome.network`` says which: "namespace" or "audit hook".
- in every case the audit hook refuses, and reports, socket connect/bind/send to any address
  but a unix socket inside the working directory, and name lookups (DNS) other than of
  numeric addresses. The outcome then says "network access refused: connect HOST:PORT".

Outcome status: ``pass`` (the program ran to its end and exited 0), ``fail`` (AssertionError),
``timeout``, or ``error`` with the reason (the exception, "exit code N", "killed by SIGSEGV",
"write outside sandbox: ...", ...). A program that stops early with exit code 0
(``sys.exit()``, ``os._exit(0)``) is an error: its tests did not all run.

What this sandbox does NOT protect against:

- network access where no namespace is allowed: the audit hook is in-process only (ctypes or a
  C extension calling libc bypasses it); with a namespace, unix sockets bound to a path
  outside the working directory stay reachable through such a bypass (file permissions apply);
- reading files: the candidate can read any file its user can read, and as root (with
  CAP_DAC_READ_SEARCH) any file on the machine, secrets included;
- code that bypasses the audit hook: ctypes or any C extension calling libc directly,
  os.mkfifo/os.mknod (not audited), or tampering with the hook from Python (it lives in the
  same interpreter). As a non-root user such writes land wherever that user may write; as
  root the private uid can only write to world-writable places (/tmp, /dev/shm);
- processes that leave the process group (os.setsid) when not running as root: they can
  outlive the run; as root they are found by uid and killed;
- kernel or interpreter exploits, privilege escalation, timing and other side channels;
- CPU, memory, disk or process exhaustion beyond the limits above: limits are per process
  (RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE), not cgroups, so a program with max_processes
  children may use max_processes x memory_mb; disk use in the working directory is bounded
  per file only; on macOS RLIMIT_AS is not enforced;
- forged results: the program can write a fake "done" record to its inherited result
  descriptor (an early ``exit(0)`` alone is caught).

It is meant for pass@k on model output (accidents, not attackers). For hostile code use a
container or VM with no network.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal

from mlxtune.errors import MlxtuneError

UID_BASE = 59000  # private uids for candidates when running as root: UID_BASE ... UID_BASE + UID_COUNT - 1
UID_COUNT = 1000
OUTPUT_KEEP = 4000  # bytes of the candidate's output kept from its start and from its end
# The wrapper the child interpreter runs (stdlib only; -I keeps mlxtune itself off its sys.path).
CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
NET_NAMESPACE = True  # False: guard the network with the audit hook only, as where the OS refuses a namespace
NETWORK_NOTES = {
    "namespace": "sandbox: network cut (each candidate ran in a new, empty network namespace)",
    "audit hook": "sandbox: this system allows no network namespace; sockets were refused by an in-process "
                  "audit hook only (code calling libc directly can bypass it)",
}


@dataclass
class Outcome:
    """Result of one candidate: status, why, wall seconds, and its captured output."""

    status: Literal["pass", "fail", "timeout", "error"]
    reason: str
    seconds: float
    output: str = ""
    network: str = ""  # the network protection in force: "namespace" or "audit hook" ("" if the wrapper never started)


# ------------------------------------------------------------------ processes and uids


def _tasks_by_uid() -> dict[int, list[tuple[int, bool, int]]]:
    """Linux: real uid -> [(pid, is_zombie, threads)] from /proc."""
    out: dict[int, list[tuple[int, bool, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                text = f.read()
            state = text[text.index("\nState:") + 7:].lstrip()[:1]
            uid = int(text[text.index("\nUid:") + 5:].split(None, 1)[0])
            threads = int(text[text.index("\nThreads:") + 9:].split(None, 1)[0])
        except (OSError, ValueError):
            continue  # the process ended while we looked
        out.setdefault(uid, []).append((int(entry), state == "Z", threads))
    return out


def _count_tasks(uid: int) -> int:
    """What RLIMIT_NPROC counts for ``uid``: its threads on Linux, its processes on macOS."""
    if os.path.isdir("/proc/self"):
        return sum(t for _, _, t in _tasks_by_uid().get(uid, []))
    ps = subprocess.run(["ps", "-axo", "uid="], capture_output=True, text=True, check=False)  # macOS counts processes
    return sum(1 for field in ps.stdout.split() if field == str(uid)) or 1


@contextmanager
def _private_uid() -> Iterator[int]:
    """An unused uid held for this run. A bound abstract unix socket is the lock (released
    when this process dies); the uid must have no passwd entry and no process."""
    import pwd

    known = _tasks_by_uid()
    for uid in range(UID_BASE, UID_BASE + UID_COUNT):
        if uid in known:
            continue
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0mlxtune-sandbox-uid-{uid}")
        except OSError:
            lock.close()
            continue
        try:
            if uid in _tasks_by_uid():  # taken between the scan and the lock
                continue
            yield uid
            return
        finally:
            lock.close()
    raise MlxtuneError(f"sandbox: no free uid in {UID_BASE}-{UID_BASE + UID_COUNT - 1} to run candidates as")


@contextmanager
def _maybe_private_uid() -> Iterator[int | None]:
    if os.geteuid() != 0:
        yield None
        return
    if not sys.platform.startswith("linux"):
        raise MlxtuneError("the code sandbox does not run as root outside Linux (root ignores the process limit); run mlxtune as a normal user")
    with _private_uid() as uid:
        yield uid


def _kill_uid(uid: int) -> None:
    """Kill every live process of a private uid (also ones that left the process group)."""
    for _ in range(200):
        live = [pid for pid, zombie, _ in _tasks_by_uid().get(uid, []) if not zombie]
        if not live:
            return
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until the child exits, without reaping it where the OS allows (a pidfd on Linux,
    waitid WNOWAIT elsewhere), so that its pid and process-group id stay reserved for the
    group kill that follows. True when the wall-clock timeout hit first."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                return not poller.poll(timeout * 1000.0)
            finally:
                os.close(fd)
    if not hasattr(os, "waitid"):  # macOS: reaping wait; the group id could in theory be reused
        try:
            proc.wait(timeout)
            return False
        except subprocess.TimeoutExpired:
            return True
    deadline = time.monotonic() + timeout
    delay = 0.001
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.02)
    return False


# ------------------------------------------------------------------ one candidate


def _check_limits(timeout: float, memory_mb: int, max_processes: int, max_file_mb: int) -> None:
    if os.name != "posix":
        raise MlxtuneError("the code sandbox needs Linux or macOS (it uses setrlimit and process groups)")
    if not (timeout > 0 and memory_mb >= 64 and max_processes >= 1 and max_file_mb >= 1):
        raise MlxtuneError(
            f"sandbox limits: need timeout > 0, memory_mb >= 64, max_processes >= 1, max_file_mb >= 1 "
            f"(got {timeout}, {memory_mb}, {max_processes}, {max_file_mb})")


def _read_output(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= 2 * OUTPUT_KEEP:
            data = f.read()
        else:
            head = f.read(OUTPUT_KEEP)
            f.seek(size - OUTPUT_KEEP)
            data = head + f"\n[... {size - 2 * OUTPUT_KEEP} bytes cut ...]\n".encode() + f.read()
    return data.decode("utf-8", errors="replace")


def _read_records(path: str) -> list[dict[str, Any]]:
    records = []
    with open(path, "rb") as f:
        for line in f.read(1 << 20).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


_SIGNAL_HINTS = {"SIGKILL": " (memory or CPU limit?)", "SIGXCPU": " (CPU time limit)", "SIGSEGV": " (crash)",
                 "SIGABRT": " (abort)", "SIGXFSZ": " (file size limit)", "SIGBUS": " (crash)"}


def _classify(returncode: int, timed_out: bool, timeout: float, records: list[dict[str, Any]]) -> tuple[str, str]:
    writes = [str(r["write"]) for r in records if "write" in r]
    programs = [str(r["program"]) for r in records if "program" in r]
    network = [str(r["network"]) for r in records if "network" in r]
    refused = ""
    if writes:
        refused = f"write outside sandbox: {writes[0]}" + (f" (+{len(writes) - 1} more)" if len(writes) > 1 else "")
    elif programs:
        refused = f"refused to start another program ({programs[0]}): its writes could not be checked"
    elif network:
        refused = f"network access refused: {network[0]}" + (f" (+{len(network) - 1} more)" if len(network) > 1 else "")
    if timed_out:
        return "timeout", f"timed out after {timeout:g} s (wall clock)" + (f"; {refused}" if refused else "")
    if refused:
        return "error", refused
    exc = next((r for r in records if "exc" in r), None)
    if exc is not None:
        where = f" (line {exc['line']})" if exc.get("line") else ""
        text = f"{exc['exc']}: {exc['msg']}" if exc.get("msg") else str(exc["exc"])
        return ("fail" if exc["exc"] == "AssertionError" else "error"), text + where
    if returncode == 0:
        if any(r.get("done") for r in records):
            return "pass", "ok"
        return "error", "the program exited with code 0 before its end (sys.exit or os._exit), so not all its code ran"
    if returncode > 0:
        return "error", f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return "error", f"killed by {name}{_SIGNAL_HINTS.get(name, '')}"


def _rmtree(path: str) -> None:
    def unlock(func: Any, p: str, exc: Any) -> None:  # a candidate may have chmod-ed a folder to 000
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=unlock)


@contextmanager
def _scratch(uid: int | None) -> Iterator[tuple[str, str]]:
    """A fresh working directory for the candidate (owned by its uid) and a private one for
    its source, result and output files; both removed afterwards."""
    work = os.path.realpath(tempfile.mkdtemp(prefix="mlxtune-sandbox-"))
    private = tempfile.mkdtemp(prefix="mlxtune-sandbox-io-")
    try:
        if uid is not None:
            os.chown(work, uid, uid)
        yield work, private
    finally:
        _rmtree(work)
        _rmtree(private)


def _launch(source: str, work: str, private: str, uid: int | None, limits: dict[str, int]) -> subprocess.Popen:
    with open(os.path.join(private, "candidate.py"), "w", encoding="utf-8", errors="replace") as f:
        f.write(source)
    src_fd = os.open(os.path.join(private, "candidate.py"), os.O_RDONLY)
    res_fd = os.open(os.path.join(private, "result.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    config = {"uid": uid, "work": work, "src_fd": src_fd, "res_fd": res_fd, "netns": NET_NAMESPACE, **limits}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work,
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        with open(os.path.join(private, "output"), "wb") as out:
            return subprocess.Popen(
                [sys.executable, "-I", "-B", CHILD_SCRIPT, json.dumps(config)], cwd=work, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, pass_fds=(src_fd, res_fd),
                start_new_session=True)
    finally:
        os.close(src_fd)
        os.close(res_fd)


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 32,
                max_file_mb: int = 16) -> Outcome:
    """Run one Python program in the sandbox (see the module docstring) and classify the result."""
    _check_limits(timeout, memory_mb, max_processes, max_file_mb)
    with _maybe_private_uid() as uid, _scratch(uid) as (work, private):
        # RLIMIT_NPROC counts all tasks of the real uid: a private uid starts from 0, a user's own does not
        nproc = max_processes if uid is not None else _count_tasks(os.getuid()) + max_processes
        limits = {"cpu": math.ceil(timeout) + 1, "memory": memory_mb << 20, "fsize": max_file_mb << 20, "nproc": nproc}
        start = time.monotonic()
        proc = _launch(source, work, private, uid, limits)
        try:
            timed_out = _wait_exit(proc, timeout)
            seconds = time.monotonic() - start
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet: its group id is still ours
            except (ProcessLookupError, PermissionError):
                pass
            if uid is not None:
                _kill_uid(uid)
            proc.wait()
        records = _read_records(os.path.join(private, "result.jsonl"))
        setup = next((r["setup_error"] for r in records if "setup_error" in r), None)
        if setup:
            raise MlxtuneError(f"sandbox: {setup}")
        status, reason = _classify(proc.returncode, timed_out, timeout, records)
        network = next((str(r["net_guard"]) for r in records if "net_guard" in r), "")
        return Outcome(status, reason, round(seconds, 4), _read_output(os.path.join(private, "output")), network)


def run_programs(sources: list[str], *, workers: int = 2, progress: bool = False, **limits: Any) -> list[Outcome]:
    """Run many programs, ``workers`` at a time, each in its own sandbox; results in input order.

    ``limits`` are run_program's keyword arguments (timeout, memory_mb, max_processes, max_file_mb).
    With ``progress``, a last line says which network protection was in force."""
    if workers < 1:
        raise ValueError("run_programs: workers must be >= 1")
    results: list[Outcome | None] = [None] * len(sources)
    passed = 0
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(run_program, src, **limits): i for i, src in enumerate(sources)}
        for done, fut in enumerate(as_completed(futures), 1):
            outcome = fut.result()
            results[futures[fut]] = outcome
            passed += outcome.status == "pass"
            if progress:
                print(f"\rsandbox: {done}/{len(sources)} programs run, {passed} passed", end="", file=sys.stderr, flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if progress and sources:
            print(file=sys.stderr)
            for guard in sorted({r.network for r in results if r is not None and r.network in NETWORK_NOTES}):
                print(NETWORK_NOTES[guard], file=sys.stderr)
    return [r for r in results if r is not None]


# ------------------------------------------------------------------ building programs


def extract_code(completion: str) -> str:
    """The code in a model's answer: the first ```python (or ```py) block if there is one,
    else the first ``` block of any kind; an unclosed block (generation cut off) runs to the
    end. Without a fence the text itself, cut at the first special token (``<|...|>``,
    ``</s>``) and without leading blank lines or trailing whitespace; indentation is kept,
    since a HumanEval-style completion continues a function body."""
    import re

    fence = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
    blocks = [(m.group(1).lower(), m.group(2)) for m in fence.finditer(completion)]
    if blocks:
        code = next((body for lang, body in blocks if lang in ("python", "py", "python3")), blocks[0][1])
        return code.rstrip() + "\n"
    text = re.split(r"<\|[\w.-]+\|>|</s>", completion, maxsplit=1)[0]
    lines = text.rstrip().split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines) + "\n" if lines else ""


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that checks one HumanEval-style completion.

    When the completion defines ``entry_point`` itself (a chat model writes the whole function),
    it replaces the prompt's stub: it comes after the prompt, which is kept in front for its
    imports and helper functions when it compiles on its own (else the completion runs alone).
    Otherwise the completion continues the prompt. Then the test code, and ``check(entry_point)``
    when an entry point is given (without one, ``test`` must run its own asserts)."""
    import re

    if entry_point and re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", completion, re.M):
        try:
            compile(prompt, "<prompt>", "exec")  # compiling runs nothing
            code = prompt.rstrip() + "\n\n\n" + completion
        except (SyntaxError, ValueError):
            code = completion
    else:
        code = prompt + completion
    program = code.rstrip() + "\n\n\n" + test.rstrip() + "\n"
    if entry_point:
        program += f"\n\ncheck({entry_point})\n"
    return program
