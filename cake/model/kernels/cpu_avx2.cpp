// cake's own CPU kernels for AVX2 machines (x86 without AVX-512 is most laptops and desktops),
// where torch's int4 kernel reads weights at a fifth of the memory bandwidth.
//
// int4 weights are cake's QuantizedTensor layout, used as stored (no repacking):
//   q      uint8 (N, K/2): column 2j in the low nibble, 2j+1 in the high one, values 0..15
//   scales bf16  (N, K/G), zeros bf16 (N, K/G):  w[n, k] = (q - 8) * scale + zero
// zeros may be null: all zero (symmetric formats such as GGUF's Q4_0), a tenth fewer bytes.
// Activations are quantized per block of 32 to 16-bit precision (int4: two int8 parts, see
// QuantRow; int8: int16 values), a relative error of ~2e-5, below bf16's 4e-3. Plain int8
// activations, as llama.cpp's Q8_0, erred by 1-2% on SmolLM2's real hidden states and flipped
// its greedy answers. A block's dot product is then integer, and per 32-block
//   sum_k w x = xs * scale * sum q*xq + (zero - 8 scale) * sum x.
// Threads: OpenMP. torch's wheel loads libgomp.so.1 first, so these loops run on torch's own
// thread pool (the soname is shared), sized by the caller (torch.get_num_threads()).
//
// Built by cake/model/kernels/native.py with the system C++ compiler; called through ctypes.

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>

extern "C" {

int cake_kernels_version() { return 2; }

int cake_cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

}  // extern "C"

static const int64_t PREFETCH_BYTES = 4096;  // how far ahead of the weight bytes being read

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// 8 bf16 values -> 8 floats.
static inline __m256 load_bf16x8(const uint16_t* p) {
    __m128i raw = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline float block_scale(const float* xb, float* inv) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(xb[i]));
    *inv = amax > 0.f ? 32767.f / amax : 0.f;
    return amax / 32767.f;
}

// One row of activations for the int4 kernel, in two int8 parts per 32-block: x ~ xs * (254 *
// hi + lo) with xs = max|x| / (127 * 254), so the integer dot products run on maddubs (4-bit
// unsigned x 8-bit signed) at the precision of 16-bit activations. Laid out per pair of blocks
// (64 columns, 128 bytes): hi of the even columns of both blocks (block a's 16, then a+1's),
// hi of the odd columns, lo of the even, lo of the odd. Even and odd match the low and high
// nibbles of the weight bytes.
struct QuantRow {
    int8_t* parts;  // (blocks + 1) / 2 * 128 bytes
    float* scale;   // per block: xs
    float* sum;     // per block: the exact sum of its 32 activations
};

// halves: the column order of GGUF's Q4_0/Q4_1 bytes (byte j holds values j and j + 16 of its
// block), where cake's own bytes hold 2j and 2j + 1.
static void quantize_row(const float* x, int64_t K, QuantRow r, bool halves = false) {
    int64_t blocks = K / 32;
    for (int64_t b = 0; b < blocks; ++b) {
        const float* xb = x + b * 32;
        float amax = 0.f, sum = 0.f;
        for (int i = 0; i < 32; ++i) { amax = fmaxf(amax, fabsf(xb[i])); sum += xb[i]; }
        float step_hi = amax / 127.f, inv_hi = amax > 0.f ? 127.f / amax : 0.f;
        float step_lo = step_hi / 254.f, inv_lo = amax > 0.f ? 254.f * 127.f / amax : 0.f;
        int8_t* pair = r.parts + (b / 2) * 128 + (b % 2) * 16;
        for (int j = 0; j < 32; ++j) {
            int hi = (int)lrintf(xb[j] * inv_hi);
            int lo = (int)lrintf((xb[j] - (float)hi * step_hi) * inv_lo);
            lo = lo > 127 ? 127 : (lo < -127 ? -127 : lo);
            // the low nibbles' values first, the high nibbles' after
            int column = halves ? (j / 16) * 32 + j % 16 : (j % 2) * 32 + j / 2;
            pair[column] = (int8_t)hi;
            pair[64 + column] = (int8_t)lo;
        }
        r.scale[b] = step_lo;
        r.sum[b] = sum;
    }
    if (blocks % 2) {  // the last pair's second block: zeros (its weights are read as zeros)
        int8_t* pair = r.parts + (blocks / 2) * 128 + 16;
        for (int half = 0; half < 4; ++half) memset(pair + half * 32, 0, 16);
    }
}

