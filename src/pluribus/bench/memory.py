"""Peak memory of a process, and the chunked exact KL's peak at a large vocabulary.

Peak memory is the resident high-water mark (Linux VmHWM). `reset_peak` sets it back to the current
RSS (`/proc/self/clear_refs`), so the peak of one phase can be read above what existed before it;
where Linux refuses, the figure is the process's whole peak and is marked as such.
"""

from __future__ import annotations

import resource
import time

GIB = 1 << 30
MIB = 1 << 20


def rss_bytes(field: str = "VmRSS") -> int | None:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    hwm = rss_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def chunked_kl_peak(positions: int, vocab: int, dim: int, chunk: int) -> dict:
    """One forward + backward of `reverse_kl_chunked` on random inputs; the peak RSS above the inputs.

    The figure counts the chunk buffers, the KL and the gradients (the head's `[V, D]` gradient included),
    not the inputs. One `[N, V]` float32 buffer, what a naive KL holds several of, is given for scale.
    """
    import torch

    from pluribus.core import reverse_kl_chunked

    def run(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size):
        kl = reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size)
        kl.mean().backward()
        return kl

    # Thread pools and allocator arenas start on first use: start them on toy sizes, outside the figure.
    run(torch.randn(8, 4, requires_grad=True), torch.randn(64, 4, requires_grad=True), torch.randn(8, 4),
        torch.randn(64, 4), 4)
    generator = torch.Generator().manual_seed(0)
    # In place: `randn(...) * s` would briefly hold two copies and raise the baseline.
    student_hidden = torch.randn(positions, dim, generator=generator).requires_grad_()
    student_head = torch.randn(vocab, dim, generator=generator).mul_(2 / dim**0.5).requires_grad_()
    teacher_hidden = torch.randn(positions, dim, generator=generator)
    teacher_head = torch.randn(vocab, dim, generator=generator).mul_(2 / dim**0.5)
    inputs = sum(t.numel() * t.element_size() for t in (student_hidden, student_head, teacher_hidden, teacher_head))
    baseline = rss_bytes()
    reset = reset_peak()
    if baseline is None or not reset:
        baseline = peak_bytes()
    start = time.perf_counter()
    kl = run(student_hidden, student_head, teacher_hidden, teacher_head, chunk)
    seconds = time.perf_counter() - start
    peak = peak_bytes() - baseline
    full_logits = positions * vocab * 4
    return {"positions": positions, "vocab": vocab, "dim": dim, "chunk": chunk, "seconds": seconds,
            "peak_above_inputs_gib": peak / GIB, "inputs_gib": inputs / GIB, "full_logits_gib": full_logits / GIB,
            "peak_to_full_logits_ratio": peak / full_logits, "peak_reset": reset, "mean_kl": kl.mean().item()}
