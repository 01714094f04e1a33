"""The code sandbox: correct verdicts on HumanEval/MBPP-style checks, and containment of attacks.

Every sandbox test runs once per isolation level that works here; a level that does not work is
skipped with the probe's reason, and a guarantee a level does not make (see the table in
`pluribus.rewards.sandbox`) is skipped with that reason instead of asserted.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pluribus.rewards import sandbox
from pluribus.rewards.code import build_test_source, check_program, check_programs_batch, extract_code
from pluribus.rewards.sandbox import (
    ISOLATION_LEVELS,
    MAX_PROCESSES,
    OUTPUT_LIMIT_BYTES,
    SandboxUnavailable,
    run_many,
    run_python,
)

REPO = Path(__file__).resolve().parents[1]
FORCE_NAME = {"bubblewrap": "bwrap", "rlimits+namespaces": "namespaces", "rlimits": "rlimits"}
IS_ROOT = os.geteuid() == 0


@pytest.fixture(params=ISOLATION_LEVELS)
def level(request, monkeypatch) -> str:
    """Force one isolation level for the test (skipped, with the probe's reason, if it fails here)."""
    reason = sandbox.unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} sandbox does not work on this machine: {reason}")
    monkeypatch.setenv("PLURIBUS_SANDBOX", FORCE_NAME[request.param])
    return request.param


def sandboxed_processes(marker: str) -> list[int]:
    """Live processes on the host whose command line contains `marker` (any user)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in arg for arg in cmdline):
            found.append(int(entry))
    return found


def running_programs() -> list[int]:
    """Processes that are sandboxed programs (their command line ends with `-I -S main.py`)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if cmdline[-3:] == [b"-I", b"-S", b"main.py"]:
            found.append(int(entry))
    return found


# ---------------------------------------------------------------- verdicts


ADD = "def add(a, b):\n    return a + b\n"
ADD_WRONG = "def add(a, b):\n    return a - b\n"
HUMANEVAL_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
MBPP_TESTS = ["assert add(2, 3) == 5", "assert add(0, 0) == 0"]


def test_verdicts_humaneval_mbpp_and_syntax_error(level):
    programs = [ADD, ADD_WRONG, ADD, ADD_WRONG, "def add(a, b)\n    return a + b\n", ADD + "while True:\n    pass\n"]
    tests = [HUMANEVAL_TESTS, HUMANEVAL_TESTS, MBPP_TESTS, MBPP_TESTS, MBPP_TESTS, MBPP_TESTS]
    entry_points = ["add", "add", None, None, None, None]
    rewards = check_programs_batch(programs, tests, entry_points, timeout_s=1.0)
    assert rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert check_program(ADD, HUMANEVAL_TESTS, "add", timeout_s=5.0) == 1.0


def test_humaneval_check_is_called():
    """Without the `check(entry_point)` line a HumanEval test would pass vacuously."""
    source = build_test_source(ADD_WRONG, HUMANEVAL_TESTS, "add")
    assert source.rstrip().endswith("check(add)")
    with pytest.raises(ValueError, match="identifier"):
        build_test_source(ADD, HUMANEVAL_TESTS, "add); import os; os.system('x')")


def test_stdin_stdout_and_output_bound(level):
    result = run_python("import sys\nprint(sys.stdin.read().upper())\nprint('x' * 300_000)", stdin="hello")
    assert result.ok and result.isolation == level
    assert result.stdout.startswith("HELLO\n")
    assert len(result.stdout.encode()) == OUTPUT_LIMIT_BYTES


def test_extract_code():
    text = "Plan.\n```python\nx = 1\n```\nthen\n```py\ndef f():\n    return 2\n```\nDone."
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```python\nprint(1)\n```\n```text\nout\n```") == "print(1)\n"
    assert extract_code("```python\ndef g():\n    return 3") == "def g():\n    return 3"
    assert extract_code("def h(): pass") == "def h(): pass"


def test_forcing_an_unknown_level_is_an_error(monkeypatch):
    monkeypatch.setenv("PLURIBUS_SANDBOX", "docker")
    with pytest.raises(SandboxUnavailable, match="docker"):
        run_python("print(1)")


# ---------------------------------------------------------------- attacks


