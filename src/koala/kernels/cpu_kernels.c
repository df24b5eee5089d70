/* koala's CPU kernels (x86 with AVX2 and FMA): a linear, an RMSNorm and an attention whose rows do not depend on
   the other rows of the call.

   Linear: y = x W^T (+ b) for fp32, bf16 or fp16 weights and rows, accumulated in fp32.

   The weight is packed once (koala_pack) into panels of 16 columns stored k-major, so one 32- or 64-byte load
   gives a column block's weights at one k. A tile of R rows x 16 columns broadcasts x[r, k] and accumulates with
   one FMA per output element per k, k in order: every output element is the same chain (0, fma over k = 0..K-1,
   then the bias) whatever the number of rows M and whatever tile it falls in. So a row's result does not depend
   on how many rows share the call, which is what makes verifying n draft tokens give each the bits of a
   one-token step (lossless speculative decoding). Half-precision weights are widened exactly to fp32.
   Compiled by koala.cpu_kernels with -ffp-contract=off so the compiler cannot fuse or reorder differently. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Q4, Q8: packed weights only (koala_pack_codes), bf16 values held as a GGUF's 4- or 8-bit codes. */
enum { F32 = 0, BF16 = 1, F16 = 2, Q4 = 3, Q8 = 4, PANEL = 16, ROWS = 6 };

static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

static inline float to_float(const void *v, int kind, int64_t i) {
  if (kind == F32) return ((const float *)v)[i];
  uint16_t h = ((const uint16_t *)v)[i];
  if (kind == F16) return _cvtsh_ss(h);
  union { uint32_t u; float f; } c = {(uint32_t)h << 16};
  return c.f;
}

/* Stores f into element i of v in its kind, rounding to nearest even as torch's .to() does. */
static inline void store(void *v, int kind, int64_t i, float f) {
  if (kind == F32) {
    ((float *)v)[i] = f;
  } else if (kind == F16) {
    ((uint16_t *)v)[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
  } else {
    union { float f; uint32_t u; } c = {f};
    ((uint16_t *)v)[i] = isnan(f) ? 0x7FC0 : (uint16_t)((c.u + 0x7FFF + ((c.u >> 16) & 1)) >> 16);
  }
}

static inline int64_t elem_bytes(int kind) { return kind == F32 ? 4 : 2; }

/* Eight elements from i on as fp32, widened exactly (the vector `to_float`). */
static inline __m256 load8(const void *v, int kind, int64_t i) {
  if (kind == F32) return _mm256_loadu_ps((const float *)v + i);
  __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)v + i));
  if (kind == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* f rounded to bf16 (nearest even, NaN as 0x7FC0) in the high halves of its lanes: `store`'s arithmetic. */
static inline __m256i bf16_bits(__m256 f) {
  __m256i u = _mm256_castps_si256(f);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
  r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xFFFF0000u));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}

/* Eight elements stored from i on in v's kind, rounded as `store` rounds. */
static inline void store8(void *v, int kind, int64_t i, __m256 f) {
  if (kind == F32) {
    _mm256_storeu_ps((float *)v + i, f);
  } else if (kind == F16) {
    _mm_storeu_si128((__m128i *)((uint16_t *)v + i), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
  } else {
    __m256i r = _mm256_srli_epi32(bf16_bits(f), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)v + i), packed);
  }
}

/* f rounded to the kind and widened back (the vector `rounded`). */
static inline __m256 rounded8(int kind, __m256 f) {
  if (kind == F32) return f;
  if (kind == F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
  return _mm256_castsi256_ps(bf16_bits(f));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define KOALA_AVX512 1
#else
#define KOALA_AVX512 0
#endif

/* Which linear this build runs: 512 (AVX-512 with BF16 dot products) or 256 (AVX2). */
int koala_isa(void) { return KOALA_AVX512 ? 512 : 256; }

#if !KOALA_AVX512
/* Bytes per packed panel: PANEL columns x K, padded columns zero. */
static int64_t panel_bytes(int kind, int64_t K) { return PANEL * K * elem_bytes(kind); }

/* Bytes koala_pack writes for an (N, K) weight. */
int64_t koala_packed_bytes(int kind, int64_t N, int64_t K) { return (N + PANEL - 1) / PANEL * panel_bytes(kind, K); }

/* w (N, K) row-major -> ceil(N / PANEL) panels, each K steps of PANEL values. bf16 steps are stored interleaved
   (value 2j is column j, value 2j + 1 column 8 + j), so that a shift and a mask of one 32-byte load give columns
   0-7 and 8-15 as fp32; fp32 and fp16 steps are in column order. */
void koala_pack(const void *w, int kind, void *packed, int64_t N, int64_t K) {
  int64_t panels = (N + PANEL - 1) / PANEL;
  #pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; p++)
    for (int64_t k = 0; k < K; k++)
      for (int64_t c = 0; c < PANEL; c++) {
        int64_t n = p * PANEL + c, at = (p * K + k) * PANEL;
        if (kind == F32) {
          ((float *)packed)[at + c] = n < N ? ((const float *)w)[n * K + k] : 0.0f;
        } else {
          int64_t slot = kind == BF16 ? (c < 8 ? 2 * c : 2 * (c - 8) + 1) : c;
          ((uint16_t *)packed)[at + slot] = n < N ? ((const uint16_t *)w)[n * K + k] : 0;
        }
      }
}

/* The packed weights of one panel at step k as two fp32 vectors: columns 0-7 and 8-15. */
static inline void load_step(const void *panel, int kind, int64_t k, __m256 *lo, __m256 *hi) {
  if (kind == F32) {
    const float *p = (const float *)panel + k * PANEL;
    *lo = _mm256_loadu_ps(p);
    *hi = _mm256_loadu_ps(p + 8);
  } else if (kind == BF16) {
    __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + k * PANEL));
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
  } else {
    const __m128i *p = (const __m128i *)((const uint16_t *)panel + k * PANEL);
    *lo = _mm256_cvtph_ps(_mm_loadu_si128(p));
    *hi = _mm256_cvtph_ps(_mm_loadu_si128(p + 1));
  }
}

/* R rows (from x) x the panel's columns [n0, n0 + cols) into y (rows N apart). R and kind are constants at every
   call site, so the compiler keeps the 2R accumulators in registers and drops the other kinds' branches. */
