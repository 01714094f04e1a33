// Fused CPU kernels for pluribus.models.lean (float32; the training ones split rows over OpenMP threads): the decoder's
// prefill and decode step, and the packed training forward. Called through ctypes by pluribus.models.kernels, which
// compiles this file at first use with HEAD_DIM set to the model's head size. Each replaces several PyTorch ops whose
// per-op cost and memory passes, not their arithmetic, dominate a small model's step on a CPU. The matrix multiplies
// stay PyTorch's.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<the model's head size>"
#endif
#if HEAD_DIM % 2
#error "HEAD_DIM must be even (RoPE turns pairs of halves)"
#endif
#define W 16            // floats a vector (GCC vector extensions: the compiler maps them to this CPU's registers)
#define BLOCK (4 * W)   // keys scored at a time; the cache's width is a multiple of it
// Below this many floats an elementwise kernel runs on one thread: waking the others costs more than it saves.
#define PARALLEL_MIN (1 << 15)

// The threads a parallel region gets: torch's (built with OpenMP, the kernels share its runtime, libgomp.so.1, and
// follow torch.set_num_threads); 1 when compiled without OpenMP.
static inline int threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// This thread's index in its parallel region, and the region's number of threads (0 and 1 outside one).
static inline int thread_index() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int team_size() {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}
typedef float vf __attribute__((vector_size(W * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(W * 4), aligned(4)));

static inline vf vload(const float *p) { vf x; std::memcpy(&x, p, sizeof x); return x; }
static inline void vstore(float *p, vf x) { std::memcpy(p, &x, sizeof x); }
static inline vf splat(float a) { return (vf){} + a; }
static inline float hsum(vf x) { float s = 0.f; for (int i = 0; i < W; i++) s += x[i]; return s; }

// Read one byte of every 64-byte line of `bytes` bytes at `next` (null: nothing): the weights of the matrix multiply
// that follows the calling kernel in a decode step. The decode's matmuls have a few dozen rows, so they are bound
// by reading their weights, which a step's 4+ MB of weights and caches push out of the core's caches between steps;
// MKL's small-matrix kernels read them in a pattern that waits on memory line by line, while a plain forward pass over
// them streams at the memory's rate: a 32-row decode step +10% tokens/s on the bench's model (docs/performance.md).
static volatile unsigned warmed;
static inline void warm(const void *next, long bytes) {
    if (!next) return;
    const unsigned char *c = (const unsigned char *)next;
    unsigned acc = 0;
    for (long i = 0; i < bytes; i += 64) acc += *(const volatile unsigned char *)(c + i);
    warmed = acc;
}

// e^x for x <= 0: 2^n · 2^f with |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error < 2e-7);
// 0 below -87, where float32 turns subnormal.
static inline vf vexp_nonpos(vf x) {
    vf y = x * 1.4426950408889634f;
    y = y < -126.f ? splat(-126.f) : y;
    vf n = __builtin_convertvector(__builtin_convertvector(y + (y < 0 ? splat(-0.5f) : splat(0.5f)), vi), vf);
    vf f = y - n;
    vf p = splat(1.5403530393381606e-4f);
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910072e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < -87.f ? splat(0.f) : p * scale;
}

// out = x · rstd · weight for one row of D floats, rstd = 1 / sqrt(mean(x²) + eps) (returned): RMSNorm, float32
// statistics.
static inline float normalize_row(const float *__restrict x, const float *__restrict weight, float *__restrict out,
                                  int D, float eps) {
    vf squares = {};
    int i = 0;
    for (; i + W <= D; i += W) { vf v = vload(x + i); squares += v * v; }
    float ss = hsum(squares);
    for (; i < D; i++) ss += x[i] * x[i];
    float rstd = 1.f / std::sqrt(ss / D + eps);
    for (i = 0; i < D; i++) out[i] = x[i] * rstd * weight[i];
    return rstd;
}

// With `residual`, x += residual (in place: the decoder's residual stream); then out = RMSNorm(x) · weight, float32
// statistics. Rows of D floats. Then `warm(next)`.
extern "C" void add_rms_norm(float *__restrict x, const float *__restrict residual, const float *__restrict weight,
                             float *__restrict out, int rows, int D, float eps, const void *next, long next_bytes) {
    for (int r = 0; r < rows; r++) {
        float *xr = x + (long)r * D;
        if (residual) {
            const float *a = residual + (long)r * D;
            for (int i = 0; i < D; i++) xr[i] += a[i];
        }
        normalize_row(xr, weight, out + (long)r * D, D, eps);
    }
    warm(next, next_bytes);
}

// out[r, i] = silu(gate[r, i]) · up[r, i], rows `stride` floats apart in gate and up (the decoder's fused [gate, up]
// rows: up = gate + I, stride 2·I), I apart in out: the gated MLP's activation. Then `warm(next)`.
extern "C" void silu_mul(const float *__restrict gate, const float *__restrict up, long stride, float *__restrict out,
                         int rows, int I, const void *next, long next_bytes) {
#pragma omp parallel for schedule(static) if (rows * (long)I >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        const float *g = gate + r * stride, *u = up + r * stride;
        float *o = out + (long)r * I;
        int i = 0;
        for (; i + W <= I; i += W) {
            vf x = vload(g + i);
            vf e = vexp_nonpos(x < 0 ? x : -x);  // e^-|x|: the sigmoid without overflow on either side
            vf sigmoid = x < 0 ? e / (1.f + e) : 1.f / (1.f + e);
            vstore(o + i, x * sigmoid * vload(u + i));
        }
        for (; i < I; i++) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
    warm(next, next_bytes);
}

// Its gradients over n elements of contiguous gate, up and dout:
// dgate = dout·up·σ(g)·(1 + g·(1 - σ(g))), dup = dout·silu(g).
extern "C" void silu_mul_backward(const float *__restrict g, const float *__restrict u, const float *__restrict dout,
                                  float *__restrict dg, float *__restrict du, long n) {
    const long vectors = n / W * W;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (long i = 0; i < vectors; i += W) {
        vf x = vload(g + i), dy = vload(dout + i);
        vf e = vexp_nonpos(x < 0 ? x : -x);
        vf sigmoid = x < 0 ? e / (1.f + e) : 1.f / (1.f + e);
        vstore(dg + i, dy * vload(u + i) * sigmoid * (1.f + x * (1.f - sigmoid)));
        vstore(du + i, dy * x * sigmoid);
    }
    for (long i = vectors; i < n; i++) {
        float sigmoid = 1.f / (1.f + std::exp(-g[i]));
        dg[i] = dout[i] * u[i] * sigmoid * (1.f + g[i] * (1.f - sigmoid));
        du[i] = dout[i] * g[i] * sigmoid;
    }
}

// RMSNorm of rows of D floats for training: y = x · rstd · weight, rstd = 1 / sqrt(mean(x²) + eps) kept per row.
extern "C" void rms_norm_forward(const float *__restrict x, const float *__restrict weight, float *__restrict y,
                                 float *__restrict rstd, int rows, int D, float eps) {
#pragma omp parallel for schedule(static) if (rows * (long)D >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        rstd[r] = normalize_row(x + (long)r * D, weight, y + (long)r * D, D, eps);
    }
}