// Integer dot products of the weight bytes of a pair of blocks (v: block a in bytes 0-15, a+1
// in 16-31) with their activations: int32 lanes 0-3 sum to block a's, 4-7 to block a+1's.
static inline __m256i pair_dot(__m256i v, const int8_t* x) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1), hi_weight = _mm256_set1_epi16(254);
    __m256i even = _mm256_and_si256(v, mask);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    __m256i hi = _mm256_add_epi16(
        _mm256_maddubs_epi16(even, _mm256_loadu_si256((const __m256i*)x)),
        _mm256_maddubs_epi16(odd, _mm256_loadu_si256((const __m256i*)(x + 32))));
    __m256i lo = _mm256_add_epi16(
        _mm256_maddubs_epi16(even, _mm256_loadu_si256((const __m256i*)(x + 64))),
        _mm256_maddubs_epi16(odd, _mm256_loadu_si256((const __m256i*)(x + 96))));
    return _mm256_add_epi32(_mm256_madd_epi16(hi, hi_weight), _mm256_madd_epi16(lo, ones));
}

// One row of int4 weights as the dot products read it: cake's layout (below) or GGUF's Q4_0/Q4_1
// blocks (further down). For 8 blocks from `blk` (EIGHT: when the layout holds one scale per
// block): their scales and "mins" (w = scale * q + min, so min = zero - 8 scale); one pair of
// blocks' 32 weight bytes (block a in bytes 0-15, a+1 in 16-31); one block's scale and min.
struct CakeInt4Row {
    const uint8_t* q;
    const uint16_t* sc;
    const uint16_t* zr;  // null: all zero
    int64_t per_group;   // blocks of 32 per group
    static const int BYTES_PER_BLOCK = 16;
    const uint8_t* bytes(int64_t blk) const { return q + blk * 16; }
    __m256 scales8(int64_t blk) const { return load_bf16x8(sc + blk); }
    __m256 mins8(int64_t blk, __m256 s8) const {
        __m256 z8 = zr ? load_bf16x8(zr + blk) : _mm256_setzero_ps();
        return _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s8, z8);
    }
    __m256i pair(int64_t a) const { return _mm256_loadu_si256((const __m256i*)(q + a * 16)); }
    __m128i one(int64_t a) const { return _mm_loadu_si128((const __m128i*)(q + a * 16)); }
    float scale(int64_t blk) const { return bf16_to_f32(sc[blk / per_group]); }
    float min(int64_t blk) const {
        return (zr ? bf16_to_f32(zr[blk / per_group]) : 0.f) - 8.f * scale(blk);
    }
};

