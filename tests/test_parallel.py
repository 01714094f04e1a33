"""`pluribus.parallel.run_all`: jobs side by side in spawned processes, results in order, no orphans."""

import os
import select
import subprocess
import sys
import textwrap

import pytest

from pluribus.parallel import run_all


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def _fail(x: int) -> int:
    if x == 2:
        raise ValueError("job 2 failed")
    return x


def test_results_come_back_in_the_order_of_the_jobs():
    out = run_all(_square_and_pid, [(x,) for x in range(5)], workers=2)
    assert [r for r, _ in out] == [0, 1, 4, 9, 16]
    assert os.getpid() not in {pid for _, pid in out}  # in worker processes
    assert run_all(_square_and_pid, [(3,)], workers=2) == [(9, os.getpid())]  # one job: no process
    assert [r for r, _ in run_all(_square_and_pid, [(x,) for x in range(3)], workers=1)] == [0, 1, 4]


def test_a_failed_job_fails_the_call():
    with pytest.raises(ValueError, match="job 2 failed"):
        run_all(_fail, [(x,) for x in range(4)], workers=2)


def test_workers_die_with_their_parent(tmp_path):
    """A kill -9 of the run leaves no worker writing into a stage a restarted run resumes."""
    pid_file = tmp_path / "worker.pid"
    script = textwrap.dedent(f"""
        import os, signal
        from pluribus.parallel import run_all

        def job(i):
            if i == 0:
                return i
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            os.kill(os.getppid(), signal.SIGKILL)  # the run dies as kill -9 would end it
            signal.pause()  # blocks: only a signal (the parent's death) ends this worker

        if __name__ == "__main__":
            run_all(job, [(0,), (1,)], workers=2)
    """)
    (tmp_path / "run.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py")], cwd=tmp_path,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == -9
    worker = int(pid_file.read_text())
    try:
        fd = os.pidfd_open(worker)
    except ProcessLookupError:
        return  # gone already
    try:
        readable, _, _ = select.select([fd], [], [], 30)  # a pidfd turns readable when its process ends
    finally:
        os.close(fd)
    if not readable:
        os.kill(worker, 9)
    assert readable, f"worker {worker} outlived its killed parent"