// dweight[lo:hi] += Σ_rows dy · x · rstd, rows in order, row by row (contiguous reads). Each product is rounded before
// its sum (no fused multiply-add): the rounding of the column-by-column loop this replaced (f14efdb, whose quickstart
// the README reports), 4-6 ms slower on the bench's OPD backward for its strided reads.
__attribute__((noinline, optimize("fp-contract=off")))
static void add_weight_grad(const float *__restrict dy, const float *__restrict x, const float *__restrict rstd,
                            float *__restrict dweight, int rows, int D, int lo, int hi) {
    for (int r = 0; r < rows; r++) {
        const float *dyr = dy + (long)r * D, *xr = x + (long)r * D;
        const float inv = rstd[r];
        for (int i = lo; i < hi; i++) dweight[i] += dyr[i] * xr[i] * inv;
    }
}

// Its gradients: dx = rstd · (g - x · rstd² · mean(g · x)) with g = dy · weight;
// dweight += Σ_rows dy · x · rstd (rows in order: the same sum every run).
extern "C" void rms_norm_backward(const float *__restrict dy, const float *__restrict x, const float *__restrict weight,
                                  const float *__restrict rstd, float *__restrict dx, float *__restrict dweight,
                                  int rows, int D) {
    const bool parallel = rows * (long)D >= PARALLEL_MIN;
#pragma omp parallel for schedule(static) if (parallel)
    for (int r = 0; r < rows; r++) {
        const float *dyr = dy + (long)r * D, *xr = x + (long)r * D;
        float inv = rstd[r];
        vf acc = {};
        int i = 0;
        for (; i + W <= D; i += W) acc += vload(dyr + i) * vload(weight + i) * vload(xr + i);
        float gx = hsum(acc);
        for (; i < D; i++) gx += dyr[i] * weight[i] * xr[i];
        float c = inv * inv * gx / D;
        float *dxr = dx + (long)r * D;
        for (i = 0; i < D; i++) dxr[i] = inv * (dyr[i] * weight[i] - xr[i] * c);
    }
#pragma omp parallel if (parallel)  // each thread a block of columns, over every row in order
    {
        const int t = thread_index(), n = team_size();
        add_weight_grad(dy, x, rstd, dweight, rows, D, (int)((long)D * t / n), (int)((long)D * (t + 1) / n));
    }
}

// RoPE of one head: x·cos + rotate_half(x)·sin, with the sine's first half negated (lean._rope_table's tables).
static inline void rope(const float *x, const float *cos, const float *signed_sin, float *out) {
    const int half = HEAD_DIM / 2;
    for (int i = 0; i < half; i++) {
        out[i] = x[i] * cos[i] + x[i + half] * signed_sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * signed_sin[i + half];
    }
}

// RoPE for training, rows of `heads` heads: out[n, h] = rope(x[n, h]) with row n's cos and signed sin ([N, d]). With
// `inverse`, the transposed rotation (the sine negated): the backward, dx from dy.
extern "C" void rope_rows(const float *__restrict x, const float *__restrict cos, const float *__restrict signed_sin,
                          float *__restrict out, int N, int heads, int inverse) {
    const int d = HEAD_DIM;
#pragma omp parallel for schedule(static) if (N * (long)heads * d >= PARALLEL_MIN)
    for (int n = 0; n < N; n++) {
        float flipped[HEAD_DIM];
        const float *c = cos + (long)n * d, *sn = signed_sin + (long)n * d;
        if (inverse) {
            for (int t = 0; t < d; t++) flipped[t] = -sn[t];
            sn = flipped;
        }
        for (int h = 0; h < heads; h++) rope(x + ((long)n * heads + h) * d, c, sn, out + ((long)n * heads + h) * d);
    }
}

// --- attention helpers: scores against transposed keys, softmax weights, the weighted values ----------------