// Dot products of one int4 weight row with up to 4 activation rows. EIGHT: 8 blocks' scales
// load as one vector (cake's layout with groups of 32, GGUF's blocks).
template <int B, bool EIGHT, class Row>
static inline void dot_row(const Row& w, int64_t K, const QuantRow* x, float* out) {
    __m256 acc[B], macc[B];
    for (int b = 0; b < B; ++b) { acc[b] = _mm256_setzero_ps(); macc[b] = _mm256_setzero_ps(); }
    int64_t blocks = K / 32, blk = 0;
    if (EIGHT) {
        for (; blk + 8 <= blocks; blk += 8) {
            // The hardware prefetcher alone left ~15% of the bandwidth unused here (AVX2
            // EPYC, weights streamed from DRAM); 4 KiB ahead measured best of 1-16 KiB.
            const char* ahead = (const char*)w.bytes(blk) + PREFETCH_BYTES;
            _mm_prefetch(ahead, _MM_HINT_T0);
            _mm_prefetch(ahead + 64, _MM_HINT_T0);
            if (Row::BYTES_PER_BLOCK > 16) _mm_prefetch(ahead + 128, _MM_HINT_T0);
            __m256 s8 = w.scales8(blk);
            __m256 m8 = w.mins8(blk, s8);
            __m256 d8[B];
            for (int b = 0; b < B; ++b) {
                d8[b] = _mm256_mul_ps(s8, _mm256_loadu_ps(x[b].scale + blk));
                macc[b] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(x[b].sum + blk), macc[b]);
            }
            __m256i pick = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
            for (int p = 0; p < 4; ++p, pick = _mm256_add_epi32(pick, _mm256_set1_epi32(2))) {
                int64_t a = blk + 2 * p;
                __m256i v = w.pair(a);
                for (int b = 0; b < B; ++b) {
                    __m256 dot = _mm256_cvtepi32_ps(pair_dot(v, x[b].parts + (a / 2) * 128));
                    acc[b] = _mm256_fmadd_ps(dot, _mm256_permutevar8x32_ps(d8[b], pick), acc[b]);
                }
            }
        }
    }
    float mins[B];
    for (int b = 0; b < B; ++b) mins[b] = 0.f;
    for (; blk < blocks; blk += 2) {  // the rest a pair at a time (the last may be single)
        bool single = blk + 1 == blocks;
        __m256i v = single ? _mm256_zextsi128_si256(w.one(blk)) : w.pair(blk);
        float sa = w.scale(blk), ma = w.min(blk);
        float sb = single ? 0.f : w.scale(blk + 1), mb = single ? 0.f : w.min(blk + 1);
        for (int b = 0; b < B; ++b) {
            float da = sa * x[b].scale[blk], db = single ? 0.f : sb * x[b].scale[blk + 1];
            __m256 d = _mm256_set_m128(_mm_set1_ps(db), _mm_set1_ps(da));
            __m256 dot = _mm256_cvtepi32_ps(pair_dot(v, x[b].parts + (blk / 2) * 128));
            acc[b] = _mm256_fmadd_ps(dot, d, acc[b]);
            mins[b] += ma * x[b].sum[blk] + (single ? 0.f : mb * x[b].sum[blk + 1]);
        }
    }
    for (int b = 0; b < B; ++b) out[b] = hsum(acc[b]) + hsum(macc[b]) + mins[b];
}

// y (M, N) = x (M, K) @ W.T, one weight row (`row_of(n)`) at a time, up to 4 activation rows
// per pass over it. The activations are quantized first (QuantRow; `halves`: GGUF's order).
template <bool EIGHT, class RowOf>
static void int4_product(const float* x, int64_t M, int64_t K, int64_t N, bool halves,
                         RowOf row_of, float* y, int threads) {
    int64_t blocks = K / 32;
    int64_t row_bytes = (blocks + 1) / 2 * 128;
    int8_t* qx = (int8_t*)aligned_alloc(64, (size_t)(M * row_bytes + 64));
    float* fx = (float*)aligned_alloc(64, (size_t)(M * blocks * 2 * sizeof(float) + 64));
    QuantRow* rows = (QuantRow*)malloc(sizeof(QuantRow) * (size_t)M);
    for (int64_t m = 0; m < M; ++m) {
        rows[m] = QuantRow{qx + m * row_bytes, fx + m * blocks * 2, fx + m * blocks * 2 + blocks};
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (M * K > 32768)
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, K, rows[m], halves);

    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        auto w = row_of(n);
        int64_t m = 0;
        float out[4];
        for (; m + 4 <= M; m += 4) {
            dot_row<4, EIGHT>(w, K, rows + m, out);
            for (int b = 0; b < 4; ++b) y[(m + b) * N + n] = out[b];
        }
        for (; m + 2 <= M; m += 2) {
            dot_row<2, EIGHT>(w, K, rows + m, out);
            for (int b = 0; b < 2; ++b) y[(m + b) * N + n] = out[b];
        }
        for (; m < M; ++m) {
            dot_row<1, EIGHT>(w, K, rows + m, out);
            y[m * N + n] = out[0];
        }
    }
    free(rows);
    free(fx);
    free(qx);
}

