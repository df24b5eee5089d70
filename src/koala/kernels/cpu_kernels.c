/* y = x W^T (+ b) on x86 CPUs with AVX2 and FMA, for fp32, bf16 or fp16 weights and fp32 activations.

   Every output element is the same chain of operations whatever the number of rows M and whatever tile it falls
   in: 8-lane FMAs over k in order, one fixed horizontal sum, scalar FMAs over the tail, then the bias. So a row's
   result does not depend on how many rows share the call, which is what makes verifying n draft tokens give each
   the bits of a one-token step (lossless speculative decoding). Half-precision weights are widened exactly to
   fp32; for 8 rows or more a block of columns is widened once into a small buffer and reused by every row.
   Compiled by koala.cpu_kernels with -ffp-contract=off so the compiler cannot fuse or reorder differently. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

enum { F32 = 0, BF16 = 1, F16 = 2, COLS = 3, ROWS = 4, BUF_K = 4096 };

static inline __m256 load8(const void *w, int kind, int64_t i) {
  if (kind == F32) return _mm256_loadu_ps((const float *)w + i);
  __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
  if (kind == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

static inline float load1(const void *w, int kind, int64_t i) {
  if (kind == F32) return ((const float *)w)[i];
  uint16_t v = ((const uint16_t *)w)[i];
  if (kind == BF16) {
    union { uint32_t u; float f; } c = {(uint32_t)v << 16};
    return c.f;
  }
  return _cvtsh_ss(v);
}

static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

/* R rows (from m0) x C columns (w points at the block's first column, rows of length K) into y[., n0 + c]. */
#define TILE(R, C)                                                                                         \
  static inline void tile_##R##_##C(const float *x, const void *w, int kind, const float *bias, float *y, \
                                    int64_t m0, int64_t n0, int64_t N, int64_t K) {                      \
    __m256 acc[R][C];                                                                                      \
    for (int r = 0; r < R; r++)                                                                            \
      for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();                                        \
    int64_t k = 0;                                                                                         \
    for (; k + 8 <= K; k += 8) {                                                                           \
      __m256 wv[C];                                                                                        \
      for (int c = 0; c < C; c++) wv[c] = load8(w, kind, c * K + k);                                       \
      for (int r = 0; r < R; r++) {                                                                        \
        __m256 xv = _mm256_loadu_ps(x + (m0 + r) * K + k);                                                 \
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);                     \
      }                                                                                                    \
    }                                                                                                      \
    for (int r = 0; r < R; r++)                                                                            \
      for (int c = 0; c < C; c++) {                                                                        \
        float s = hsum(acc[r][c]);                                                                         \
        for (int64_t t = k; t < K; t++) s = fmaf(x[(m0 + r) * K + t], load1(w, kind, c * K + t), s);      \
        if (bias) s += bias[n0 + c];                                                                       \
        y[(m0 + r) * N + n0 + c] = s;                                                                      \
      }                                                                                                    \
  }
TILE(4, 3) /* ROWS x COLS */
TILE(1, 3)
TILE(4, 1)
TILE(1, 1)

/* Columns [n0, n0 + cols) for every row; cols is COLS or 1. */
static void block(const float *x, const void *w, int kind, const float *bias, float *y, int64_t M, int64_t N,
                  int64_t K, int64_t n0, int cols) {
  float buf[COLS * BUF_K];
  const void *wb = (const char *)w + n0 * K * (kind == F32 ? 4 : 2);
  if (kind != F32 && M >= 2 * ROWS && K <= BUF_K) { /* widen once, exactly: the same bits as widening per row */
    int64_t i = 0;
    for (; i + 8 <= cols * K; i += 8) _mm256_storeu_ps(buf + i, load8(wb, kind, i));
    for (; i < cols * K; i++) buf[i] = load1(wb, kind, i);
    wb = buf;
    kind = F32;
  }
  int64_t m = 0;
  for (; m + ROWS <= M; m += ROWS) {
    if (cols == COLS) tile_4_3(x, wb, kind, bias, y, m, n0, N, K);
    else tile_4_1(x, wb, kind, bias, y, m, n0, N, K);
  }
  for (; m < M; m++) {
    if (cols == COLS) tile_1_3(x, wb, kind, bias, y, m, n0, N, K);
    else tile_1_1(x, wb, kind, bias, y, m, n0, N, K);
  }
}