namespace {

// out[0:n] = Σ_t x[t] · rows[t·stride : t·stride + n] (x scaled by `scale`): a vector against n columns (n a
// multiple of W), 4·W at a time while they last (four independent sums), then W at a time with even and odd t in
// two sums (in one, a short row's HEAD_DIM dependent FMAs left the core waiting on their latency). With `lo` (a
// multiple of W), the columns before it are not needed: the 4·W blocks wholly before it and the W-vectors before it
// are skipped; each other column's sum is computed as without.
inline void against_columns(const float *x, const float *rows, int stride, int n, float scale, float *out,
                            int lo = 0) {
    int jb = 0;
    for (; jb + BLOCK <= n; jb += BLOCK) {
        if (jb + BLOCK <= lo) continue;
        vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int t = 0; t < HEAD_DIM; t++) {
            const float *r = rows + t * stride + jb;
            float xt = x[t] * scale;
            a0 += xt * vload(r); a1 += xt * vload(r + W); a2 += xt * vload(r + 2 * W); a3 += xt * vload(r + 3 * W);
        }
        vstore(out + jb, a0); vstore(out + jb + W, a1); vstore(out + jb + 2 * W, a2); vstore(out + jb + 3 * W, a3);
    }
    for (jb = std::max(jb, lo); jb < n; jb += W) {
        vf a = {}, b = {};
        for (int t = 0; t < HEAD_DIM; t += 2) {
            const float *r = rows + t * stride + jb;
            a += (x[t] * scale) * vload(r);
            b += (x[t + 1] * scale) * vload(r + stride);
        }
        vstore(out + jb, a + b);
    }
}

// Per mask row (`rows` rows of K): 1 + the last column the query sees (not -inf). A causal row's query skips the
// keys after it; found once per query, not once per head.
inline std::vector<int> seen_extents(const float *mask, long rows, int K) {
    std::vector<int> extent(rows);
    for (long r = 0; r < rows; r++) {
        const float *m = mask + r * K;
        int n = K;
        while (n > 1 && m[n - 1] == -INFINITY) n--;
        extent[r] = n;
    }
    return extent;
}

// Whether a head's HEAD_DIM floats are all zero.
inline bool all_zero(const float *x) {
    int t = 0, nonzero = 0;
    for (; t + W <= HEAD_DIM; t += W) {
        vi ne = vload(x + t) != 0.f;
        for (int l = 0; l < W; l++) nonzero |= ne[l];
    }
    for (; t < HEAD_DIM; t++) nonzero |= x[t] != 0.f;
    return !nonzero;
}

// s[j] += mask[j] (padding columns past K: -inf); then s[j] = e^(s[j] - shift), where shift is `*shift` if given,
// else the largest s (written to *largest); returns Σ s.
// The largest lane of x: a tree of vector maxima (max is exact: any order gives the same value).
inline float hmax(vf x) {
#if W == 16
    vf y = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x = y > x ? y : x;
    y = __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x = y > x ? y : x;
    y = __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x = y > x ? y : x;
    y = __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    x = y > x ? y : x;
    return x[0];
#else
    float mx = -INFINITY;
    for (int l = 0; l < W; l++) mx = x[l] > mx ? x[l] : mx;
    return mx;
#endif
}

// `weights` without its last step: the lanes of Σ s, for the caller to add up (`hsum`, or `hsum_many` for QB rows).
// From column `lo` (a multiple of W) on, where every column before it is masked: their weights would be 0, adding
// nothing to any lane.
inline vf weight_lanes(float *s, const float *mask, int K, int Kb, const float *shift, float *largest, int lo = 0) {
    vf top = splat(-INFINITY);
    int j = lo;
    for (; j + W <= K; j += W) { vf x = vload(s + j) + vload(mask + j); vstore(s + j, x); top = x > top ? x : top; }
    float mx = hmax(top);
    for (; j < K; j++) { s[j] += mask[j]; mx = s[j] > mx ? s[j] : mx; }
    for (; j < Kb; j++) s[j] = -INFINITY;
    if (largest) *largest = mx;
    float m = shift ? *shift : mx;
    vf sums = {};
    for (j = lo; j < Kb; j += W) { vf e = vexp_nonpos(vload(s + j) - m); vstore(s + j, e); sums += e; }
    return sums;
}

inline float weights(float *s, const float *mask, int K, int Kb, const float *shift, float *largest, int lo = 0) {
    return hsum(weight_lanes(s, mask, K, Kb, shift, largest, lo));
}

// out[b] = hsum(x[b]) for nb <= 4 vectors: each sum in hsum's order, the four chains side by side.
inline void hsum_many(const vf *x, int nb, float *out) {
    float s[4] = {};
    for (int i = 0; i < W; i++)
        for (int b = 0; b < 4; b++) s[b] += b < nb ? x[b][i] : 0.f;
    for (int b = 0; b < nb; b++) out[b] = s[b];
}

// acc = Σ_j w[j] · v[j] over K value rows of HEAD_DIM floats, in two partial sums (half the dependency chain);
// the caller normalises. From key `lo` (even) on, where every weight before it is 0: the same two sums.
inline void weighted_sum(const float *__restrict w, const float *__restrict v, int K, float *__restrict acc,
                         int lo = 0) {
    float o0[HEAD_DIM] = {}, o1[HEAD_DIM] = {};
    int j = lo;
    for (; j + 1 < K; j += 2) {
        const float *va = v + (long)j * HEAD_DIM, *vb = va + HEAD_DIM;
        for (int t = 0; t < HEAD_DIM; t++) { o0[t] += w[j] * va[t]; o1[t] += w[j + 1] * vb[t]; }
    }
    if (j < K)
        for (int t = 0; t < HEAD_DIM; t++) o0[t] += w[j] * v[(long)j * HEAD_DIM + t];
    for (int t = 0; t < HEAD_DIM; t++) acc[t] = o0[t] + o1[t];
}