extern "C" {

// y (M, N) f32 = x (M, K) f32 @ W.T for an int4 W (see the top of the file). K % 32 == 0,
// G % 32 == 0, K % G == 0. Meant for decode and small batches (M of a few rows).
void cake_int4_linear(const float* x, int64_t M, int64_t K, const uint8_t* q,
                      const uint16_t* scales, const uint16_t* zeros, int64_t N, int64_t G,
                      float* y, int threads) {
    int64_t groups = K / G;
    auto row_of = [=](int64_t n) {
        return CakeInt4Row{q + n * (K / 2), scales + n * groups,
                           zeros ? zeros + n * groups : nullptr, G / 32};
    };
    if (G == 32) int4_product<true>(x, M, K, N, false, row_of, y, threads);
    else int4_product<false>(x, M, K, N, false, row_of, y, threads);
}

// Rows [r0, r1) of an int4 W, dequantized to f32 into out ((r1 - r0), K): the prefill path
// multiplies tiles of these with the BLAS GEMM.
void cake_int4_dequantize(const uint8_t* q, const uint16_t* scales, const uint16_t* zeros,
                          int64_t K, int64_t G, int64_t r0, int64_t r1, float* out,
                          int threads) {
    int64_t groups = K / G;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = r0; n < r1; ++n) {
        const uint8_t* qn = q + n * (K / 2);
        float* o = out + (n - r0) * K;
        for (int64_t g = 0; g < groups; ++g) {
            float s = bf16_to_f32(scales[n * groups + g]);
            float z = (zeros ? bf16_to_f32(zeros[n * groups + g]) : 0.f) - 8.f * s;
            __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
            for (int64_t c = g * G; c < (g + 1) * G; c += 16) {
                // 8 bytes -> 16 values: low nibble = column c+2j, high = c+2j+1.
                __m128i v = _mm_loadl_epi64((const __m128i*)(qn + c / 2));
                __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
                __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
                __m128i inter = _mm_unpacklo_epi8(lo, hi);  // c, c+1, ..., c+15
                __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(inter));
                __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(inter, 8)));
                _mm256_storeu_ps(o + c, _mm256_fmadd_ps(a, vs, vz));
                _mm256_storeu_ps(o + c + 8, _mm256_fmadd_ps(b, vs, vz));
            }
        }
    }
}

}  // extern "C"

// --- int8 weights, per output channel: q int8 (N, K), scales bf16 (N,); w = q * scale --------

static void quantize_row_plain(const float* x, int64_t K, int16_t* xq, float* xs) {
    for (int64_t b = 0; b < K / 32; ++b) {
        const float* xb = x + b * 32;
        float inv;
        xs[b] = block_scale(xb, &inv);
        for (int i = 0; i < 32; ++i) xq[b * 32 + i] = (int16_t)lrintf(xb[i] * inv);
    }
}

// One row of int8 weights as dot_row_int8 reads it: cake's (per-channel scale, applied to the
// row's sum) or GGUF's Q8_0 blocks (34 bytes: an f16 scale, 32 int8 values; further down).
struct CakeInt8Row {
    const int8_t* q;
    float row_scale;
    const int8_t* values(int64_t blk) const { return q + blk * 32; }
    float scale(int64_t) const { return 1.f; }
};

template <int B, class Row>
static inline void dot_row_int8(const Row& w, int64_t K, const int16_t* const* xq,
                                const float* const* xs, float* out) {
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < K / 32; ++blk) {
        if (blk % 2 == 0) _mm_prefetch((const char*)w.values(blk) + PREFETCH_BYTES, _MM_HINT_T0);
        __m256i v = _mm256_loadu_si256((const __m256i*)w.values(blk));
        __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
        __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
        float d = w.scale(blk);
        for (int b = 0; b < B; ++b) {
            const int16_t* x = xq[b] + blk * 32;
            __m256i s = _mm256_add_epi32(
                _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i*)x)),
                _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i*)(x + 16))));
            acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xs[b][blk]),
                                     acc[b]);
        }
    }
    for (int b = 0; b < B; ++b) out[b] = hsum(acc[b]) * w.row_scale;
}