static inline __attribute__((always_inline)) void tile(int R, int kind, const float *x, const void *panel,
                                                       const float *bias, void *y, int ykind, int64_t m0,
                                                       int64_t n0, int cols, int64_t N, int64_t K) {
  __m256 acc[ROWS][2];
  #pragma GCC unroll 8
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    __m256 lo, hi;
    load_step(panel, kind, k, &lo, &hi);
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(xv, lo, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, hi, acc[r][1]);
    }
  }
  float out[ROWS][PANEL]; /* out of registers only after the loop: indexing acc below would keep it in memory */
  #pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
    _mm256_storeu_ps(out[r], acc[r][0]);
    _mm256_storeu_ps(out[r] + 8, acc[r][1]);
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < cols; c++) store(y, ykind, (m0 + r) * N + n0 + c, bias ? out[r][c] + bias[n0 + c] : out[r][c]);
}

#define TILES(kind)                                                                                         \
  static void rows_##kind(const float *x, const void *panel, const float *bias, void *y, int ykind,         \
                          int64_t M, int64_t n0, int cols, int64_t N, int64_t K) {                          \
    int64_t m = 0;                                                                                          \
    for (; m + ROWS <= M; m += ROWS) tile(ROWS, kind, x + m * K, panel, bias, y, ykind, m, n0, cols, N, K); \
    switch (M - m) {                                                                                        \
      case 5: tile(5, kind, x + m * K, panel, bias, y, ykind, m, n0, cols, N, K); break;                    \
      case 4: tile(4, kind, x + m * K, panel, bias, y, ykind, m, n0, cols, N, K); break;                    \
      case 3: tile(3, kind, x + m * K, panel, bias, y, ykind, m, n0, cols, N, K); break;                    \
      case 2: tile(2, kind, x + m * K, panel, bias, y, ykind, m, n0, cols, N, K); break;                    \
      case 1: tile(1, kind, x + m * K, panel, bias, y, ykind, m, n0, cols, N, K); break;                    \
    }                                                                                                       \
  }
TILES(F32)
TILES(BF16)
TILES(F16)

/* x (M, K) of xkind, packed weights of kind from koala_pack, bias (N) fp32 or NULL -> y (M, N) of ykind.
   Half-precision x is widened (exactly) once into a scratch buffer. Returns 0, or -1 if that buffer could not be
   allocated (y untouched). */
int koala_linear(const void *x, int xkind, const void *packed, int kind, const float *bias, void *y, int ykind,
                 int64_t M, int64_t N, int64_t K) {
  if (kind == Q4 || kind == Q8) return -2; /* coded weights need the AVX-512 build */
  const float *xf = (const float *)x;
  float *wide = 0;
  if (xkind != F32) {
    wide = (float *)malloc((size_t)(M * K + 1) * sizeof(float));
    if (!wide) return -1;
    for (int64_t i = 0; i < M * K; i++) wide[i] = to_float(x, xkind, i);
    xf = wide;
  }
  int64_t panels = (N + PANEL - 1) / PANEL, bytes = panel_bytes(kind, K);
  /* small products are not worth waking a second thread for (threads never change a result) */
  #pragma omp parallel for schedule(static) if (M * N * K > (1 << 17))
  for (int64_t p = 0; p < panels; p++) {
    const void *panel = (const char *)packed + p * bytes;
    int cols = N - p * PANEL < PANEL ? (int)(N - p * PANEL) : PANEL;
    if (kind == F32) rows_F32(xf, panel, bias, y, ykind, M, p * PANEL, cols, N, K);
    else if (kind == BF16) rows_BF16(xf, panel, bias, y, ykind, M, p * PANEL, cols, N, K);
    else rows_F16(xf, panel, bias, y, ykind, M, p * PANEL, cols, N, K);
  }
  free(wide);
  return 0;
}

int koala_pack_codes(const void *blocks, int kind, void *packed, int64_t N, int64_t K) { return -2; }
int koala_unpack_codes(const void *packed, int kind, void *w, int64_t N, int64_t K) { return -2; }

#else
/* The AVX-512 linear: the same panels of 16 columns and the same per-element chains, 16 lanes wide, two panels per
   tile (2R accumulators), so even one row keeps two independent chains in flight.

   fp32 and fp16 weights, and bf16 weights with fp32 rows, accumulate exactly as the AVX2 kernel does (one FMA per
   element per k, k in order): the same bits. bf16 weights with bf16 rows (K even) take vdpbf16ps instead: per
   element and per pair of k (2s, 2s + 1) one instruction adds both exact products, pairs in order. That is a
   different (fixed) chain from the FMA one, so its results differ from the fp32-row path by rounding, but it is
   still the same chain whatever the row count or tile, hence row-invariant, at twice the products per
   instruction. bf16 panels store k pairs: value 2c + j of step s is column c at k = 2s + j (K padded to even). */
enum { WROWS = 8 };

/* Coded weights (see "Coded weights" below): bytes of one block of 32 k of a panel, scales then codes. */
enum { CODE_BLOCK = 32, AHEAD = 4 }; /* AHEAD: blocks a coded tile prefetches ahead (see "Coded weights") */
static inline int64_t code_block_bytes(int kind) {
  return kind == Q4 ? 2 * PANEL * 4 + 16 * PANEL : PANEL * 4 + 32 * PANEL;
}

static int64_t panel_bytes(int kind, int64_t K) {
  if (kind == Q4 || kind == Q8) return K / CODE_BLOCK * code_block_bytes(kind);
  return PANEL * (kind == BF16 ? K + (K & 1) : K) * elem_bytes(kind);
}

/* The panel count rounded up to even (tiles read panels two at a time; the extra one is zeros). */
static int64_t coded_bytes(int kind, int64_t N, int64_t K) {
  int64_t panels = (N + PANEL - 1) / PANEL;
  return (panels + (panels & 1)) * panel_bytes(kind, K);
}

/* Coded weights (Q4, Q8) keep the bf16 panels of the same values after their codes (see "Coded weights"). */
int64_t koala_packed_bytes(int kind, int64_t N, int64_t K) {
  return coded_bytes(kind, N, K) + (kind == Q4 || kind == Q8 ? coded_bytes(BF16, N, K) : 0);
}