// --- the same, for QB queries at a time (the training attention, packed_attention_*) ----------------------------
// Each key and value read from the cache then serves QB queries instead of one. Every query's sums are the
// single-query helpers', term by term in the same order, so the results are theirs to the bit.
#define QB 4
static_assert(QB <= 4, "hsum_many adds at most four sums side by side");

// Scores of nb queries (x already scaled) against one BLOCK of columns from jb: one chain over t per column, as
// against_columns runs a query's whole BLOCKs.
template <int NB>
inline void columns_whole(const float (*x)[HEAD_DIM], const float *rows, int stride, int jb, float *const *out) {
    vf a[NB][4] = {};
    for (int t = 0; t < HEAD_DIM; t++) {
        const float *r = rows + t * stride + jb;
        const vf r0 = vload(r), r1 = vload(r + W), r2 = vload(r + 2 * W), r3 = vload(r + 3 * W);
        for (int b = 0; b < NB; b++) {
            const float xt = x[b][t];
            a[b][0] += xt * r0; a[b][1] += xt * r1; a[b][2] += xt * r2; a[b][3] += xt * r3;
        }
    }
    for (int b = 0; b < NB; b++)
        for (int c = 0; c < 4; c++) vstore(out[b] + jb + c * W, a[b][c]);
}

// The same against one vector of W columns from jb, as against_columns runs the columns past a query's whole BLOCKs:
// even and odd t in two chains, added at the end.
template <int NB>
inline void columns_split(const float (*x)[HEAD_DIM], const float *rows, int stride, int jb, float *const *out) {
    vf a[NB] = {}, c[NB] = {};
    for (int t = 0; t < HEAD_DIM; t += 2) {
        const float *r = rows + t * stride + jb;
        const vf even = vload(r), odd = vload(r + stride);
        for (int b = 0; b < NB; b++) { a[b] += x[b][t] * even; c[b] += x[b][t + 1] * odd; }
    }
    for (int b = 0; b < NB; b++) vstore(out[b] + jb, a[b] + c[b]);
}

template <int NB>
inline void columns_block(const float (*x)[HEAD_DIM], const float *rows, int stride, int jb, float *const *out,
                          bool whole) {
    if (whole) columns_whole<NB>(x, rows, stride, jb, out);
    else columns_split<NB>(x, rows, stride, jb, out);
}

// out[b][0:n[b]] = against_columns(x[b] / scale, rows, stride, n[b], scale) for nb <= QB queries, x[b] already
// scaled: their common whole BLOCKs first, all nb queries at a time; then the BLOCKs whole for some and split for
// others, query by query; then the vectors every query splits. Columns past a query's own n[b], up to the largest,
// are written too (the caller masks them).
inline void against_columns_many(const float (*x)[HEAD_DIM], int nb, const int *n, const float *rows, int stride,
                                 float *const *out) {
    int whole[QB], common = 1 << 30, widest = 0, top = 0;
    for (int b = 0; b < nb; b++) {
        whole[b] = n[b] / BLOCK * BLOCK;
        common = std::min(common, whole[b]);
        widest = std::max(widest, whole[b]);
        top = std::max(top, n[b]);
    }
    auto all = [&](int jb, bool is_whole) {
        switch (nb) {
            case 4: columns_block<4>(x, rows, stride, jb, out, is_whole); break;
            case 3: columns_block<3>(x, rows, stride, jb, out, is_whole); break;
            case 2: columns_block<2>(x, rows, stride, jb, out, is_whole); break;
            default: columns_block<1>(x, rows, stride, jb, out, is_whole);
        }
    };
    int jb = 0;
    for (; jb < common; jb += BLOCK) all(jb, true);
    for (; jb < widest; jb += BLOCK)
        for (int b = 0; b < nb; b++) {
            if (jb < whole[b]) columns_whole<1>(x + b, rows, stride, jb, out + b);
            else
                for (int c = jb; c < jb + BLOCK && c < n[b]; c += W) columns_split<1>(x + b, rows, stride, c, out + b);
        }
    for (; jb < top; jb += W) all(jb, false);
}

// acc[b] = weighted_sum(w[b], v, K) for nb <= QB weight rows, each zero past its own keys up to K.
template <int NB>
inline void weighted_sum_many_of(float *const *w, const float *__restrict v, int K, float (*acc)[HEAD_DIM]) {
    float o0[NB][HEAD_DIM] = {}, o1[NB][HEAD_DIM] = {};
    int j = 0;
    for (; j + 1 < K; j += 2) {
        const float *va = v + (long)j * HEAD_DIM, *vb = va + HEAD_DIM;
        for (int b = 0; b < NB; b++) {
            const float wa = w[b][j], wb = w[b][j + 1];
            for (int t = 0; t < HEAD_DIM; t++) { o0[b][t] += wa * va[t]; o1[b][t] += wb * vb[t]; }
        }
    }
    if (j < K)
        for (int b = 0; b < NB; b++)
            for (int t = 0; t < HEAD_DIM; t++) o0[b][t] += w[b][j] * v[(long)j * HEAD_DIM + t];
    for (int b = 0; b < NB; b++)
        for (int t = 0; t < HEAD_DIM; t++) acc[b][t] = o0[b][t] + o1[b][t];
}

inline void weighted_sum_many(float *const *w, int nb, const float *v, int K, float (*acc)[HEAD_DIM]) {
    switch (nb) {
        case 4: weighted_sum_many_of<4>(w, v, K, acc); break;
        case 3: weighted_sum_many_of<3>(w, v, K, acc); break;
        case 2: weighted_sum_many_of<2>(w, v, K, acc); break;
        default: weighted_sum_many_of<1>(w, v, K, acc);
    }
}

}  // namespace