// y (M, N) = x (M, K) @ W.T, int8 weights a row (`row_of(n)`) at a time, up to 4 activation
// rows per pass; the activations quantized to int16 per block of 32 first.
template <class RowOf>
static void int8_product(const float* x, int64_t M, int64_t K, int64_t N, RowOf row_of,
                         float* y, int threads) {
    int64_t blocks = K / 32;
    int16_t* qx = (int16_t*)aligned_alloc(64, (size_t)(M * K * 2 + 64));
    float* sx = (float*)aligned_alloc(64, (size_t)(M * blocks * sizeof(float) + 64));
    #pragma omp parallel for num_threads(threads) schedule(static) if (M * K > 32768)
    for (int64_t m = 0; m < M; ++m) quantize_row_plain(x + m * K, K, qx + m * K, sx + m * blocks);

    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        auto w = row_of(n);
        const int16_t* xr[4];
        const float* sr[4];
        float out[4];
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            for (int b = 0; b < 4; ++b) { xr[b] = qx + (m + b) * K; sr[b] = sx + (m + b) * blocks; }
            dot_row_int8<4>(w, K, xr, sr, out);
            for (int b = 0; b < 4; ++b) y[(m + b) * N + n] = out[b];
        }
        for (; m < M; ++m) {
            xr[0] = qx + m * K;
            sr[0] = sx + m * blocks;
            dot_row_int8<1>(w, K, xr, sr, out);
            y[m * N + n] = out[0];
        }
    }
    free(sx);
    free(qx);
}

extern "C" {

// y (M, N) f32 = x (M, K) f32 @ W.T for an int8 W. K % 32 == 0.
void cake_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* q,
                      const uint16_t* scales, int64_t N, float* y, int threads) {
    auto row_of = [=](int64_t n) { return CakeInt8Row{q + n * K, bf16_to_f32(scales[n])}; };
    int8_product(x, M, K, N, row_of, y, threads);
}

// Rows [r0, r1) of an int8 W as f32 into out ((r1 - r0), K).
void cake_int8_dequantize(const int8_t* q, const uint16_t* scales, int64_t K, int64_t r0,
                          int64_t r1, float* out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = r0; n < r1; ++n) {
        __m256 s = _mm256_set1_ps(bf16_to_f32(scales[n]));
        const int8_t* wn = q + n * K;
        float* o = out + (n - r0) * K;
        int64_t c = 0;
        for (; c + 8 <= K; c += 8) {
            __m128i v = _mm_loadl_epi64((const __m128i*)(wn + c));
            _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s));
        }
        for (; c < K; ++c) o[c] = (float)wn[c] * bf16_to_f32(scales[n]);
    }
}

}  // extern "C"

// --- the small f32 operations of a block, one call each instead of several torch ops --------

extern "C" {

// out = w * x / sqrt(mean(x^2) + eps), row by row: RMSNorm in f32.
void cake_rms_norm(const float* x, int64_t rows, int64_t C, const float* w, float eps,
                   float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * C;
        float* o = out + r * C;
        __m256 acc = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 8 <= C; c += 8) {
            __m256 v = _mm256_loadu_ps(xr + c);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (; c < C; ++c) ss += xr[c] * xr[c];
        __m256 scale = _mm256_set1_ps(1.f / sqrtf(ss / (float)C + eps));
        for (c = 0; c + 8 <= C; c += 8) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xr + c), scale);
            _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(w + c), v));
        }
        for (; c < C; ++c) o[c] = w[c] * (xr[c] * _mm_cvtss_f32(_mm256_castps256_ps128(scale)));
    }
}