void koala_pack(const void *w, int kind, void *packed, int64_t N, int64_t K) {
  int64_t panels = (N + PANEL - 1) / PANEL, padded = panels + (panels & 1), steps = kind == BF16 ? K + (K & 1) : K;
  #pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < padded; p++)
    for (int64_t k = 0; k < steps; k++)
      for (int64_t c = 0; c < PANEL; c++) {
        int64_t n = p * PANEL + c, in = n < N && k < K;
        if (kind == F32) {
          ((float *)packed)[(p * K + k) * PANEL + c] = in ? ((const float *)w)[n * K + k] : 0.0f;
        } else {
          int64_t at = kind == BF16 ? (p * steps + (k & ~1)) * PANEL + 2 * c + (k & 1) : (p * K + k) * PANEL + c;
          ((uint16_t *)packed)[at] = in ? ((const uint16_t *)w)[n * K + k] : 0;
        }
      }
}

/* Panel `panel`'s weights at step k as fp32 (for bf16, step k of the pair layout). */
static inline __m512 load_wide(const void *panel, int kind, int64_t k) {
  if (kind == F32) return _mm512_loadu_ps((const float *)panel + k * PANEL);
  if (kind == F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + k * PANEL)));
  __m512i v = _mm512_loadu_si512((const uint16_t *)panel + (k & ~1) * PANEL);
  return _mm512_castsi512_ps(k & 1 ? _mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u))
                                   : _mm512_slli_epi32(v, 16));
}

/* The tile's R x 32 results (bias added) into y, rounded to its kind. */
static inline __attribute__((always_inline)) void store_tile(int R, __m512 acc[][2], const float *bias, void *y,
                                                             int ykind, int64_t m0, int64_t n0, int cols, int64_t N) {
  float out[WROWS][2 * PANEL];
  #pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
    _mm512_storeu_ps(out[r], acc[r][0]);
    _mm512_storeu_ps(out[r] + PANEL, acc[r][1]);
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < cols; c++) store(y, ykind, (m0 + r) * N + n0 + c, bias ? out[r][c] + bias[n0 + c] : out[r][c]);
}

/* Step s of the bf16 dot chain: R bf16 rows (K apart) x two panels' bf16 values w0, w1. */
static inline __attribute__((always_inline)) void dot_step(int R, __m512 acc[][2], const uint16_t *xh, int64_t K,
                                                           int64_t s, __m512bh w0, __m512bh w1) {
  #pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
    int32_t pair;
    __builtin_memcpy(&pair, xh + r * K + 2 * s, 4);
    __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
  }
}

/* R rows x the two panels at `panel` (columns [n0, n0 + cols), cols <= 32) into y. dot: x is bf16 rows and the
   products run in vdpbf16ps; else x is fp32 rows. R, kind and dot are constants at every call site. */
static inline __attribute__((always_inline)) void tile(int R, int kind, int dot, const void *x, const void *panel,
                                                       int64_t bytes, const float *bias, void *y, int ykind,
                                                       int64_t m0, int64_t n0, int cols, int64_t N, int64_t K) {
  __m512 acc[WROWS][2];
  const char *p0 = (const char *)panel, *p1 = p0 + bytes;
  #pragma GCC unroll 8
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  if (dot) {
    const uint16_t *xh = (const uint16_t *)x;
    for (int64_t s = 0; s < K / 2; s++) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(p0 + s * 64), w1 = (__m512bh)_mm512_loadu_si512(p1 + s * 64);
      dot_step(R, acc, xh, K, s, w0, w1);
    }
  } else {
    const float *xf = (const float *)x;
    for (int64_t k = 0; k < K; k++) {
      __m512 w0 = load_wide(p0, kind, k), w1 = load_wide(p1, kind, k);
      #pragma GCC unroll 8
      for (int r = 0; r < R; r++) {
        __m512 xv = _mm512_set1_ps(xf[r * K + k]);
        acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
  }
  store_tile(R, acc, bias, y, ykind, m0, n0, cols, N);
}

/* Coded weights: a GGUF file holds a weight as blocks of 32 consecutive k of a row, Q4_1 as 4-bit codes q with an
   fp16 scale d and offset m (the value d * q + m in fp32, as gguf-py and llama.cpp dequantise it), Q8_0 as int8
   codes with an fp16 scale (d * q); a bf16 target loaded from it holds those values rounded to bf16. A coded panel
   keeps, per block of 32 k, the 16 columns' d (and for Q4 m) as fp32, then 16 steps. A Q4 step is 16 bytes, byte
   i holding, low, column i / 2's code at k = 2s + i % 2 and, high, column 8 + i / 2's; they are stored four steps
   to 64 bytes, byte t of dword i being step 4g + t's byte i, so one load and shifts give each step's codes in the
   dword lanes (15% fewer cycles a step than widening 16 bytes per step). Q8 steps are 32 bytes, byte i
   column i / 2's code and byte 16 + i column 8 + i / 2's. code_step rebuilds a step's 32 bf16 values in the layout
   of the bf16 panels (d * q is exact in fp32, so one FMA rounds d * q + m as multiply-then-add does; then nearest
   even to bf16: the same values), so the vdpbf16ps chain below is the bf16 one, bit for bit, reading 6 (Q4) or 9
   (Q8) bits a weight instead of 16. That pays while a call is memory-bound (up to WROWS rows); the rebuild makes
   wider calls compute-bound, so the packed weight also holds the bf16 panels of the same values, after the codes,
   and calls of more rows run on those (the same bits again, at 16 bits a weight of memory more). Each block's turn
   prefetches the block AHEAD blocks on in both panels: with the rebuild between loads the hardware prefetchers
   lagged (a one-row 1536 x 576 Q4_1 call 53 -> 41 us, a whole decode step ~10% faster; 2, 3, 6 and 8 did no
   better). The prefetches are non-temporal: a step reads each weight once, and with the T0 hint the ~110 MB of
   codes a step streams evicted what the next step reads again (KV cache, a draft head's weights, scratch) from
   the caches: whole generations ran 5-10% faster with NTA (docs/benchmark.md, round 26). */

/* 16 columns' fp32 scales as the two vectors code_step wants: lane i holds column i / 2, or 8 + i / 2. */
static inline void code_lanes(const uint8_t *v, __m512 *lo, __m512 *hi) {
  const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  __m512 all = _mm512_loadu_ps(v);
  *lo = _mm512_permutexvar_ps(first, all);
  *hi = _mm512_permutexvar_ps(_mm512_add_epi32(first, _mm512_set1_epi32(8)), all);
}

/* A block's scales (d low, d high, m low, m high) in the lanes of code_lanes. */
static inline void code_scales(int kind, const uint8_t *block, __m512 *s) {
  code_lanes(block, &s[0], &s[1]);
  if (kind == Q4) code_lanes(block + 64, &s[2], &s[3]);
}

/* Q4 step 4g + t from its group's 64 bytes: vpermps reads the low 4 bits of each lane's index. */
static inline __m512bh q4_step(__m512i group, int t, const __m512 *s) {
  const __m512 q = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i v = t ? _mm512_srli_epi32(group, 8 * t) : group;
  __m512 lo = _mm512_permutexvar_ps(v, q), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(group, 8 * t + 4), q);
  return _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s[1], s[3]), _mm512_fmadd_ps(lo, s[0], s[2]));
}