// One new token per row. RoPE turns its queries and keys; its key and value go to column `col` of the row's cache;
// each query head then attends over columns 0..col of its key head (scaled scores, additive mask, softmax).
//   qkv: [B, (H + 2·Hkv)·d], rows qkv_row apart (query heads, key heads, value heads); cos, signed_sin: [P, d];
//   position: [B]; keys_t: [B, Hkv, d, L] (keys transposed: a query's scores are contiguous vector FMAs);
//   values: [B, Hkv, L, d]; mask: [B, L], rows mask_row apart (0 or -inf); out: [B, H·d]. L % BLOCK == 0. Then
//   `warm(next)`.
extern "C" void decode_attention(const float *__restrict qkv, long qkv_row, const float *__restrict cos,
                                 const float *__restrict signed_sin, const int64_t *__restrict position,
                                 float *__restrict keys_t, float *__restrict values, long L,
                                 const float *__restrict mask, long mask_row, float *__restrict out,
                                 int B, int H, int Hkv, int col, float scale, const void *next, long next_bytes) {
    const int d = HEAD_DIM, group = H / Hkv, K = col + 1, Kv = (K + W - 1) / W * W;
    float s[Kv];  // one head's scores, then its weights (L <= lean.KERNEL_MAX_CONTEXT keeps this small)
    float q[HEAD_DIM], k[HEAD_DIM], acc[HEAD_DIM];
    for (int b = 0; b < B; b++) {
        const float *row = qkv + b * qkv_row, *c = cos + position[b] * d, *sn = signed_sin + position[b] * d;
        for (int g = 0; g < Hkv; g++) {
            rope(row + (H + g) * d, c, sn, k);
            float *kt = keys_t + ((long)b * Hkv + g) * d * L;
            for (int t = 0; t < d; t++) kt[(long)t * L + col] = k[t];
            std::memcpy(values + (((long)b * Hkv + g) * L + col) * d, row + (H + Hkv + g) * d, d * sizeof(float));
        }
        const float *m = mask + b * mask_row;
        int lo = 0;  // a context shorter than the batch's longest starts right-aligned: its leading columns are masked
        while (lo < K && m[lo] == -INFINITY) lo++;
        lo = lo / W * W;  // whole vectors of them are neither read nor weighed (0 to every sum)
        for (int h = 0; h < H; h++) {
            rope(row + h * d, c, sn, q);
            against_columns(q, keys_t + ((long)b * Hkv + h / group) * d * L, L, Kv, scale, s, lo);
            float mx, inv = 1.f / weights(s, m, K, Kv, nullptr, &mx, lo);
            weighted_sum(s, values + ((long)b * Hkv + h / group) * L * d, K, acc, lo);
            float *o = out + ((long)b * H + h) * d;
            for (int t = 0; t < d; t++) o[t] = acc[t] * inv;
        }
    }
    warm(next, next_bytes);
}

// The prefill's cache write: row b's context (tokens start[b] .. start[b] + length[b] - 1 of the packed prefill, rows
// k_row floats apart in `k` and v_row in `v`, Hkv heads of d each) lands right-aligned at columns longest - length[b] ..
// longest - 1 of the row's cache: keys_t [B, Hkv, d, L] (transposed, as decode_attention reads them), values
// [B, Hkv, L, d]. Rows sharing a context (a GRPO group) each get a copy.
extern "C" void write_cache(const float *__restrict k, long k_row, const float *__restrict v, long v_row,
                            const int64_t *__restrict start, const int64_t *__restrict length, int B, int Hkv,
                            long L, int longest, float *__restrict keys_t, float *__restrict values) {
    const int d = HEAD_DIM;
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hkv; g++) {
            float *kt = keys_t + ((long)b * Hkv + g) * d * L, *vb = values + ((long)b * Hkv + g) * L * d;
            for (long j = 0; j < length[b]; j++) {
                const long token = start[b] + j, col = longest - length[b] + j;
                const float *kj = k + token * k_row + g * d, *vj = v + token * v_row + g * d;
                for (int t = 0; t < d; t++) kt[t * L + col] = kj[t];
                std::memcpy(vb + col * d, vj, d * sizeof(float));
            }
        }
}

// --- the packed training forward's attention (pluribus.models.lean.predicting_hidden_states) -------------------
// Tokens are packed, each once: q [N, H, d], k and v [N, Hkv, d] (after RoPE). A group of rows attends as a
// [G, Q, K] block: query i of row g is token queries[g·Q + i], its key j token keys[g·K + j], under an additive mask
// [G, Q, K] (0 or -inf; every query sees at least one key). Output [G·Q, H·d] and the log-sum-exp of each (row,
// head, query) [G, H, Q], from which the backward recomputes the weights (no [G, H, Q, K] buffer is kept). With
// `real` ([G] or null), row g's queries from real[g] on are padding: the forward writes zeros for them (their
// outputs are never read) instead of attending, which cost ~40% of its time on the bench's OPD batch.
// Per row and key head the row's keys and values are first gathered into contiguous buffers, keys transposed
// ([d, K]; the backward's values too): a query's scores against every key are then vertical vector FMAs, as in
// decode_attention, QB queries at a time (each key read once for all of them; the same sums as one at a time).

static inline float dot(const float *__restrict a, const float *__restrict b) {
#if HEAD_DIM % W == 0
    vf acc = {};
    for (int c = 0; c < HEAD_DIM; c += W) acc += vload(a + c) * vload(b + c);
    return hsum(acc);
#else
    float acc = 0.f;
    for (int t = 0; t < HEAD_DIM; t++) acc += a[t] * b[t];
    return acc;
#endif
}