@pytest.mark.parametrize("where", ["repo", "tmp"])
def test_writing_outside_the_scratch_directory_fails(level, where):
    if where == "tmp" and level == "rlimits":
        pytest.skip("the rlimits level cannot keep a program out of world-writable /tmp (documented)")
    if where == "repo" and level == "rlimits" and not IS_ROOT:
        pytest.skip("the rlimits level as non-root runs as the caller's uid, which may write the repo")
    target = (REPO if where == "repo" else Path("/tmp")) / f"pluribus_attack_{secrets.token_hex(6)}"
    program = f"""
        import os
        try:
            with open({str(target)!r}, "w") as f:
                f.write("pwned")
            print("wrote")
        except OSError as exc:
            print("refused", exc.errno)
        os.makedirs("inside/ok", exist_ok=True)  # the scratch directory itself is writable
        open("inside/ok/file.txt", "w").write("fine")
    """
    try:
        result = run_python(textwrap.dedent(program), timeout_s=5.0)
        assert result.ok, result.stderr
        if where == "tmp" and level == "bubblewrap":  # /tmp is the sandbox's own tmpfs: wrote there
            assert result.stdout.startswith("wrote"), result.stdout
        else:
            assert result.stdout.startswith("refused"), result.stdout
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_no_connection_to_a_loopback_listener(level):
    if level == "rlimits":
        pytest.skip("the rlimits level has no network isolation (documented)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"""
            import socket
            s = socket.socket()
            s.settimeout(2.0)
            try:
                s.connect(("127.0.0.1", {port}))
                print("connected")
            except OSError as exc:
                print("failed", type(exc).__name__)
        """
        result = run_python(textwrap.dedent(program), timeout_s=5.0)
        assert result.ok, result.stderr
        assert result.stdout.startswith("failed"), result.stdout
        with pytest.raises(BlockingIOError):  # nothing ever reached the listener
            server.accept()


def test_fork_bomb_is_bounded_and_cleaned_up(level):
    assert running_programs() == []
    program = """
        import os, signal
        n = 0
        try:
            while n < 10_000:
                if os.fork() == 0:
                    signal.pause()
                    os._exit(0)
                n += 1
        except OSError:
            print("fork refused after", n, flush=True)
        while True:  # then every process keeps forking until the wall timeout
            try:
                os.fork()
            except OSError:
                pass
    """
    result = run_python(textwrap.dedent(program), timeout_s=1.5)
    assert result.timed_out and not result.ok
    assert result.wall_s <= 2.5
    words = result.stdout.split()
    assert words[:3] == ["fork", "refused", "after"], (result.stdout, result.stderr)
    assert int(words[3]) < MAX_PROCESSES
    assert running_programs() == []
    assert subprocess.run([sys.executable, "-c", "print('alive')"], capture_output=True, text=True).stdout == "alive\n"


def test_memory_hog_fails_quickly(level):
    result = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')", timeout_s=10.0, memory_mb=512)
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr
    assert "allocated" not in result.stdout
    assert result.wall_s < 5.0


def test_infinite_loop_times_out(level):
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and not result.ok
    assert 1.0 <= result.wall_s <= 2.0
    assert running_programs() == []


def test_parent_environment_is_invisible(level, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("PLURIBUS_TEST_SECRET", secret)
    program = """
        import os
        print(sorted(os.environ))
        for pid in ("self", os.getppid(), 1):
            try:
                print(open(f"/proc/{pid}/environ", "rb").read())
            except OSError as exc:
                print("unreadable", exc.errno)
    """
    result = run_python(textwrap.dedent(program))
    assert result.ok, result.stderr
    assert secret not in result.stdout
    assert result.stdout.splitlines()[0] == str(
        sorted(["HOME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "TMPDIR"])
    )


def test_program_cannot_kill_the_process_that_launched_it(level, tmp_path):
    if level == "rlimits" and not IS_ROOT:
        pytest.skip("the rlimits level as non-root runs as the caller's uid, which may signal it (documented)")
    # The attack targets a decoy: a helper process, in its own session, that runs the sandbox. Even
    # if isolation failed, the signals could reach only the helper, never pytest.
    helper = """
        import os, sys, textwrap
        from pluribus.rewards.sandbox import run_python
        attack = f'''
        import os, signal
        for name, attempt in [
            ("parent", lambda: os.kill(os.getppid(), signal.SIGKILL)),
            ("helper", lambda: os.kill({os.getpid()}, signal.SIGKILL)),
            ("helper-group", lambda: os.killpg({os.getpgid(0)}, signal.SIGKILL)),
        ]:
            try:
                attempt()
                print(name, "sent")
            except OSError as exc:
                print(name, "refused", type(exc).__name__)
        '''
        result = run_python(textwrap.dedent(attack), timeout_s=5.0)
        print(result.stdout, end="")
        print("helper survived", result.ok)
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PLURIBUS_SANDBOX": FORCE_NAME[level]}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(helper)],
        env=env, capture_output=True, text=True, timeout=30, start_new_session=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    assert "helper survived True" in lines
    assert [line.split()[:2] for line in lines[1:3]] == [["helper", "refused"], ["helper-group", "refused"]]


def test_background_children_die_with_the_program(level):
    if level == "rlimits" and not IS_ROOT:
        pytest.skip("the rlimits level as non-root cannot find processes that left the group (documented)")
    marker = f"pluribus_marker_{secrets.token_hex(6)}"
    program = f"""
        import os, subprocess, sys
        sleeper = [sys.executable, "-c", "import time  # {marker}\\ntime.sleep(60)"]
        child = subprocess.Popen(sleeper, start_new_session=True)
        if os.fork() == 0:  # a classic daemon: double fork and setsid
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, sleeper)
            os._exit(0)
        os.wait()
        os.kill(child.pid, 0)  # raises if the child is not alive when the program ends
        print("left a child behind")
    """
    result = run_python(textwrap.dedent(program), timeout_s=5.0)
    assert result.ok, result.stderr
    assert result.stdout == "left a child behind\n"
    assert sandboxed_processes(marker) == []


# ---------------------------------------------------------------- throughput


def test_run_many_in_parallel_keeps_order(level):
    sources = [f"import sys\nprint(sum(range({i} * 1000)), {i})" for i in range(8)]
    results = run_many(sources, max_workers=4, timeout_s=10.0)
    assert [r.ok for r in results] == [True] * 8
    assert [r.stdout for r in results] == [f"{sum(range(i * 1000))} {i}\n" for i in range(8)]
    assert {r.isolation for r in results} == {level}