static inline __m512i q4_group(const uint8_t *block, int64_t g) {
  return _mm512_loadu_si512(block + 128 + g * 4 * PANEL);
}

static inline __m512bh code_step(int kind, const uint8_t *block, int64_t j, const __m512 *s) {
  if (kind == Q4) return q4_step(q4_group(block, j / 4), (int)(j % 4), s);
  const __m128i *codes = (const __m128i *)(block + 64 + j * 2 * PANEL);
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes)));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes + 1)));
  return _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s[1]), _mm512_mul_ps(lo, s[0]));
}

/* The bf16 dot tile of `tile` on two coded panels of `kind` (a constant at every call site; dot: always). */
static inline __attribute__((always_inline)) void tile_codes(int R, int kind, int dot, const void *x,
                                                             const void *panel, int64_t bytes, const float *bias,
                                                             void *y, int ykind, int64_t m0, int64_t n0, int cols,
                                                             int64_t N, int64_t K) {
  __m512 acc[WROWS][2];
  const uint8_t *p0 = (const uint8_t *)panel, *p1 = p0 + bytes;
  const uint16_t *xh = (const uint16_t *)x;
  int64_t size = code_block_bytes(kind);
  #pragma GCC unroll 8
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / CODE_BLOCK; b++) {
    const uint8_t *b0 = p0 + b * size, *b1 = p1 + b * size;
    for (int64_t line = 0; line < size; line += 64) {
      _mm_prefetch((const char *)b0 + AHEAD * size + line, _MM_HINT_NTA);
      _mm_prefetch((const char *)b1 + AHEAD * size + line, _MM_HINT_NTA);
    }
    __m512 s0[4], s1[4];
    code_scales(kind, b0, s0);
    code_scales(kind, b1, s1);
    if (kind == Q4) {
      for (int64_t g = 0; g < CODE_BLOCK / 8; g++) {
        __m512i c0 = q4_group(b0, g), c1 = q4_group(b1, g);
        #pragma GCC unroll 4
        for (int t = 0; t < 4; t++)
          dot_step(R, acc, xh, K, b * CODE_BLOCK / 2 + 4 * g + t, q4_step(c0, t, s0), q4_step(c1, t, s1));
      }
      continue;
    }
    for (int64_t j = 0; j < CODE_BLOCK / 2; j++) {
      __m512bh w0 = code_step(kind, b0, j, s0), w1 = code_step(kind, b1, j, s1);
      int64_t s = b * CODE_BLOCK / 2 + j;
      dot_step(R, acc, xh, K, s, w0, w1);
    }
  }
  store_tile(R, acc, bias, y, ykind, m0, n0, cols, N);
}

/* GGUF blocks of `kind` (N rows of K / 32 blocks; Q4_1: fp16 d, fp16 m, 16 bytes where byte i holds element i
   low and element 16 + i high; Q8_0: fp16 d, 32 int8) -> coded panels, the first
   part of the koala_packed_bytes(kind, N, K) bytes; the caller writes the bf16 panels of the same values after
   them (koala_pack of the bf16 weight at koala_packed_bytes(kind) - koala_packed_bytes(BF16)). Returns 0, or -1
   for another kind or a K that is not a multiple of 32. */
int koala_pack_codes(const void *blocks, int kind, void *packed, int64_t N, int64_t K) {
  if ((kind != Q4 && kind != Q8) || K % CODE_BLOCK) return -1;
  int64_t panels = (N + PANEL - 1) / PANEL, padded = panels + (panels & 1), nb = K / CODE_BLOCK;
  int64_t size = code_block_bytes(kind), src_size = kind == Q4 ? 20 : 34, steps = kind == Q4 ? 128 : 64;
  #pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < padded; p++)
    for (int64_t b = 0; b < nb; b++) {
      uint8_t *out = (uint8_t *)packed + (p * nb + b) * size;
      __builtin_memset(out, 0, size);
      for (int64_t c = 0; c < PANEL && p * PANEL + c < N; c++) {
        const uint8_t *src = (const uint8_t *)blocks + ((p * PANEL + c) * nb + b) * src_size;
        uint16_t half;
        uint8_t q[CODE_BLOCK];
        __builtin_memcpy(&half, src, 2);
        ((float *)out)[c] = _cvtsh_ss(half);
        if (kind == Q4) {
          __builtin_memcpy(&half, src + 2, 2);
          ((float *)out)[PANEL + c] = _cvtsh_ss(half);
          for (int i = 0; i < 16; i++) q[i] = src[4 + i] & 15, q[16 + i] = src[4 + i] >> 4;
        } else {
          __builtin_memcpy(q, src + 2, CODE_BLOCK);
        }
        for (int j = 0; j < CODE_BLOCK / 2; j++)  /* column c's codes at k = 2j, 2j + 1 */
          for (int h = 0; h < 2; h++) {
            if (kind == Q4) { /* step j's byte 2 (c % 8) + h, grouped by four steps (see "Coded weights") */
              int64_t at = steps + j / 4 * 4 * PANEL + 4 * (2 * (c % 8) + h) + j % 4;
              out[at] |= (uint8_t)(q[2 * j + h] << (c < 8 ? 0 : 4));
            } else {
              out[steps + j * 2 * PANEL + (c < 8 ? 0 : PANEL) + 2 * (c % 8) + h] = q[2 * j + h];
            }
          }
      }
    }
  return 0;
}

