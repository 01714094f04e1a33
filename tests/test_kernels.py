"""The native decode kernels (pluribus.models.kernels): each against a float64 reference written with loops, the
decoder's logits with them against transformers' forward, and the fallbacks (turned off, no compiler)."""

import math
import shutil

import pytest
import torch

from pluribus.models import kernels as native
from pluribus.models import lean as lean_module
from pluribus.models.lean import LeanDecoder

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """The training kernels split their rows over torch's threads (OpenMP): each test runs on one thread and two."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _kernels(head_dim: int) -> native.CpuKernels:
    kernels = native.cpu_kernels(head_dim)
    assert kernels is not None
    return kernels


def _rope_reference(x, cos_d, signed_sin_d):
    """HF RoPE of one head in float64 by loops: x·cos + rotate_half(x)·sin, the angles' cosines and sines read from
    the float32 tables the decoder uses (their second halves hold cos and +sin of each frequency)."""
    d = len(x)
    out = torch.empty(d, dtype=torch.float64)
    for i in range(d // 2):
        c, s = float(cos_d[i + d // 2]), float(signed_sin_d[i + d // 2])
        out[i] = x[i] * c - x[i + d // 2] * s
        out[i + d // 2] = x[i + d // 2] * c + x[i] * s
    return out


@needs_compiler
@pytest.mark.parametrize("heads,kv_heads,d,column", [(4, 4, 32, 9), (4, 2, 32, 70), (2, 1, 64, 127)])
def test_attention_equals_a_float64_reference(heads, kv_heads, d, column):
    """RoPE, the cache write and masked softmax attention over columns 0..column, per row and head by loops; GQA
    (two query heads a key head); scores crossing the kernel's 64-key blocks; masked columns."""
    gen = torch.Generator().manual_seed(0)
    B, L = 3, native.BLOCK * 2
    qkv = torch.randn(B, (heads + 2 * kv_heads) * d, generator=gen)
    keys_t = torch.randn(B, kv_heads, d, L, generator=gen)
    values = torch.randn(B, kv_heads, L, d, generator=gen)
    keys_before, values_before = keys_t.clone(), values.clone()
    mask = torch.zeros(B, L)
    mask[0, :3] = float("-inf")  # row 0 does not see its first three columns
    mask[2, column // 2] = float("-inf")
    position = torch.tensor([column, column - 3, 5], dtype=torch.long)
    cos, sin = lean_module._rope_table(lean_module._inv_freq(10000.0, d, "cpu"), 200, torch.float32)

    out = _kernels(d).attention(qkv, cos, sin, position, keys_t, values, mask, column, heads)

    q64, new = qkv.double(), {}
    for b in range(B):
        for g in range(kv_heads):
            new[b, g] = (_rope_reference(q64[b, (heads + g) * d:(heads + g + 1) * d], cos[position[b]],
                                         sin[position[b]]),
                         q64[b, (heads + kv_heads + g) * d:(heads + kv_heads + g + 1) * d])
            # the new key and value landed in column `column`, nothing else moved
            assert torch.allclose(keys_t[b, g, :, column].double(), new[b, g][0], atol=1e-6)
            assert torch.equal(values[b, g, column], qkv[b, (heads + kv_heads + g) * d:(heads + kv_heads + g + 1) * d])
    others = torch.ones(L, dtype=torch.bool)
    others[column] = False
    assert torch.equal(keys_t[..., others], keys_before[..., others])
    assert torch.equal(values[:, :, others], values_before[:, :, others])
    for b in range(B):
        for h in range(heads):
            g = h // (heads // kv_heads)
            q = _rope_reference(q64[b, h * d:(h + 1) * d], cos[position[b]], sin[position[b]])
            scores = []
            for j in range(column + 1):
                k = new[b, g][0] if j == column else keys_before[b, g, :, j].double()
                scores.append(float(q @ k) / math.sqrt(d) + float(mask[b, j]))
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            expected = sum(w * (new[b, g][1] if j == column else values_before[b, g, j].double())
                           for j, w in enumerate(weights)) / sum(weights)
            assert torch.allclose(out[b, h * d:(h + 1) * d].double(), expected, atol=2e-6), (b, h)


@needs_compiler
@pytest.mark.parametrize("D", [128, 40])
def test_add_rms_norm_equals_a_float64_reference(D):
    gen = torch.Generator().manual_seed(1)
    x, residual, weight = (torch.randn(5, D, generator=gen), 3 * torch.randn(5, D, generator=gen),
                           torch.randn(D, generator=gen))
    expected_x = x.double() + residual.double()
    expected = torch.stack([row / math.sqrt(float((row ** 2).mean()) + 1e-6) for row in expected_x]) * weight.double()
    out = _kernels(32).add_rms_norm(x, residual, weight, 1e-6, torch.empty(5, D))
    assert torch.allclose(x.double(), expected_x, atol=1e-6)  # the residual stream, updated in place
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6)
    alone = _kernels(32).add_rms_norm(x.clone(), None, weight, 1e-6, torch.empty(5, D))
    assert torch.allclose(alone.double(), expected, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("I", [384, 40])
def test_silu_mul_equals_a_float64_reference_without_overflow(I):
    gen = torch.Generator().manual_seed(2)
    gate_up = 4 * torch.randn(3, 2 * I, generator=gen)
    gate_up[0, :4] = torch.tensor([-1e4, -100.0, 100.0, 1e4])  # e^±x overflows float32 here
    out = _kernels(32).silu_mul(gate_up)
    g, u = gate_up[:, :I].double(), gate_up[:, I:].double()
    expected = g * torch.sigmoid(g) * u
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_warming_the_next_weight_changes_no_output():
    """The decode kernels' `warm` (a read through the next matmul's weight) leaves every output and the caches bit for
    bit as without it; a weight that is not one block of memory, or too large to stay cached, is skipped."""
    from pluribus.models.kernels import NO_SPAN, warm_span

    gen = torch.Generator().manual_seed(3)
    kernels, weight = _kernels(32), torch.randn(300, 128, generator=gen)
    assert warm_span(None) == NO_SPAN == (None, 0) and warm_span(weight.t()) == NO_SPAN
    assert warm_span(weight) == (weight.data_ptr(), 300 * 128 * 4)
    assert warm_span(torch.empty(native.WARM_MAX_BYTES // 4 + 1)) == NO_SPAN  # would not stay cached for the matmul
    x, residual, norm = torch.randn(5, 128, generator=gen), torch.randn(5, 128, generator=gen), torch.randn(128)
    plain = kernels.add_rms_norm(x.clone(), residual, norm, 1e-6, torch.empty(5, 128))
    for warm in (weight, weight.t()):
        out = kernels.add_rms_norm(x.clone(), residual, norm, 1e-6, torch.empty(5, 128), warm=warm_span(warm))
        assert torch.equal(out, plain)
    gate_up = torch.randn(3, 768, generator=gen)
    assert torch.equal(kernels.silu_mul(gate_up, warm=warm_span(weight)), kernels.silu_mul(gate_up))
    L = native.BLOCK
    qkv, keys_t, values = (torch.randn(2, 12 * 32, generator=gen), torch.randn(2, 4, 32, L, generator=gen),
                           torch.randn(2, 4, L, 32, generator=gen))
    cos, sin = lean_module._rope_table(lean_module._inv_freq(10000.0, 32, "cpu"), L, torch.float32)
    position, mask = torch.tensor([7, 7]), torch.zeros(2, L)
    caches = [(keys_t.clone(), values.clone()) for _ in range(2)]
    outs = [kernels.attention(qkv, cos, sin, position, k, v, mask, 7, 4, warm=w)
            for (k, v), w in zip(caches, (NO_SPAN, warm_span(weight)))]
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(caches[0], caches[1]))


@needs_compiler
def test_decoder_with_kernels_equals_the_hf_forward_with_grouped_heads(one_thread):
    """A Qwen2 with 4 query heads over 2 key heads, biases on q/k/v: prefill and 70 decode steps (past one 64-key
    block), rows dropped midway; logits within 1e-5 of transformers' forward."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14], [15]]
    with torch.no_grad():
        decoder = LeanDecoder.build(model)
        assert decoder.kernels is not None
        logits = decoder.prefill(prompts, 70)
        assert decoder.k_cache[0].shape == (4, 2, 16, 128)  # keys transposed, width a multiple of 64
        rows = [list(p) for p in prompts]
        for step in range(70):
            token = logits.argmax(-1)
            for row, t in zip(rows, token.tolist()):
                row.append(t)
            if step == 30:  # rows 0 and 2 go on
                decoder.keep_rows(torch.tensor([0, 2]))
                rows, token = [rows[0], rows[2]], token[[0, 2]]
            logits = decoder.step(token)
            reference = torch.stack([model(torch.tensor([row])).logits[0, -1] for row in rows])
            assert (logits - reference).abs().max() < 1e-5, step


@needs_compiler
def test_write_cache_puts_each_context_right_aligned_in_its_rows():
    """Keys transposed and values by column, each row's context ending at column `longest`; rows sharing a context
    (a GRPO group) each get it; k and v read through views of one fused projection (different row strides)."""
    gen = torch.Generator().manual_seed(3)
    Hkv, d, L, longest = 2, 32, 64, 6
    fused = torch.randn(9, 5 * Hkv * d, generator=gen)  # 9 packed tokens, each row [.., keys, .., values]
    k, v = fused[:, Hkv * d: 2 * Hkv * d].view(9, Hkv, d), fused[:, 4 * Hkv * d:].view(9, Hkv, d)
    start, length = torch.tensor([0, 3, 0, 3]), torch.tensor([3, 6, 3, 6])  # rows 0 and 2 share a context
    keys_t, values = torch.zeros(4, Hkv, d, L), torch.zeros(4, Hkv, L, d)
    _kernels(d).write_cache(k, v, start, length, longest, keys_t, values)
    expected_k, expected_v = torch.zeros(4, Hkv, d, L), torch.zeros(4, Hkv, L, d)
    for b in range(4):
        for j in range(int(length[b])):
            col = longest - int(length[b]) + j
            for g in range(Hkv):
                for t in range(d):
                    expected_k[b, g, t, col] = k[int(start[b]) + j, g, t]
                    expected_v[b, g, col, t] = v[int(start[b]) + j, g, t]
    assert torch.equal(keys_t, expected_k) and torch.equal(values, expected_v)
    with pytest.raises(ValueError, match="contiguous heads"):
        _kernels(d).write_cache(k.transpose(1, 2), v, start, length, longest, keys_t, values)


@needs_compiler
def test_native_prefill_equals_the_packed_prefill_and_steps_aside_for_long_contexts(monkeypatch, one_thread,
                                                                                   tiny_qwen2):
    """The kernels' prefill (each token once in one packed list) gives the logits and caches of the PyTorch-ops
    prefill (contexts packed several to a padded row): distinct contexts of several lengths, one longer than a
    pack, and a group sharing a context. Where the packed layout is refused (its dense mask too large), the packed
    prefill runs and nothing changes."""
    from pluribus.models import load

    model, _ = load(tiny_qwen2, trainable=False)
    prompts = [[3, 4, 5, 6], [7, 8], [9] * 3 + list(range(10, 90)), [7, 8], [7, 8], [15]]
    native_calls, packed_calls = [], []
    native_prefill, packed_prefill = LeanDecoder._native_prefill, LeanDecoder._packed_prefill
    monkeypatch.setattr(LeanDecoder, "_native_prefill",
                        lambda self, *a: native_calls.append(1) or native_prefill(self, *a))
    monkeypatch.setattr(LeanDecoder, "_packed_prefill",
                        lambda self, *a: packed_calls.append(1) or packed_prefill(self, *a))

    def prefill():
        decoder = LeanDecoder.build(model)
        with torch.no_grad():
            logits = decoder.prefill(prompts, 5)
        return decoder, logits

    with_kernels, logits = prefill()
    assert with_kernels.kernels is not None and (len(native_calls), len(packed_calls)) == (1, 0)
    monkeypatch.setattr(lean_module, "MAX_MASK_ELEMENTS", 0)  # the layout refuses: the packed prefill runs
    refused, refused_logits = prefill()
    assert (len(native_calls), len(packed_calls)) == (2, 1)
    monkeypatch.setenv("PLURIBUS_KERNELS", "0")
    plain, plain_logits = prefill()
    assert plain.kernels is None and len(packed_calls) == 2
    for other, other_logits in ((refused, refused_logits), (plain, plain_logits)):
        assert (logits - other_logits).abs().max() < 1e-5
        for layer in range(len(with_kernels.layers)):
            keys = other.k_cache[layer] if other.kernels is not None else other.k_cache[layer].transpose(2, 3)
            width = keys.shape[-1]
            assert (with_kernels.k_cache[layer][..., :width] - keys).abs().max() < 1e-5
            assert (with_kernels.v_cache[layer][:, :, :width] - other.v_cache[layer]).abs().max() < 1e-5


def test_kernels_off_keeps_the_pytorch_ops(monkeypatch, tiny_qwen2):
    from pluribus.models import load

    monkeypatch.setenv("PLURIBUS_KERNELS", "0")
    assert native.cpu_kernels(32) is None
    model, _ = load(tiny_qwen2, trainable=False)
    decoder = LeanDecoder.build(model)
    assert decoder.kernels is None
    with torch.no_grad():
        decoder.prefill([[3, 4, 5]], 4)
    assert decoder.k_cache[0].shape == (1, 2, 7, 32)  # keys by position, no padding to a block


def test_unsupported_head_sizes_get_none():
    assert native.cpu_kernels(33) is None
    assert native.cpu_kernels(native.MAX_HEAD_DIM + 2) is None


def test_a_missing_compiler_warns_once_and_decoding_falls_back(monkeypatch, tmp_path, tiny_qwen2):
    from pluribus.models import load

    monkeypatch.setenv("PLURIBUS_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable"):
            assert native.cpu_kernels(32) is None
        model, _ = load(tiny_qwen2, trainable=False)
        decoder = LeanDecoder.build(model)  # the failure is remembered: no second warning, no second attempt
        assert decoder.kernels is None
        assert list((tmp_path / "cache").iterdir()) == []  # no partial library left behind
    finally:
        native._load.cache_clear()


@needs_compiler
def test_a_built_library_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("PLURIBUS_KERNEL_CACHE", str(tmp_path))
    first = native._build(32)
    assert first.parent == tmp_path and first.exists()
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("compiled twice"))
    assert native._build(32) == first


def _packed_reference(q, k, v, queries, keys, mask):
    """The packed attention in float64 by loops over rows, heads and queries."""
    (G, Q), K, H, Hkv, d = queries.shape, keys.shape[1], q.shape[1], k.shape[1], q.shape[2]
    out = torch.zeros(G * Q, H * d, dtype=torch.float64)
    for g in range(G):
        for h in range(H):
            for i in range(Q):
                qi = q[queries[g, i], h]
                scores = torch.stack([qi @ k[keys[g, j], h // (H // Hkv)] / math.sqrt(d) + mask[g, 0, i, j]
                                      for j in range(K)])
                weights = torch.softmax(scores, 0)
                out[g * Q + i, h * d:(h + 1) * d] = sum(weights[j] * v[keys[g, j], h // (H // Hkv)] for j in range(K))
    return out


@needs_compiler
@pytest.mark.parametrize("heads,kv_heads,K", [(2, 2, 9), (4, 2, 70)])
def test_packed_attention_and_its_gradients_equal_a_float64_reference(heads, kv_heads, K, threads):
    """Rows sharing their first keys (a GRPO group's prompt, on two threads split between them), masked keys, keys
    past one 64-key block, grouped heads, and output rows whose gradient is zero (padding queries): values and q/k/v
    gradients, twice the same."""
    gen = torch.Generator().manual_seed(3)
    G, Q, d, N = 3, 5, 32, 90
    q, k, v = (torch.randn(N, h, d, generator=gen) for h in (heads, kv_heads, kv_heads))
    queries = torch.randperm(N, generator=gen)[:G * Q].view(G, Q)
    keys = torch.randint(0, N, (G, K), generator=gen)
    keys[:, :4] = keys[0, :4]
    seen = torch.rand(G, Q, K, generator=gen) < 0.7
    seen[:, :, 0] = True
    mask = torch.zeros(G, 1, Q, K).masked_fill_(~seen[:, None], float("-inf"))
    grad_out = torch.randn(G * Q, heads * d, generator=gen)
    grad_out[::4] = 0

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _kernels(d).packed_attention(*leaves, queries, keys, mask)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in leaves]

    out, grads = run()
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = _packed_reference(*leaves, queries, keys, mask.double())
    expected.backward(grad_out.double())
    assert (out.double() - expected.detach()).abs().max() < 1e-5
    for got, leaf in zip(grads, leaves):
        assert (got.double() - leaf.grad).abs().max() < 1e-5
    again_out, again = run()
    assert torch.equal(again_out, out) and all(torch.equal(a, b) for a, b in zip(again, grads))


@needs_compiler
@pytest.mark.parametrize("d", [32, 24])
def test_packed_attention_skips_padding_queries(d, threads):
    """With `queried_G`, a row's queries past its count are padding: their outputs are zeros and the real ones are
    the same to the bit as when every query is computed (rows of 0, 3 and 7 real queries, 4 queries at a time in the
    kernel); the gradients too."""
    gen = torch.Generator().manual_seed(5)
    G, Q, K, N, H = 3, 7, 11, 40, 2
    q, k, v = (torch.randn(N, H, d, generator=gen) for _ in range(3))
    queries = torch.randperm(N, generator=gen)[:G * Q].view(G, Q)  # each token the query of one row (the layout's)
    keys = torch.randint(0, N, (G, K), generator=gen)
    seen = torch.arange(K)[None, None, :] <= torch.arange(Q)[None, :, None] + torch.tensor([0, 2, 4])[:, None, None]
    mask = torch.zeros(G, 1, Q, K).masked_fill_(~seen[:, None], float("-inf"))
    queried = torch.tensor([0, 3, 7])
    real = (torch.arange(Q)[None, :] < queried[:, None]).flatten()
    grad_out = torch.randn(G * Q, H * d, generator=gen) * real[:, None]

    def run(counts):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _kernels(d).packed_attention(*leaves, queries, keys, mask, counts)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in leaves]

    (every, every_grads), (skipped, skipped_grads) = run(None), run(queried)
    assert torch.equal(skipped[real], every[real]) and not skipped[~real].any() and every[~real].any()
    assert all(torch.equal(a, b) for a, b in zip(skipped_grads, every_grads))


@needs_compiler
@pytest.mark.parametrize("D", [128, 40])
def test_training_rms_norm_and_its_gradients_equal_float64(D, threads):
    gen = torch.Generator().manual_seed(4)
    rows = 300  # enough floats for the kernels to use both threads
    x, grad = 3 * torch.randn(rows, D, generator=gen), torch.randn(rows, D, generator=gen)
    weight = torch.randn(D, generator=gen)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    out = _kernels(32).rms_norm(*leaves, 1e-6)
    out.backward(grad)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    expected.backward(grad.double())
    assert (out.double() - expected).abs().max() < 1e-5
    assert (leaves[0].grad.double() - x64.grad).abs().max() < 1e-5
    assert (leaves[1].grad.double() - w64.grad).abs().max() < 1e-4  # a sum over 300 rows of values up to ~10


@needs_compiler
def test_training_rope_and_its_gradient_equal_float64(threads):
    gen = torch.Generator().manual_seed(5)
    N, H, d = 360, 3, 32
    cos, sin = lean_module._rope_table(lean_module._inv_freq(10000.0, d, "cpu"), 50, torch.float32)
    position = torch.tensor([0, 3, 7, 20, 41, 49] * 60)
    x, grad = torch.randn(N, H, d, generator=gen), torch.randn(N, H, d, generator=gen)
    leaf = x.clone().requires_grad_()
    out = _kernels(d).rope(leaf, cos[position][:, None], sin[position][:, None])
    out.backward(grad)
    x64 = x.double().requires_grad_()
    expected = torch.stack([torch.stack([_rope_reference(x64[n, h], cos[position[n]], sin[position[n]])
                                         for h in range(H)]) for n in range(N)])
    expected.backward(grad.double())
    assert (out.double() - expected).abs().max() < 1e-5
    assert (leaf.grad.double() - x64.grad).abs().max() < 1e-5


@needs_compiler
@pytest.mark.parametrize("I", [96, 40])
def test_training_silu_mul_and_its_gradients_equal_float64(I, threads):
    gen = torch.Generator().manual_seed(6)
    gate, up, grad = (4 * torch.randn(900, I, generator=gen) for _ in range(3))
    gate[0, :4] = torch.tensor([-1e4, -100.0, 100.0, 1e4])
    leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    out = _kernels(32).silu_mul_split(*leaves)
    out.backward(grad)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    expected = torch.nn.functional.silu(g64) * u64
    expected.backward(grad.double())
    assert torch.isfinite(out).all() and torch.isfinite(leaves[0].grad).all()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
    for leaf, ref in zip(leaves, (g64, u64)):
        assert torch.allclose(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
