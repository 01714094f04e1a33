"""Native CPU kernels for the lean forwards (`pluribus.models.lean`), compiled at first use.

On a small model a CPU step spends much of its time outside the matrix multiplies: in ATen's cost per op (a decode
step's dozens of tiny ops a layer; RMSNorm runs as six of them, RoPE as four) and in memory passes (a training
step's elementwise chains and their backward). `cpu_kernels.cc`, next to this file, does in one call each:

- for decoding (`LeanDecoder.step`): RoPE on the new token's queries and keys, its key and value written into the
  cache, and each head's masked softmax attention over the cache (`attention`; ATen ran it as two batched products
  of B·H one-row matrices, multiplied one by one); the residual add and the RMSNorm after it (`add_rms_norm`);
  the gated MLP's SiLU(gate)·up (`silu_mul`); for the prefill (`LeanDecoder.prefill`, each context's tokens once in
  one packed list, its attention through `packed_attention`), the keys and values written into each row's cache
  (`write_cache`);
- for training (`predicting_hidden_states`; forward and backward, as autograd functions): the packed attention
  (`packed_attention`, in place of SDPA on the gathered rows), RMSNorm, RoPE and SiLU·up.

The matrix multiplies stay PyTorch's. The decode kernels run on one thread; the training kernels split their rows
over torch's threads with OpenMP, in the runtime torch has already loaded (`libgomp.so.1`: one thread team, and
`torch.set_num_threads` rules both), and give the same results on any number of threads (each row's sums in one
order; the gradients of keys shared by rows added in row order after the threads). Measured on the bench's model
(docs/performance.md, sessions 13-14): a 32-row decode step 1.3-1.5× faster, an OPD update after the rollout -10% on
one thread, pretraining on two threads -11%. Every backward adds in a fixed order (the same gradients every run).

The source is compiled for this CPU (`-march=native`) with the head size built in, by `$CXX` (else `c++`), once
per source, head size and CPU, into `$PLURIBUS_KERNEL_CACHE` (default `~/.cache/pluribus/kernels`); each process
then loads the built library (milliseconds). No compiler, a failed build, or `PLURIBUS_KERNELS=0` give None, and
the lean forwards keep PyTorch's ops. Float32 on the CPU only; the callers check that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# Keys scored at a time by `decode_attention` (its BLOCK): a cache's width must be a multiple of it.
BLOCK = 64
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared")
# The library then needs libgomp.so.1, which the dynamic loader finds already loaded with torch: one OpenMP runtime.
OPENMP_FLAGS = ("-fopenmp",)
MAX_HEAD_DIM = 512
# The largest weight a decode kernel reads through ahead of its matmul (`warm`): half of a 1 MiB L2 (AMD Zen 4;
# Intel's server cores have 1-2 MiB). A larger one would not stay in the cache for the matmul, which would read it
# from memory again: one more pass over weights that a bigger model's decode is already bound by.
WARM_MAX_BYTES = 512 << 10
Span = tuple[int | None, int]  # (address, bytes): what a decode kernel reads through ahead of the next matmul
NO_SPAN: Span = (None, 0)


class CpuKernels:
    """The compiled kernels for one head size. Every tensor is float32, contiguous, on the CPU; shapes below."""

    def __init__(self, library: ctypes.CDLL, head_dim: int):
        self.head_dim = head_dim
        p, n, i, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        signatures = {"decode_attention": [p, n, p, p, p, p, p, n, p, n, p, i, i, i, i, f, p, n],
                      "add_rms_norm": [p, p, p, p, i, i, f, p, n], "silu_mul": [p, p, n, p, i, i, p, n],
                      "silu_mul_backward": [p, p, p, p, p, n], "rms_norm_forward": [p, p, p, p, i, i, f],
                      "rms_norm_backward": [p, p, p, p, p, p, i, i], "rope_rows": [p, p, p, p, i, i, i],
                      "write_cache": [p, n, p, n, p, p, i, i, n, i, p, p],
                      "packed_attention_forward": [p, p, p, i, i, p, p, p, p, i, i, i, f, p, p],
                      "packed_attention_backward": [p, p, p, i, i, p, p, p, i, i, i, f, p, p, p, p, p, p]}
        for name, argtypes in signatures.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, None
            setattr(self, f"_{name}", function)

    # `warm`, in the decode step's kernels: the weight of the matrix multiply that comes next, as `warm_span` gives it
    # (worked out once per batch by the caller), read through at the end of the kernel (cpu_kernels.cc, `warm`) so
    # that the multiply finds it in the core's caches.

    def attention(self, qkv_B_X: Tensor, cos_P_d: Tensor, signed_sin_P_d: Tensor, position_B: Tensor,
                  keys_t_B_Hkv_d_L: Tensor, values_B_Hkv_L_d: Tensor, mask_B_L: Tensor, column: int,
                  heads: int, warm: Span = NO_SPAN) -> Tensor:
        """Attention output `[B, H·d]` of one new token per row, whose fused projection is `qkv_B_X`
        (`X = (H + 2·Hkv)·d`: queries, keys, values); writes its key and value at `column` of the caches first.

        cos/signed_sin: `_rope_table`'s, indexed by `position_B` (int64). keys_t: keys transposed, `[B, Hkv, d, L]`;
        values `[B, Hkv, L, d]`; mask_B_L additive (0 or -inf), columns ≤ `column` read; L a multiple of BLOCK.
        """
        B, kv_heads, d, L = keys_t_B_Hkv_d_L.shape
        out = torch.empty(B, heads * d, dtype=torch.float32, device="cpu")
        self._decode_attention(qkv_B_X.data_ptr(), qkv_B_X.shape[-1], cos_P_d.data_ptr(), signed_sin_P_d.data_ptr(),
                               position_B.data_ptr(), keys_t_B_Hkv_d_L.data_ptr(), values_B_Hkv_L_d.data_ptr(), L,
                               mask_B_L.data_ptr(), mask_B_L.shape[-1], out.data_ptr(), B, heads, kv_heads, column,
                               d ** -0.5, *warm)
        return out

    def add_rms_norm(self, x_B_D: Tensor, residual_B_D: Tensor | None, weight_D: Tensor, eps: float,
                     out_B_D: Tensor, warm: Span = NO_SPAN) -> Tensor:
        """`x += residual` in place (when given), then `out = RMSNorm(x)·weight` (float32 statistics)."""
        rows, D = x_B_D.shape
        self._add_rms_norm(x_B_D.data_ptr(), None if residual_B_D is None else residual_B_D.data_ptr(),
                           weight_D.data_ptr(), out_B_D.data_ptr(), rows, D, eps, *warm)
        return out_B_D

    def silu_mul(self, gate_up_B_2I: Tensor, warm: Span = NO_SPAN) -> Tensor:
        """SiLU(gate)·up `[B, I]` of the gated MLP's fused projection `[B, 2·I]` (gate columns first)."""
        rows, width = gate_up_B_2I.shape
        out = torch.empty(rows, width // 2, dtype=torch.float32, device="cpu")
        self._silu_mul(gate_up_B_2I.data_ptr(), gate_up_B_2I.data_ptr() + 4 * (width // 2), width, out.data_ptr(),
                       rows, width // 2, *warm)
        return out

    def write_cache(self, k_N_Hkv_d: Tensor, v_N_Hkv_d: Tensor, start_B: Tensor, length_B: Tensor, longest: int,
                    keys_t_B_Hkv_d_L: Tensor, values_B_Hkv_L_d: Tensor) -> None:
        """Row b's context, packed tokens `start[b] : start[b] + length[b]` of k and v, into its cache right-aligned
        at column `longest` (keys transposed, as `attention` reads them). k and v: rows of Hkv contiguous heads
        (views into a fused projection are fine); start, length: int64."""
        B, kv_heads, d, L = keys_t_B_Hkv_d_L.shape
        for x in (k_N_Hkv_d, v_N_Hkv_d):
            if x.shape[1:] != (kv_heads, d) or x.stride()[1:] != (d, 1):
                raise ValueError(f"write_cache: expected rows of {kv_heads} contiguous heads of {d}, got shape "
                                 f"{tuple(x.shape)}, strides {x.stride()}")
        self._write_cache(k_N_Hkv_d.data_ptr(), k_N_Hkv_d.stride(0), v_N_Hkv_d.data_ptr(), v_N_Hkv_d.stride(0),
                          start_B.data_ptr(), length_B.data_ptr(), B, kv_heads, L, longest,
                          keys_t_B_Hkv_d_L.data_ptr(), values_B_Hkv_L_d.data_ptr())

    # --- training (differentiable) -------------------------------------------------------------------------

    def rms_norm(self, x_N_D: Tensor, weight_D: Tensor, eps: float) -> Tensor:
        """RMSNorm(x)·weight with float32 statistics, differentiable in x and weight."""
        return _RMSNorm.apply(x_N_D, weight_D, eps, self)

    def rope(self, x_N_H_d: Tensor, cos_N_d: Tensor, signed_sin_N_d: Tensor) -> Tensor:
        """RoPE of every head of each row with that row's `_rope_table` rows, differentiable in x."""
        return _Rope.apply(x_N_H_d, cos_N_d, signed_sin_N_d, self)

    def silu_mul_split(self, gate_N_I: Tensor, up_N_I: Tensor) -> Tensor:
        """SiLU(gate)·up, differentiable in both."""
        return _SiluMul.apply(gate_N_I, up_N_I, self)

    def packed_attention(self, q_N_H_d: Tensor, k_N_Hkv_d: Tensor, v_N_Hkv_d: Tensor, queries_G_Q: Tensor,
                         keys_G_K: Tensor, mask_G_1_Q_K: Tensor, queried_G: Tensor | None = None) -> Tensor:
        """Attention of the packed training forward, differentiable in q, k and v: `[G·Q, H·d]`, row g's query i
        (token `queries[g, i]`) over its keys (tokens `keys[g]`) under the additive mask; equal to SDPA on the
        gathered rows up to float rounding. Its backward adds the gradients of a key shared by several rows in
        a fixed order (deterministic, as `lean._rows` is).
        queried_G: how many of each row's first queries are real (int64); the others are padding, never read:
        their outputs are zeros, not computed. None: all Q."""
        return _PackedAttention.apply(q_N_H_d, k_N_Hkv_d, v_N_Hkv_d, queries_G_Q, keys_G_K, mask_G_1_Q_K, queried_G,
                                      self)


def warm_span(tensor: Tensor | None) -> Span:
    """(address, bytes) of a contiguous CPU tensor for a kernel's `warm`; NO_SPAN, nothing read, for none, one that
    is not one block of memory, or one larger than WARM_MAX_BYTES."""
    if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return NO_SPAN
    size = tensor.numel() * tensor.element_size()
    return (tensor.data_ptr(), size) if size <= WARM_MAX_BYTES else NO_SPAN


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, queries: Tensor, keys: Tensor, mask: Tensor,
                queried: Tensor | None, kernels: CpuKernels) -> Tensor:
        q, k, v, queries, keys, mask = (t.contiguous() for t in (q, k, v, queries, keys, mask))
        (N, H, d), Hkv, (G, Q), K = q.shape, k.shape[1], queries.shape, keys.shape[1]
        if queried is not None:
            queried = queried.to(torch.long).contiguous()
            if queried.shape != (G,):
                raise ValueError(f"packed_attention: queried_G must have shape ({G},), got {tuple(queried.shape)}")
        out = torch.empty(G * Q, H * d, dtype=torch.float32, device="cpu")
        lse = torch.empty(G, H, Q, dtype=torch.float32, device="cpu")
        kernels._packed_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), H, Hkv, queries.data_ptr(),
                                          keys.data_ptr(), mask.data_ptr(),
                                          None if queried is None else queried.data_ptr(), G, Q, K, d ** -0.5,
                                          out.data_ptr(), lse.data_ptr())
        ctx.save_for_backward(q, k, v, queries, keys, mask, out, lse)
        ctx.kernels = kernels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, queries, keys, mask, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        (N, H, d), Hkv, (G, Q), K = q.shape, k.shape[1], queries.shape, keys.shape[1]
        ctx.kernels._packed_attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), H, Hkv, queries.data_ptr(),
                                               keys.data_ptr(), mask.data_ptr(), G, Q, K, d ** -0.5, out.data_ptr(),
                                               lse.data_ptr(), dout.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                               dv.data_ptr())
        return dq, dk, dv, None, None, None, None, None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, kernels: CpuKernels) -> Tensor:
        x2, weight = x.contiguous().view(-1, x.shape[-1]), weight.contiguous()
        y, rstd = torch.empty_like(x2), torch.empty(x2.shape[0], dtype=torch.float32, device="cpu")
        kernels._rms_norm_forward(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), x2.shape[0],
                                  x2.shape[1], eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.kernels, ctx.shape = kernels, x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        dx, dweight = torch.empty_like(x2), torch.zeros_like(weight)
        ctx.kernels._rms_norm_backward(dy.data_ptr(), x2.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                                       dx.data_ptr(), dweight.data_ptr(), x2.shape[0], x2.shape[1])
        return dx.view(ctx.shape), dweight, None, None