namespace {

#if W == 16
// Rows r[0..15] of a 16 × 16 tile become its columns, in place: four rounds of two-vector shuffles (64 in all), in
// place of 256 scalar stores at a stride.
#define LANES(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, 4 * (i0), 4 * (i0) + 1, 4 * (i0) + 2, 4 * (i0) + 3, \
    4 * (i1), 4 * (i1) + 1, 4 * (i1) + 2, 4 * (i1) + 3, 4 * (i2), 4 * (i2) + 1, 4 * (i2) + 2, 4 * (i2) + 3, \
    4 * (i3), 4 * (i3) + 1, 4 * (i3) + 2, 4 * (i3) + 3)
static inline void transpose16(vf *r) {
    vf t[16], u[16];
    for (int i = 0; i < 16; i += 2) {  // 32-bit pairs within each 128-bit lane
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
    }
    for (int i = 0; i < 16; i += 4)  // 64-bit pairs: lane L of u[i + c] holds column 4L + c of rows i .. i + 3
        for (int h = 0; h < 2; h++) {
            u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25,
                                                   12, 13, 28, 29);
            u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26,
                                                       27, 14, 15, 30, 31);
        }
    for (int c = 0; c < 4; c++) {  // 128-bit lanes: column 4L + c is lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
        const vf x_lo = LANES(u[c], u[4 + c], 0, 1, 4, 5), x_hi = LANES(u[c], u[4 + c], 2, 3, 6, 7);
        const vf y_lo = LANES(u[8 + c], u[12 + c], 0, 1, 4, 5), y_hi = LANES(u[8 + c], u[12 + c], 2, 3, 6, 7);
        r[c] = LANES(x_lo, y_lo, 0, 2, 4, 6);
        r[4 + c] = LANES(x_lo, y_lo, 1, 3, 5, 7);
        r[8 + c] = LANES(x_hi, y_hi, 0, 2, 4, 6);
        r[12 + c] = LANES(x_hi, y_hi, 1, 3, 5, 7);
    }
}
#undef LANES
#endif

struct Gathered {  // one row's keys and values for one key head, in the layouts a kernel reads
    int K, Kb;
    bool backward;
    // keys transposed [d, Kb] (zero past K); the forward's values [K, d]; the backward's keys [K, d] and values
    // transposed [d, Kb]
    std::vector<float> kt, v, k, vt;
    Gathered(int K_, bool backward_) : K(K_), Kb((K_ + BLOCK - 1) / BLOCK * BLOCK), backward(backward_),
                                       kt(HEAD_DIM * Kb), v(backward ? 0 : K_ * HEAD_DIM),
                                       k(backward ? K_ * HEAD_DIM : 0), vt(backward ? HEAD_DIM * Kb : 0) {}
    void load(const float *key_src, const float *value_src, const int64_t *key, int Hkv, int kv_head) {
        for (int j = 0; j < K; j++) {
            const float *kj = key_src + (key[j] * Hkv + kv_head) * HEAD_DIM;
            const float *vj = value_src + (key[j] * Hkv + kv_head) * HEAD_DIM;
            std::memcpy(backward ? &k[j * HEAD_DIM] : &v[j * HEAD_DIM], backward ? kj : vj, HEAD_DIM * sizeof(float));
        }
#if W == 16 && HEAD_DIM % W == 0
        transpose_into(kt.data(), key_src, key, Hkv, kv_head);
        if (backward) transpose_into(vt.data(), value_src, key, Hkv, kv_head);
#else
        for (int j = 0; j < K; j++) {
            const float *kj = key_src + (key[j] * Hkv + kv_head) * HEAD_DIM;
            const float *vj = value_src + (key[j] * Hkv + kv_head) * HEAD_DIM;
            for (int t = 0; t < HEAD_DIM; t++) kt[t * Kb + j] = kj[t];
            if (backward)
                for (int t = 0; t < HEAD_DIM; t++) vt[t * Kb + j] = vj[t];
        }
#endif
    }
#if W == 16 && HEAD_DIM % W == 0
    // out [d, Kb] = the K rows (key heads `kv_head` of tokens `key`) of src, transposed 16 × 16 tiles at a time;
    // a last partial tile's missing rows are zeros (columns past K stay zero).
    void transpose_into(float *out, const float *src, const int64_t *key, int Hkv, int kv_head) const {
        for (int j0 = 0; j0 < K; j0 += W) {
            const int n = std::min(W, K - j0);
            for (int c = 0; c < HEAD_DIM; c += W) {
                vf tile[W];
                for (int i = 0; i < W; i++)
                    tile[i] = i < n ? vload(src + (key[j0 + i] * Hkv + kv_head) * HEAD_DIM + c) : vf{};
                transpose16(tile);
                for (int i = 0; i < W; i++) vstore(out + (long)(c + i) * Kb + j0, tile[i]);
            }
        }
    }
#endif
};