// Rotary embedding in place on the first `heads` heads (q and k) of each row of a fused
// q|k|v output: x (rows, row_stride), head h of row r at x + r * row_stride + h * hd. Row r
// takes cos/sin row (r % table_rows) of (table_rows, hd) tables. rotate_half convention:
//   x'[i] = x[i] cos[i] - x[i + hd/2] sin[i];  x'[i + hd/2] = x[i + hd/2] cos[i + hd/2] + x[i] sin[i + hd/2]
void cake_rope(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t hd,
               const float* cos, const float* sin, int64_t table_rows) {
    int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; ++r) {
        const float* c = cos + (r % table_rows) * hd;
        const float* s = sin + (r % table_rows) * hd;
        for (int64_t h = 0; h < heads; ++h) {
            float* a = x + r * row_stride + h * hd;
            float* b = a + half;
            int64_t i = 0;
            for (; i + 8 <= half; i += 8) {
                __m256 va = _mm256_loadu_ps(a + i), vb = _mm256_loadu_ps(b + i);
                __m256 ra = _mm256_fnmadd_ps(vb, _mm256_loadu_ps(s + i),
                                             _mm256_mul_ps(va, _mm256_loadu_ps(c + i)));
                __m256 rb = _mm256_fmadd_ps(va, _mm256_loadu_ps(s + half + i),
                                            _mm256_mul_ps(vb, _mm256_loadu_ps(c + half + i)));
                _mm256_storeu_ps(a + i, ra);
                _mm256_storeu_ps(b + i, rb);
            }
            for (; i < half; ++i) {
                float va = a[i], vb = b[i];
                a[i] = va * c[i] - vb * s[i];
                b[i] = vb * c[half + i] + va * s[half + i];
            }
        }
    }
}

}  // extern "C"

// --- SiLU(gate) * up for a fused gate|up output --------------------------------------------

// e^x for 8 floats (Cephes' single-precision polynomial: relative error ~1e-7; x clamped to
// the range where e^x is a finite float).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

extern "C" {

// out (rows, inner) = silu(gu[:, :inner]) * gu[:, inner:], silu(g) = g / (1 + e^-g).
void cake_silu_mul(const float* gu, int64_t rows, int64_t inner, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* g = gu + r * 2 * inner;
        const float* u = g + inner;
        float* o = out + r * inner;
        int64_t i = 0;
        for (; i + 8 <= inner; i += 8) {
            __m256 vg = _mm256_loadu_ps(g + i);
            __m256 denom = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), vg)));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(vg, denom), _mm256_loadu_ps(u + i)));
        }
        for (; i < inner; ++i) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

}  // extern "C"

// --- GGUF's Q4_0 and Q4_1 blocks, used where they lie in the mapped file --------------------
//
// A row of K values is K/32 blocks of BYTES bytes: Q4_0 (18) = d (f16), 16 bytes of nibbles;
// Q4_1 (20) = d, m (f16), 16 bytes. Byte j of a block holds value j (low nibble) and j + 16
// (high); w = d * (q - 8) for Q4_0, d * q + m for Q4_1. The same integer dot products as the
// int4 kernel above (pair_dot), on activations quantized in the halves order.

static inline float f16_to_f32(const uint8_t* p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return _cvtsh_ss(v);
}

// 8 consecutive blocks' f16 at byte `at` of each block -> 8 floats.
template <int BYTES>
static inline __m256 load_f16_strided(const uint8_t* first, int at) {
    uint16_t h[8];
    for (int i = 0; i < 8; ++i) memcpy(h + i, first + i * BYTES + at, 2);
    __m128i v = _mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], (short)h[4],
                               (short)h[5], (short)h[6], (short)h[7]);
    return _mm256_cvtph_ps(v);
}

// A row of Q4_0 (BYTES 18) or Q4_1 (20) blocks, for dot_row.
template <int BYTES>
struct GgufQ4Row {
    const uint8_t* row;
    static const int QS = BYTES - 16;  // where a block's nibbles start
    static const int BYTES_PER_BLOCK = BYTES;
    const uint8_t* bytes(int64_t blk) const { return row + blk * BYTES; }
    __m256 scales8(int64_t blk) const { return load_f16_strided<BYTES>(bytes(blk), 0); }
    __m256 mins8(int64_t blk, __m256 s8) const {
        return BYTES == 20 ? load_f16_strided<BYTES>(bytes(blk), 2)
                           : _mm256_mul_ps(_mm256_set1_ps(-8.f), s8);
    }
    __m256i pair(int64_t a) const {
        return _mm256_set_m128i(_mm_loadu_si128((const __m128i*)(bytes(a + 1) + QS)), one(a));
    }
    __m128i one(int64_t a) const { return _mm_loadu_si128((const __m128i*)(bytes(a) + QS)); }
    float scale(int64_t blk) const { return f16_to_f32(bytes(blk)); }
    float min(int64_t blk) const {
        return BYTES == 20 ? f16_to_f32(bytes(blk) + 2) : -8.f * scale(blk);
    }
};