/* One coded panel -> the bf16 panel koala_pack makes of the same values (step s at 2 * PANEL * s). */
static void code_panel(int kind, const uint8_t *panel, uint16_t *out, int64_t K) {
  for (int64_t b = 0; b < K / CODE_BLOCK; b++) {
    const uint8_t *block = panel + b * code_block_bytes(kind);
    __m512 s[4];
    code_scales(kind, block, s);
    for (int64_t j = 0; j < CODE_BLOCK / 2; j++)
      _mm512_storeu_si512(out + (b * CODE_BLOCK / 2 + j) * 2 * PANEL, (__m512i)code_step(kind, block, j, s));
  }
}

/* Coded panels -> the bf16 weight (N, K) they stand for, by code_step itself: what a load-time check compares
   with the target's own bf16 weight. Returns 0, or -1 as koala_pack_codes (or without memory). */
int koala_unpack_codes(const void *packed, int kind, void *w, int64_t N, int64_t K) {
  if ((kind != Q4 && kind != Q8) || K % CODE_BLOCK) return -1;
  uint16_t *panel = malloc((size_t)(2 * PANEL * K));
  if (!panel) return -1;
  for (int64_t p = 0; p * PANEL < N; p++) {
    code_panel(kind, (const uint8_t *)packed + p * panel_bytes(kind, K), panel, K);
    for (int64_t c = 0; c < PANEL && p * PANEL + c < N; c++)
      for (int64_t k = 0; k < K; k++) ((uint16_t *)w)[(p * PANEL + c) * K + k] = panel[(k / 2) * 2 * PANEL + 2 * c + k % 2];
  }
  free(panel);
  return 0;
}

#define TILES(name, run, kind, dot)                                                                            \
  static void name(const void *x, int64_t row_bytes, const void *panel, int64_t bytes, const float *bias,   \
                   void *y, int ykind, int64_t M, int64_t n0, int cols, int64_t N, int64_t K) {             \
    int64_t m = 0;                                                                                          \
    for (; m + WROWS <= M; m += WROWS)                                                                      \
      run(WROWS, kind, dot, (const char *)x + m * row_bytes, panel, bytes, bias, y, ykind, m, n0, cols, N, K); \
    const void *xm = (const char *)x + m * row_bytes;                                                       \
    switch (M - m) {                                                                                        \
      case 7: run(7, kind, dot, xm, panel, bytes, bias, y, ykind, m, n0, cols, N, K); break;               \
      case 6: run(6, kind, dot, xm, panel, bytes, bias, y, ykind, m, n0, cols, N, K); break;               \
      case 5: run(5, kind, dot, xm, panel, bytes, bias, y, ykind, m, n0, cols, N, K); break;               \
      case 4: run(4, kind, dot, xm, panel, bytes, bias, y, ykind, m, n0, cols, N, K); break;               \
      case 3: run(3, kind, dot, xm, panel, bytes, bias, y, ykind, m, n0, cols, N, K); break;               \
      case 2: run(2, kind, dot, xm, panel, bytes, bias, y, ykind, m, n0, cols, N, K); break;               \
      case 1: run(1, kind, dot, xm, panel, bytes, bias, y, ykind, m, n0, cols, N, K); break;               \
    }                                                                                                       \
  }
TILES(rows_F32, tile, F32, 0)
TILES(rows_BF16, tile, BF16, 0)
TILES(rows_F16, tile, F16, 0)
TILES(rows_DOT, tile, BF16, 1)
TILES(rows_Q4, tile_codes, Q4, 1)
TILES(rows_Q8, tile_codes, Q8, 1)

int koala_linear(const void *x, int xkind, const void *packed, int kind, const float *bias, void *y, int ykind,
                 int64_t M, int64_t N, int64_t K) {
  int coded = kind == Q4 || kind == Q8;
  if (coded && (xkind != BF16 || K % CODE_BLOCK)) return -2; /* coded weights take bf16 rows */
  if (coded && M > WROWS) { /* compute-bound: the same values' bf16 panels, stored after the codes, are faster */
    packed = (const char *)packed + coded_bytes(kind, N, K);
    kind = BF16;
    coded = 0;
  }
  int dot = (kind == BF16 || coded) && xkind == BF16 && K % 2 == 0;
  const void *rows = x;
  float *wide = 0;
  if (xkind != F32 && !dot) {
    wide = (float *)malloc((size_t)(M * K + 1) * sizeof(float));
    if (!wide) return -1;
    for (int64_t i = 0; i < M * K; i++) wide[i] = to_float(x, xkind, i);
    rows = wide;
  }
  int64_t pairs = (N + 2 * PANEL - 1) / (2 * PANEL), bytes = panel_bytes(kind, K), row_bytes = K * (dot ? 2 : 4);
  #pragma omp parallel for schedule(static) if (M * N * K > (1 << 17))
  for (int64_t p = 0; p < pairs; p++) {
    const void *panel = (const char *)packed + 2 * p * bytes;
    int64_t n0 = p * 2 * PANEL;
    int cols = N - n0 < 2 * PANEL ? (int)(N - n0) : 2 * PANEL;
    if (kind == Q4) rows_Q4(rows, row_bytes, panel, bytes, bias, y, ykind, M, n0, cols, N, K);
    else if (kind == Q8) rows_Q8(rows, row_bytes, panel, bytes, bias, y, ykind, M, n0, cols, N, K);
    else if (dot) rows_DOT(rows, row_bytes, panel, bytes, bias, y, ykind, M, n0, cols, N, K);
    else if (kind == F32) rows_F32(rows, row_bytes, panel, bytes, bias, y, ykind, M, n0, cols, N, K);
    else if (kind == BF16) rows_BF16(rows, row_bytes, panel, bytes, bias, y, ykind, M, n0, cols, N, K);
    else rows_F16(rows, row_bytes, panel, bytes, bias, y, ykind, M, n0, cols, N, K);
  }
  free(wide);
  return 0;
}
#endif

/* RMSNorm as Llama-family models define it, per row: h = x / sqrt(mean(x^2) + eps) in fp32, rounded to x's kind,
   times the weight (same kind), rounded again. The sum of squares runs in a fixed order, so rows are invariant. */