def _rope_rows(kernels: CpuKernels, x: Tensor, cos: Tensor, signed_sin: Tensor, inverse: bool) -> Tensor:
    out = torch.empty_like(x)
    kernels._rope_rows(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                       int(inverse))
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, signed_sin: Tensor, kernels: CpuKernels) -> Tensor:
        cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
        ctx.save_for_backward(cos, signed_sin)
        ctx.kernels = kernels
        return _rope_rows(kernels, x.contiguous(), cos, signed_sin, inverse=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):  # the rotation's transpose: the sine negated
        cos, signed_sin = ctx.saved_tensors
        return _rope_rows(ctx.kernels, dy.contiguous(), cos, signed_sin, inverse=True), None, None, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, kernels: CpuKernels) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        I = gate.shape[-1]
        out = torch.empty_like(gate)
        kernels._silu_mul(gate.data_ptr(), up.data_ptr(), I, out.data_ptr(), gate.numel() // I, I, None, 0)
        ctx.save_for_backward(gate, up)
        ctx.kernels = kernels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        ctx.kernels._silu_mul_backward(gate.data_ptr(), up.data_ptr(), dout.data_ptr(), dgate.data_ptr(),
                                       dup.data_ptr(), gate.numel())
        return dgate, dup, None


def _cpu_signature() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags (a library built for one CPU may not run
    on another, e.g. a home directory shared between machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep))) or platform.machine()