template <int BYTES>
static void q4_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                      float* y, int threads) {
    int64_t row_bytes = K / 32 * BYTES;
    auto row_of = [=](int64_t n) { return GgufQ4Row<BYTES>{w + n * row_bytes}; };
    int4_product<true>(x, M, K, N, true, row_of, y, threads);
}

template <int BYTES>
static void q4_dequantize_row(const uint8_t* row, int64_t K, float* o) {
    const int QS = BYTES - 16;
    for (int64_t blk = 0; blk < K / 32; ++blk) {
        const uint8_t* a = row + blk * BYTES;
        float s = f16_to_f32(a), m = BYTES == 20 ? f16_to_f32(a + 2) : -8.f * s;
        __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
        __m128i v = _mm_loadu_si128((const __m128i*)(a + QS));
        __m128i halves[2] = {_mm_and_si128(v, _mm_set1_epi8(0x0F)),
                             _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F))};
        for (int h = 0; h < 2; ++h) {  // values 0-15 (low nibbles), 16-31 (high)
            __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
            __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8)));
            _mm256_storeu_ps(o + blk * 32 + h * 16, _mm256_fmadd_ps(lo, vs, vm));
            _mm256_storeu_ps(o + blk * 32 + h * 16 + 8, _mm256_fmadd_ps(hi, vs, vm));
        }
    }
}

// GGUF's Q8_0: blocks of 34 bytes, an f16 scale d and 32 int8 values q; w = d * q.
static const int64_t Q8_BYTES = 34;

struct GgufQ8Row {
    const uint8_t* row;
    float row_scale = 1.f;
    const int8_t* values(int64_t blk) const { return (const int8_t*)(row + blk * Q8_BYTES + 2); }
    float scale(int64_t blk) const { return f16_to_f32(row + blk * Q8_BYTES); }
};

static void q8_dequantize_row(const uint8_t* row, int64_t K, float* o) {
    for (int64_t blk = 0; blk < K / 32; ++blk) {
        const uint8_t* a = row + blk * Q8_BYTES;
        __m256 d = _mm256_set1_ps(f16_to_f32(a));
        for (int c = 0; c < 32; c += 8) {
            __m128i v = _mm_loadl_epi64((const __m128i*)(a + 2 + c));
            __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            _mm256_storeu_ps(o + blk * 32 + c, _mm256_mul_ps(f, d));
        }
    }
}

extern "C" {

// y (M, N) f32 = x (M, K) f32 @ W.T for W stored as GGUF blocks of 32 values, row after row,
// the format named by the size of a block: Q4_0 (block_bytes 18), Q4_1 (20), Q8_0 (34).
// K % 32 == 0.
void cake_gguf_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t block_bytes,
                    int64_t N, float* y, int threads) {
    if (block_bytes == Q8_BYTES) {
        int64_t row_bytes = K / 32 * Q8_BYTES;
        auto row_of = [=](int64_t n) { return GgufQ8Row{w + n * row_bytes}; };
        int8_product(x, M, K, N, row_of, y, threads);
    } else if (block_bytes == 20) {
        q4_linear<20>(x, M, K, w, N, y, threads);
    } else {
        q4_linear<18>(x, M, K, w, N, y, threads);
    }
}

// The W rows listed in `rows` (n of them) dequantized to f32 into out (n, K): the prefill
// path's tiles and a stored embedding table's looked-up rows.
void cake_gguf_dequantize(const uint8_t* w, int64_t block_bytes, int64_t K, const int64_t* rows,
                        int64_t n, float* out, int threads) {
    int64_t row_bytes = K / 32 * block_bytes;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * K > 32768)
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* row = w + rows[i] * row_bytes;
        if (block_bytes == Q8_BYTES) q8_dequantize_row(row, K, out + i * K);
        else if (block_bytes == 20) q4_dequantize_row<20>(row, K, out + i * K);
        else q4_dequantize_row<18>(row, K, out + i * K);
    }
}

}  // extern "C"