void koala_linear(const float *x, const void *w, int kind, const float *bias, float *y, int64_t M, int64_t N,
                  int64_t K) {
  int64_t full = N / COLS, blocks = full + N % COLS;
  /* small products are not worth waking a second thread for (threads never change a result) */
  #pragma omp parallel for schedule(static) if (M * N * K > (1 << 17))
  for (int64_t b = 0; b < blocks; b++) {
    if (b < full) block(x, w, kind, bias, y, M, N, K, b * COLS, COLS);
    else block(x, w, kind, bias, y, M, N, K, full * COLS + (b - full), 1);
  }
}

/* exp for x <= 0 (softmax after subtracting the max), per lane: a deterministic polynomial (Cephes' expf
   coefficients), 0 below -87 so that masked keys add exact zeros. */
static inline __m256 exp_neg(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}

static inline float dot(const float *a, const float *b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < d; i++) s = fmaf(a[i], b[i], s);
  return s;
}

/* Attention for one query row: out = softmax(scale * q.K + mask) V over the keys, in fp32.
   A row's result does not depend on the other rows of the call, nor on where masked keys sit among the visible
   ones (a tree token's ancestors are scattered through the verify block, a plain step's are contiguous): scores
   are per key, the max is exact, masked keys get an exact 0 and are skipped, and the denominator and the weighted
   sum run over the visible keys in order. */
static void attend_row(const float *q, const float *k, const float *v, const float *mask, int64_t keys,
                       int64_t ks, int64_t vs, int64_t d, float scale, float *s, float *out) {
  float top = -INFINITY;
  for (int64_t l = 0; l < keys; l++) {
    s[l] = dot(q, k + l * ks, d) * scale + (mask ? mask[l] : 0.0f);
    top = s[l] > top ? s[l] : top;
  }
  int64_t l = 0;
  for (; l + 8 <= keys; l += 8)
    _mm256_storeu_ps(s + l, exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + l), _mm256_set1_ps(top))));
  if (l < keys) {
    float tail[8] = {0};
    for (int64_t t = l; t < keys; t++) tail[t - l] = s[t] - top;
    _mm256_storeu_ps(tail, exp_neg(_mm256_loadu_ps(tail)));
    for (int64_t t = l; t < keys; t++) s[t] = tail[t - l];
  }
  float total = 0.0f;
  for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
  for (l = 0; l < keys; l++) {
    if (s[l] == 0.0f) continue;
    total += s[l];
    const float *vl = v + l * vs;
    int64_t i = 0;
    __m256 p = _mm256_set1_ps(s[l]);
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vl + i),
                                                                          _mm256_loadu_ps(out + i)));
    for (; i < d; i++) out[i] = fmaf(s[l], vl[i], out[i]);
  }
  for (int64_t i = 0; i < d; i++) out[i] /= total;
}

/* q (B, H, M, D); k, v (B, KVH, L, D) with strides (kb, kh) and (vb, vh) in floats, rows D apart; mask (B, M, L)
   additive, or NULL for causal (query m sees keys up to L - M + m); out (B, M, H, D). */
void koala_attention(const float *q, const float *k, const float *v, const float *mask, float *out, int64_t B,
                     int64_t H, int64_t KVH, int64_t M, int64_t L, int64_t D, int64_t kb, int64_t kh, int64_t vb,
                     int64_t vh, float scale) {
  int64_t group = H / KVH;
  #pragma omp parallel if (B * H * M * L * D > (1 << 16))
  {
    float *s = (float *)__builtin_alloca((size_t)(L + 8) * sizeof(float));
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < B * H * M; i++) {
      int64_t b = i / (H * M), h = (i / M) % H, m = i % M, g = h / group;
      int64_t keys = mask ? L : L - M + m + 1;
      attend_row(q + i * D, k + b * kb + g * kh, v + b * vb + g * vh, mask ? mask + (b * M + m) * L : 0, keys,
                 D, D, D, scale, s, out + ((b * M + m) * H + h) * D);
    }
  }
}