def cache_dir() -> Path:
    if os.environ.get("PLURIBUS_KERNEL_CACHE"):
        return Path(os.environ["PLURIBUS_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pluribus" / "kernels"


def _build(head_dim: int) -> Path:
    """The built library for `head_dim`: from the cache, or compiled into it (atomically: concurrent processes
    each write a file of their own and rename it into place). With OpenMP where the compiler has it (the training
    kernels then split their rows over torch's threads, in torch's own OpenMP runtime), else without."""
    error = None
    for openmp in (OPENMP_FLAGS, ()):
        try:
            return _build_with(head_dim, [*FLAGS, *openmp, f"-DHEAD_DIM={head_dim}"])
        except RuntimeError as failed:
            error = failed
    raise error


def _build_with(head_dim: int, flags: list[str]) -> Path:
    compiler = os.environ.get("CXX", "c++")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([compiler, *flags]).encode(), _cpu_signature().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache: a private folder in the temp directory
        folder = Path(tempfile.gettempdir()) / f"pluribus-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
        folder.mkdir(mode=0o700, exist_ok=True)
    library = folder / f"cpu-kernels-d{head_dim}-{key}.so"
    if library.exists():
        return library
    partial = folder / f".{library.name}.{os.getpid()}"
    result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"{compiler} failed: {lines[-1] if lines else 'no output'}")
    os.replace(partial, library)
    return library


def cpu_kernels(head_dim: int) -> CpuKernels | None:
    """The kernels for models with heads of `head_dim`, or None: turned off (`PLURIBUS_KERNELS=0`, read at each
    call), an odd or outsized head, Windows, or no working compiler (warned once per head size and process)."""
    if os.environ.get("PLURIBUS_KERNELS", "1") == "0" or head_dim % 2 or not 0 < head_dim <= MAX_HEAD_DIM:
        return None
    if sys.platform == "win32":  # MSVC takes none of the flags: Windows keeps the PyTorch ops
        return None
    return _load(head_dim)


@functools.cache
def _load(head_dim: int) -> CpuKernels | None:
    try:
        return CpuKernels(ctypes.CDLL(str(_build(head_dim))), head_dim)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:  # OSError: no compiler, or no loading
        warnings.warn(f"pluribus: the native CPU kernels are unavailable ({error}); decoding and training use "
                      f"PyTorch ops, slower on a CPU (set PLURIBUS_KERNELS=0 to skip the attempt)", RuntimeWarning,
                      stacklevel=3)
        return None