void koala_rmsnorm(const void *x, const void *w, int kind, float eps, void *y, int64_t M, int64_t K) {
  #pragma omp parallel for schedule(static) if (M * K > (1 << 16))
  for (int64_t m = 0; m < M; m++) {
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256 xv = load8(x, kind, m * K + k);
      acc = _mm256_fmadd_ps(xv, xv, acc);
    }
    float s = hsum(acc);
    for (; k < K; k++) s = fmaf(to_float(x, kind, m * K + k), to_float(x, kind, m * K + k), s);
    float r = 1.0f / sqrtf(s / (float)K + eps);
    __m256 rv = _mm256_set1_ps(r);
    for (k = 0; k + 8 <= K; k += 8) {
      __m256 h = rounded8(kind, _mm256_mul_ps(load8(x, kind, m * K + k), rv));
      store8(y, kind, m * K + k, _mm256_mul_ps(load8(w, kind, k), h));
    }
    for (; k < K; k++) {
      store(y, kind, m * K + k, to_float(x, kind, m * K + k) * r);
      store(y, kind, m * K + k, to_float(w, kind, k) * to_float(y, kind, m * K + k));
    }
  }
}

/* A Llama-family decoder layer in three calls (koala.fused_layer), around the KV cache update, the attention and
   the SiLU, which stay in Python. Every intermediate is rounded to the model's kind where transformers' separate
   tensor ops round it (projections, RoPE's products and sum, residual sums), so a layer gives the bits of its own
   forward on these kernels while Python makes ~10 calls instead of ~270. */

static inline float rounded(int kind, float f) {
  if (kind == F32) return f;
  uint16_t h;
  store(&h, kind, 0, f);
  return to_float(&h, kind, 0);
}

/* out = x + y over count elements, each sum rounded to the kind (a residual connection); out may be x. */
static void residual(const void *x, const void *y, void *out, int kind, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) store8(out, kind, i, _mm256_add_ps(load8(x, kind, i), load8(y, kind, i)));
  for (; i < count; i++) store(out, kind, i, to_float(x, kind, i) + to_float(y, kind, i));
}

/* One head of RoPE as transformers applies it: out = x * cos + rot(x) * sin, rot(x) = (-x[D/2:], x[:D/2]). */
static void rope(const void *x, int64_t xi, const void *cos, const void *sin, int64_t ci, void *out, int64_t oi,
                 int kind, int64_t D) {
  int64_t half = D / 2;
  if (half % 8 == 0) { /* eight lanes at a time, the same products, roundings and sums */
    const __m256 minus = _mm256_set1_ps(-0.0f);
    for (int64_t d = 0; d < D; d += 8) {
      __m256 rot = d < half ? _mm256_xor_ps(load8(x, kind, xi + d + half), minus) : load8(x, kind, xi + d - half);
      __m256 a = rounded8(kind, _mm256_mul_ps(load8(x, kind, xi + d), load8(cos, kind, ci + d)));
      __m256 b = rounded8(kind, _mm256_mul_ps(rot, load8(sin, kind, ci + d)));
      store8(out, kind, oi + d, _mm256_add_ps(a, b));
    }
    return;
  }
  for (int64_t d = 0; d < D; d++) {
    float rot = d < half ? -to_float(x, kind, xi + d + half) : to_float(x, kind, xi + d - half);
    float a = rounded(kind, to_float(x, kind, xi + d) * to_float(cos, kind, ci + d));
    float b = rounded(kind, rot * to_float(sin, kind, ci + d));
    store(out, kind, oi + d, a + b);
  }
}

/* x (B * n, hidden) -> the attention's inputs q (B * n, H * D), k and v (B * n, KVH * D) (transformers' layout
   before it views them as heads): RMSNorm (w1, eps), the three projections (packed weights; fp32 biases or NULL),
   RoPE on q and k with cos/sin (B, n, D), or (1, n, D) when cos_rows is 0. All of kind; packed weights of wkind
   (kind, or Q4 / Q8 for bf16). Returns 0, or -1 when
   scratch memory could not be allocated. */
int koala_attn_in(const void *x, int kind, int wkind, const void *w1, float eps, const void *wq, const float *bq,
                  const void *wk, const float *bk, const void *wv, const float *bv, const void *cos, const void *sin,
                  int cos_rows, void *q, void *k, void *v, int64_t B, int64_t n, int64_t hidden, int64_t H,
                  int64_t KVH, int64_t D) {
  int64_t M = B * n, size = elem_bytes(kind);
  char *h = malloc((size_t)(M * hidden * size)), *ql = malloc((size_t)(M * (H + KVH) * D * size));
  int bad = !h || !ql;
  char *kl = ql + M * H * D * size;
  if (!bad) {
    koala_rmsnorm(x, w1, kind, eps, h, M, hidden);
    bad = koala_linear(h, kind, wq, wkind, bq, ql, kind, M, H * D, hidden) ||
          koala_linear(h, kind, wk, wkind, bk, kl, kind, M, KVH * D, hidden) ||
          koala_linear(h, kind, wv, wkind, bv, v, kind, M, KVH * D, hidden);
  }
  if (!bad)
    for (int64_t m = 0; m < M; m++) {
      int64_t ci = ((cos_rows ? m / n : 0) * n + m % n) * D;
      for (int64_t i = 0; i < H; i++) rope(ql, (m * H + i) * D, cos, sin, ci, q, (m * H + i) * D, kind, D);
      for (int64_t g = 0; g < KVH; g++) rope(kl, (m * KVH + g) * D, cos, sin, ci, k, (m * KVH + g) * D, kind, D);
    }
  free(h);
  free(ql);
  return bad ? -1 : 0;
}

/* After the attention: r = x + o_proj(a), then h = RMSNorm(r) (w2, eps), g = gate(h), u = up(h). a (M, HD), x and
   r (M, hidden), g and u (M, inter), all of kind. Returns 0, or -1 as koala_attn_in. */
int koala_attn_out(const void *a, int kind, int wkind, const void *wo, const float *bo, const void *x, void *r, const void *w2,
                   float eps, const void *wg, const float *bg, const void *wu, const float *bu, void *g, void *u,
                   int64_t M, int64_t HD, int64_t hidden, int64_t inter) {
  int64_t size = elem_bytes(kind);
  char *o = malloc((size_t)(M * hidden * size)), *h = malloc((size_t)(M * hidden * size));
  int bad = !o || !h || koala_linear(a, kind, wo, wkind, bo, o, kind, M, hidden, HD);
  if (!bad) {
    residual(x, o, r, kind, M * hidden);
    koala_rmsnorm(r, w2, kind, eps, h, M, hidden);
    bad = koala_linear(h, kind, wg, wkind, bg, g, kind, M, inter, hidden) ||
          koala_linear(h, kind, wu, wkind, bu, u, kind, M, inter, hidden);
  }
  free(o);
  free(h);
  return bad ? -1 : 0;
}