// The backward's sums over one row's keys j < K for nb <= QB queries of one head, term by term as the single-query
// loop ran them (queries in order within each key): dq[b] += dS·k_j, dk_j += dS·q[b], dv_j += p[b][j]·dout[b],
// dS = p[b][j]·(dp[b][j] - D[b])·scale, keys of no weight skipped. Each key's dk_j and dv_j stay in registers across
// the nb queries.
template <int NB>
inline void key_grads_of(const float *const *p, const float *const *dp, const float *D, float scale,
                         const float *const *q, const float *const *dout, const float *k, int K,
                         float *dk, float *dv, float (*dq)[HEAD_DIM]) {
#if HEAD_DIM % W == 0
    constexpr int V = HEAD_DIM / W;
    vf qv[NB][V], dov[NB][V], dqv[NB][V] = {};
    for (int b = 0; b < NB; b++)
        for (int c = 0; c < V; c++) qv[b][c] = vload(q[b] + c * W), dov[b][c] = vload(dout[b] + c * W);
    for (int j = 0; j < K; j++) {
        vf kv[V], dkv[V], dvv[V];
        for (int c = 0; c < V; c++)
            kv[c] = vload(k + j * HEAD_DIM + c * W), dkv[c] = vload(dk + j * HEAD_DIM + c * W),
            dvv[c] = vload(dv + j * HEAD_DIM + c * W);
        for (int b = 0; b < NB; b++) {
            const float pj = p[b][j];
            if (pj == 0.f) continue;
            const float dS = pj * (dp[b][j] - D[b]) * scale;
            for (int c = 0; c < V; c++) {
                dqv[b][c] += dS * kv[c];
                dkv[c] += dS * qv[b][c];
                dvv[c] += pj * dov[b][c];
            }
        }
        for (int c = 0; c < V; c++) vstore(dk + j * HEAD_DIM + c * W, dkv[c]), vstore(dv + j * HEAD_DIM + c * W, dvv[c]);
    }
    for (int b = 0; b < NB; b++)
        for (int c = 0; c < V; c++) vstore(dq[b] + c * W, dqv[b][c]);
#else
    for (int b = 0; b < NB; b++) std::fill(dq[b], dq[b] + HEAD_DIM, 0.f);
    for (int j = 0; j < K; j++)
        for (int b = 0; b < NB; b++) {
            const float pj = p[b][j];
            if (pj == 0.f) continue;
            const float dS = pj * (dp[b][j] - D[b]) * scale;
            const float *kj = k + j * HEAD_DIM, *qi = q[b], *doi = dout[b];
            float *dkj = dk + j * HEAD_DIM, *dvj = dv + j * HEAD_DIM;
            for (int t = 0; t < HEAD_DIM; t++) {
                dq[b][t] += dS * kj[t];
                dkj[t] += dS * qi[t];
                dvj[t] += pj * doi[t];
            }
        }
#endif
}

inline void key_grads(int nb, const float *const *p, const float *const *dp, const float *D, float scale,
                      const float *const *q, const float *const *dout, const float *k, int K, float *dk, float *dv,
                      float (*dq)[HEAD_DIM]) {
    switch (nb) {
        case 4: key_grads_of<4>(p, dp, D, scale, q, dout, k, K, dk, dv, dq); break;
        case 3: key_grads_of<3>(p, dp, D, scale, q, dout, k, K, dk, dv, dq); break;
        case 2: key_grads_of<2>(p, dp, D, scale, q, dout, k, K, dk, dv, dq); break;
        default: key_grads_of<1>(p, dp, D, scale, q, dout, k, K, dk, dv, dq);
    }
}

}  // namespace

extern "C" void packed_attention_forward(const float *__restrict q, const float *__restrict k,
                                         const float *__restrict v, int H, int Hkv, const int64_t *__restrict queries,
                                         const int64_t *__restrict keys, const float *__restrict mask,
                                         const int64_t *__restrict real, int G, int Q, int K, float scale,
                                         float *__restrict out, float *__restrict lse) {
    const int d = HEAD_DIM, group = H / Hkv;
    const std::vector<int> extent = seen_extents(mask, G * Q, K);
#pragma omp parallel if (G > 1)  // rows on the threads: their outputs are disjoint
    {
    Gathered row(K, false);
    std::vector<float> s((size_t)QB * row.Kb);
    float *sb[QB];
    for (int b = 0; b < QB; b++) sb[b] = &s[(size_t)b * row.Kb];
#pragma omp for schedule(static)
    for (int g = 0; g < G; g++) {
        const int queried = real ? (int)std::min<int64_t>(real[g], Q) : Q;  // the rest are padding: never read
        std::fill(out + ((long)g * Q + queried) * H * d, out + ((long)g + 1) * Q * H * d, 0.f);
        for (int h = 0; h < H; h++)
            std::fill(lse + ((long)g * H + h) * Q + queried, lse + ((long)g * H + h + 1) * Q, 0.f);
        for (int kv_head = 0; kv_head < Hkv; kv_head++) {
            row.load(k, v, keys + (long)g * K, Hkv, kv_head);
            for (int h = kv_head * group; h < (kv_head + 1) * group; h++)
                for (int i0 = 0; i0 < queried; i0 += QB) {
                    const int nb = std::min(QB, queried - i0);
                    float x[QB][HEAD_DIM], acc[QB][HEAD_DIM], total[QB], mx[QB];
                    int n[QB], seen[QB], top = 0;
                    for (int b = 0; b < nb; b++) {
                        const float *qi = q + (queries[g * Q + i0 + b] * H + h) * d;
                        for (int t = 0; t < d; t++) x[b][t] = qi[t] * scale;
                        seen[b] = extent[g * Q + i0 + b];
                        n[b] = (seen[b] + W - 1) / W * W;
                        top = std::max(top, seen[b]);
                    }
                    against_columns_many(x, nb, n, row.kt.data(), row.Kb, sb);
                    vf lanes[QB];
                    for (int b = 0; b < nb; b++) {
                        lanes[b] = weight_lanes(sb[b], mask + ((long)g * Q + i0 + b) * K, seen[b], n[b], nullptr,
                                                &mx[b]);
                        std::fill(sb[b] + n[b], sb[b] + std::max(n[b], top), 0.f);  // no weight past its keys
                    }
                    hsum_many(lanes, nb, total);
                    weighted_sum_many(sb, nb, row.v.data(), top, acc);
                    for (int b = 0; b < nb; b++) {
                        float *o = out + ((long)g * Q + i0 + b) * H * d + h * d;
                        for (int t = 0; t < d; t++) o[t] = acc[b][t] / total[b];
                        lse[((long)g * H + h) * Q + i0 + b] = mx[b] + std::log(total[b]);
                    }
                }
        }
    }
    }
}

