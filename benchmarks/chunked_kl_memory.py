"""Peak CPU memory of the exact reverse KL, forward + backward: chunked through the heads vs. naive.

    python benchmarks/chunked_kl_memory.py                # N=4096, V=131072, D=256, chunk=1024
    python benchmarks/chunked_kl_memory.py --naive        # also the naive path (~10 GiB)
    python benchmarks/chunked_kl_memory.py --smoke        # small sizes, seconds

Each measurement runs in a fresh subprocess. The process's resident high-water mark (VmHWM) is
reset to the current RSS once the inputs exist (Linux `/proc/self/clear_refs`, falling back to
`ru_maxrss`), so the figure is the peak above the inputs: logits, log-softmaxes and the gradients
(the head's `[V, D]` gradient included). Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 1 << 30


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    hwm = _rss_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: str, n: int, vocab: int, dim: int, chunk: int) -> dict:
    """Runs in the worker process: one forward + backward, peak RSS above the inputs."""
    import torch

    from pluribus.core import reverse_kl, reverse_kl_chunked

    def run(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size):
        if path == "chunked":
            kl = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size)
        else:
            kl = reverse_kl(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T)
        kl.mean().backward()
        return kl

    # Thread pools and allocator arenas start on first use; start them on toy sizes so their
    # one-off cost is not charged to the measurement.
    toy = [torch.randn(8, 4, requires_grad=True), torch.randn(64, 4, requires_grad=True), torch.randn(8, 4), torch.randn(64, 4)]
    run(*toy, 4)

    generator = torch.Generator().manual_seed(0)
    # In-place scaling: `randn(...) * s` would briefly hold two copies and raise the baseline peak.
    student_hidden = torch.randn(n, dim, generator=generator).requires_grad_()
    student_head = torch.randn(vocab, dim, generator=generator).mul_(2 / dim**0.5).requires_grad_()
    teacher_hidden = torch.randn(n, dim, generator=generator)
    teacher_head = torch.randn(vocab, dim, generator=generator).mul_(2 / dim**0.5)
    input_bytes = sum(t.numel() * t.element_size() for t in (student_hidden, student_head, teacher_hidden, teacher_head))

    baseline = _rss_bytes("VmRSS")
    reset = _reset_peak()
    if baseline is None or not reset:
        baseline = _peak_bytes()  # the best available: the high-water mark so far
    start = time.perf_counter()
    kl = run(student_hidden, student_head, teacher_hidden, teacher_head, chunk)
    seconds = time.perf_counter() - start
    peak = _peak_bytes()
    return {
        "path": path,
        "peak_above_inputs_gib": (peak - baseline) / GIB,
        "inputs_gib": input_bytes / GIB,
        "seconds": seconds,
        "mean_kl": kl.mean().item(),
        "peak_reset": reset,
    }


def _spawn(path: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", path,
               "--n", str(args.n), "--vocab", str(args.vocab), "--dim", str(args.dim), "--chunk", str(args.chunk)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"path": path, "error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="positions")
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--dim", type=int, default=256, help="hidden size (student and teacher)")
    parser.add_argument("--chunk", type=int, default=1024, help="positions per chunk")
    parser.add_argument("--naive", action="store_true", help="also measure the naive path (materialises [N, V] several times)")
    parser.add_argument("--smoke", action="store_true", help="N=256, V=4096, D=32, chunk=64")
    parser.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.n, args.vocab, args.dim, args.chunk = 256, 4096, 32, 64

    if args.worker:
        print(json.dumps(measure(args.worker, args.n, args.vocab, args.dim, args.chunk)))
        return

    chunk_buffer_gib = args.chunk * args.vocab * 4 / GIB
    print(f"reverse KL forward+backward, float32 CPU: N={args.n} V={args.vocab} D={args.dim} chunk={args.chunk}")
    print(f"one [chunk, V] buffer: {chunk_buffer_gib:.3f} GiB; one [N, V] buffer: {args.n * args.vocab * 4 / GIB:.3f} GiB")
    results = [_spawn("chunked", args)] + ([_spawn("naive", args)] if args.naive else [])
    for result in results:
        if "error" in result:
            print(f"  {result['path']:8s} failed: {result['error']}")
            continue
        note = "" if result["peak_reset"] else "  (peak not resettable here: figure is a lower bound)"
        print(f"  {result['path']:8s} peak above inputs {result['peak_above_inputs_gib']:7.3f} GiB"
              f"   inputs {result['inputs_gib']:.3f} GiB   {result['seconds']:6.1f} s   mean KL {result['mean_kl']:.6f}{note}")
    if len(results) == 2 and all("error" not in r for r in results):
        difference = abs(results[0]["mean_kl"] - results[1]["mean_kl"])
        print(f"  |mean KL chunked − naive| = {difference:.2e}")


if __name__ == "__main__":
    main()