/* r += down(m), the sum rounded to the kind: the MLP's last projection and the layer's second residual. */
int koala_mlp_out(const void *m, int kind, int wkind, const void *wd, const float *bd, void *r, int64_t M, int64_t inter,
                  int64_t hidden) {
  char *d = malloc((size_t)(M * hidden * elem_bytes(kind)));
  int bad = !d || koala_linear(m, kind, wd, wkind, bd, d, kind, M, hidden, inter);
  if (!bad) residual(r, d, r, kind, M * hidden);
  free(d);
  return bad ? -1 : 0;
}

void koala_attention(const float *q, const float *k, const float *v, const float *mask, float *out, int64_t B,
                     int64_t H, int64_t KVH, int64_t M, int64_t L, int64_t D, int64_t kb, int64_t kh, int64_t vb,
                     int64_t vh, float scale);

/* A decode step through a run of decoder layers in one call (koala.fused_body): per layer koala_attn_in; the new
   keys and values widened into the layer's fp32 KV cache buffers (B, KVH, cap, D) at columns past..past + n - 1;
   koala_attention over the past + n columns (mask (B, n, past + n) additive fp32, or NULL: causal); its fp32
   result rounded to the kind; koala_attn_out; m = act(g) * u, the activation read from a table of its value at
   each of the 65,536 16-bit inputs (made by the model's own activation, so its bits) and the product rounded as a
   16-bit tensor product rounds; koala_mlp_out. These are the fused layer's Python steps with the same roundings,
   so the step keeps their bits while Python makes one call instead of ~40 a layer. x (B * n, hidden) of kind (bf16
   or fp16) is the first layer's input and receives the last one's output. Returns 0, or -1 without memory. */
typedef struct {
  const void *w1, *wq, *wk, *wv, *wo, *w2, *wg, *wu, *wd;
  const float *bq, *bk, *bv, *bo, *bg, *bu, *bd;
  const uint16_t *act;
  float *keys, *values;
  int64_t cap;
  float eps1, eps2;
} koala_layer;

int koala_layers(const koala_layer *layers, int64_t count, void *x, int kind, int wkind, const void *cos,
                 const void *sin, int cos_rows, const float *mask, int64_t B, int64_t n, int64_t past,
                 int64_t hidden, int64_t H, int64_t KVH, int64_t D, int64_t inter, float scale) {
  int64_t M = B * n, size = elem_bytes(kind), qd = M * H * D, kvd = M * KVH * D;
  char *q = malloc((size_t)(qd * size)), *k = malloc((size_t)(kvd * size)), *v = malloc((size_t)(kvd * size));
  char *a = malloc((size_t)(qd * size)), *r = malloc((size_t)(M * hidden * size));
  char *g = malloc((size_t)(M * inter * size)), *u = malloc((size_t)(M * inter * size));
  float *qf = malloc((size_t)qd * sizeof(float)), *af = malloc((size_t)qd * sizeof(float));
  int bad = !q || !k || !v || !a || !r || !g || !u || !qf || !af;
  char *cur = x, *next = r;
  for (int64_t l = 0; l < count && !bad; l++) {
    const koala_layer *y = layers + l;
    bad = koala_attn_in(cur, kind, wkind, y->w1, y->eps1, y->wq, y->bq, y->wk, y->bk, y->wv, y->bv, cos, sin,
                        cos_rows, q, k, v, B, n, hidden, H, KVH, D);
    if (bad) break;
    for (int64_t b = 0; b < B; b++) /* the cache update: (B, n, KVH, D) rows into (B, KVH, cap, D) columns */
      for (int64_t t = 0; t < n; t++)
        for (int64_t h = 0; h < KVH; h++) {
          int64_t from = ((b * n + t) * KVH + h) * D, to = ((b * KVH + h) * y->cap + past + t) * D;
          for (int64_t d = 0; d < D; d++) {
            y->keys[to + d] = to_float(k, kind, from + d);
            y->values[to + d] = to_float(v, kind, from + d);
          }
        }
    for (int64_t b = 0; b < B; b++) /* q as the attention reads it: (B, H, n, D) fp32 */
      for (int64_t t = 0; t < n; t++)
        for (int64_t h = 0; h < H; h++)
          for (int64_t d = 0; d < D; d++)
            qf[((b * H + h) * n + t) * D + d] = to_float(q, kind, ((b * n + t) * H + h) * D + d);
    int64_t stride = KVH * y->cap * D;
    koala_attention(qf, y->keys, y->values, mask, af, B, H, KVH, n, past + n, D, stride, y->cap * D, stride,
                    y->cap * D, scale);
    for (int64_t i = 0; i < qd; i++) store(a, kind, i, af[i]);
    bad = koala_attn_out(a, kind, wkind, y->wo, y->bo, cur, next, y->w2, y->eps2, y->wg, y->bg, y->wu, y->bu, g, u,
                         M, H * D, hidden, inter);
    if (bad) break;
    for (int64_t i = 0; i < M * inter; i++)
      store(g, kind, i, to_float(y->act, kind, ((const uint16_t *)g)[i]) * to_float(u, kind, i));
    bad = koala_mlp_out(g, kind, wkind, y->wd, y->bd, next, M, inter, hidden);
    char *done = cur;
    cur = next;
    next = done;
  }
  if (!bad && cur != x) __builtin_memcpy(x, cur, (size_t)(M * hidden * size));
  free(q), free(k), free(v), free(a), free(r), free(g), free(u), free(qf), free(af);
  return bad ? -1 : 0;
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
  if (d == 64) { /* unrolled: the same chain, one loop fewer per key */
    #pragma GCC unroll 8
    for (int j = 0; j < 8; j++) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + 8 * j), _mm256_loadu_ps(b + 8 * j), acc);
    return hsum(acc);
  }
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
  int64_t l = 0;
  if (d == 64) { /* four keys at a time: four independent FMA chains instead of one (each key's chain and sum
                    are exactly dot()'s, so the scores keep their bits); q stays in registers across keys */
    __m256 qr[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; j++) qr[j] = _mm256_loadu_ps(q + 8 * j);
    for (; l + 4 <= keys; l += 4) {
      const float *k0 = k + l * ks, *k1 = k0 + ks, *k2 = k1 + ks, *k3 = k2 + ks;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      #pragma GCC unroll 8
      for (int j = 0; j < 8; j++) {
        a0 = _mm256_fmadd_ps(qr[j], _mm256_loadu_ps(k0 + 8 * j), a0);
        a1 = _mm256_fmadd_ps(qr[j], _mm256_loadu_ps(k1 + 8 * j), a1);
        a2 = _mm256_fmadd_ps(qr[j], _mm256_loadu_ps(k2 + 8 * j), a2);
        a3 = _mm256_fmadd_ps(qr[j], _mm256_loadu_ps(k3 + 8 * j), a3);
      }
      s[l] = hsum(a0), s[l + 1] = hsum(a1), s[l + 2] = hsum(a2), s[l + 3] = hsum(a3);
    }
  }
  for (; l < keys; l++) s[l] = dot(q, k + l * ks, d);
  for (l = 0; l < keys; l++) /* a key masked with -inf scores -inf whatever its dot product */
    s[l] = mask && mask[l] == -INFINITY ? -INFINITY : s[l] * scale + (mask ? mask[l] : 0.0f);
  for (l = 0; l < keys; l++) top = s[l] > top ? s[l] : top;
  l = 0;
  for (; l + 8 <= keys; l += 8)
    _mm256_storeu_ps(s + l, exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + l), _mm256_set1_ps(top))));
  if (l < keys) {
    float tail[8] = {0};
    for (int64_t t = l; t < keys; t++) tail[t - l] = s[t] - top;
    _mm256_storeu_ps(tail, exp_neg(_mm256_loadu_ps(tail)));
    for (int64_t t = l; t < keys; t++) s[t] = tail[t - l];
  }
  float total = 0.0f;
  if (d == 64) { /* the common head size: the same chain per element, the sums kept in registers across keys */
    __m256 o[8];
    #pragma GCC unroll 8
    for (int i = 0; i < 8; i++) o[i] = _mm256_setzero_ps();
    for (l = 0; l < keys; l++) {
      if (s[l] == 0.0f) continue;
      total += s[l];
      __m256 p = _mm256_set1_ps(s[l]);
      #pragma GCC unroll 8
      for (int i = 0; i < 8; i++) o[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + l * vs + 8 * i), o[i]);
    }
    #pragma GCC unroll 8
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + 8 * i, o[i]);
    for (int64_t i = 0; i < d; i++) out[i] /= total;
    return;
  }
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

