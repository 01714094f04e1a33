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


FAULTS = textwrap.dedent("""
    import resource, torch
    from pluribus.parallel import keep_freed_memory
    keep_freed_memory()
    from pluribus.models import random_causal_lm, tiny_config
    from pluribus.models.lean import predicting_hidden_states
    torch.manual_seed(0)
    model = random_causal_lm(tiny_config(2, 103, "qwen2"))
    prompts = [[1 + (7 * b + j) % 100 for j in range(20)] for b in range(32)]
    responses, mask = torch.randint(3, 100, (32, 32)), torch.ones(32, 32, dtype=torch.bool)
    def step():  # a teacher's forward over 32 rollouts: activations of ~1-2 MiB, made and freed each time
        with torch.no_grad():
            return predicting_hidden_states(model, prompts, responses, mask).sum()
    for _ in range(10):  # the heap grows to its working size
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    def faults(setting: str) -> int:
        env = dict(os.environ, PLURIBUS_MALLOC=setting, OMP_NUM_THREADS="1")
        return int(subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 4_000  # glibc hands freed activations back and faults fresh pages in (18,000-78,000 measured)
    assert kept * 5 < default  # 16-730 measured (up to 2,100 after 3 warm-up steps instead of 10)