// One row's key and value gradients (its K keys, one key head) added into dk and dv at the keys' tokens.
static inline void add_row_grads(float *dk, float *dv, const int64_t *key, int Hkv, int kv_head, int K,
                                 const float *dk_row, const float *dv_row) {
    for (int j = 0; j < K; j++) {
        float *dkp = dk + (key[j] * Hkv + kv_head) * HEAD_DIM, *dvp = dv + (key[j] * Hkv + kv_head) * HEAD_DIM;
        for (int t = 0; t < HEAD_DIM; t++) { dkp[t] += dk_row[j * HEAD_DIM + t]; dvp[t] += dv_row[j * HEAD_DIM + t]; }
    }
}

// Gradients of packed_attention_forward, added (+=) into dq [N, H, d], dk and dv [N, Hkv, d] in a fixed order, so a
// key shared by several rows (a GRPO group's prompt) gets the same sum every run, on any number of threads. dout:
// [G·Q, H·d]. Each token is the query of at most one (row, position) whose output gradient is not zero (the packed
// layout's: a prompt's queries attend from the row that runs it), so threads add into disjoint rows of dq; each row's
// key and value gradients are kept per row on several threads and added in row order after them.
extern "C" void packed_attention_backward(const float *__restrict q, const float *__restrict k,
                                          const float *__restrict v, int H, int Hkv,
                                          const int64_t *__restrict queries, const int64_t *__restrict keys,
                                          const float *__restrict mask, int G, int Q, int K, float scale,
                                          const float *__restrict out, const float *__restrict lse,
                                          const float *__restrict dout, float *__restrict dq, float *__restrict dk,
                                          float *__restrict dv) {
    const int d = HEAD_DIM, group = H / Hkv;
    const std::vector<int> extent = seen_extents(mask, G * Q, K);
    const bool parallel = G > 1 && threads() > 1;
    std::vector<float> kept(parallel ? (size_t)G * Hkv * K * d * 2 : 0);  // [G, Hkv, 2, K, d]: each row's dk, dv
#pragma omp parallel if (parallel)
    {
    Gathered row(K, true);
    std::vector<float> buffers((size_t)2 * QB * row.Kb), own(parallel ? 0 : K * d * 2);
    std::vector<int> active(Q);
    float *p[QB], *dp[QB];
    for (int b = 0; b < QB; b++) p[b] = &buffers[(size_t)b * row.Kb], dp[b] = &buffers[(size_t)(QB + b) * row.Kb];
#pragma omp for schedule(static)
    for (int g = 0; g < G; g++)
        for (int kv_head = 0; kv_head < Hkv; kv_head++) {
            const int64_t *key = keys + (long)g * K;
            row.load(k, v, key, Hkv, kv_head);
            float *dk_row = parallel ? &kept[((size_t)g * Hkv + kv_head) * K * d * 2] : own.data();
            float *dv_row = dk_row + (size_t)K * d;
            std::fill(dk_row, dk_row + (size_t)K * d * 2, 0.f);
            for (int h = kv_head * group; h < (kv_head + 1) * group; h++) {
                int live = 0;  // a padding query, or one whose output is not read, has no gradient
                for (int i = 0; i < Q; i++)
                    if (!all_zero(dout + ((long)g * Q + i) * H * d + h * d)) active[live++] = i;
                for (int a0 = 0; a0 < live; a0 += QB) {
                    const int nb = std::min(QB, live - a0);
                    const float *qs[QB], *dos[QB];
                    float x[QB][HEAD_DIM], y[QB][HEAD_DIM], dqs[QB][HEAD_DIM], D[QB];
                    int n[QB], seen[QB], top = 0;
                    for (int b = 0; b < nb; b++) {
                        const int i = active[a0 + b];
                        qs[b] = q + (queries[g * Q + i] * H + h) * d;
                        dos[b] = dout + ((long)g * Q + i) * H * d + h * d;
                        for (int t = 0; t < d; t++) x[b][t] = qs[b][t] * scale, y[b][t] = dos[b][t] * 1.f;
                        seen[b] = extent[g * Q + i];
                        n[b] = (seen[b] + W - 1) / W * W;
                        top = std::max(top, seen[b]);
                        D[b] = dot(dos[b], out + ((long)g * Q + i) * H * d + h * d);
                    }
                    against_columns_many(x, nb, n, row.kt.data(), row.Kb, p);
                    against_columns_many(y, nb, n, row.vt.data(), row.Kb, dp);
                    for (int b = 0; b < nb; b++) {
                        const int i = active[a0 + b];
                        weights(p[b], mask + ((long)g * Q + i) * K, seen[b], n[b], &lse[((long)g * H + h) * Q + i],
                                nullptr);
                        std::fill(p[b] + n[b], p[b] + std::max(n[b], top), 0.f);
                    }
                    key_grads(nb, p, dp, D, scale, qs, dos, row.k.data(), top, dk_row, dv_row, dqs);
                    for (int b = 0; b < nb; b++) {
                        float *dqp = dq + (queries[g * Q + active[a0 + b]] * H + h) * d;
                        for (int t = 0; t < d; t++) dqp[t] += dqs[b][t];
                    }
                }
            }
            if (!parallel) add_row_grads(dk, dv, key, Hkv, kv_head, K, dk_row, dv_row);
        }
    }
    if (parallel)
        for (int g = 0; g < G; g++)
            for (int kv_head = 0; kv_head < Hkv; kv_head++) {
                const float *dk_row = &kept[((size_t)g * Hkv + kv_head) * K * d * 2];
                add_row_grads(dk, dv, keys + (long)g * K, Hkv, kv_head, K, dk_row, dk_row + (size_t)K * d);
            }
}