/* Per-row softmax statistics for training losses over a (reduced) vocabulary, one pass of memory per row where
   torch makes several (N, V) temporaries: the max, lse = max + log sum exp(z - max), and <p, z> for the row of
   probabilities p (fp32) into *pz when p is given. The row is z[o .. o+V) in z's kind (and p[o .. o+V)). */
static float row_lse(const void *z, int kind, const float *p, int64_t o, int64_t V, float *pz) {
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) m8 = _mm256_max_ps(m8, load8(z, kind, o + v));
  float lanes[8], top = -INFINITY;
  _mm256_storeu_ps(lanes, m8);
  for (int i = 0; i < 8; i++) top = lanes[i] > top ? lanes[i] : top;
  for (int64_t t = v; t < V; t++) top = to_float(z, kind, o + t) > top ? to_float(z, kind, o + t) : top;
  __m256 s8 = _mm256_setzero_ps(), d8 = _mm256_setzero_ps(), t8 = _mm256_set1_ps(top);
  for (v = 0; v + 8 <= V; v += 8) {
    __m256 x = load8(z, kind, o + v);
    s8 = _mm256_add_ps(s8, exp_neg(_mm256_sub_ps(x, t8)));
    if (p) d8 = _mm256_fmadd_ps(_mm256_loadu_ps(p + o + v), x, d8);
  }
  float s = hsum(s8), d = hsum(d8);
  for (int64_t t = v; t < V; t++) {
    float x = to_float(z, kind, o + t);
    s += expf(x - top);
    if (p) d = fmaf(p[o + t], x, d);
  }
  if (p) *pz = d;
  return top + logf(s);
}

/* lse[n] and <p[n], z[n]> for N rows of logits z and probabilities p: the soft cross-entropy is lse - <p, z>. */
void koala_soft_ce(const void *z, int kind, const float *p, float *lse, float *pz, int64_t N, int64_t V) {
  #pragma omp parallel for schedule(static) if (N * V > (1 << 16))
  for (int64_t n = 0; n < N; n++) lse[n] = row_lse(z, kind, p, n * V, V, pz + n);
}

/* Its gradient: g = scale * (softmax(z) - p), written in z's kind. */
void koala_soft_ce_grad(const void *z, int kind, const float *p, const float *lse, float scale, void *g, int64_t N,
                        int64_t V) {
  #pragma omp parallel for schedule(static) if (N * V > (1 << 16))
  for (int64_t n = 0; n < N; n++) {
    const int64_t o = n * V;
    __m256 l8 = _mm256_set1_ps(lse[n]), c8 = _mm256_set1_ps(scale);
    int64_t v = 0;
    for (; v + 8 <= V; v += 8) {
      __m256 e = exp_neg(_mm256_sub_ps(load8(z, kind, o + v), l8));
      store8(g, kind, o + v, _mm256_mul_ps(c8, _mm256_sub_ps(e, _mm256_loadu_ps(p + o + v))));
    }
    for (; v < V; v++) store(g, kind, o + v, scale * (expf(to_float(z, kind, o + v) - lse[n]) - p[o + v]));
  }
}

/* Fp32 logits z (N, V) -> probabilities softmax(z) in place, with each row's entropy (the training labels). */
void koala_softmax_entropy(float *z, float *entropy, int64_t N, int64_t V) {
  #pragma omp parallel for schedule(static) if (N * V > (1 << 16))
  for (int64_t n = 0; n < N; n++) {
    float lse = row_lse(z, F32, 0, n * V, V, 0), *row = z + n * V;
    __m256 l8 = _mm256_set1_ps(lse), h8 = _mm256_setzero_ps();
    int64_t v = 0;
    for (; v + 8 <= V; v += 8) {
      __m256 lp = _mm256_sub_ps(_mm256_loadu_ps(row + v), l8), e = exp_neg(lp);
      h8 = _mm256_fnmadd_ps(e, lp, h8);
      _mm256_storeu_ps(row + v, e);
    }
    float h = hsum(h8);
    for (; v < V; v++) {
      float lp = row[v] - lse, e = expf(lp);
      h = fmaf(-e, lp, h);
      row[v] = e;
    }
    entropy[n] = h;
  }
}
