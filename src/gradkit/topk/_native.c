/* Fused CPU kernels for gradkit.soft_topk: one slice (row) at a time, in cache.
 *
 * The PyTorch path spends most of its time outside arithmetic: every solver pass is four or
 * five separate full-size ops (w − t, σ, Σp, Σp², …), each streaming the tensor through
 * memory, plus dozens of small per-slice ops.  Here a row is solved while it sits in L1/L2.
 * One pass stores exponentials relative to a reference point; after that each evaluation of
 * F(t) = Σ σ(w_i − t), its slope and its curvature term is one fused loop of a multiply and a
 * divide per entry, and the model-based Newton step of _solve.py needs no exp or log per
 * entry.  Rows spanning at most SPREAD_LIMIT·τ (SMALL_BUDGET_SPREAD_LIMIT·τ for small
 * budgets) start from the log-sum-exp bound with E_i = e^{w_i − w_max}; wider rows (small τ)
 * start from order statistics, located by vectorised counting passes, with G_i = e^{t₀ − w_i}.
 *
 * Scope: any row, with one budget for all rows or one per row: −inf entries are masked
 * (never selected), +inf entries take k/m each (at most 1) of the budget, a row with a NaN is
 * NaN — as the PyTorch path.  float32 rows too wide for float32 (small τ) are solved in
 * float64, float64 rows too wide for float64 about a pivot near the root (solve_row_far).  A
 * row with 1/τ beyond float64 (status 1), or whose bracket collapses onto a jump of F the
 * dtype cannot resolve (status 3), is left to the caller, which solves it with the PyTorch
 * path.  Every exponential is of a difference of scores first (x − a reference point in x,
 * exact near it), then scaled by 1/τ.  Math and symbols follow _solve.py:
 * z_i = w_i − t, p_i = σ(z_i), v_i = p_i(1 − p_i), F = Σp, F' = −Σv.
 *
 * C99 (plus GCC/Clang vector types in the short-row tiles), compiled on first use by
 * _native.py: with -fopenmp but linked against no OpenMP
 * library, so that it runs on the OpenMP runtime PyTorch has already loaded; or, where that
 * cannot load, with pthreads.
 * exp is a local Cody–Waite + polynomial version (≤ 2 ulp) that the compiler vectorises.
 */
/* GCC assumes by default that floating-point operations may trap (-ftrapping-math), and then
   will not if-convert the clamps and selects below: every loop of this file would run scalar
   (about 4× slower).  Nothing here reads the floating-point exception flags.  Likewise
   sqrt may set errno (-fmath-errno), a side effect that keeps a loop calling it scalar;
   nothing here reads errno. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "no-math-errno")
#endif
/* On x86 CPUs with AVX-512, GCC's -march=native still prefers 256-bit vectors, while PyTorch's
   own kernels use 512-bit ones: the row loops here take 512-bit vectors, the short-row tiles
   keep 256-bit ones on Intel (slower at 512 there; README, "512-bit vectors for the row
   loops") and take 512-bit ones on AMD (GCC's znver3–5 with AVX-512: 0.83–0.96× in float64
   tiles, 0.93–1.01× in float32).  Without AVX-512 the pragma changes nothing. */
#if defined(__GNUC__) && __GNUC__ >= 8 && !defined(__clang__) && !defined(__INTEL_COMPILER) && \
    (defined(__x86_64__) || defined(__i386__)) /* (GCC 8: the first to know the option) */
#pragma GCC target("prefer-vector-width=512")
#if defined(__znver3__) || defined(__znver4__) || defined(__znver5__)
#define TILE_CODE_BEGIN
#define TILE_CODE_END
#else
#define TILE_CODE_BEGIN                                                                          \
    _Pragma("GCC push_options") _Pragma("GCC target(\"prefer-vector-width=256\")")
#define TILE_CODE_END _Pragma("GCC pop_options")
#endif
#else
#define TILE_CODE_BEGIN
#define TILE_CODE_END
#endif
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define SPREAD_LIMIT 16.0 /* rows spanning more τ than this start from order statistics … */
#define SMALL_BUDGET_SPREAD_LIMIT 40.0 /* … except small budgets (e^−40 is still normal): */
#define SMALL_BUDGET_SHARE 0.125       /* k ≤ 12.5% of the row (as TILE_SMALL_SHARE), for which
                                          the log-sum-exp start is close (exact in the lower
                                          tail): fewer passes than counting rounds to 40·τ */
#define MAX_PASSES 64
/* T's least positive normal number and its largest finite one, as doubles */
#define MIN_NORMAL(T) (sizeof(T) == sizeof(float) ? (double)FLT_MIN : DBL_MIN)
#define MAX_FINITE(T) (sizeof(T) == sizeof(float) ? (double)FLT_MAX : DBL_MAX)
#define BLOCK 256 /* elements per partial sum (accurate, vectorisable summation) */
#define COUNT_THRESHOLDS 7 /* cuts per counting pass of a wide row's start (see count_start) */
#define MAX_COUNT_PASSES 8  /* … which narrow its bracket at most 8⁸-fold */
#define START_WIDTH 2.0     /* … down to this many units of τ */
#define TOP_LIST 16 /* wide rows of budgets below 15 start from a list of their top entries, */
#define TOP_SHARE (ROW_SCANS ? 100 : 256) /* … when they hold this many entries per listed one
                                            (else count_start; fewer with AVX-512's scans) */
#define NEAR_ROW 512 /* wide rows this long iterate on the entries near the root only … */
#define NEAR_MARGIN 4.0 /* … while the threshold stays within this many τ below its start, */
#define NEAR_SHARE 0.25 /* … if at most this share of the entries is near */
#define SHORT_ROW 128 /* rows this short are solved LANES at a time, one per vector lane, */
#define TILE_SOFT 6.0  /* … and start from their order statistics when wider than this many τ, */
                       /* in a tile where some row spans more than SPREAD_LIMIT τ (tiles of    */
                       /* more than SORT_N entries: SMALL_BUDGET_SPREAD_LIMIT τ for a budget   */
#define TILE_SMALL_SHARE 0.125 /* within this share of the live count from 0 or from it) */
#define TILE_MOMENT_WIDTH 2.0 /* tile lanes wider than this many τ that keep the log-sum-exp start
                               move it up to their moment start (tile_moment_start) if their … */
#define TILE_MOMENT_SHARE 0.2 /* … budget is at least this share of the live count, or they are
                                 wider than TILE_SOFT τ (a tile computes moments for all or none) */
#define LANES 8
/* The solves' tiles hold their lanes in 32-byte vectors: an x86 build without AVX turns much of
   a tile into scalar code (SSE4.2: 3.8–10× the AVX build's time, and 1.2–4.6× the time of the
   per-row path on the same build), so there short rows are solved row by row. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(__AVX__)
#define SOLVE_TILES 0
#else
#define SOLVE_TILES 1
#endif
#define SHORT_VJP_ROW 128 /* rows this short are differentiated LANES at a time too */
/* A function always inlined is compiled anew for each call with a constant argument: the tiles'
   helpers taking a constant flag (tile_differences' sums, tile_write's infinities) lose the
   code it turns off.  The backward tiles are so compiled with n a constant at the two widths
   met most, 8 and 16 entries (MoE routers, short attention rows), their loops over a row
   unrolled: 0.55–0.75× the time of their general loops there.  The solves' tiles gain nothing
   from it and are not specialised. */
#define ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__AVX__) /* (square roots of whole tile vectors: the tiles' bookkeeping is in the
                         row's own type) */
#define TILE_VSQRT_f32(v) ((tile_vec_f32)_mm256_sqrt_ps((__m256)(v)))
#define TILE_VSQRT_f64(v) ((tile_vec_f64)_mm256_sqrt_pd((__m256d)(v)))
#else
#define TILE_VSQRT_f32(v) tile_vsqrt_f32(v)
#define TILE_VSQRT_f64(v) tile_vsqrt_f64(v)
#endif
#define ROW_SPAN_LIMIT_f32 1048576.0       /* 2²⁰: float32 rows spanning more τ are solved in … */
#define ROW_SPAN_LIMIT_f64 70368744177664.0 /* … float64; beyond 2⁴⁶ about a pivot (solve_row_far) */
#define FAR_REACH 1099511627776.0 /* 2⁴⁰: solve_row_far clamps x − pivot to ±this many τ */
/* A float32 row solved in float64 (a copy each way); a float64 row about a pivot near its
   root.  Both defined after the kernels they call. */
static int solve_row_widened(const float *x, float *out, int64_t n, double k, double inv_tau);
static int solve_row_far(const double *x, double *out, int64_t n, double k, double inv_tau);
#define WIDEN_f32(x, out, n, k, inv_tau) solve_row_widened((x), (out), (n), (k), (inv_tau))
#define WIDEN_f64(x, out, n, k, inv_tau) solve_row_far((x), (out), (n), (k), (inv_tau))

/* ------------------------------------------------------------------ vectorisable exp */

/* a·b + c in one rounding where the target has a fused multiply-add (ISO C mode keeps GCC from
   contracting it by itself; elsewhere fma() would be a slow library call).  Used only where a
   fused result is as good as the rounded one: the exponentials' polynomials. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MADD_F32(a, b, c) fmaf((a), (b), (c))
#define MADD_F64(a, b, c) fma((a), (b), (c))
#else
#define MADD_F32(a, b, c) ((a) * (b) + (c))
#define MADD_F64(a, b, c) ((a) * (b) + (c))
#endif

static inline float exp_core_f32(float x) {
    /* e^x for x in [−87, 88]: 2^m · e^r with m = round(x / ln 2) and |r| ≤ ln2/2 (Cody–Waite
       split of ln 2), e^r from Cephes' degree-6 minimax polynomial.
       round to nearest by the 1.5·2²³ trick (vectorises, unlike roundf) */
    float shifted = x * 1.44269504088896341f + 12582912.0f;
    float m = shifted - 12582912.0f;
    float r = x - m * 0.693359375f;
    r = r - m * -2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = MADD_F32(q, r, 1.3981999507e-3f);
    q = MADD_F32(q, r, 8.3334519073e-3f);
    q = MADD_F32(q, r, 4.1665795894e-2f);
    q = MADD_F32(q, r, 1.6666665459e-1f);
    q = MADD_F32(q, r, 5.0000001201e-1f);
    float e = MADD_F32(q, r * r, r) + 1.0f;
    /* 2^m by adding m to the exponent field; m is read from the low bits of `shifted`
       (= 1.5·2²³ + m) rather than converted (a float → int conversion can trap, which keeps
       GCC from vectorising, and AVX2 has no double → int64 conversion). */
    int32_t bits, m_bits;
    memcpy(&bits, &e, sizeof bits);
    memcpy(&m_bits, &shifted, sizeof m_bits);
    bits += (int32_t)((uint32_t)(m_bits - 0x4B400000) << 23);
    memcpy(&e, &bits, sizeof e);
    return e;
}

static inline float exp_f32(float x_in) {
    /* The clamp keeps 2^m·e^r normal; outside it the result saturates exactly, to 0 (instead of
       a denormal) or +inf. */
    float x = x_in < -87.0f ? -87.0f : (x_in > 88.0f ? 88.0f : x_in);
    float e = exp_core_f32(x);
    return x_in < -87.0f ? 0.0f : (x_in > 88.0f ? (float)INFINITY : e);
}

static inline double exp_core_f64(double x) {
    /* The same scheme in double, for x in [−708, 709]: fdlibm's split of ln 2, Taylor to
       degree 13 on |r| ≤ 0.347 (truncation below 1e-17 relative). */
    double shifted = x * 1.4426950408889634074 + 6755399441055744.0;
    double m = shifted - 6755399441055744.0;
    double r = x - m * 6.93147180369123816490e-01;
    r = r - m * 1.90821492927058770002e-10;
    double q = 1.0 / 6227020800.0;
    q = MADD_F64(q, r, 1.0 / 479001600.0);
    q = MADD_F64(q, r, 1.0 / 39916800.0);
    q = MADD_F64(q, r, 1.0 / 3628800.0);
    q = MADD_F64(q, r, 1.0 / 362880.0);
    q = MADD_F64(q, r, 1.0 / 40320.0);
    q = MADD_F64(q, r, 1.0 / 5040.0);
    q = MADD_F64(q, r, 1.0 / 720.0);
    q = MADD_F64(q, r, 1.0 / 120.0);
    q = MADD_F64(q, r, 1.0 / 24.0);
    q = MADD_F64(q, r, 1.0 / 6.0);
    q = MADD_F64(q, r, 0.5);
    double e = MADD_F64(q, r * r, r) + 1.0;
    int64_t bits, m_bits;
    memcpy(&bits, &e, sizeof bits);
    memcpy(&m_bits, &shifted, sizeof m_bits);
    bits += (int64_t)((uint64_t)(m_bits - 0x4338000000000000) << 52);
    memcpy(&e, &bits, sizeof e);
    return e;
}

static inline double exp_f64(double x_in) {
    double x = x_in < -708.0 ? -708.0 : (x_in > 709.0 ? 709.0 : x_in);
    double e = exp_core_f64(x);
    return x_in < -708.0 ? 0.0 : (x_in > 709.0 ? (double)INFINITY : e);
}

/* A zero the compiler cannot see through.  Clamps at constant bounds make GCC specialise the
   code after them for each bound and blend all the versions (twice the instructions in a
   vectorised loop of exponentials); bounds offset by this zero stay plain min/max selects. */
static volatile float opaque_zero_f32 = 0.0f;
static volatile double opaque_zero_f64 = 0.0;

/* exp_f32 and exp_f64 with their range [low, high] passed in (offset by an opaque zero, for
   the loops of exponentials over a row). */
static inline float exp_within_f32(float x_in, float low, float high) {
    float x = x_in > low ? x_in : low;
    float e = exp_core_f32(x < high ? x : high);
    return x_in < low ? 0.0f : (x_in > high ? (float)INFINITY : e);
}

static inline double exp_within_f64(double x_in, double low, double high) {
    double x = x_in > low ? x_in : low;
    double e = exp_core_f64(x < high ? x : high);
    return x_in < low ? 0.0 : (x_in > high ? (double)INFINITY : e);
}

/* ------------------------------------------------------------------ tile vectors
 * 32 bytes of floats or doubles (GCC/Clang vector extensions: one AVX register, two SSE ones),
 * and their comparison masks (a true comparison is −1), for the short-row tiles:
 * explicit vectors keep a tile's per-lane sums in registers across a loop over its entries. */
typedef float tile_vec_f32 __attribute__((vector_size(32)));
typedef int32_t tile_mask_f32 __attribute__((vector_size(32)));
typedef double tile_vec_f64 __attribute__((vector_size(32)));
typedef int64_t tile_mask_f64 __attribute__((vector_size(32)));
#if !defined(__AVX__)
/* TILE_VSQRT without AVX: through memory, so that the loop vectorises. */
#define DEFINE_TILE_VSQRT(T, SUFFIX, SQRT)                                                       \
    static inline tile_vec_##SUFFIX tile_vsqrt_##SUFFIX(tile_vec_##SUFFIX v) {                   \
        T a[sizeof v / sizeof(T)];                                                               \
        memcpy(a, &v, sizeof a);                                                                 \
        _Pragma("omp simd") for (size_t i = 0; i < sizeof a / sizeof(T); ++i) a[i] = SQRT(a[i]); \
        memcpy(&v, a, sizeof a);                                                                 \
        return v;                                                                                \
    }
DEFINE_TILE_VSQRT(float, f32, sqrtf)
DEFINE_TILE_VSQRT(double, f64, sqrt)
#endif

/* Batcher's odd–even merge sort on 8 and 16 slots, for the short-row tiles' sorts across the
   lanes (tile_sort), on vectors held in registers (the exchanges' indices constant; a float64
   tile sorts its two halves of four lanes one after the other): v[i] ← max, v[j] ← min for
   each compare-exchange (i, j) (a lane holding a NaN is never read). */
#define SORT_NETWORK_8(CE, v)                                                                    \
    CE(v, 0, 1); CE(v, 2, 3); CE(v, 4, 5); CE(v, 6, 7); CE(v, 0, 2); CE(v, 1, 3); CE(v, 4, 6);   \
    CE(v, 5, 7); CE(v, 1, 2); CE(v, 5, 6); CE(v, 0, 4); CE(v, 1, 5); CE(v, 2, 6); CE(v, 3, 7);   \
    CE(v, 2, 4); CE(v, 3, 5); CE(v, 1, 2); CE(v, 3, 4); CE(v, 5, 6);
#define SORT_NETWORK_16(CE, v)                                                                   \
    CE(v, 0, 1); CE(v, 2, 3); CE(v, 4, 5); CE(v, 6, 7); CE(v, 8, 9); CE(v, 10, 11);              \
    CE(v, 12, 13); CE(v, 14, 15); CE(v, 0, 2); CE(v, 1, 3); CE(v, 4, 6); CE(v, 5, 7);            \
    CE(v, 8, 10); CE(v, 9, 11); CE(v, 12, 14); CE(v, 13, 15); CE(v, 1, 2); CE(v, 5, 6);          \
    CE(v, 9, 10); CE(v, 13, 14); CE(v, 0, 4); CE(v, 1, 5); CE(v, 2, 6); CE(v, 3, 7);             \
    CE(v, 8, 12); CE(v, 9, 13); CE(v, 10, 14); CE(v, 11, 15); CE(v, 2, 4); CE(v, 3, 5);          \
    CE(v, 10, 12); CE(v, 11, 13); CE(v, 1, 2); CE(v, 3, 4); CE(v, 5, 6); CE(v, 9, 10);           \
    CE(v, 11, 12); CE(v, 13, 14); CE(v, 0, 8); CE(v, 1, 9); CE(v, 2, 10); CE(v, 3, 11);          \
    CE(v, 4, 12); CE(v, 5, 13); CE(v, 6, 14); CE(v, 7, 15); CE(v, 4, 8); CE(v, 5, 9);            \
    CE(v, 6, 10); CE(v, 7, 11); CE(v, 2, 4); CE(v, 3, 5); CE(v, 6, 8); CE(v, 7, 9);              \
    CE(v, 10, 12); CE(v, 11, 13); CE(v, 1, 2); CE(v, 3, 4); CE(v, 5, 6); CE(v, 7, 8);            \
    CE(v, 9, 10); CE(v, 11, 12); CE(v, 13, 14);
#if defined(__AVX__)
#define SORT_CE_f32(v, i, j)                                                                     \
    do {                                                                                         \
        tile_vec_f32 high_ = (tile_vec_f32)_mm256_max_ps((__m256)v[i], (__m256)v[j]);            \
        v[j] = (tile_vec_f32)_mm256_min_ps((__m256)v[i], (__m256)v[j]);                          \
        v[i] = high_;                                                                            \
    } while (0)
#define SORT_CE_f64(v, i, j)                                                                     \
    do {                                                                                         \
        tile_vec_f64 high_ = (tile_vec_f64)_mm256_max_pd((__m256d)v[i], (__m256d)v[j]);          \
        v[j] = (tile_vec_f64)_mm256_min_pd((__m256d)v[i], (__m256d)v[j]);                        \
        v[i] = high_;                                                                            \
    } while (0)
#else
#define SORT_CE_GENERIC(V, M, v, i, j)                                                           \
    do {                                                                                         \
        M first_ = v[i] > v[j];                                                                  \
        V high_ = (V)(((M)v[i] & first_) | ((M)v[j] & ~first_));                                 \
        v[j] = (V)(((M)v[j] & first_) | ((M)v[i] & ~first_));                                    \
        v[i] = high_;                                                                            \
    } while (0)
#define SORT_CE_f32(v, i, j) SORT_CE_GENERIC(tile_vec_f32, tile_mask_f32, v, i, j)
#define SORT_CE_f64(v, i, j) SORT_CE_GENERIC(tile_vec_f64, tile_mask_f64, v, i, j)
#endif
static inline void sort_8_f32(tile_vec_f32 *v) { SORT_NETWORK_8(SORT_CE_f32, v) }
static inline void sort_16_f32(tile_vec_f32 *v) { SORT_NETWORK_16(SORT_CE_f32, v) }
static inline void sort_8_f64(tile_vec_f64 *v) { SORT_NETWORK_8(SORT_CE_f64, v) }
static inline void sort_16_f64(tile_vec_f64 *v) { SORT_NETWORK_16(SORT_CE_f64, v) }

#define SORT_N 16 /* tiles of rows this short can sort each lane (tile_sort) */

/* Two-vector shuffles with constant indices (GCC and Clang spell them differently). */
#if defined(__clang__)
#define SHUFFLE_F32(a, b, ...) __builtin_shufflevector((a), (b), __VA_ARGS__)
#define SHUFFLE_F64(a, b, ...) __builtin_shufflevector((a), (b), __VA_ARGS__)
#else
#define SHUFFLE_F32(a, b, ...) __builtin_shuffle((a), (b), (tile_mask_f32){__VA_ARGS__})
#define SHUFFLE_F64(a, b, ...) __builtin_shuffle((a), (b), (tile_mask_f64){__VA_ARGS__})
#endif

/* The sums of the entries of each of the vectors v[0..8), in sum[0..8): pairwise sums in a
   tree of shuffles (no vector is summed on its own, entry by entry). */
static inline tile_vec_f32 pair_sums_f32(tile_vec_f32 a, tile_vec_f32 b) {
    return SHUFFLE_F32(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           SHUFFLE_F32(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
static void row_sums_f32(const tile_vec_f32 *v, float *sum) {
    tile_vec_f32 low = pair_sums_f32(pair_sums_f32(v[0], v[1]), pair_sums_f32(v[2], v[3]));
    tile_vec_f32 high = pair_sums_f32(pair_sums_f32(v[4], v[5]), pair_sums_f32(v[6], v[7]));
    tile_vec_f32 total = SHUFFLE_F32(low, high, 0, 1, 2, 3, 8, 9, 10, 11) +
                         SHUFFLE_F32(low, high, 4, 5, 6, 7, 12, 13, 14, 15);
    memcpy(sum, &total, sizeof total);
}
static inline tile_vec_f64 pair_sums_f64(tile_vec_f64 a, tile_vec_f64 b) {
    return SHUFFLE_F64(a, b, 0, 4, 2, 6) + SHUFFLE_F64(a, b, 1, 5, 3, 7);
}
static void row_sums_f64(const tile_vec_f64 *v, double *sum) {
    for (int half = 0; half < 2; ++half) {
        tile_vec_f64 low = pair_sums_f64(v[4 * half], v[4 * half + 1]);
        tile_vec_f64 high = pair_sums_f64(v[4 * half + 2], v[4 * half + 3]);
        tile_vec_f64 total =
            SHUFFLE_F64(low, high, 0, 1, 4, 5) + SHUFFLE_F64(low, high, 2, 3, 6, 7);
        memcpy(sum + 4 * half, &total, sizeof total);
    }
}

/* In-place transposes of a square block of vectors (8 floats, 4 doubles): v[j][l] ↔ v[l][j],
   in three (two) rounds of two-vector shuffles; they write a tile's lanes back to its rows. */
static inline void transpose_f32(tile_vec_f32 *v) {
    tile_vec_f32 t[8], u[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = SHUFFLE_F32(v[j], v[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[j + 1] = SHUFFLE_F32(v[j], v[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int j = 0; j < 8; j += 4)
        for (int h = 0; h < 2; ++h) {
            u[j + 2 * h] = SHUFFLE_F32(t[j + h], t[j + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[j + 2 * h + 1] = SHUFFLE_F32(t[j + h], t[j + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int j = 0; j < 4; ++j) {
        v[j] = SHUFFLE_F32(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        v[j + 4] = SHUFFLE_F32(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
static inline void transpose_f64(tile_vec_f64 *v) {
    tile_vec_f64 t[4];
    for (int j = 0; j < 4; j += 2) {
        t[j] = SHUFFLE_F64(v[j], v[j + 1], 0, 4, 2, 6);
        t[j + 1] = SHUFFLE_F64(v[j], v[j + 1], 1, 5, 3, 7);
    }
    for (int j = 0; j < 2; ++j) {
        v[j] = SHUFFLE_F64(t[j], t[j + 2], 0, 1, 4, 5);
        v[j + 2] = SHUFFLE_F64(t[j], t[j + 2], 2, 3, 6, 7);
    }
}

/* A tile's rows into its lanes, xt[i·8 + l] = x[l·n + i] for 8 rows of n entries: 8 × 8 (two
   4 × 4) blocks at a time by the transposes above, the columns past the last block one by one
   (the tiles' lane count, LANES and SPARSE_LANES, is 8). */
static inline void tile_gather_f32(const float *x, int64_t n, float *xt) {
    int64_t start = 0;
    for (; start + 8 <= n; start += 8) {
        tile_vec_f32 v[8];
        _Pragma("GCC unroll 8") /* (in registers, not through a copy on the stack) */
        for (int l = 0; l < 8; ++l) memcpy(&v[l], x + l * n + start, sizeof v[l]);
        transpose_f32(v);
        _Pragma("GCC unroll 8")
        for (int j = 0; j < 8; ++j) memcpy(xt + (start + j) * 8, &v[j], sizeof v[j]);
    }
    for (int64_t i = start; i < n; ++i)
        for (int l = 0; l < 8; ++l) xt[i * 8 + l] = x[l * n + i];
}
static inline void tile_gather_f64(const double *x, int64_t n, double *xt) {
    int64_t start = 0;
    for (; start + 4 <= n; start += 4)
        for (int h = 0; h < 8; h += 4) {
            tile_vec_f64 v[4];
            _Pragma("GCC unroll 4")
            for (int r = 0; r < 4; ++r) memcpy(&v[r], x + (h + r) * n + start, sizeof v[r]);
            transpose_f64(v);
            _Pragma("GCC unroll 4")
            for (int j = 0; j < 4; ++j) memcpy(xt + (start + j) * 8 + h, &v[j], sizeof v[j]);
        }
    for (int64_t i = start; i < n; ++i)
        for (int l = 0; l < 8; ++l) xt[i * 8 + l] = x[l * n + i];
}

static inline double clamp_f64(double v, double low, double high) {
    return v < low ? low : (v > high ? high : v);
}

/* ------------------------------------------------------------------ AVX-512 row scans
 * Two scans of the long-row solve whose per-entry work is a comparison: on AVX-512 they take
 * 64 bytes at a time into a mask register (one kortest per 16 floats), where the generic
 * vector code tests a 32-byte mask through four general registers, and the compaction
 * (branch-free scalar stores otherwise) compresses each vector's kept entries into one store.
 * ROW_SCAN_WIDTH_f32/f64 entries per call; without AVX-512 the loops of the macro below run. */
#if defined(__AVX512F__)
#define ROW_SCANS 1
#define ROW_SCAN_WIDTH_f32 16
#define ROW_SCAN_WIDTH_f64 8
/* Bit l set where x[l] is not −inf and x[l]·sc ≥ bar (top_start's test). */
static inline unsigned top_hits_f32(const float *x, float sc, float bar) {
    __m512 v = _mm512_loadu_ps(x);
    __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
    return _mm512_mask_cmp_ps_mask(live, _mm512_mul_ps(v, _mm512_set1_ps(sc)),
                                   _mm512_set1_ps(bar), _CMP_GE_OQ);
}
static inline unsigned top_hits_f64(const double *x, double sc, double bar) {
    __m512d v = _mm512_loadu_pd(x);
    __mmask8 live = _mm512_cmp_pd_mask(v, _mm512_set1_pd(-INFINITY), _CMP_NEQ_UQ);
    return _mm512_mask_cmp_pd_mask(live, _mm512_mul_pd(v, _mm512_set1_pd(sc)),
                                   _mm512_set1_pd(bar), _CMP_GE_OQ);
}
/* The maxima of 16 lanes over the whole 16-entry blocks of a row's live x_i·sc (−inf where
   a lane holds none): 16 distinct entries, of which the j-th largest is a bar that at least
   j entries of the row reach (top_start). */
static inline void top_lanes_f32(const float *x, int64_t n, float sc, float *lanes) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_GT_OQ);
        best = _mm512_mask_max_ps(best, live, best, _mm512_mul_ps(v, _mm512_set1_ps(sc)));
    }
    _mm512_storeu_ps(lanes, best);
}
static inline void top_lanes_f64(const double *x, int64_t n, double sc, double *lanes) {
    __m512d best[2] = {_mm512_set1_pd(-INFINITY), _mm512_set1_pd(-INFINITY)};
    for (int64_t i = 0; i + 16 <= n; i += 16)
        for (int h = 0; h < 2; ++h) {
            __m512d v = _mm512_loadu_pd(x + i + 8 * h), w = _mm512_mul_pd(v, _mm512_set1_pd(sc));
            __mmask8 live = _mm512_cmp_pd_mask(v, _mm512_set1_pd(-INFINITY), _CMP_GT_OQ);
            best[h] = _mm512_mask_max_pd(best[h], live, best[h], w);
        }
    _mm512_storeu_pd(lanes, best[0]);
    _mm512_storeu_pd(lanes + 8, best[1]);
}
/* The entries e[l] ≤ cut, in order, stored from out (which has room for a whole vector):
   returns how many. */
static inline int64_t keep_below_f32(const float *e, float cut, float *out) {
    __m512 v = _mm512_loadu_ps(e);
    __mmask16 keep = _mm512_cmp_ps_mask(v, _mm512_set1_ps(cut), _CMP_LE_OQ);
    _mm512_storeu_ps(out, _mm512_maskz_compress_ps(keep, v));
    return __builtin_popcount(keep);
}
static inline int64_t keep_below_f64(const double *e, double cut, double *out) {
    __m512d v = _mm512_loadu_pd(e);
    __mmask8 keep = _mm512_cmp_pd_mask(v, _mm512_set1_pd(cut), _CMP_LE_OQ);
    _mm512_storeu_pd(out, _mm512_maskz_compress_pd(keep, v));
    return __builtin_popcount(keep);
}
/* sparse_topk's window of a wide row, 8 entries at x: w = (x − ref)·inv in double; returns
   how many lie at or above high (fixed at p = 1) and stores those in (low, high), in order,
   from out (room for 8), adding their count to *kept. */
static inline int window_f32(const float *x, double ref, double inv, double low, double high,
                             double *out, int64_t *kept) {
    __m512d w = _mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x)),
                                            _mm512_set1_pd(ref)), _mm512_set1_pd(inv));
    __mmask8 above = _mm512_cmp_pd_mask(w, _mm512_set1_pd(high), _CMP_GE_OQ);
    __mmask8 keep = _mm512_mask_cmp_pd_mask(~above, w, _mm512_set1_pd(low), _CMP_GT_OQ);
    _mm512_storeu_pd(out, _mm512_maskz_compress_pd(keep, w));
    *kept += __builtin_popcount(keep);
    return __builtin_popcount(above);
}
static inline int window_f64(const double *x, double ref, double inv, double low, double high,
                             double *out, int64_t *kept) {
    __m512d w = _mm512_mul_pd(_mm512_sub_pd(_mm512_loadu_pd(x), _mm512_set1_pd(ref)),
                              _mm512_set1_pd(inv));
    __mmask8 above = _mm512_cmp_pd_mask(w, _mm512_set1_pd(high), _CMP_GE_OQ);
    __mmask8 keep = _mm512_mask_cmp_pd_mask(~above, w, _mm512_set1_pd(low), _CMP_GT_OQ);
    _mm512_storeu_pd(out, _mm512_maskz_compress_pd(keep, w));
    *kept += __builtin_popcount(keep);
    return __builtin_popcount(above);
}
#else /* (stand-ins the macro's dead branches name) */
#define ROW_SCANS 0
#define ROW_SCAN_WIDTH_f32 1
#define ROW_SCAN_WIDTH_f64 1
#define top_hits_f32(x, sc, bar) ((void)(bar), 0u)
#define top_hits_f64(x, sc, bar) ((void)(bar), 0u)
#define top_lanes_f32(x, n, sc, lanes) ((void)(x), (void)(n), (void)(sc), (void)(lanes))
#define top_lanes_f64(x, n, sc, lanes) ((void)(x), (void)(n), (void)(sc), (void)(lanes))
#define keep_below_f32(e, cut, out) 0
#define keep_below_f64(e, cut, out) 0
#define window_f32(x, ref, inv, low, high, out, kept) 0
#define window_f64(x, ref, inv, low, high, out, kept) 0
#endif

/* ------------------------------------------------------------------ per-row solve
 * Instantiated for float and double by the macro below.  Scalars are double throughout.
 *
 * status: 0 solved here; 1 |x/τ| too large (or no memory); 3 not solved (a bracket collapsed
 * onto a jump of F, or no convergence): the caller solves those rows.
 */

#define DEFINE_ROW_KERNELS(T, COUNT, SUFFIX, EXP, EPS, LIMIT, LOG_MIN, LOG_MAX, EXP_MAX, EXP_CUT) \
    /* One evaluation of F from stored exponentials, with a multiply and a divide per entry:     \
       the direct form holds E_i = e^{w_i − w_max} ∈ (0, 1] and c = e^{w_max − t}, so that       \
       σ(w_i − t) = y/(1 + y) with y = cE_i; the inverted form (wide rows) holds                 \
       G_i = e^{t₀ − w_i} and c = e^{t − t₀}, so that σ(w_i − t) = 1/(1 + y) with y = cG_i.      \
       Both keep p and q = 1 − p at full relative accuracy.  Returns Σp, Σv and Σp·v. */         \
    static void evaluate_##SUFFIX(const T *e, int64_t n, double scale, int inverted,             \
                                  double *mass, double *slope, double *upper) {                  \
        double sum_p = 0.0, sum_v = 0.0, sum_pv = 0.0;                                           \
        const T c = (T)scale, huge = (T)ldexp(1.0, EXP_CUT);                                     \
        /* (the low cut on e, before the product: c·e itself must not be denormal) */             \
        const T e_tiny = (T)fmax(ldexp(1.0, -EXP_CUT) / scale, MIN_NORMAL(T));                   \
        const T zero = opaque_zero_##SUFFIX; /* (c·0 not folded: the product after the select) */ \
        for (int64_t start = 0; start < n; start += BLOCK) {                                     \
            int64_t stop = start + BLOCK < n ? start + BLOCK : n;                                \
            T block_p = 0, block_v = 0, block_pv = 0;                                            \
            _Pragma("omp simd reduction(+ : block_p, block_v, block_pv)")                        \
            for (int64_t i = start; i < stop; ++i) {                                             \
                /* Entries beyond 2^±EXP_CUT of the threshold weigh < 2^−EXP_CUT in every sum:   \
                   cut them to exact 0/1 there, so no product of them is denormal (a denormal    \
                   costs a microcode assist, ~100× an ordinary multiply). */                     \
                T y = c * (e[i] > e_tiny ? e[i] : zero);                                         \
                y = y < huge ? y : huge;                                                         \
                T r = (T)1 / ((T)1 + y);                                                         \
                T p = inverted ? r : y * r;                                                      \
                T q = inverted ? y * r : r;                                                      \
                T v = p * q;                                                                     \
                block_p += p;                                                                    \
                block_v += v;                                                                    \
                block_pv += p * v;                                                               \
            }                                                                                    \
            sum_p += block_p;                                                                    \
            sum_v += block_v;                                                                    \
            sum_pv += block_pv;                                                                  \
        }                                                                                        \
        *mass = sum_p;                                                                           \
        *slope = sum_v;                                                                          \
        *upper = sum_pv;                                                                         \
    }                                                                                            \
                                                                                                 \
    /* write's loop, with `masked` a constant in each call (ALWAYS_INLINE). */                   \
    static ALWAYS_INLINE void write_loop_##SUFFIX(T *e, const T *x, int64_t n, T c, int want_q,  \
                                                  int masked) {                                  \
        const T big = (T)EXP_MAX, minus_inf = -(T)INFINITY;                                      \
        /* y kept within [2·min, 1/(2·min)] (T's least normal min) or 0 or +inf, so that no      \
           product or quotient below is denormal: p below 2·min is written as 0 */               \
        const T e_lo = (T)fmax(2.0 * MIN_NORMAL(T) / (double)c, MIN_NORMAL(T));                  \
        const T e_hi = (T)fmin(0.5 / MIN_NORMAL(T) / (double)c, MAX_FINITE(T));                  \
        const T zero = opaque_zero_##SUFFIX, inf = (T)INFINITY + zero; /* (as newton_near's) */  \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            T g = e[i] < e_lo ? zero : (e[i] > e_hi ? inf : e[i]);                               \
            T y = c * g; /* +inf for an entry saturated at 0 (inverted form) */                  \
            T r = (T)1 / ((T)1 + y);                                                             \
            T other = y < big ? y * r : (T)1;                                                    \
            T value = want_q ? r : other;                                                        \
            e[i] = masked && x[i] == minus_inf ? (T)0 : value;                                   \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* The result, in place of the exponentials: the caller's p (p, or 1 − p when flipped);      \
       0 for the masked (−inf) entries of x when `masked` is set. */                             \
    static void write_##SUFFIX(T *e, const T *x, int masked, int64_t n, double scale,            \
                               int inverted, int flipped) {                                      \
        const T c = (T)scale;                                                                    \
        const int want_q = inverted != flipped; /* the value that is r = 1/(1 + y) */            \
        /* A masked entry holds E = 0 (G = +inf in the inverted form), whose p is 0 already     \
           unless flipped (then 1 − p is, and p must be set to 0 by its x). */                  \
        if (masked && flipped)                                                                   \
            write_loop_##SUFFIX(e, x, n, c, want_q, 1);                                          \
        else                                                                                     \
            write_loop_##SUFFIX(e, x, n, c, want_q, 0);                                          \
    }                                                                                            \
                                                                                                 \
    /* Two-tail step (see _solve.py): y = eᵟ solves a·y² − g·y − b = 0, g = F − k + a − b. */    \
    static double two_tail_##SUFFIX(double excess, double slope, double upper) {                 \
        double a = upper < 0 ? 0 : (upper > slope ? slope : upper);                              \
        double b = slope - a;                                                                    \
        double g = excess + a - b;                                                               \
        double root = sqrt(g * g + 4.0 * a * b);                                                 \
        return g >= 0 ? (g + root) / (2.0 * a) : (2.0 * b) / (root - g);                         \
    }                                                                                            \
                                                                                                 \
    /* Descending quickselect: afterwards a[m] is the (m+1)-th largest, a[0..m) ≥ a[m] ≥         \
       a(m..n).  Median-of-three pivots; returns 0 if it needs too many rounds. */               \
    static int select_##SUFFIX(T *a, int64_t n, int64_t m) {                                     \
        int64_t left = 0, right = n - 1;                                                         \
        for (int round = 0; right > left; ++round) {                                             \
            if (round > 200) return 0;                                                           \
            T x0 = a[left], x1 = a[left + (right - left) / 2], x2 = a[right];                    \
            T pivot = x0 > x1 ? (x1 > x2 ? x1 : (x0 > x2 ? x2 : x0))                             \
                               : (x0 > x2 ? x0 : (x1 > x2 ? x2 : x1));                           \
            int64_t i = left, j = right;                                                         \
            while (i <= j) {                                                                     \
                while (a[i] > pivot) ++i;                                                        \
                while (a[j] < pivot) --j;                                                        \
                if (i <= j) {                                                                    \
                    T swap = a[i];                                                               \
                    a[i] = a[j];                                                                 \
                    a[j] = swap;                                                                 \
                    ++i;                                                                         \
                    --j;                                                                         \
                }                                                                                \
            }                                                                                    \
            if (m <= j) right = j;                                                               \
            else if (m >= i) left = i;                                                           \
            else break;                                                                          \
        }                                                                                        \
        return 1;                                                                                \
    }                                                                                            \
                                                                                                 \
    /* How many live entries lie above each of the COUNT_THRESHOLDS cuts: one branch-free pass   \
       (a compare and an add per entry and cut, vectorised); masked (−inf) entries count         \
       nowhere. */                                                                               \
    static void count_above_##SUFFIX(const T *x, int64_t n, int masked, T sc, const T *cut,      \
                                     int64_t *counts) {                                          \
        const T minus_inf = -(T)INFINITY;                                                        \
        const T t0 = cut[0], t1 = cut[1], t2 = cut[2], t3 = cut[3], t4 = cut[4], t5 = cut[5],    \
                t6 = cut[6];                                                                     \
        for (int j = 0; j < COUNT_THRESHOLDS; ++j) counts[j] = 0;                                \
        for (int64_t start = 0; start < n; start += BLOCK) {                                     \
            int64_t stop = start + BLOCK < n ? start + BLOCK : n;                                \
            COUNT c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0;                        \
            _Pragma("omp simd reduction(+ : c0, c1, c2, c3, c4, c5, c6)")                        \
            for (int64_t i = start; i < stop; ++i) {                                             \
                T w = x[i] * sc;                                                                 \
                w = masked && x[i] == minus_inf ? minus_inf : w; /* (−inf·s is +inf if s < 0) */ \
                c0 += (COUNT)(w > t0);                                                           \
                c1 += (COUNT)(w > t1);                                                           \
                c2 += (COUNT)(w > t2);                                                           \
                c3 += (COUNT)(w > t3);                                                           \
                c4 += (COUNT)(w > t4);                                                           \
                c5 += (COUNT)(w > t5);                                                           \
                c6 += (COUNT)(w > t6);                                                           \
            }                                                                                    \
            counts[0] += c0;                                                                     \
            counts[1] += c1;                                                                     \
            counts[2] += c2;                                                                     \
            counts[3] += c3;                                                                     \
            counts[4] += c4;                                                                     \
            counts[5] += c5;                                                                     \
            counts[6] += c6;                                                                     \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* The largest live w at or below b (the (c + 1)-th largest, when c entries lie above b)     \
       and the smallest above it (the c-th), in one branch-free pass. */                         \
    static void around_##SUFFIX(const T *x, int64_t n, int masked, T sc, T b, T *below,          \
                                T *above) {                                                      \
        const T minus_inf = -(T)INFINITY, plus_inf = (T)INFINITY;                                \
        T low = minus_inf, high = plus_inf;                                                      \
        _Pragma("omp simd reduction(max : low) reduction(min : high)")                           \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            T w = x[i] * sc;                                                                     \
            w = masked && x[i] == minus_inf ? minus_inf : w;                                     \
            T under = w > b ? minus_inf : w, over = w > b ? w : plus_inf;                        \
            low = under > low ? under : low;                                                     \
            high = over < high ? over : high;                                                    \
        }                                                                                        \
        *below = low;                                                                            \
        *above = high;                                                                           \
    }                                                                                            \
                                                                                                 \
    /* A start for t in a wide row, from the order statistics around the budget (as              \
       _solve.py: midway between the m-th and (m+1)-th largest w for an integer budget m,        \
       w_(m+1) − logit(f) for a budget m + f).  Counting passes narrow an interval (a, b]        \
       holding w_(m+1) (count(w > a) ≥ m + 1 > count(w > b)) COUNT_THRESHOLDS + 1-fold each,     \
       until exactly m entries lie above b, when one more pass reads w_(m) and w_(m+1) off,      \
       or until it is START_WIDTH wide, when the start interpolates the count inside it.         \
       (A quickselect finds them too, but its branches cost as much as several vectorised        \
       passes.)  Returns 0 (no start) if MAX_COUNT_PASSES do not suffice: a row spanning         \
       more than ~10⁷ units of τ. */                                                             \
    static int count_start_##SUFFIX(const T *x, int64_t n, int64_t live, int masked, T sc,       \
                                    double budget, T a, T b, double *start) {                    \
        const int64_t m = (int64_t)floor(budget);                                                \
        int64_t a_count = live, b_count = 0; /* (a = w_min: count every live entry) */           \
        for (int pass = 0; b_count < m && (double)b - (double)a > START_WIDTH; ++pass) {         \
            if (pass == MAX_COUNT_PASSES) return 0;                                              \
            T cut[COUNT_THRESHOLDS];                                                             \
            int64_t counts[COUNT_THRESHOLDS];                                                    \
            double width = (double)b - (double)a;                                                \
            for (int j = 0; j < COUNT_THRESHOLDS; ++j)                                           \
                cut[j] = (T)((double)a + (j + 1) * (width / (COUNT_THRESHOLDS + 1)));            \
            count_above_##SUFFIX(x, n, masked, sc, cut, counts);                                 \
            int j = COUNT_THRESHOLDS - 1; /* the highest cut with more than m entries above */   \
            while (j >= 0 && counts[j] <= m) --j;                                                \
            T next_a = j >= 0 ? cut[j] : a, next_b = j + 1 < COUNT_THRESHOLDS ? cut[j + 1] : b;  \
            if (!((double)next_b - (double)next_a < width)) break; /* T's resolution */          \
            if (j >= 0) a_count = counts[j];                                                     \
            if (j + 1 < COUNT_THRESHOLDS) b_count = counts[j + 1];                               \
            a = next_a;                                                                          \
            b = next_b;                                                                          \
        }                                                                                        \
        if (b_count < m) { /* several entries within START_WIDTH: interpolate the count */       \
            double share = ((double)a_count - budget) / (double)(a_count - b_count);             \
            *start = (double)a + ((double)b - (double)a) * share;                                \
            return 1;                                                                            \
        }                                                                                        \
        T below, above;                                                                          \
        around_##SUFFIX(x, n, masked, sc, b, &below, &above);                                    \
        double fraction = budget - (double)m;                                                    \
        *start = fraction == 0.0 ? 0.5 * ((double)below + (double)above)                         \
                                 : (double)below - log(fraction / (1.0 - fraction));             \
        return 1;                                                                                \
    }                                                                                            \
                                                                                                 \
    /* The model-based Newton iteration (see _solve.py) on stored exponentials, in the scale     \
       c of evaluate(): F increases with c in the direct form, decreases in the inverted one;    \
       a step δ in t divides c by y = eᵟ (direct) or multiplies it (inverted), so a pass         \
       needs no exp or log.  [lo, hi] brackets the root; a step that leaves it is replaced by    \
       a bisection (geometric: the midpoint in t).  Stops when the mass is within                \
       8·eps·max(k, 1) of k, or after a step with |δ|³ ≤ tol_step (the two-tail step's error     \
       is ≲ |δ|³/4).  Returns 3 if the bracket collapses onto a jump of F (ties at the           \
       resolution limit straddle the root: the torch path blends them) or after *passes          \
       passes.  `far` > 0 (inverted form only): e holds only the entries near the root, and      \
       the others, far below it, weigh p ≈ far/c − far2/c² and v ≈ far/c − 2·far2/c² (see        \
       newton_near); returns 4, with *scale the current c, when c falls below `limit`, where     \
       that no longer holds.  On return, *passes is the number of passes made. */                \
    static int newton_##SUFFIX(const T *e, int64_t n, int inverted, double budget,               \
                               double *scale, double lo, double hi, double tol_step,             \
                               double far, double far2, double limit, int *passes) {             \
        const double tol_mass = 8.0 * EPS * (budget > 1.0 ? budget : 1.0);                       \
        const int max_passes = *passes;                                                          \
        double c = *scale;                                                                       \
        int status = 0, pass = 0;                                                                \
        for (;; ++pass) {                                                                        \
            if (pass == max_passes) { status = 3; break; }                                       \
            if (far > 0.0 && c < limit) { status = 4; break; }                                   \
            double mass, slope, upper;                                                           \
            evaluate_##SUFFIX(e, n, c, inverted, &mass, &slope, &upper);                         \
            mass += far / c - far2 / (c * c);                                                    \
            slope += far / c - 2.0 * far2 / (c * c);                                             \
            double excess = mass - budget;                                                       \
            if (fabs(excess) <= tol_mass) break;                                                 \
            if ((excess > 0) != inverted) hi = c; else lo = c;                                   \
            double y = two_tail_##SUFFIX(excess, slope, upper);                                  \
            double next = inverted ? c * y : c / y;                                              \
            if (!(next > lo && next < hi)) { /* outside the bracket (or NaN): bisect */          \
                if (hi - lo <= 4.0 * EPS * hi) { status = 3; break; } /* collapsed: torch path */ \
                c = sqrt(lo * hi);                                                               \
                continue;                                                                        \
            }                                                                                    \
            if (next == c) break; /* below the resolution of c */                                \
            c = next;                                                                            \
            double change = fabs(y - 1.0);                                                       \
            if (change * change * change <= tol_step) { ++pass; break; }                         \
        }                                                                                        \
        *scale = c;                                                                              \
        *passes = pass;                                                                          \
        return status;                                                                           \
    }                                                                                            \
                                                                                                 \
    /* Long wide rows: newton() (inverted form, G_i = e^{t₀ − w_i} in e) on the entries near t₀  \
       only.  An entry with G_i > e^{NEAR_MARGIN + tail} (w_i more than that many τ below t₀)    \
       has y = cG_i ≥ e^{tail} while c ≥ e^{−NEAR_MARGIN} (t no more than NEAR_MARGIN τ below    \
       t₀), so p_i = 1/(1 + y) = 1/y − 1/y² + O(y⁻³) = (1/y − 1/y²)(1 + O(e^{−2·tail})), and     \
       v_i = 1/y − 2/y² likewise: those entries weigh far/c − far2/c² in F (and in its slope,    \
       far/c − 2·far2/c²), far = Σ 1/G_i and far2 = Σ 1/G_i² summed once, to a relative error    \
       below e^{−2·tail} = eps/8.  (The second-order term halves the reach of the near set       \
       against a first-order cut at e^{−tail} = eps/8: rows of 10³–10⁴ entries spanning tens of  \
       τ keep a tenth of them, not all.)  The near entries are copied out (most rows of a small  \
       budget keep few), and the passes run over them alone; if c leaves the region where that   \
       holds, newton() continues on every entry.  At most MAX_PASSES passes in all. */           \
    static int newton_near_##SUFFIX(const T *e, int64_t n, double budget, double *scale,         \
                                    double lo, double hi, double tol_step) {                     \
        int passes = 0;                                                                          \
        T *near = n >= NEAR_ROW ? (T *)malloc((size_t)n * sizeof(T)) : NULL;                     \
        if (near != NULL) {                                                                      \
            const T cut = (T)exp_f64(NEAR_MARGIN + 0.5 * log(8.0 / EPS));                        \
            const int shift = sizeof(T) == sizeof(float) ? 64 : 512;                             \
            const T up = (T)ldexp(1.0, shift), e_big = (T)(1.0 / MIN_NORMAL(T));                \
            /* (an infinity the compiler cannot see: with 1/∞ folded to 0 it would divide every  \
               entry, then select, and make the denormal quotients after all) */                 \
            const T inf = (T)INFINITY + opaque_zero_##SUFFIX;                                    \
            double far = 0.0, far2 = 0.0, count = 0.0;                                           \
            for (int64_t start = 0; start < n; start += BLOCK) {                                 \
                int64_t stop = start + BLOCK < n ? start + BLOCK : n;                            \
                T block = 0, block2 = 0, kept = 0;                                               \
                _Pragma("omp simd reduction(+ : block, block2, kept)")                           \
                for (int64_t i = start; i < stop; ++i) {                                         \
                    T d = e[i] > cut && e[i] < e_big ? e[i] : inf; /* (1/d normal) */             \
                    T r = (T)1 / d;                                                              \
                    block += r;                                                                  \
                    T scaled = r * up; /* (1/G·2^shift: its square is normal, no slow denormal   \
                                          product, and finite over any row) */                   \
                    block2 += scaled * scaled;                                                   \
                    kept += (T)(e[i] <= cut);                                                    \
                }                                                                                \
                far += block;                                                                    \
                far2 += ldexp((double)block2, -2 * shift);                                       \
                count += kept;                                                                   \
            }                                                                                    \
            int status = 4;                                                                      \
            if (count <= NEAR_SHARE * (double)n) { /* (else the copy would not pay) */           \
                int64_t kept = 0, i = 0;                                                         \
                if (ROW_SCANS) /* (kept ≤ i: a vector's store stays within near's n) */          \
                    for (; i + ROW_SCAN_WIDTH_##SUFFIX <= n; i += ROW_SCAN_WIDTH_##SUFFIX)       \
                        kept += keep_below_##SUFFIX(e + i, cut, near + kept);                    \
                for (; i < n; ++i) { /* branch-free: kept entries are scattered */               \
                    near[kept] = e[i];                                                           \
                    kept += e[i] <= cut;                                                         \
                }                                                                                \
                passes = MAX_PASSES;                                                             \
                status = newton_##SUFFIX(near, kept, 1, budget, scale, lo, hi, tol_step,         \
                                         far > 0.0 ? far : 1e-300, far2,                         \
                                         exp_f64(-NEAR_MARGIN), &passes);                        \
            }                                                                                    \
            free(near);                                                                          \
            if (status != 4) return status;                                                      \
        }                                                                                        \
        passes = MAX_PASSES - passes;                                                            \
        return newton_##SUFFIX(e, n, 1, budget, scale, lo, hi, tol_step, 0.0, 0.0, 0.0,          \
                               &passes);                                                         \
    }                                                                                            \
                                                                                                 \
    /* Whether any comparison of a tile mask is true (its words or-ed together). */              \
    static inline int tile_any_##SUFFIX(tile_mask_##SUFFIX m) {                                  \
        uint64_t words[sizeof m / sizeof(uint64_t)], any = 0;                                    \
        memcpy(words, &m, sizeof m);                                                             \
        for (size_t h = 0; h < sizeof m / sizeof(uint64_t); ++h) any |= words[h];                \
        return any != 0;                                                                         \
    }                                                                                            \
                                                                                                 \
    /* w into the descending list top[0..*size) of at most `capacity` entries. */                \
    static inline void top_insert_##SUFFIX(T *top, int64_t *size, int64_t capacity, T w) {       \
        if (*size == capacity && !(w > top[capacity - 1])) return;                               \
        int64_t j = *size < capacity ? (*size)++ : capacity - 1;                                 \
        for (; j > 0 && top[j - 1] < w; --j) top[j] = top[j - 1];                                \
        top[j] = w;                                                                              \
    }                                                                                            \
                                                                                                 \
    /* With AVX-512 (ROW_SCANS): a bar that at least `capacity` (≤ 16) live entries x_i·sc of   \
       the row reach, the capacity-th largest of 16 lanes' maxima (top_lanes; −inf where fewer   \
       lanes hold an entry). */                                                                  \
    static inline T top_bar_##SUFFIX(const T *x, int64_t n, T sc, int64_t capacity) {            \
        T lanes[16], bars[16];                                                                   \
        int64_t filled = 0;                                                                      \
        top_lanes_##SUFFIX(x, n, sc, lanes);                                                     \
        for (int l = 0; l < 16; ++l) top_insert_##SUFFIX(bars, &filled, capacity, lanes[l]);     \
        return bars[capacity - 1];                                                               \
    }                                                                                            \
                                                                                                 \
    /* For budgets with m = ⌊budget⌋ < TOP_LIST: w_(m+1) and w_(m) (the start of                 \
       solve_wide_row, as count_start) from a sorted list of the m + 1 largest live w, built in  \
       one scan.  Once the list is full, a vector of entries none of which can enter it (one     \
       comparison with the list's last entry) is skipped, so that on most rows few entries       \
       reach the (branchy) insertion. */                                                         \
    static double top_start_##SUFFIX(const T *x, int64_t n, T sc, double budget) {               \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T) };                                  \
        const T minus_inf = -(T)INFINITY;                                                        \
        const int64_t m = (int64_t)floor(budget), capacity = m + 1;                              \
        T top[TOP_LIST];                                                                         \
        int64_t size = 0, i = 0;                                                                 \
        if (ROW_SCANS) { /* Entries reaching a bar that m + 1 of them reach, while the list      \
                            fills, then those reaching its last: few are inserted. */            \
            const T bar = top_bar_##SUFFIX(x, n, sc, capacity);                                  \
            for (; i + ROW_SCAN_WIDTH_##SUFFIX <= n; i += ROW_SCAN_WIDTH_##SUFFIX) {             \
                T least = size < capacity ? bar : top[capacity - 1];                             \
                for (unsigned hits = top_hits_##SUFFIX(x + i, sc, least); hits; hits &= hits - 1) \
                    top_insert_##SUFFIX(top, &size, capacity, x[i + __builtin_ctz(hits)] * sc);  \
            }                                                                                    \
        }                                                                                        \
        for (; i < n && size < capacity; ++i) /* (live entries: at least m + 1) */               \
            if (x[i] != minus_inf) top_insert_##SUFFIX(top, &size, capacity, x[i] * sc);         \
        for (; i + WIDTH <= n; i += WIDTH) {                                                     \
            tile_vec_##SUFFIX v;                                                                 \
            memcpy(&v, x + i, sizeof v);                                                         \
            /* (−inf·s is +inf for s < 0: masked entries are excluded first) */                  \
            tile_mask_##SUFFIX hit = (v != minus_inf) & (v * sc > top[capacity - 1]);            \
            if (!tile_any_##SUFFIX(hit)) continue;                                               \
            for (int64_t h = i; h < i + WIDTH; ++h)                                              \
                if (x[h] != minus_inf) top_insert_##SUFFIX(top, &size, capacity, x[h] * sc);     \
        }                                                                                        \
        for (; i < n; ++i)                                                                       \
            if (x[i] != minus_inf) top_insert_##SUFFIX(top, &size, capacity, x[i] * sc);         \
        double fraction = budget - (double)m, below = (double)top[m];                            \
        return fraction == 0.0 ? 0.5 * ((double)top[m - 1] + below)                              \
                               : below - log(fraction / (1.0 - fraction));                       \
    }                                                                                            \
                                                                                                 \
    /* Rows spanning more than SPREAD_LIMIT·τ (small temperatures): most entries saturate,       \
       the log-sum-exp start lands plateaus away from the root, and e^{w − w_max} underflows.    \
       Start instead from order statistics (top_start for small budgets of long rows, else       \
       count_start, or a quickselect for the rows it cannot resolve), store G_i = e^{t₀ − w_i}   \
       (clamped to the exp range: entries beyond it stay saturated) and solve for c = e^{t − t₀} \
       (newton_near) in the bracket [w_min − logit(k/n), w_max − logit(k/n)] of t, clamped to    \
       that range.  t₀ − w_i is (x₀ − x_i)·s/τ about the start's point x₀ in x: exact near it,   \
       so that entries near the root keep their resolution however far they lie from 0 or from   \
       the row's ends (x_i·s/τ − t₀ lost eps·|x|/τ units: Σp missed k by up to 8e−4 in           \
       float64 on a cluster of entries at the root). */                                          \
    static int solve_wide_row_##SUFFIX(const T *x, T *out, int64_t n, int64_t live,              \
                                       double scale, double budget, int flipped, T x_min,        \
                                       T x_max) {                                                \
        const T sc = (T)scale, minus_inf = -(T)INFINITY;                                         \
        const int masked = live < n;                                                             \
        const double w_min = (double)(flipped ? x_max : x_min) * scale;                          \
        const double w_max = (double)(flipped ? x_min : x_max) * scale;                          \
        double t;                                                                                \
        if (budget < TOP_LIST - 1 && (floor(budget) + 1.0) * TOP_SHARE <= (double)n) {          \
            t = top_start_##SUFFIX(x, n, sc, budget);                                            \
        } else if (!count_start_##SUFFIX(x, n, live, masked, sc, budget, (T)w_min, (T)w_max, &t)) { \
            /* The (m+1)-th largest w (and the m-th) by a quickselect of the live entries. */    \
            int64_t m = (int64_t)floor(budget), candidates = 0;                                  \
            double fraction = budget - (double)m;                                                \
            for (int64_t i = 0; i < n; ++i) {                                                    \
                out[candidates] = x[i] * sc;                                                     \
                candidates += x[i] != minus_inf;                                                 \
            }                                                                                    \
            if (!select_##SUFFIX(out, candidates, m)) return 3;                                  \
            T kth = out[m], before = out[0];                                                     \
            for (int64_t i = 1; i < m; ++i) before = out[i] < before ? out[i] : before;          \
            t = fraction == 0.0 ? 0.5 * ((double)before + (double)kth)                           \
                                : (double)kth - log(fraction / (1.0 - fraction));                \
        }                                                                                        \
        T origin = (T)(t / scale); /* x₀, within [x_min, x_max] */                               \
        origin = origin < x_min ? x_min : (origin > x_max ? x_max : origin);                     \
        const double t0 = (double)origin * scale;                                                \
        /* G_i = e^{t₀ − w_i}; +inf for masked entries, which then weigh nothing (p = 0). */     \
        const T low = (T)(LOG_MIN) + opaque_zero_##SUFFIX;                                       \
        const T high = (T)(LOG_MAX) + opaque_zero_##SUFFIX;                                      \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            T g = exp_within_##SUFFIX((origin - x[i]) * sc, low, high);                          \
            out[i] = x[i] == minus_inf ? (T)INFINITY : g;                                        \
        }                                                                                        \
        /* c at the bracket's ends: e^{w − t₀}·(n − k)/k, within exp's range. */                 \
        const double inv_odds = ((double)live - budget) / budget;                                \
        const double c_min = exp_f64(LOG_MIN), c_max = exp_f64(LOG_MAX);                         \
        const double end_a = ((double)x_min - (double)origin) * scale;                           \
        const double end_b = ((double)x_max - (double)origin) * scale;                           \
        double lo = exp_f64(clamp_f64(flipped ? end_b : end_a, LOG_MIN, LOG_MAX)) * inv_odds;    \
        double hi = exp_f64(clamp_f64(flipped ? end_a : end_b, LOG_MIN, LOG_MAX)) * inv_odds;    \
        lo = clamp_f64(lo, c_min, c_max);                                                        \
        hi = clamp_f64(hi, c_min, c_max);                                                        \
        double c = 1.0;                                                                          \
        double tol_step = 64.0 * EPS; /* (t − t₀ resolves EPS, G being exact about x₀; a step    \
                                         error ≲ |δ|³/4 ≤ 16 EPS moves p by ≤ 4 EPS) */          \
        if (newton_near_##SUFFIX(out, n, budget, &c, lo, hi, tol_step)) return 3;                \
        write_##SUFFIX(out, x, masked, n, c, 1, flipped);                                        \
        return 0;                                                                                \
    }                                                                                            \
                                                                                                 \
    static int solve_row_##SUFFIX(const T *x, T *out, int64_t n, double k, double inv_tau);      \
                                                                                                 \
    /* A row with m > 0 entries at +inf (as the torch path): they take k/m each, at most 1;      \
       the finite entries share what is left, max(k − m, 0), solved with the +inf entries        \
       masked in a copy of the row.  Status 1 (the torch path) if no copy can be made. */        \
    static int solve_positive_row_##SUFFIX(const T *x, T *out, int64_t n, double k,              \
                                           double inv_tau, int64_t m) {                          \
        const T plus_inf = (T)INFINITY;                                                          \
        T *copy = (T *)malloc((size_t)n * sizeof(T));                                            \
        if (copy == NULL) return 1;                                                              \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; ++i) copy[i] = x[i] == plus_inf ? -plus_inf : x[i];           \
        double rest = k - (double)m;                                                             \
        int status = solve_row_##SUFFIX(copy, out, n, rest > 0 ? rest : 0.0, inv_tau);           \
        free(copy);                                                                              \
        const T share = (T)(k >= (double)m ? 1.0 : k / (double)m);                               \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; ++i) out[i] = x[i] == plus_inf ? share : out[i];              \
        return status;                                                                           \
    }                                                                                            \
                                                                                                 \
    static int solve_row_##SUFFIX(const T *x, T *out, int64_t n, double k, double inv_tau) {     \
        /* One pass: min, max and a finiteness probe (x·0 is NaN for NaN and ±inf).  Only a      \
           row that fails the probe gets a second pass: the min and max of its live entries,     \
           how many are masked (−inf: never selected, p = 0), and whether any is NaN or +inf     \
           (left to the caller: status 1). */                                                    \
        const T minus_inf = -(T)INFINITY, plus_inf = (T)INFINITY;                                \
        T top = x[0], bottom = x[0], probe = 0;                                                  \
        _Pragma("omp simd reduction(max : top) reduction(min : bottom) reduction(+ : probe)")    \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            top = x[i] > top ? x[i] : top;                                                       \
            bottom = x[i] < bottom ? x[i] : bottom;                                              \
            probe += x[i] * (T)0;                                                                \
        }                                                                                        \
        int64_t masked_count = 0;                                                                \
        if (probe != 0) { /* (vectorised) live min and max; counts of −inf, +inf and NaN */      \
            COUNT minus = 0, plus = 0, nan = 0;                                                  \
            top = minus_inf;                                                                     \
            bottom = plus_inf;                                                                   \
            _Pragma("omp simd reduction(max : top) reduction(min : bottom) reduction(+ : minus, plus, nan)") \
            for (int64_t i = 0; i < n; ++i) {                                                    \
                T v = x[i];                                                                      \
                int finite = v - v == 0;                                                         \
                top = finite && v > top ? v : top;                                               \
                bottom = finite && v < bottom ? v : bottom;                                      \
                minus += (COUNT)(v == minus_inf);                                                \
                plus += (COUNT)(v == plus_inf);                                                  \
                nan += (COUNT)(v != v);                                                          \
            }                                                                                    \
            if (nan) { /* a slice with a NaN is NaN */                                           \
                for (int64_t i = 0; i < n; ++i) out[i] = (T)NAN;                                 \
                return 0;                                                                        \
            }                                                                                    \
            if (plus) return solve_positive_row_##SUFFIX(x, out, n, k, inv_tau, plus);           \
            masked_count = minus;                                                                \
        }                                                                                        \
        const int64_t live = n - masked_count;                                                   \
        const int masked = masked_count > 0;                                                     \
        /* A budget of at least the live count selects every live entry (as the torch path). */  \
        if (k >= (double)live) k = (double)live;                                                 \
        if (k <= 0.0 || k >= (double)live) { /* nothing, or every live entry */                  \
            for (int64_t i = 0; i < n; ++i)                                                      \
                out[i] = (T)(k <= 0.0 || x[i] == minus_inf ? 0.0 : 1.0);                         \
            return 0;                                                                            \
        }                                                                                        \
        double x_max = (double)top, x_min = (double)bottom;                                      \
        /* |x/τ| beyond max/16 (where the torch path caps 1/τ so that no difference              \
           overflows): a float32 row is solved in float64, a float64 row about a pivot. */       \
        if (!(fabs(x_max * inv_tau) <= (LIMIT)) || !(fabs(x_min * inv_tau) <= (LIMIT)))          \
            return WIDEN_##SUFFIX(x, out, n, k, inv_tau);                                        \
        /* Nor can the start, from x·s/τ in T, find the root of a row spanning more than         \
           ROW_SPAN_LIMIT τ (a budget's fraction carried by one entry came out up to 2e−2 off):  \
           a float32 row is solved in float64, a float64 row about a pivot near the root. */     \
        if ((x_max - x_min) * inv_tau > ROW_SPAN_LIMIT_##SUFFIX)                                 \
            return WIDEN_##SUFFIX(x, out, n, k, inv_tau);                                        \
        if (x_max == x_min) { /* exact ties: p = k/n over the live entries */                    \
            for (int64_t i = 0; i < n; ++i)                                                      \
                out[i] = (T)(x[i] == minus_inf ? 0.0 : k / (double)live);                        \
            return 0;                                                                            \
        }                                                                                        \
        /* Work in w = s·x/τ with s = −1 when k > live/2 (the complement, budget ≤ live/2). */   \
        int flipped = k > 0.5 * (double)live;                                                    \
        double scale = flipped ? -inv_tau : inv_tau;                                             \
        double budget = flipped ? (double)live - k : k;                                          \
        double spread = (x_max - x_min) * inv_tau;                                               \
        int small_budget = budget <= SMALL_BUDGET_SHARE * (double)live;                          \
        if (spread > (small_budget ? SMALL_BUDGET_SPREAD_LIMIT : SPREAD_LIMIT)) {                \
            return solve_wide_row_##SUFFIX(x, out, n, live, scale, budget, flipped, bottom,      \
                                           top);                                                 \
        }                                                                                        \
        /* w_i − w_max = (x_i − anchor)·s/τ: the difference first, exact near the anchor, so     \
           that an offset common to the row costs no resolution. */                              \
        const T sc = (T)scale, anchor = flipped ? bottom : top;                                  \
        /* E_i = e^{w_i − w_max} into out (≥ e^−40: normal; 0 for masked entries), and Σ E_i. */ \
        double exp_sum = 0.0;                                                                    \
        const T low = (T)(LOG_MIN) + opaque_zero_##SUFFIX;                                       \
        const T high = (T)(LOG_MAX) + opaque_zero_##SUFFIX;                                      \
        for (int64_t start = 0; start < n; start += BLOCK) {                                     \
            int64_t stop = start + BLOCK < n ? start + BLOCK : n;                                \
            T block = 0;                                                                         \
            if (masked) {                                                                        \
                _Pragma("omp simd reduction(+ : block)")                                         \
                for (int64_t i = start; i < stop; ++i) {                                         \
                    T e = exp_within_##SUFFIX((x[i] - anchor) * sc, low, high);                  \
                    e = x[i] == minus_inf ? (T)0 : e;                                            \
                    out[i] = e;                                                                  \
                    block += e;                                                                  \
                }                                                                                \
            } else {                                                                             \
                _Pragma("omp simd reduction(+ : block)")                                         \
                for (int64_t i = start; i < stop; ++i) {                                         \
                    T e = exp_within_##SUFFIX((x[i] - anchor) * sc, low, high);                  \
                    out[i] = e;                                                                  \
                    block += e;                                                                  \
                }                                                                                \
            }                                                                                    \
            exp_sum += block;                                                                    \
        }                                                                                        \
        /* Solve for the scale c = e^{w_max − t} (t relative to the row's max: c's relative      \
           resolution eps is θ's absolute resolution in units of τ).  F increases with c; the    \
           root lies in [e^{logit(k/n)}, e^{spread + logit(k/n)}], and the log-sum-exp start     \
           c₀ = k/ΣE lies left of it (σ(z) < eᶻ, so F(c₀) < k), exact in the lower tail.  A      \
           step δ in t multiplies c by e^−δ, so no exp or log is needed per pass. */             \
        double odds = budget / ((double)live - budget);                                          \
        double lo = odds, hi = odds * exp_f64(spread);                                           \
        double c = budget / exp_sum;                                                             \
        if (c > lo) lo = c;                                                                      \
        if (c > hi) c = hi;                                                                      \
        int passes = MAX_PASSES;                                                                 \
        if (newton_##SUFFIX(out, n, 0, budget, &c, lo, hi, 4.0 * EPS, 0.0, 0.0, 0.0, &passes))   \
            return 3;                                                                            \
        write_##SUFFIX(out, x, masked, n, c, 0, flipped);                                        \
        return 0;                                                                                \
    }                                                                                            \
                                                                                                 \
    /* grad_x = v⊙(g − c)/τ with c = Σ g·v / Σ v (0 for a saturated row); returns c. */          \
    static double vjp_row_##SUFFIX(const T *g, const T *p, T *out, int64_t n, double inv_tau) {  \
        double sum_v = 0.0, sum_gv = 0.0;                                                        \
        for (int64_t start = 0; start < n; start += BLOCK) {                                     \
            int64_t stop = start + BLOCK < n ? start + BLOCK : n;                                \
            T block_v = 0, block_gv = 0;                                                         \
            _Pragma("omp simd reduction(+ : block_v, block_gv)")                                 \
            for (int64_t i = start; i < stop; ++i) {                                             \
                T v = p[i] * ((T)1 - p[i]);                                                      \
                block_v += v;                                                                    \
                block_gv += g[i] * v;                                                            \
            }                                                                                    \
            sum_v += block_v;                                                                    \
            sum_gv += block_gv;                                                                  \
        }                                                                                        \
        double c = sum_v > 0 ? sum_gv / sum_v : 0.0;                                             \
        const T cs = (T)c, scale = (T)inv_tau;                                                   \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; ++i) out[i] = p[i] * ((T)1 - p[i]) * (g[i] - cs) * scale;     \
        return c;                                                                                \
    }

/* The short-row tiles of soft_topk (compiled for 256-bit vectors: see the top of the file). */
#define DEFINE_TILE_KERNELS(T, COUNT, SUFFIX, EXP, EPS, LIMIT, LOG_MIN, LOG_MAX, EXP_MAX, EXP_CUT) \
    static inline tile_vec_##SUFFIX tile_select_##SUFFIX(tile_mask_##SUFFIX m,                   \
                                                         tile_vec_##SUFFIX a,                    \
                                                         tile_vec_##SUFFIX b) {                  \
        return (tile_vec_##SUFFIX)(((tile_mask_##SUFFIX)a & m) | ((tile_mask_##SUFFIX)b & ~m));  \
    }                                                                                            \
                                                                                                 \
    /* Per lane of a transposed tile s (n ≤ SORT_N entries a lane, room for SORT_N): the         \
       entries in descending order, padded with −inf to 8 or 16 slots (Batcher's network, one    \
       compare-exchange of whole vectors at a time). */                                          \
    static void tile_sort_##SUFFIX(T *s, int64_t n) {                                            \
        enum { PARTS = LANES * sizeof(T) / sizeof(tile_vec_##SUFFIX), WIDTH = LANES / PARTS };   \
        const int64_t slots = n <= 8 ? 8 : 16;                                                   \
        for (int64_t i = n * LANES; i < slots * LANES; ++i) s[i] = (T)-INFINITY;                 \
        for (int h = 0; h < PARTS; ++h) { /* (a vector a slot, in registers) */                  \
            tile_vec_##SUFFIX v[16];                                                             \
            if (PARTS == 1) memcpy(v, s, (size_t)slots * sizeof v[0]); /* (one block: faster) */ \
            else                                                                                 \
                for (int64_t j = 0; j < slots; ++j)                                              \
                    memcpy(&v[j], s + j * LANES + h * WIDTH, sizeof v[j]);                       \
            if (slots == 8) sort_8_##SUFFIX(v);                                                  \
            else sort_16_##SUFFIX(v);                                                            \
            if (PARTS == 1) memcpy(s, v, (size_t)slots * sizeof v[0]);                           \
            else                                                                                 \
                for (int64_t j = 0; j < slots; ++j)                                              \
                    memcpy(s + j * LANES + h * WIDTH, &v[j], sizeof v[j]);                       \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* Rows l < LANES of x (n ≤ SORT_N entries each) sorted by tile_sort into out (the tests'    \
       view of the network: gradkit_sort_tiles). */                                              \
    static void tile_sort_rows_##SUFFIX(const T *x, T *out, int64_t n) {                         \
        T s[SORT_N * LANES];                                                                     \
        for (int64_t i = 0; i < n; ++i)                                                          \
            for (int l = 0; l < LANES; ++l) s[i * LANES + l] = x[l * n + i];                     \
        tile_sort_##SUFFIX(s, n);                                                                \
        for (int64_t i = 0; i < n; ++i)                                                          \
            for (int l = 0; l < LANES; ++l) out[l * n + i] = s[i * LANES + l];                   \
    }                                                                                            \
                                                                                                 \
    /* tile_count_start's start from the order statistics themselves, for tiles of at most       \
       SORT_N entries a lane: w_(m) and w_(m+1) off a sorted copy of z (m = ⌊k⌋, w_(0) = +inf),  \
       then the same start as tile_count_start's between them. */                                \
    static void tile_sorted_start_##SUFFIX(const T *z, int64_t n, const T *budget, T *start) {   \
        enum { PARTS = LANES * sizeof(T) / sizeof(tile_vec_##SUFFIX), WIDTH = LANES / PARTS };   \
        const int64_t slots = n <= 8 ? 8 : 16;                                                   \
        for (int h = 0; h < PARTS; ++h) { /* (sorted and read off in registers) */               \
            tile_vec_##SUFFIX v[16], k, none = (tile_vec_##SUFFIX){0};                           \
            for (int64_t j = 0; j < slots; ++j)                                                  \
                if (j < n) memcpy(&v[j], z + j * LANES + h * WIDTH, sizeof v[j]);                \
                else v[j] = none - (T)INFINITY;                                                  \
            if (slots == 8) sort_8_##SUFFIX(v);                                                  \
            else sort_16_##SUFFIX(v);                                                            \
            memcpy(&k, budget + h * WIDTH, sizeof k);                                            \
            tile_vec_##SUFFIX m = __builtin_convertvector(                                       \
                __builtin_convertvector(k, tile_mask_##SUFFIX), tile_vec_##SUFFIX); /* ⌊k⌋ */     \
            tile_vec_##SUFFIX above = none + (T)INFINITY, below = none; /* (⌊k⌋ < live ≤ n) */    \
            for (int64_t j = 0; j < slots; ++j) {                                                \
                above = tile_select_##SUFFIX(m - 1 == (T)j, v[j], above);                        \
                below = tile_select_##SUFFIX(m == (T)j, v[j], below);                            \
            }                                                                                    \
            tile_vec_##SUFFIX share = k - m, shift = 4 * (share - (T)0.5);                       \
            shift = tile_select_##SUFFIX(shift < -3, none - 3,                                   \
                                         tile_select_##SUFFIX(shift > 3, none + 3, shift));     \
            tile_vec_##SUFFIX at = tile_select_##SUFFIX(share == 0, (T)0.5 * (above + below),    \
                                                         below - shift);                          \
            memcpy(start + h * WIDTH, &at, sizeof at);                                           \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* Per lane of a transposed tile z (n entries a lane): z ← e^{min(z − ref, cap)} in place    \
       (0 below e^LOG_MIN), and the sum of the exponentials. */                                  \
    static void tile_exp_sum_##SUFFIX(T *z, int64_t n, const T *ref, T cap, T *sum) {            \
        enum { PARTS = LANES * sizeof(T) / sizeof(tile_vec_##SUFFIX) };                          \
        tile_vec_##SUFFIX total[PARTS];                                                          \
        memset(total, 0, sizeof total);                                                          \
        const T low = (T)(LOG_MIN) + opaque_zero_##SUFFIX, high = cap + opaque_zero_##SUFFIX;    \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            _Pragma("omp simd")                                                                  \
            for (int l = 0; l < LANES; ++l) {                                                    \
                T v = z[i * LANES + l] - ref[l], w = v > low ? v : low;                          \
                T ev = exp_core_##SUFFIX(w < high ? w : high);                                   \
                z[i * LANES + l] = v < low ? (T)0 : ev;                                          \
            }                                                                                    \
            for (int h = 0; h < PARTS; ++h) {                                                    \
                tile_vec_##SUFFIX v;                                                             \
                memcpy(&v, z + i * LANES + h * (LANES / PARTS), sizeof v);                       \
                total[h] += v;                                                                   \
            }                                                                                    \
        }                                                                                        \
        memcpy(sum, total, sizeof total);                                                        \
    }                                                                                            \
                                                                                                 \
    /* Per lane of a transposed tile xt (n entries a lane): the largest and smallest finite      \
       entries (−inf and +inf for none), and the counts of −inf, +inf and NaN entries. */        \
    static void tile_scan_##SUFFIX(const T *xt, int64_t n, T *top, T *bottom, COUNT *minus,      \
                                   COUNT *plus, COUNT *bad) {                                    \
        enum { PARTS = LANES * sizeof(T) / sizeof(tile_vec_##SUFFIX) };                          \
        const T minus_inf = -(T)INFINITY, plus_inf = (T)INFINITY;                                \
        tile_vec_##SUFFIX high[PARTS], low[PARTS];                                               \
        tile_mask_##SUFFIX down[PARTS], up[PARTS], nan[PARTS];                                   \
        for (int h = 0; h < PARTS; ++h) {                                                        \
            high[h] = (tile_vec_##SUFFIX){0} + minus_inf;                                        \
            low[h] = (tile_vec_##SUFFIX){0} + plus_inf;                                          \
            down[h] = up[h] = nan[h] = (tile_mask_##SUFFIX){0};                                  \
        }                                                                                        \
        for (int64_t i = 0; i < n; ++i)                                                          \
            for (int h = 0; h < PARTS; ++h) {                                                    \
                tile_vec_##SUFFIX v, none = (tile_vec_##SUFFIX){0};                              \
                memcpy(&v, xt + i * LANES + h * (LANES / PARTS), sizeof v);                      \
                tile_mask_##SUFFIX finite = v - v == 0; /* (selects: no masked stores) */        \
                tile_vec_##SUFFIX above = tile_select_##SUFFIX(finite, v, none + minus_inf);     \
                tile_vec_##SUFFIX below = tile_select_##SUFFIX(finite, v, none + plus_inf);      \
                high[h] = tile_select_##SUFFIX(above > high[h], above, high[h]);                 \
                low[h] = tile_select_##SUFFIX(below < low[h], below, low[h]);                    \
                down[h] -= v == minus_inf; /* (a true comparison is −1) */                       \
                up[h] -= v == plus_inf;                                                          \
                nan[h] -= v != v;                                                                \
            }                                                                                    \
        memcpy(top, high, sizeof high);                                                          \
        memcpy(bottom, low, sizeof low);                                                         \
        memcpy(minus, down, sizeof down);                                                        \
        memcpy(plus, up, sizeof up);                                                             \
        memcpy(bad, nan, sizeof nan);                                                            \
    }                                                                                            \
                                                                                                 \
    /* newton()'s bookkeeping after a pass of solve_tile, for every lane at once, in T, on      \
       whole vectors held in registers with selects for its branches (a lane that is done       \
       keeps its state); the bisection's square root is taken only in tiles where some lane     \
       steps outside its bracket.  Returns the number of lanes not done. */                     \
    static T tile_steps_##SUFFIX(T *restrict c, T *restrict lo, T *restrict hi, T *restrict ok, \
                                 T *restrict done, const T *sum_p, const T *sum_v,               \
                                 const T *sum_pv, const T *budget, const T *tol_mass) {          \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T), PARTS = LANES / WIDTH };           \
        tile_vec_##SUFFIX cv[PARTS], lov[PARTS], hiv[PARTS], okv[PARTS], donev[PARTS];          \
        tile_vec_##SUFFIX pv[PARTS], vv[PARTS], pvv[PARTS], kv[PARTS], tolv[PARTS];             \
        tile_mask_##SUFFIX out[PARTS], any = {0};                                                \
        memcpy(cv, c, sizeof cv);                                                                \
        memcpy(lov, lo, sizeof lov);                                                             \
        memcpy(hiv, hi, sizeof hiv);                                                             \
        memcpy(okv, ok, sizeof okv);                                                             \
        memcpy(donev, done, sizeof donev);                                                       \
        memcpy(pv, sum_p, sizeof pv);                                                            \
        memcpy(vv, sum_v, sizeof vv);                                                            \
        memcpy(pvv, sum_pv, sizeof pvv);                                                         \
        memcpy(kv, budget, sizeof kv);                                                           \
        memcpy(tolv, tol_mass, sizeof tolv);                                                     \
        const tile_vec_##SUFFIX zero = cv[0] * 0, one = zero + 1, eps4 = zero + (T)(4.0 * EPS); \
        tile_vec_##SUFFIX pending = zero;                                                        \
        for (int h = 0; h < PARTS; ++h) {                                                        \
            /* the two-tail step y = eᵟ */                                                       \
            tile_vec_##SUFFIX slope = vv[h], upper = pvv[h];                                     \
            tile_vec_##SUFFIX a = tile_select_##SUFFIX(upper < 0, zero,                          \
                                  tile_select_##SUFFIX(upper > slope, slope, upper));            \
            tile_vec_##SUFFIX b = slope - a, g = pv[h] - kv[h] + a - b;                          \
            tile_vec_##SUFFIX root = TILE_VSQRT_##SUFFIX(g * g + 4 * a * b);                     \
            tile_mask_##SUFFIX right = g >= 0;                                                   \
            tile_vec_##SUFFIX y = tile_select_##SUFFIX(right, g + root, 2 * b) /                 \
                                  tile_select_##SUFFIX(right, 2 * a, root - g);                  \
            /* the bracket, the next c and the lane's verdict */                                 \
            tile_vec_##SUFFIX excess = pv[h] - kv[h], now = cv[h];                               \
            tile_vec_##SUFFIX change = tile_select_##SUFFIX(y > 1, y - 1, 1 - y);                \
            tile_vec_##SUFFIX step = now / y;                                                    \
            tile_vec_##SUFFIX size = tile_select_##SUFFIX(excess < 0, -excess, excess);         \
            tile_mask_##SUFFIX active = donev[h] == 0, converged = size <= tolv[h];             \
            tile_mask_##SUFFIX above = excess > 0;                                               \
            tile_vec_##SUFFIX high = tile_select_##SUFFIX(active & above, now, hiv[h]);          \
            tile_vec_##SUFFIX low = tile_select_##SUFFIX(active & ~above, now, lov[h]);          \
            tile_mask_##SUFFIX inside = (step > low) & (step < high); /* (NaN: bisect) */        \
            tile_mask_##SUFFIX collapsed = ~inside & (high - low <= eps4 * high);                \
            tile_mask_##SUFFIX settled =                                                         \
                inside & ((step == now) | (change * change * change <= eps4));                   \
            tile_mask_##SUFFIX move = active & ~converged & ~collapsed;                          \
            tile_mask_##SUFFIX failed = active & ~converged & collapsed; /* (the torch path) */  \
            tile_mask_##SUFFIX finished = ~active | converged | collapsed | settled;             \
            out[h] = move & ~inside;                                                             \
            any |= out[h];                                                                       \
            cv[h] = tile_select_##SUFFIX(move, step, now);                                       \
            okv[h] = tile_select_##SUFFIX(failed, zero, okv[h]);                                 \
            donev[h] = tile_select_##SUFFIX(finished, one, zero);                                \
            pending += tile_select_##SUFFIX(finished, zero, one);                                \
            hiv[h] = high;                                                                       \
            lov[h] = low;                                                                        \
        }                                                                                        \
        if (tile_any_##SUFFIX(any))                                                              \
            for (int h = 0; h < PARTS; ++h)                                                      \
                cv[h] = tile_select_##SUFFIX(out[h], TILE_VSQRT_##SUFFIX(lov[h] * hiv[h]), cv[h]); \
        memcpy(c, cv, sizeof cv);                                                                \
        memcpy(lo, lov, sizeof lov);                                                             \
        memcpy(hi, hiv, sizeof hiv);                                                             \
        memcpy(ok, okv, sizeof okv);                                                             \
        memcpy(done, donev, sizeof donev);                                                       \
        T count = 0;                                                                             \
        for (int l = 0; l < WIDTH; ++l) count += pending[l];                                     \
        return count;                                                                            \
    }                                                                                            \
    /* Per lane of a transposed tile z (n entries a lane), how many entries lie above each of    \
       COUNT_THRESHOLDS cuts (cut[j·LANES + l]), in count[j·LANES + l]. */                       \
    static void tile_count_above_##SUFFIX(const T *z, int64_t n, const T *cut, T *count) {       \
        enum { PARTS = LANES * sizeof(T) / sizeof(tile_vec_##SUFFIX) };                          \
        tile_vec_##SUFFIX at[COUNT_THRESHOLDS][PARTS];                                           \
        tile_mask_##SUFFIX above[COUNT_THRESHOLDS][PARTS];                                       \
        memcpy(at, cut, sizeof at);                                                              \
        memset(above, 0, sizeof above);                                                          \
        for (int64_t i = 0; i < n; ++i)                                                          \
            for (int h = 0; h < PARTS; ++h) {                                                    \
                tile_vec_##SUFFIX v;                                                             \
                memcpy(&v, z + i * LANES + h * (LANES / PARTS), sizeof v);                       \
                for (int j = 0; j < COUNT_THRESHOLDS; ++j) above[j][h] -= v > at[j][h];          \
            }                                                                                    \
        for (int j = 0; j < COUNT_THRESHOLDS; ++j)                                               \
            for (int h = 0; h < PARTS; ++h)                                                      \
                for (int l = 0; l < LANES / PARTS; ++l)                                          \
                    count[j * LANES + h * (LANES / PARTS) + l] = (T)above[j][h][l];              \
    }                                                                                            \
                                                                                                 \
    /* A start for the lanes of a tile whose rows span more than TILE_SOFT·τ (width[l] τ), where \
       most entries saturate and the log-sum-exp start lies far from the root: count_start's     \
       search on all lanes at once.  z holds w − w_top (≤ 0; −inf for masked entries).  Each     \
       round counts the entries above COUNT_THRESHOLDS cuts evenly spaced in a lane's            \
       interval [a, b] (first [−width − 1, 0]) and keeps the cell holding the (m+1)-th largest   \
       entry, m = ⌊k⌋ (count(> a) > m ≥ count(> b)), until every wide lane's cell is             \
       START_WIDTH wide.  With fewer than m entries above b, several lie in the cell: the start  \
       interpolates the count in it.  With m above b, the root lies between the m-th and         \
       (m+1)-th largest entries, the nearest entries above and below b: near their midpoint      \
       for a whole budget, and near the (m+1)-th, logit(k − m) below it, otherwise (the logit    \
       linearised and clamped: a start needs no log).  Returns t − w_top per lane (units of      \
       τ) in start[l]; NaN where MAX_COUNT_PASSES rounds leave several entries in a cell too     \
       wide for a start (count_start gives up there too). */                                     \
    static void tile_count_start_##SUFFIX(const T *z, int64_t n, const T *budget,                \
                                          const T *width, const T *live, T *start) {             \
        T a[LANES], b[LANES], a_count[LANES], b_count[LANES], m[LANES];                          \
        T cut[COUNT_THRESHOLDS * LANES], count[COUNT_THRESHOLDS * LANES], widest = 0;            \
        for (int l = 0; l < LANES; ++l) {                                                        \
            a[l] = -width[l] - 1;                                                                \
            b[l] = 0;                                                                            \
            a_count[l] = live[l];                                                                \
            b_count[l] = 0;                                                                      \
            m[l] = (T)floor((double)budget[l]);                                                  \
            widest = width[l] > widest ? width[l] : widest;                                      \
        }                                                                                        \
        for (int round = 0; round < MAX_COUNT_PASSES && widest > START_WIDTH; ++round) {         \
            widest /= COUNT_THRESHOLDS + 1;                                                      \
            for (int j = 0; j < COUNT_THRESHOLDS; ++j)                                           \
                for (int l = 0; l < LANES; ++l)                                                  \
                    cut[j * LANES + l] =                                                         \
                        a[l] + (b[l] - a[l]) * (T)(j + 1) / (COUNT_THRESHOLDS + 1);              \
            tile_count_above_##SUFFIX(z, n, cut, count);                                         \
            _Pragma("omp simd")                                                                  \
            for (int l = 0; l < LANES; ++l) { /* the highest cut with more than m above */       \
                /* (one expression per select: split into statements, GCC compiled this          \
                   loop into code that made whole tiles of 16 entries 1.3× slower) */            \
                T low = a[l], low_count = a_count[l], high = cut[l], high_count = count[l];      \
                for (int j = 0; j < COUNT_THRESHOLDS; ++j) {                                     \
                    int more = count[j * LANES + l] > m[l], last = j + 1 == COUNT_THRESHOLDS;    \
                    low = more ? cut[j * LANES + l] : low;                                       \
                    low_count = more ? count[j * LANES + l] : low_count;                         \
                    high = more ? (last ? b[l] : cut[(j + 1) * LANES + l]) : high;               \
                    high_count =                                                                 \
                        more ? (last ? b_count[l] : count[(j + 1) * LANES + l]) : high_count;    \
                }                                                                                \
                a[l] = low;                                                                      \
                a_count[l] = low_count;                                                          \
                b[l] = high;                                                                     \
                b_count[l] = high_count;                                                         \
            }                                                                                    \
        }                                                                                        \
        enum { PARTS = LANES * sizeof(T) / sizeof(tile_vec_##SUFFIX) };                          \
        tile_vec_##SUFFIX upper[PARTS], lower[PARTS], cell[PARTS];                               \
        memcpy(cell, b, sizeof cell);                                                            \
        for (int h = 0; h < PARTS; ++h) {                                                        \
            upper[h] = cell[h] * 0 + (T)INFINITY;                                                \
            lower[h] = cell[h] * 0 - (T)INFINITY;                                                \
        }                                                                                        \
        for (int64_t i = 0; i < n; ++i) /* the nearest entries above and below b */              \
            for (int h = 0; h < PARTS; ++h) {                                                    \
                tile_vec_##SUFFIX v;                                                             \
                memcpy(&v, z + i * LANES + h * (LANES / PARTS), sizeof v);                       \
                tile_mask_##SUFFIX over = v > cell[h];                                           \
                upper[h] = tile_select_##SUFFIX(over & (v < upper[h]), v, upper[h]);             \
                lower[h] = tile_select_##SUFFIX(~over & (v > lower[h]), v, lower[h]);            \
            }                                                                                    \
        T above[LANES], below[LANES];                                                            \
        memcpy(above, upper, sizeof above);                                                      \
        memcpy(below, lower, sizeof below);                                                      \
        _Pragma("omp simd")                                                                      \
        for (int l = 0; l < LANES; ++l) {                                                        \
            T share = budget[l] - m[l], shift = 4 * (share - (T)0.5);                            \
            shift = shift < -3 ? -3 : (shift > 3 ? 3 : shift);                                   \
            T around = share == 0 ? (T)0.5 * (above[l] + below[l]) : below[l] - shift;           \
            T spread = a_count[l] > b_count[l] ? a_count[l] - b_count[l] : 1;                    \
            T inside = a[l] + (b[l] - a[l]) * ((a_count[l] - budget[l]) / spread);               \
            int unresolved = (b_count[l] < m[l]) & (b[l] - a[l] > 4 * START_WIDTH);              \
            start[l] = unresolved ? (T)NAN : (b_count[l] < m[l] ? inside : around);              \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* Per lane of a transposed tile xt (n entries a lane): z = (x − centre)·sc, the difference  \
       first (exact near the centre, so that no offset of the row costs resolution); −inf for    \
       masked entries and on the lanes not ok. */                                                \
    /* ln x within 1e−3, for a start (x positive and normal): the binary exponent plus a cubic  \
       in the mantissa m − 1 ∈ [0, 1) (a least-squares fit of ln(1 + f)); no library call, so   \
       that a loop over lanes vectorises.  The exponent is read off as a float by the 2^mant    \
       trick (AVX2 has no int64 → double conversion). */                                         \
    static inline T log_rough_##SUFFIX(T x) {                                                    \
        enum { MANT = sizeof(T) == 4 ? 23 : 52, BIAS = sizeof(T) == 4 ? 127 : 1023 };            \
        const COUNT one = 1, mask = (one << MANT) - 1, bias = (COUNT)BIAS << MANT;              \
        COUNT bits, high, low;                                                                   \
        memcpy(&bits, &x, sizeof bits);                                                          \
        const T two_mant = (T)ldexp(1.0, MANT);                                                  \
        COUNT magic;                                                                             \
        memcpy(&magic, &two_mant, sizeof magic);                                                 \
        high = (bits >> MANT) | magic; /* (x > 0: no sign bit) */                                \
        low = (bits & mask) | bias;                                                              \
        T exponent, m;                                                                           \
        memcpy(&exponent, &high, sizeof exponent);                                               \
        memcpy(&m, &low, sizeof m);                                                              \
        T f = m - 1;                                                                             \
        T fraction = f * ((T)0.98668483 + f * ((T)-0.40738601 + f * (T)0.11475665));             \
        return (exponent - two_mant - (T)BIAS) * (T)0.69314718055994531 + fraction;              \
    }                                                                                            \
                                                                                                 \
    /* Per lane, the start c = e^{−t} at the root of a Gaussian row z ~ N(μ, s²) (μ and s² the  \
       moments of its live entries): E σ(z − t) ≈ σ((μ − t)/√(1 + πs²/8)) = k/live gives        \
       t = μ − √(1 + πs²/8)·logit(k/live).  Near the root for rows of a few τ, where the         \
       log-sum-exp start lies several passes away. */                                            \
    static void tile_moment_start_##SUFFIX(const T *sum, const T *sum_sq, const T *budget,       \
                                           const T *live, T *start) {                            \
        _Pragma("omp simd")                                                                      \
        for (int l = 0; l < LANES; ++l) {                                                        \
            T mean = sum[l] / live[l], var = sum_sq[l] / live[l] - mean * mean;                  \
            T spread2 = (T)1 + (T)0.39269908169872414 * (var > 0 ? var : 0);                     \
            T stretch = sizeof(T) == 4 ? (T)sqrtf((float)spread2) : (T)sqrt((double)spread2);   \
            T odds = budget[l] / (live[l] - budget[l]);                                          \
            start[l] = EXP(stretch * log_rough_##SUFFIX(odds) - mean);                           \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    static ALWAYS_INLINE void tile_differences_##SUFFIX(const T *xt, int64_t n, const T *centre, \
                                                        const T *sc, const T *ok, T *z, T *sum,  \
                                                        T *sum_sq) {                             \
        enum { PARTS = LANES * sizeof(T) / sizeof(tile_vec_##SUFFIX), WIDTH = LANES / PARTS };   \
        tile_vec_##SUFFIX mid[PARTS], scale[PARTS], first[PARTS], second[PARTS];                 \
        tile_mask_##SUFFIX on[PARTS];                                                            \
        memcpy(mid, centre, sizeof mid);                                                         \
        memcpy(scale, sc, sizeof scale);                                                         \
        memcpy(first, ok, sizeof first);                                                         \
        for (int h = 0; h < PARTS; ++h) {                                                        \
            on[h] = first[h] != 0;                                                               \
            first[h] = second[h] = mid[h] * 0;                                                   \
        }                                                                                        \
        const tile_vec_##SUFFIX minus_inf = mid[0] * 0 - (T)INFINITY;                            \
        for (int64_t i = 0; i < n; ++i)                                                          \
            for (int h = 0; h < PARTS; ++h) {                                                    \
                tile_vec_##SUFFIX v, d;                                                          \
                memcpy(&v, xt + i * LANES + h * WIDTH, sizeof v);                                \
                tile_mask_##SUFFIX kept = on[h] & (v - v == 0); /* (finite v) */                 \
                d = (v - mid[h]) * scale[h];                                                     \
                d = (tile_vec_##SUFFIX)((tile_mask_##SUFFIX)d & kept);                           \
                first[h] += d;                                                                   \
                second[h] += d * d;                                                              \
                d = tile_select_##SUFFIX(kept, d, minus_inf);                                    \
                memcpy(z + i * LANES + h * WIDTH, &d, sizeof d);                                 \
            }                                                                                    \
        if (sum) {                                                                               \
            memcpy(sum, first, sizeof first);                                                    \
            memcpy(sum_sq, second, sizeof second);                                               \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* solve_tile's output, WIDTH entries of WIDTH rows at a time while whole blocks remain: p   \
       (its complement 1/(1 + ce) on flipped lanes) by lanes, back to rows in registers; with   \
       `infinite` (a constant: the tile holds ±inf entries), 0 at −inf and 1 at +inf.  Returns   \
       the first entry not written. */                                                           \
    static ALWAYS_INLINE int64_t tile_write_##SUFFIX(const T *e, const T *xt, const T *c,         \
                                                     const T *flipped, T *out, int64_t n,        \
                                                     int infinite) {                             \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T), PARTS_W = LANES / WIDTH };         \
        tile_vec_##SUFFIX scale_w[PARTS_W], flip_w[PARTS_W];                                     \
        memcpy(scale_w, c, sizeof scale_w);                                                      \
        memcpy(flip_w, flipped, sizeof flip_w);                                                  \
        const tile_vec_##SUFFIX one = scale_w[0] * 0 + 1, zero = scale_w[0] * 0;                 \
        const tile_vec_##SUFFIX big = zero + (T)EXP_MAX, plus_inf = zero + (T)INFINITY;          \
        int64_t start = 0;                                                                       \
        for (; start + WIDTH <= n; start += WIDTH)                                               \
            for (int h = 0; h < PARTS_W; ++h) {                                                  \
                tile_vec_##SUFFIX v[WIDTH];                                                      \
                for (int j = 0; j < WIDTH; ++j) {                                                \
                    tile_vec_##SUFFIX y;                                                         \
                    memcpy(&y, e + (start + j) * LANES + h * WIDTH, sizeof y);                   \
                    y *= scale_w[h];                                                             \
                    tile_vec_##SUFFIX r = 1 / (1 + y);                                           \
                    tile_vec_##SUFFIX other = tile_select_##SUFFIX(y < big, y * r, one);         \
                    v[j] = tile_select_##SUFFIX(flip_w[h] != 0, r, other);                       \
                    if (infinite) {                                                              \
                        tile_vec_##SUFFIX score;                                                 \
                        memcpy(&score, xt + (start + j) * LANES + h * WIDTH, sizeof score);      \
                        v[j] = tile_select_##SUFFIX(score == plus_inf, one, v[j]);               \
                        v[j] = tile_select_##SUFFIX(score == -plus_inf, zero, v[j]);             \
                    }                                                                            \
                }                                                                                \
                transpose_##SUFFIX(v);                                                           \
                for (int j = 0; j < WIDTH; ++j)                                                  \
                    memcpy(out + (h * WIDTH + j) * n + start, &v[j], sizeof v[j]);               \
            }                                                                                    \
        return start;                                                                            \
    }                                                                                            \
                                                                                                 \
    /* Short rows (n ≤ SHORT_ROW), LANES at a time, one row per vector lane: the same solve as   \
       solve_row's direct (log-sum-exp) form, on a transposed tile, so that the lanes' Newton    \
       arithmetic (a sqrt and divides per pass) overlaps instead of forming one latency chain    \
       per row; the per-lane bookkeeping is branch-free too (0/1 masks held as doubles), so      \
       that it vectorises and no lane's branch is mispredicted.  Each lane stores                \
       e = exp(w − w_top − r) once, about a reference r, and solves for the scale                \
       c = e^{r − t} (p = ce/(1 + ce)).  Lanes take r = 0 and start from the log-sum-exp bound   \
       scaled by live/(live − k): p = cE/(1 + cE) is concave in E, so by Jensen F(c₀) is at      \
       most live times the p of the mean E, which is k: c₀ stays left of the root, and is        \
       exact for equal entries; in tiles with lanes of a few τ (TILE_MOMENT_WIDTH), those        \
       lanes move it up to their moment start (tile_moment_start) where that lies above it.     \
       In a tile where some row spans more than SPREAD_LIMIT·τ (as     \
       solve_row's log-sum-exp start; in tiles of more than SORT_N entries, a row whose budget   \
       lies within TILE_SMALL_SHARE of the live count from 0 or from it only beyond              \
       SMALL_BUDGET_SPREAD_LIMIT·τ), the lanes wider than TILE_SOFT·τ take r from their order    \
       statistics instead (tiles of at most SORT_N entries: tile_sorted_start; others:           \
       tile_count_start, whose cost the whole tile pays: about two passes) and c₀ = 1; c stays   \
       within e^{±reach} and their exponents below cap, which keeps ce finite; entries further   \
       than that from the start are saturated.  m > 0 entries at +inf take 1 each and the        \
       finite ones share k − m (as solve_positive_row).  Rows the direct form does not cover     \
       (NaN entries, k ≤ m, k − m ≤ 0 or ≥ the live count, exact ties, |x/τ| too large) or that  \
       do not converge here (a root beyond the reach of c) are solved by solve_row itself, so    \
       the results keep its contract.  Budgets k[0..LANES).  Returns the passes taken. */        \
    static int solve_tile_##SUFFIX(const T *x, T *out, int32_t *status, int64_t n,               \
                                   const double *k, double inv_tau) {                            \
        T xt[SHORT_ROW * LANES], e[SHORT_ROW * LANES];                                           \
        const T minus_inf = -(T)INFINITY, plus_inf = (T)INFINITY;                                \
        tile_gather_##SUFFIX(x, n, xt);                                                          \
        T top[LANES], bottom[LANES];                                                             \
        COUNT minus[LANES], plus[LANES], bad[LANES];                                             \
        tile_scan_##SUFFIX(xt, n, top, bottom, minus, plus, bad);                                \
        T ok[LANES], flipped[LANES], done[LANES], budget[LANES], live[LANES], c[LANES];          \
        T lo[LANES], hi[LANES], tol_mass[LANES], width[LANES], ref[LANES];                       \
        T sc[LANES], anchor[LANES], exp_sum[LANES], offset[LANES], from_count[LANES];            \
        /* (in T, so that the lanes' setup is one vector's work in float32: 4× cheaper than in \
           double; counts and budgets are small, the limits far from T's range) */              \
        const T inv = (T)inv_tau, inv_limit = (T)(LIMIT);                                        \
        T budget_in[LANES];                                                                      \
        for (int l = 0; l < LANES; ++l) budget_in[l] = (T)k[l];                                  \
        _Pragma("omp simd")                                                                      \
        for (int l = 0; l < LANES; ++l) {                                                        \
            /* (+inf entries take 1 each: the finite ones share k − their count) */              \
            T count = (T)n - (T)minus[l] - (T)plus[l];                                           \
            T kk = budget_in[l] - (T)plus[l];                                                    \
            T x_max = top[l], x_min = bottom[l];                                                 \
            T spread = (x_max - x_min) * inv; /* (overflow: inf, not good) */                    \
            int flip = kk > (T)0.5 * count;                                                      \
            T high = x_max * inv, low = x_min * inv;                                             \
            int good = (bad[l] == 0) & (kk > 0) & (kk < count) & (x_max != x_min) &              \
                       (high <= inv_limit) & (high >= -inv_limit) & (low <= inv_limit) &         \
                       (low >= -inv_limit) & (spread <= (T)ROW_SPAN_LIMIT_##SUFFIX);             \
            T b = good ? (flip ? count - kk : kk) : 1; /* (else solve_row decides) */            \
            count = good ? count : 2;                                                            \
            ok[l] = good ? 1 : 0;                                                                \
            done[l] = good ? 0 : 1;                                                              \
            flipped[l] = flip ? 1 : 0;                                                           \
            budget[l] = b;                                                                       \
            live[l] = count;                                                                     \
            sc[l] = good ? (flip ? -inv : inv) : (T)0;                                           \
            anchor[l] = good ? (flip ? bottom[l] : top[l]) : (T)0; /* (w_top = s·anchor/τ) */    \
            tol_mass[l] = (T)(8.0 * EPS) * (b > 1 ? b : 1);                                      \
            width[l] = good ? spread : 0;                                                        \
            ref[l] = offset[l] = from_count[l] = 0;                                              \
        }                                                                                        \
        T wide = 0, spanned = 0;                                                                 \
        /* (where the start comes from counting rounds, small budgets keep the log-sum-exp     \
           start to SMALL_BUDGET_SPREAD_LIMIT·τ, as solve_row's) */                              \
        const int sorts = n <= SORT_N;                                                           \
        for (int l = 0; l < LANES; ++l) {                                                        \
            int small = !sorts && budget[l] <= (T)TILE_SMALL_SHARE * live[l] &&                  \
                        width[l] <= (T)SMALL_BUDGET_SPREAD_LIMIT;                                \
            wide += ok[l] != 0 && width[l] > (T)SPREAD_LIMIT && !small ? 1 : 0;                  \
        }                                                                                        \
        for (int l = 0; l < LANES; ++l) { /* (the lanes that keep the log-sum-exp start, far    \
                                             from the root: wide, or a budget off the tails) */  \
            int kept = ok[l] != 0 && !(wide > 0 && width[l] > (T)TILE_SOFT);                     \
            int off = budget[l] >= (T)TILE_MOMENT_SHARE * live[l] || width[l] > (T)TILE_SOFT;    \
            spanned += kept && width[l] > (T)TILE_MOMENT_WIDTH && off ? 1 : 0;                   \
        }                                                                                        \
        T z_sum[LANES], z_sum_sq[LANES]; /* (of the lanes' finite z: their moments) */           \
        if (spanned > 0) /* z = w − w_top */                                                     \
            tile_differences_##SUFFIX(xt, n, anchor, sc, ok, e, z_sum, z_sum_sq);                \
        else                                                                                     \
            tile_differences_##SUFFIX(xt, n, anchor, sc, ok, e, NULL, NULL);                     \
        if (wide > 0) {                                                                          \
            T counted[LANES], span[LANES];                                                       \
            for (int l = 0; l < LANES; ++l)                                                      \
                span[l] = ok[l] != 0 && width[l] > (T)TILE_SOFT ? width[l] : 0;                  \
            if (sorts) /* (cheaper than counting rounds) */                                     \
                tile_sorted_start_##SUFFIX(e, n, budget, counted);                               \
            else                                                                                 \
                tile_count_start_##SUFFIX(e, n, budget, span, live, counted);                    \
            for (int l = 0; l < LANES; ++l) {                                                    \
                int lost = counted[l] != counted[l]; /* (no start: solve_row takes the row) */   \
                ok[l] = lost ? 0 : ok[l];                                                        \
                done[l] = lost ? 1 : done[l];                                                    \
                ref[l] = span[l] > 0 && !lost ? counted[l] : 0;                                  \
                from_count[l] = span[l] > 0 && !lost ? 1 : 0;                                    \
            }                                                                                    \
            /* z again, about x₀ = anchor + r·τ/s (the start, in x): exact near the root, as     \
               solve_wide_row's G; e = exp(z − offset), offset the rounding of x₀ in units. */   \
            T centre[LANES];                                                                     \
            for (int l = 0; l < LANES; ++l) {                                                    \
                double shift = ref[l] != 0 ? (double)ref[l] / (double)sc[l] : 0.0;               \
                T x0 = (T)((double)anchor[l] + shift);                                           \
                x0 = x0 < bottom[l] ? bottom[l] : (x0 > top[l] ? top[l] : x0);                   \
                centre[l] = ref[l] != 0 ? x0 : anchor[l];                                        \
                offset[l] = ref[l] - (T)(((double)centre[l] - (double)anchor[l]) * (double)sc[l]); \
            }                                                                                    \
            tile_differences_##SUFFIX(xt, n, centre, sc, ok, e, NULL, NULL);                     \
        }                                                                                        \
        const double reach = (EXP_CUT) / 3.0; /* (ce ≤ e^{cap + reach}: finite) */               \
        const T cap = (T)((LOG_MAX) - reach - 8.0);                                              \
        tile_exp_sum_##SUFFIX(e, n, offset, cap, exp_sum);                                       \
        T pending = 0, moment[LANES];                                                            \
        const T reach_lo = EXP((T)-reach), reach_hi = EXP((T)reach);                             \
        if (spanned > 0)                                                                         \
            tile_moment_start_##SUFFIX(z_sum, z_sum_sq, budget, live, moment);                   \
        else                                                                                     \
            for (int l = 0; l < LANES; ++l) moment[l] = 0;                                       \
        _Pragma("omp simd reduction(+ : pending)")                                               \
        for (int l = 0; l < LANES; ++l) {                                                        \
            /* the bracket [odds, odds·e^spread] of e^{−t}, times e^r, within c's reach */       \
            T odds = budget[l] / (live[l] - budget[l]), r = ref[l];                              \
            T low = odds * EXP(r), high = odds * EXP(width[l] + r);                              \
            low = low > reach_lo ? low : reach_lo;                                               \
            high = high < reach_hi ? high : reach_hi;                                            \
            T bound = budget[l] / exp_sum[l]; /* F(bound) < k (σ(z) < eᶻ) */                     \
            T start = bound * (live[l] / (live[l] - budget[l])); /* F(start) ≤ k (Jensen) */     \
            int jensen = from_count[l] == 0;                                                     \
            low = jensen & (bound > low) ? bound : low;                                          \
            start = moment[l] > start ? moment[l] : start; /* (the root lies above Jensen's) */  \
            start = jensen ? start : 1;                                                          \
            start = start < high ? (start > low ? start : low) : high;                           \
            lo[l] = low;                                                                         \
            hi[l] = high;                                                                        \
            c[l] = ok[l] != 0 ? start : 1;                                                       \
            pending += 1 - done[l];                                                              \
        }                                                                                        \
        const T tiny = (T)ldexp(1.0, -EXP_CUT); /* (ce ≤ e^{cap + reach}: no overflow) */        \
        int pass = 0;                                                                            \
        for (; pending > 0; ++pass) {                                                            \
            if (pass == MAX_PASSES) { /* solve_row decides what these rows get */                \
                for (int l = 0; l < LANES; ++l) ok[l] = done[l] != 0 ? ok[l] : 0;                \
                break;                                                                           \
            }                                                                                    \
            T sum_p[LANES], sum_v[LANES], sum_pv[LANES];                                         \
            enum { PARTS = LANES * sizeof(T) / sizeof(tile_vec_##SUFFIX) };                      \
            tile_vec_##SUFFIX scale[PARTS], acc_p[PARTS], acc_v[PARTS], acc_pv[PARTS];           \
            memcpy(scale, c, sizeof scale);                                                      \
            for (int h = 0; h < PARTS; ++h) acc_p[h] = acc_v[h] = acc_pv[h] = scale[h] * 0;      \
            for (int64_t i = 0; i < n; ++i) { /* (sums in registers, one row per lane) */        \
                for (int h = 0; h < PARTS; ++h) {                                                \
                    tile_vec_##SUFFIX y;                                                         \
                    memcpy(&y, e + i * LANES + h * (LANES / PARTS), sizeof y);                   \
                    y *= scale[h];                                                               \
                    /* (no subnormals) */                                                        \
                    y = (tile_vec_##SUFFIX)((tile_mask_##SUFFIX)y & (y > tiny));                 \
                    tile_vec_##SUFFIX r = (T)1 / ((T)1 + y), p = y * r, v = p * r;               \
                    acc_p[h] += p;                                                               \
                    acc_v[h] += v;                                                               \
                    acc_pv[h] += p * v;                                                          \
                }                                                                                \
            }                                                                                    \
            memcpy(sum_p, acc_p, sizeof acc_p);                                                  \
            memcpy(sum_v, acc_v, sizeof acc_v);                                                  \
            memcpy(sum_pv, acc_pv, sizeof acc_pv);                                               \
            pending = tile_steps_##SUFFIX(c, lo, hi, ok, done, sum_p, sum_v, sum_pv, budget,      \
                                          tol_mass);                                             \
        }                                                                                        \
        const T big = (T)EXP_MAX;                                                                \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T) };                                  \
        int64_t start = 0, infinite = 0;                                                         \
        for (int l = 0; l < LANES; ++l) infinite += (int64_t)minus[l] + (int64_t)plus[l];       \
        if (infinite > 0) /* (WIDTH entries of WIDTH rows at a time) */                          \
            start = tile_write_##SUFFIX(e, xt, c, flipped, out, n, 1);                           \
        else                                                                                     \
            start = tile_write_##SUFFIX(e, xt, c, flipped, out, n, 0);                           \
        for (int64_t i = start; i < n; ++i) {                                                    \
            _Pragma("omp simd")                                                                  \
            for (int l = 0; l < LANES; ++l) {                                                    \
                T y = c[l] * e[i * LANES + l];                                                   \
                T r = (T)1 / ((T)1 + y);                                                         \
                T other = y < big ? y * r : (T)1;                                                \
                T value = flipped[l] != 0 ? r : other;                                           \
                T v = xt[i * LANES + l];                                                         \
                out[l * n + i] = v == minus_inf ? (T)0 : (v == plus_inf ? (T)1 : value);         \
            }                                                                                    \
        }                                                                                        \
        for (int l = 0; l < LANES; ++l) /* (solve_row overwrites the rows not solved here) */    \
            status[l] = ok[l] != 0 ? 0 : solve_row_##SUFFIX(x + l * n, out + l * n, n, k[l], inv_tau); \
        return pass;                                                                             \
    }                                                                                            \
                                                                                                 \
    /* Per row l < LANES of p and g (each n long): Σ w_i and Σ w_i·g_i in sum_w[l] and           \
       sum_gw[l], with w = p(1 − p) (soft_topk's v; free = 0) or w = [0 < p < 1] (sparse_topk's  \
       free set; free = 1): each row's sums in vector registers, a vector's worth of entries at  \
       a time (the rest one by one), then the LANES rows' vectors summed together in one tree    \
       of shuffles (row_sums), so that no row pays a reduction on its own. */                    \
    static inline void tile_weighted_sums_##SUFFIX(const T *g, const T *p, int64_t n, int free,  \
                                                   T *sum_w, T *sum_gw) {                        \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T) };                                  \
        const tile_vec_##SUFFIX one = (tile_vec_##SUFFIX){0} + (T)1;                             \
        tile_vec_##SUFFIX chunk_w[LANES], chunk_gw[LANES];                                       \
        T rest_w[LANES], rest_gw[LANES];                                                         \
        for (int l = 0; l < LANES; ++l) {                                                        \
            const T *gl = g + l * n, *pl = p + l * n;                                            \
            chunk_w[l] = chunk_gw[l] = (tile_vec_##SUFFIX){0};                                   \
            rest_w[l] = rest_gw[l] = 0;                                                          \
            int64_t i = 0;                                                                       \
            for (; i + WIDTH <= n; i += WIDTH) {                                                 \
                tile_vec_##SUFFIX q, grad, w;                                                    \
                memcpy(&q, pl + i, sizeof q);                                                    \
                memcpy(&grad, gl + i, sizeof grad);                                              \
                if (free)                                                                        \
                    w = (tile_vec_##SUFFIX)((tile_mask_##SUFFIX)one & (q > 0) & (q < 1));        \
                else                                                                             \
                    w = q * ((T)1 - q);                                                          \
                chunk_w[l] += w;                                                                 \
                chunk_gw[l] += grad * w;                                                         \
            }                                                                                    \
            for (; i < n; ++i) {                                                                 \
                T w = free ? (T)(pl[i] > (T)0) * (T)(pl[i] < (T)1) : pl[i] * ((T)1 - pl[i]);     \
                rest_w[l] += w;                                                                  \
                rest_gw[l] += gl[i] * w;                                                         \
            }                                                                                    \
        }                                                                                        \
        row_sums_##SUFFIX(chunk_w, sum_w);                                                       \
        row_sums_##SUFFIX(chunk_gw, sum_gw);                                                     \
        for (int l = 0; l < LANES; ++l) {                                                        \
            sum_w[l] += rest_w[l];                                                               \
            sum_gw[l] += rest_gw[l];                                                             \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* vjp_row for LANES short rows at once (rows r = 0..LANES−1 of p, g and out, each n long),  \
       their sums by tile_weighted_sums.  Writes c per row to cs[0..LANES). */                   \
    static ALWAYS_INLINE void vjp_tile_##SUFFIX(const T *g, const T *p, T *out, T *cs, int64_t n, \
                                                double inv_tau) {                                \
        T sum_v[LANES], sum_gv[LANES], c[LANES];                                                 \
        tile_weighted_sums_##SUFFIX(g, p, n, 0, sum_v, sum_gv);                                  \
        for (int l = 0; l < LANES; ++l) {                                                        \
            c[l] = sum_v[l] > 0 ? sum_gv[l] / sum_v[l] : (T)0;                                   \
            cs[l] = c[l];                                                                        \
        }                                                                                        \
        const T scale = (T)inv_tau;                                                              \
        for (int l = 0; l < LANES; ++l) {                                                        \
            const T *gl = g + l * n, *pl = p + l * n;                                            \
            T *ol = out + l * n;                                                                 \
            const T cl = c[l];                                                                   \
            _Pragma("omp simd")                                                                  \
            for (int64_t i = 0; i < n; ++i) ol[i] = pl[i] * ((T)1 - pl[i]) * (gl[i] - cl) * scale; \
        }                                                                                        \
    }                                                                                            \
    /* vjp_tile with n a constant at the widths 8 and 16 (see ALWAYS_INLINE). */                  \
    static void vjp_tiles_##SUFFIX(const T *g, const T *p, T *out, T *cs, int64_t n,             \
                                   double inv_tau) {                                             \
        if (n == 8) vjp_tile_##SUFFIX(g, p, out, cs, 8, inv_tau);                                \
        else if (n == 16) vjp_tile_##SUFFIX(g, p, out, cs, 16, inv_tau);                         \
        else vjp_tile_##SUFFIX(g, p, out, cs, n, inv_tau);                                       \
    }

/* (type, its same-width integer type, suffix, exp, eps, |x/τ| limit, exp's clamp range in log and
   linear terms, the binary exponent beyond which evaluate() cuts y = e^{±(w − t)}) */
#define KERNEL_TYPE_F32                                                                          \
    float, int32_t, f32, exp_f32, 1.1920928955078125e-07, 3.4028234663852886e38 / 16, -87.0,     \
        88.0, 1.6516362549940018e38, 60
#define KERNEL_TYPE_F64                                                                          \
    double, int64_t, f64, exp_f64, 2.220446049250313e-16, 1.7976931348623157e308 / 16, -708.0,   \
        709.0, 8.218407461554972e307, 500
#define APPLY(MACRO, ...) MACRO(__VA_ARGS__) /* (the arguments expanded first) */
APPLY(DEFINE_ROW_KERNELS, KERNEL_TYPE_F32)
APPLY(DEFINE_ROW_KERNELS, KERNEL_TYPE_F64)
TILE_CODE_BEGIN
APPLY(DEFINE_TILE_KERNELS, KERNEL_TYPE_F32)
APPLY(DEFINE_TILE_KERNELS, KERNEL_TYPE_F64)
TILE_CODE_END

static int solve_row_widened(const float *x, float *out, int64_t n, double k, double inv_tau) {
    double *wide = (double *)malloc(2 * (size_t)n * sizeof(double));
    if (wide == NULL) return 1;
    for (int64_t i = 0; i < n; ++i) wide[i] = (double)x[i];
    int status = solve_row_f64(wide, wide + n, n, k, inv_tau);
    for (int64_t i = 0; i < n; ++i) out[i] = (float)wide[n + i];
    free(wide);
    return status;
}

/* A float64 row (finite and −inf entries, 0 < k < live) spanning more than ROW_SPAN_LIMIT τ,
   or with |x/τ| beyond max/16: solved as x − c, c its ⌈k⌉-th largest live entry, which the
   root lies within a few τ of (or within a gap it does not depend on), clamped to ±FAR_REACH τ
   (p there is 0 or 1 to double precision either way).  Status 1 (the caller) if 1/τ is not
   finite, or no copy can be made. */
static int solve_row_far(const double *x, double *out, int64_t n, double k, double inv_tau) {
    if (!(inv_tau < DBL_MAX)) return 1;
    double *shifted = (double *)malloc(2 * (size_t)n * sizeof(double)), *live = shifted + n;
    if (shifted == NULL) return 1;
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
        live[count] = x[i];
        count += x[i] > -INFINITY;
    }
    int64_t rank = (int64_t)ceil(k) - 1;
    rank = rank < 0 ? 0 : (rank >= count ? count - 1 : rank);
    if (!select_f64(live, count, rank)) {
        free(shifted);
        return 1;
    }
    const double pivot = live[rank], reach = FAR_REACH / inv_tau;
    for (int64_t i = 0; i < n; ++i) {
        double v = x[i] - pivot;
        v = v > reach ? reach : (v < -reach ? -reach : v);
        shifted[i] = x[i] > -INFINITY ? v : -INFINITY;
    }
    int status = solve_row_f64(shifted, live, n, k, inv_tau);
    for (int64_t i = 0; i < n; ++i) out[i] = live[i];
    free(shifted);
    return status;
}

/* ------------------------------------------------------------------ threading */

/* The rows in [begin, end) of a solve whose status is nonzero (the caller solves them). */
#define COUNT_EVENTS(counter, count) __atomic_add_fetch(&(counter), (count), __ATOMIC_RELAXED)
/* For the tests (gradkit_soft_tile_counts): the soft tiles solved and the passes they took
   (one atomic add each per job). */
static int64_t soft_tiles, soft_tile_passes;

void gradkit_soft_tile_counts(int64_t *counts) {
    counts[0] = __atomic_exchange_n(&soft_tiles, 0, __ATOMIC_RELAXED);
    counts[1] = __atomic_exchange_n(&soft_tile_passes, 0, __ATOMIC_RELAXED);
}

static int64_t count_unsolved(const void *status, int64_t begin, int64_t end) {
    int64_t count = 0;
    for (int64_t row = begin; row < end; ++row) count += ((const int32_t *)status)[row] != 0;
    return count;
}

typedef struct {
    int op; /* 0 solve f32, 1 solve f64, 2 vjp f32, 3 vjp f64 */
    const void *a;
    const void *b;
    void *out;
    void *aux; /* status (int32) for solves, c (same dtype as out) for vjps */
    const double *budgets; /* per-row k for solves (NULL: k for every row) */
    int64_t row_begin, row_end, n;
    double k, inv_tau;
    int64_t unsolved; /* solves: rows of this job left with a nonzero status (run_job sets it) */
} Job;

/* Solve (or differentiate) rows [*row, row_end) LANES at a time while whole tiles remain
   (short rows only). */
static void run_tiles(const Job *job, int64_t *row) {
    if (job->n > (job->op > 1 ? SHORT_VJP_ROW : SHORT_ROW) || job->n < 1) return;
    if (job->op <= 1 && !SOLVE_TILES) return;
    int64_t tiles = 0, passes = 0;
    for (; *row + LANES <= job->row_end; *row += LANES) {
        int64_t offset = *row * job->n;
        if (job->op > 1) {
            if (job->op == 2)
                vjp_tiles_f32((const float *)job->a + offset, (const float *)job->b + offset,
                              (float *)job->out + offset, (float *)job->aux + *row, job->n,
                              job->inv_tau);
            else
                vjp_tiles_f64((const double *)job->a + offset, (const double *)job->b + offset,
                              (double *)job->out + offset, (double *)job->aux + *row, job->n,
                              job->inv_tau);
            continue;
        }
        double k[LANES];
        for (int l = 0; l < LANES; ++l) k[l] = job->budgets ? job->budgets[*row + l] : job->k;
        int32_t *status = (int32_t *)job->aux + *row;
        if (job->op == 0)
            passes += solve_tile_f32((const float *)job->a + offset, (float *)job->out + offset,
                                     status, job->n, k, job->inv_tau);
        else
            passes += solve_tile_f64((const double *)job->a + offset,
                                     (double *)job->out + offset, status, job->n, k, job->inv_tau);
        tiles += 1;
    }
    if (tiles > 0) {
        COUNT_EVENTS(soft_tiles, tiles);
        COUNT_EVENTS(soft_tile_passes, passes);
    }
}

static void run_job(Job *job) {
    int64_t first = job->row_begin;
    run_tiles(job, &first);
    for (int64_t row = first; row < job->row_end; ++row) {
        int64_t offset = row * job->n;
        switch (job->op) {
        case 0:
            ((int32_t *)job->aux)[row] = solve_row_f32((const float *)job->a + offset,
                                                       (float *)job->out + offset, job->n,
                                                       job->budgets ? job->budgets[row] : job->k,
                                                       job->inv_tau);
            break;
        case 1:
            ((int32_t *)job->aux)[row] = solve_row_f64((const double *)job->a + offset,
                                                       (double *)job->out + offset, job->n,
                                                       job->budgets ? job->budgets[row] : job->k,
                                                       job->inv_tau);
            break;
        case 2:
            ((float *)job->aux)[row] = (float)vjp_row_f32(
                (const float *)job->a + offset, (const float *)job->b + offset,
                (float *)job->out + offset, job->n, job->inv_tau);
            break;
        default:
            ((double *)job->aux)[row] = vjp_row_f64(
                (const double *)job->a + offset, (const double *)job->b + offset,
                (double *)job->out + offset, job->n, job->inv_tau);
        }
    }
    job->unsolved = job->op < 2 ? count_unsolved(job->aux, job->row_begin, job->row_end) : 0;
}

#ifndef _OPENMP
static void *thread_main(void *arg) {
    run_job((Job *)arg);
    return NULL;
}
#endif

#define MAX_THREADS 64
/* Rows of less than this many elements in total are not worth a thread. */
#define MIN_ELEMENTS_PER_THREAD 16384

/* Runs the rows in up to `threads` jobs; returns, for a solve, the number of rows left with a
   nonzero status (0: every row solved, the caller need not read the statuses). */
static int64_t run_parallel(Job base, int64_t rows, int threads) {
    int64_t useful = (rows * base.n) / MIN_ELEMENTS_PER_THREAD;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > useful) threads = (int)useful;
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    Job jobs[MAX_THREADS];
    for (int j = 0; j < threads; ++j) {
        jobs[j] = base;
        jobs[j].row_begin = rows * j / threads;
        jobs[j].row_end = rows * (j + 1) / threads;
    }
    if (threads == 1) {
        run_job(&jobs[0]);
        return jobs[0].unsolved;
    }
#ifdef _OPENMP
    /* Built to share PyTorch's OpenMP runtime (its GOMP symbols are resolved at load time):
       torch's worker threads, still spinning after its last parallel op, run these rows
       instead of competing with threads of our own for the same cores. */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int j = 0; j < threads; ++j) run_job(&jobs[j]);
#else
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS];
    for (int j = 1; j < threads; ++j)
        started[j] = pthread_create(&handles[j], NULL, thread_main, &jobs[j]) == 0;
    run_job(&jobs[0]);
    for (int j = 1; j < threads; ++j) {
        if (started[j])
            pthread_join(handles[j], NULL);
        else
            run_job(&jobs[j]); /* could not start a thread: do its rows here */
    }
#endif
    int64_t unsolved = 0;
    for (int j = 0; j < threads; ++j) unsolved += jobs[j].unsolved;
    return unsolved;
}

/* ------------------------------------------------------------------ exported API */

int64_t gradkit_solve(int is_double, const void *x, void *out, int32_t *status, int64_t rows,
                      int64_t n, double k, const double *budgets, double inv_tau, int threads) {
    Job job = {is_double ? 1 : 0, x, NULL, out, status, budgets, 0, rows, n, k, inv_tau};
    return run_parallel(job, rows, threads);
}

int64_t gradkit_vjp(int is_double, const void *grad, const void *p, void *out, void *c,
                    int64_t rows, int64_t n, double inv_tau, int threads) {
    Job job = {is_double ? 3 : 2, grad, p, out, c, NULL, 0, rows, n, 0.0, inv_tau};
    return run_parallel(job, rows, threads);
}

int gradkit_abi_version(void) { return 4; }

/* For the tests: rows of x (n ≤ SORT_N entries each) in descending order, by the tiles'
   sorting network (tile_sort), LANES rows at a time; rows past the last whole tile are not
   written.  Returns 1 (nothing written) for n out of range. */
int gradkit_sort_tiles(int is_double, const void *x, void *out, int64_t rows, int64_t n) {
    if (n < 1 || n > SORT_N) return 1;
    for (int64_t row = 0; row + LANES <= rows; row += LANES) {
        if (is_double) tile_sort_rows_f64((const double *)x + row * n, (double *)out + row * n, n);
        else tile_sort_rows_f32((const float *)x + row * n, (float *)out + row * n, n);
    }
    return 0;
}

/* ================================================================== sparse_topk
 * Appended section: the exact sparse projection of gradkit.sparse_topk (math: _sparse.py).
 * Per row, in double: w_i = (x_i − x_max)/τ (−inf for masked entries), the threshold t with
 * F(t) = Σ clip(w_i − t, 0, 1) = k by active-set Newton steps t ← (Σ_F w + |U| − k)/|F|,
 * stopped when the active set is stable (then t is the exact root of its piece), inside a
 * bracket (regula falsi fallback).  Most rows take passes straight over x (w computed on the
 * fly) from a start at the row's moments: the all-free root for rows spanning under 2τ, else
 * mean + σ·z(k/live) − 1/2, refined for rows of SPARSE_MODEL_START or more entries on a
 * Gaussian model of the row.  Long rows (> SPARSE_SHORT_PATH) spanning more than
 * SPARSE_NARROW τ with a budget under SPARSE_TOP_LIST start from the order-statistics
 * bracket [w_(⌊k⌋+1) − 1, w_(⌈k⌉)] (width ≤ 1, from one scan) and keep only the entries in
 * its window.  Rows of at most SPARSE_TILE_N entries are solved SPARSE_LANES at a time, one
 * per vector lane, by the same steps (sparse_tile_solve), +inf entries included; float32 tiles
 * take those steps in float, then one exact pass (sparse_tile_exact: Σ_F w in double at the
 * float root, F checked against the breakpoints nearest it).  Tiles start
 * from the all-free root, or from the order-statistics bracket: off a sorting network (wide
 * float32 tiles of at most SORT_N entries) or, for budgets below SPARSE_TOP_SLOTS (4 in tiles of
 * at most SORT_N entries) or as near n, off a list of each lane's largest or smallest entries
 * (sparse_tile_top).
 * +inf entries take k/m each (at most 1) of the budget, a NaN makes its row NaN (as _sparse.py).
 * status: 0 solved; 1 w overflows; 3 no convergence or no memory (the caller solves the row).
 */
#include <stdlib.h>

#define SPARSE_MAX_PASSES 64
/* For the tests (gradkit_sparse_tile_counts): the short rows a sparse tile took but handed to
   sparse_row unsolved, and the float32 lanes its exact pass sent back to the double passes.
   A broken tile step costs time, not correctness (sparse_row solves the row): these counts
   show it.  Atomic adds, from any thread; both events are rare. */
static int64_t sparse_tile_fallbacks, sparse_tile_retries;

/* The two counts since the last call, in counts[0] and counts[1]; both are reset. */
void gradkit_sparse_tile_counts(int64_t *counts) {
    counts[0] = __atomic_exchange_n(&sparse_tile_fallbacks, 0, __ATOMIC_RELAXED);
    counts[1] = __atomic_exchange_n(&sparse_tile_retries, 0, __ATOMIC_RELAXED);
}

/* Long rows wider than this many τ with a small budget keep only the entries near the root in
   a second scan of x (a predictable branch: few entries are kept).  With AVX-512 both scans
   are vector loops (top_hits, window_*), and rows from 4 τ wide gain. */
#define SPARSE_NARROW (ROW_SCANS ? 4.0 : 16.0)

#define SPARSE_TOP_LIST 16 /* budgets below this take their order statistics from one scan */
/* Rows spanning more than this many τ are solved about a pivot near the root (in double, w
   about the top keeps about 2⁻³² of the root's digits at this span). */
#define SPARSE_PIVOT_SPAN 1048576.0
/* float32 rows spanning more than this many τ write p in double (in float32, x/τ's rounding
   would cost p more than a few thousandths). */
#define SPARSE_WRITE_SPAN 65536.0
/* float64 rows whose root lies more than this many τ from the top take one more pass about
   the root (sparse_polish): w about the top holds the root to eps·|t|, 2⁻⁴⁰ here. */
#define SPARSE_POLISH_SPAN 4096.0
/* float32 tiles whose rows all span at most this many τ take their passes in float (w to
   2⁻¹² of τ: an active set at most an entry near a breakpoint off) before the exact pass
   (sparse_tile_exact). */
#define SPARSE_FLOAT_SPAN 4096.0

/* float32 tiles of rows of at most SORT_N entries with a row spanning more than
   SPARSE_SORT_WIDE τ start from the order-statistics bracket too, from a sorting network
   across the lanes (tile_sort; float64 tiles: twice the vectors per exchange; narrower rows:
   few passes to save). */
#define SPARSE_SORT_WIDE 16.0
#define SPARSE_SORT_NEAR 8.0   /* … or more than this many, in tiles whose budgets all lie within */
#define SPARSE_SORT_SHARE 0.25 /* … this share of the live count from 0 or from it */
/* Tiles without the sorting network read the order statistics of budgets below this (4 in tiles
   of at most SORT_N entries), or as near n, off a per-lane list of the largest (smallest)
   entries, kept by max/min insertion; a list is 4 long where every budget it serves fits. */
#define SPARSE_TOP_SLOTS 8
/* |U|, |F| and Σ_F w at t over finite w (vectorised). */
static void sparse_stats(const double *w, int64_t n, double t, double *upper, double *count,
                         double *total) {
    double u = 0.0, c = 0.0, s = 0.0;
#pragma omp simd reduction(+ : u, c, s)
    for (int64_t i = 0; i < n; ++i) {
        double z = w[i] - t;
        double up = (double)(z >= 1.0), free = (double)(z > 0.0) - up; /* (arithmetic masks
                                                                            vectorise) */
        u += up;
        c += free;
        s += free * w[i];
    }
    *upper = u;
    *count = c;
    *total = s;
}

/* Drop the entries the bracket has decided (w ≤ low: 0; w ≥ high: 1, counted in *fixed). */
static int64_t sparse_compact(double *w, int64_t n, double low, double high, double *fixed) {
    int64_t kept = 0;
    double above_count = 0.0;
    for (int64_t i = 0; i < n; ++i) { /* branch-free: random data defeats prediction */
        double v = w[i];
        int above = v >= high;
        w[kept] = v;
        kept += (v > low) & !above;
        above_count += above;
    }
    *fixed += above_count;
    return kept;
}

/* One active-set Newton step from (upper, count, total) = (|U|, |F|, Σ_F w) at *t, inside the
   bracket [*lo, *hi] (masses *mass_lo ≥ k ≥ *mass_hi, updated): returns 1 with *t the exact
   root when the active set is stable, else 0 with the next *t. */
static int sparse_step(double upper, double count, double total, double k, double *t,
                       double *lo, double *hi, double *mass_lo, double *mass_hi) {
    double mass = upper + total - count * *t;
    if (mass >= k) *lo = *t, *mass_lo = mass;
    if (mass <= k) *hi = *t, *mass_hi = mass;
    double step = count > 0 ? (total + upper - k) / count : *t;
    if (count > 0 && fabs(step - *t) <= 2.0 * 2.220446049250313e-16 * (fabs(*t) + 1.0)) {
        *t = step; /* the active set is stable: the exact root of its piece */
        return 1;
    }
    if (mass == k) return 1;
    if (count > 0 && step > *lo && step < *hi) {
        *t = step;
    } else { /* regula falsi, kept a quarter of the bracket off its ends */
        double gap = *mass_lo - *mass_hi > 1e-30 ? *mass_lo - *mass_hi : 1e-30;
        double share = (*mass_lo - k) / gap;
        share = share < 0.25 ? 0.25 : (share > 0.75 ? 0.75 : share);
        *t = *lo + share * (*hi - *lo);
    }
    return 0;
}

/* Active-set Newton from t inside the bracket [lo, hi] (masses mass_lo ≥ k ≥ mass_hi), on the
   m undecided entries cand (fixed: entries decided at 1; span: the width cand was last
   compacted to).  Returns 0 with *t_out, or 3 without convergence. */
static int sparse_newton(double *cand, int64_t m, double k, double fixed, double lo, double hi,
                         double mass_lo, double mass_hi, double span, double t,
                         double *t_out) {
    for (int pass = 0; pass < SPARSE_MAX_PASSES; ++pass) {
        if (hi + 1.0 - lo < 0.5 * span) { /* the window (lo, hi + 1) holds few entries */
            m = sparse_compact(cand, m, lo, hi + 1.0, &fixed);
            span = hi + 1.0 - lo;
        }
        double upper, count, total;
        sparse_stats(cand, m, t, &upper, &count, &total);
        if (sparse_step(upper + fixed, count, total, k, &t, &lo, &hi, &mass_lo, &mass_hi)) {
            *t_out = t;
            return 0;
        }
    }
    return 3;
}

/* Rows of at most this many entries (and longer ones unless wide with a small budget) take
   the pass-over-x path (sparse_pass_row_*): a start from the row's moments, then active-set
   Newton passes straight over x (no copy, no compaction; each pass one vectorised loop).
   With AVX-512 the order-statistics window pays from rows of more than 128 entries. */
#define SPARSE_SHORT_PATH (ROW_SCANS ? 128 : 1024)

/* z with Φ(z) ≈ 1 − share (0 < share < 1), by the logistic approximation Φ(z) ≈ σ(1.702 z):
   only a starting point, its accuracy matters for speed, never for the result. */
static double sparse_upper_quantile(double share) { return log((1.0 - share) / share) / 1.702; }

/* Rows of at least this many entries start from the Gaussian model of the row (a few scalar
   Newton steps: cheap next to the row, much closer than the moments' quantile). */
#define SPARSE_MODEL_START 512

/* E[(W − a)⁺] for W ~ N(mean, sd²), and its derivative −P(W > a). */
static double sparse_excess(double a, double mean, double sd, double *slope) {
    double d = (a - mean) / sd;
    double tail = 0.5 * erfc(d * 0.7071067811865476);
    *slope = -tail;
    return sd * 0.3989422804014327 * exp(-0.5 * d * d) + (mean - a) * tail;
}

/* t with live·E[clip(W − t, 0, 1)] = k for W ~ N(mean, sd²) (sd > 0): the expected root of a
   bell-shaped row.  Safeguarded Newton on the model, started at `t`, inside [lo, hi]; only
   a starting point (its accuracy matters for speed, never for the result). */
static double sparse_model_root(double mean, double sd, double live, double k, double t,
                                double lo, double hi) {
    for (int step = 0; step < 12; ++step) {
        double slope_0, slope_1;
        double mass = live * (sparse_excess(t, mean, sd, &slope_0) -
                              sparse_excess(t + 1.0, mean, sd, &slope_1));
        double rate = live * (slope_0 - slope_1); /* ≤ 0 */
        if (mass > k) lo = t; else hi = t;
        double next = rate < 0.0 ? t - (mass - k) / rate : 0.5 * (lo + hi);
        next = next > lo && next < hi ? next : 0.5 * (lo + hi);
        if (fabs(next - t) < 1e-3) return next;
        t = next;
    }
    return t;
}

#define DEFINE_SPARSE_KERNELS(T, SUFFIX)                                                         \
    /* a = the up-th, b = the down-th largest of x (1 ≤ down ≤ up ≤ SPARSE_TOP_LIST, up ≤ the */ \
    /* number of finite entries): a sorted list of the top `up` kept in one scan. */             \
    static void sparse_top_list_##SUFFIX(const T *x, int64_t n, int64_t up, int64_t down,        \
                                         double *a, double *b) {                                 \
        double top[SPARSE_TOP_LIST];                                                             \
        int64_t size = 0, i = 0;                                                                 \
        if (ROW_SCANS) { /* as top_start: entries reaching a bar, then the list's last */        \
            const T bar = top_bar_##SUFFIX(x, n, (T)1, up);                                      \
            for (; i + ROW_SCAN_WIDTH_##SUFFIX <= n; i += ROW_SCAN_WIDTH_##SUFFIX) {             \
                T least = size < up ? bar : (T)top[up - 1];                                      \
                for (unsigned hits = top_hits_##SUFFIX(x + i, (T)1, least); hits;                \
                     hits &= hits - 1)                                                           \
                    top_insert_f64(top, &size, up, (double)x[i + __builtin_ctz(hits)]);          \
            }                                                                                    \
        }                                                                                        \
        for (; i < n; ++i) {                                                                     \
            double v = (double)x[i];                                                             \
            if (size == up && !(v > top[size - 1])) continue;                                    \
            int64_t j = size < up ? size++ : up - 1;                                             \
            for (; j > 0 && top[j - 1] < v; --j) top[j] = top[j - 1];                            \
            top[j] = v;                                                                          \
        }                                                                                        \
        *a = top[up - 1];                                                                        \
        *b = top[down - 1];                                                                      \
    }                                                                                            \
                                                                                                 \
    /* p = clip((x − ref)·inv − t, 0, 1) for one row (0 at −inf, 1 at +inf): in double as the    \
       solve classified the entries (float64 rows, and float32 rows spanning more than           \
       SPARSE_WRITE_SPAN τ, wide), so that p keeps its digits however large x/τ is; other        \
       float32 rows in float about x₀ = ref + t·τ (θ, rounded; x − x₀ is exact near the root,    \
       where (x − ref)·inv in float lost eps·|t| of p). */                                       \
    static inline void sparse_write_p_##SUFFIX(const T *x, T *out, int64_t n, double ref,        \
                                               double inv, double t, int wide) {                 \
        if (wide && sizeof(T) < sizeof(double)) {                                                \
            for (int64_t i = 0; i < n; ++i) {                                                    \
                double z = ((double)x[i] - ref) * inv - t;                                       \
                out[i] = (T)(z > 0.0 ? (z < 1.0 ? z : 1.0) : 0.0);                               \
            }                                                                                    \
            return;                                                                              \
        }                                                                                        \
        const int about_root = sizeof(T) < sizeof(double);                                       \
        const T centre = about_root ? (T)(ref + t / inv) : (T)ref, scale = (T)inv;               \
        const T shift = about_root ? (T)(t - ((double)centre - ref) * inv) : (T)t;               \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            T z = (x[i] - centre) * scale - shift; /* −inf for masked entries */                 \
            z = z < (T)1 ? z : (T)1;                                                             \
            out[i] = z > (T)0 ? z : (T)0;                                                        \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* float64 rows solved about their top (ref) with a root t more than SPARSE_POLISH_SPAN τ    \
       below it: the exact solve of the active set at t, about x₀ = ref + t·τ (x − x₀ exact      \
       near the root, where w about the top lost eps·|t|); returns t about *ref = x₀.  Other     \
       rows: t unchanged.  `budget`: k less the +inf entries. */                                 \
    static inline double sparse_polish_##SUFFIX(const T *x, int64_t n, double budget,            \
                                                double *ref, double inv, double t) {             \
        if (sizeof(T) != sizeof(double) || !(fabs(t) > SPARSE_POLISH_SPAN)) return t;            \
        const double centre = *ref + t / inv, shift = t - (centre - *ref) * inv;                 \
        double upper = 0.0, count = 0.0, total = 0.0;                                            \
        _Pragma("omp simd reduction(+ : upper, count, total)")                                   \
        for (int64_t i = 0; i < n; ++i) { /* (±inf: neither free nor counted) */                 \
            double w = ((double)x[i] - centre) * inv, z = w - shift;                             \
            int finite = w - w == 0;                                                             \
            int is_up = finite & (z >= 1.0), is_free = finite & (z > 0.0) & (z < 1.0);           \
            upper += is_up ? 1.0 : 0.0;                                                          \
            count += is_free ? 1.0 : 0.0;                                                        \
            total += is_free ? w : 0.0;                                                          \
        }                                                                                        \
        *ref = centre;                                                                           \
        return count > 0.0 ? (total + upper - budget) / count : shift;                           \
    }                                                                                            \
                                                                                                 \
    /* A row solved about its top: polished (float64) and written; `wide` as sparse_write_p. */  \
    static inline void sparse_finish_##SUFFIX(const T *x, T *out, int64_t n, double budget,      \
                                              double top, double inv, double t, int wide) {      \
        double ref = top;                                                                        \
        t = sparse_polish_##SUFFIX(x, n, budget, &ref, inv, t);                                  \
        sparse_write_p_##SUFFIX(x, out, n, ref, inv, t, wide);                                   \
    }                                                                                            \
                                                                                                 \
    /* grad_x = 1_F (g − mean)·inv_tau for one row, NaN where p is NaN, exactly 0 off F; 1/τ     \
       capped at T's max/16 (as soft_topk caps it), so a τ below T's range gives large finite    \
       gradients on F, not inf or NaN. */                                                        \
    static ALWAYS_INLINE void sparse_write_grad_##SUFFIX(const T *g, const T *p, T *out,         \
                                                         int64_t n, T mean, double inv_tau) {    \
        const double cap = MAX_FINITE(T) / 16;                                                   \
        const T scale = (T)(inv_tau < cap ? inv_tau : cap);                                      \
        _Pragma("omp simd")                                                                      \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            T value = (p[i] > (T)0) & (p[i] < (T)1) ? (g[i] - mean) * scale : (T)0;              \
            out[i] = p[i] != p[i] ? p[i] : value;                                                \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* A row without NaN, 0 < k − plus < live: active-set Newton passes over x                   \
       itself, w_i = (x_i − top)/τ computed on the fly (−inf entries: never free nor upper).  \
       Starts from the all-free root when the row spans under 2 τ, else from its moments        \
       (mean + σ·z(k/live) − 1/2).  Returns 0 with *t_out, 3 without convergence. */                  \
    static int sparse_pass_row_##SUFFIX(const T *x, int64_t n, double k, double plus,         \
                                        double top, double inv, double lo, double sum,          \
                                        double square, double live, double *t_out) {            \
        /* (+inf entries: w = +inf, always upper; the finite ones share k − plus) */            \
        const double budget = k - plus;                                                          \
        double hi = 0.0, mass_lo = live + plus, mass_hi = plus;                                  \
        double mean = (sum / live - top) * inv;                                                  \
        double t = mean - budget / live; /* the all-free root (a start: sums may cancel) */     \
        double var = (square / live - (sum / live) * (sum / live)) * inv * inv;                  \
        double sd = var > 0.0 ? sqrt(var) : 0.0;                                                 \
        if (lo < -2.0) t = mean + sd * sparse_upper_quantile(budget / live) - 0.5;               \
        t = t > lo ? (t < hi ? t : hi) : lo; /* (a NaN start, from overflowing sums: lo) */      \
        if (n >= SPARSE_MODEL_START && sd > 0.0 && sd < INFINITY && mean == mean)                \
            t = sparse_model_root(mean, sd, live, budget, t, lo, hi);                            \
        for (int pass = 0; pass < SPARSE_MAX_PASSES; ++pass) {                                   \
            double s = 0.0, u = 0.0, c = 0.0;                                                    \
            _Pragma("omp simd reduction(+ : u, c, s)")                                           \
            for (int64_t i = 0; i < n; ++i) {                                                    \
                double w = ((double)x[i] - top) * inv;                                           \
                double z = w - t;                                                                \
                int is_up = z >= 1.0, is_free = (z > 0.0) & (z < 1.0);                           \
                u += is_up ? 1.0 : 0.0;                                                          \
                c += is_free ? 1.0 : 0.0;                                                        \
                s += is_free ? w : 0.0;                                                          \
            }                                                                                    \
            if (sparse_step(u, c, s, k, &t, &lo, &hi, &mass_lo, &mass_hi)) {                     \
                *t_out = t;                                                                      \
                return 0;                                                                        \
            }                                                                                    \
        }                                                                                        \
        return 3;                                                                                \
    }                                                                                            \
                                                                                                 \
    /* Rows spanning more than SPARSE_PIVOT_SPAN τ, whose w about the top would lose the root's  \
       digits: w about the pivot a, the ⌈budget⌉-th largest finite entry.  The root lies in      \
       (b − τ, a], b the (⌊budget⌋+1)-th largest (a itself for a fractional budget), so only     \
       the entries of the window (b − τ, a + τ) are kept.  *pivot = a, *t_out about it. */       \
    static int sparse_pivot_row_##SUFFIX(const T *x, int64_t n, double k, double plus,           \
                                         double budget, double inv, double *cand,                \
                                         double *pivot, double *t_out) {                         \
        const int64_t down = (int64_t)ceil(budget) - 1;                                          \
        double a, b;                                                                             \
        if (plus == 0.0 && floor(budget) + 1.0 <= SPARSE_TOP_LIST) { /* (one scan) */            \
            sparse_top_list_##SUFFIX(x, n, (int64_t)floor(budget) + 1, down + 1, &b, &a);        \
        } else {                                                                                 \
            int64_t live = 0;                                                                    \
            for (int64_t i = 0; i < n; ++i)                                                      \
                if (x[i] - x[i] == 0) cand[live++] = (double)x[i]; /* (the finite entries) */    \
            if (!select_f64(cand, live, down)) return 3;                                         \
            a = b = cand[down];                                                                  \
            for (int64_t i = down + 1; budget == floor(budget) && i < live; ++i)                 \
                b = i == down + 1 || cand[i] > b ? cand[i] : b; /* (after a: ≤ a) */             \
        }                                                                                        \
        double low = (b - a) * inv - 1.0, fixed = plus; /* (+inf entries: in U) */               \
        int64_t m = 0;                                                                           \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            double w = ((double)x[i] - a) * inv;                                                 \
            if (!(x[i] - x[i] == 0)) continue;                                                   \
            if (w >= 1.0)                                                                        \
                fixed += 1.0;                                                                    \
            else if (w > low)                                                                    \
                cand[m++] = w;                                                                   \
        }                                                                                        \
        double start = 0.5 * low > -1.0 ? 0.5 * low : -1.0; /* (−1: on a flat piece) */          \
        *pivot = a;                                                                              \
        return sparse_newton(cand, m, k, fixed, low, 0.0, plus + floor(budget) + 1.0,            \
                             plus + ceil(budget) - 1.0, 1.0 - low, start, t_out);                \
    }                                                                                            \
                                                                                                 \
    static int sparse_row_##SUFFIX(const T *x, T *out, int64_t n, double k, double tau,         \
                                   double *cand) {                                               \
        double top, bottom, live, plus;                                                          \
        T top_t = (T)-INFINITY, bottom_t = (T)INFINITY, live_t = 0, nan = 0, plus_t = 0;         \
        T sum_t = 0, sq_t = 0;                                                                   \
        _Pragma("omp simd reduction(+ : live_t, nan, plus_t, sum_t, sq_t) reduction(max : top_t) reduction(min : bottom_t)")\
        for (int64_t i = 0; i < n; ++i) {                                                        \
            T v = x[i];                                                                          \
            nan += v != v ? (T)1 : (T)0;                                                         \
            plus_t += v == (T)INFINITY ? (T)1 : (T)0;                                            \
            int finite = (v > (T)-INFINITY) & (v < (T)INFINITY);                                 \
            live_t += finite ? (T)1 : (T)0;                                                      \
            T finite_v = finite ? v : (T)0;                                                      \
            sum_t += finite_v; /* (for the short path's start only) */                           \
            sq_t += finite_v * finite_v;                                                         \
            T high_v = finite ? v : (T)-INFINITY;                                                \
            top_t = high_v > top_t ? high_v : top_t;                                             \
            T low_v = finite ? v : (T)INFINITY;                                                  \
            bottom_t = low_v < bottom_t ? low_v : bottom_t;                                      \
        }                                                                                        \
        top = (double)top_t;                                                                     \
        bottom = (double)bottom_t;                                                               \
        live = (double)live_t;                                                                   \
        plus = (double)plus_t;                                                                   \
        if (nan) { /* a NaN makes its slice NaN */                                               \
            for (int64_t i = 0; i < n; ++i) out[i] = (T)NAN;                                     \
            return 0;                                                                            \
        }                                                                                        \
        const double budget = k - plus; /* what the finite entries share */                      \
        if (budget <= 0.0 || budget >= live) { /* +inf entries: k/plus each, at most 1 */        \
            const T share = (T)(plus > k ? k / plus : 1.0), rest = (T)(budget > 0.0);             \
            for (int64_t i = 0; i < n; ++i)                                                      \
                out[i] = x[i] == (T)INFINITY ? share : (x[i] > (T)-INFINITY ? rest : (T)0);      \
            return 0;                                                                            \
        }                                                                                        \
        const double inv = fmin(1.0 / tau, DBL_MAX); /* (τ subnormal: no inf) */                 \
        if (!((top - bottom) * inv <= SPARSE_PIVOT_SPAN)) { /* (also: w overflows) */            \
            double pivot, t;                                                                     \
            int status = sparse_pivot_row_##SUFFIX(x, n, k, plus, budget, inv, cand, &pivot,     \
                                                   &t);                                          \
            if (!status) sparse_write_p_##SUFFIX(x, out, n, pivot, inv, t, 1);                      \
            return status;                                                                       \
        }                                                                                        \
        double t, lo = (bottom - top) * inv - 1.0;                                               \
        int status;                                                                              \
        const double up_rank = floor(k) + 1.0;                                                   \
        if (plus > 0.0 || !(n > SPARSE_SHORT_PATH && up_rank <= SPARSE_TOP_LIST &&              \
                            lo < -SPARSE_NARROW)) {                                              \
            status = sparse_pass_row_##SUFFIX(x, n, k, plus, top, inv, lo, (double)sum_t,        \
                                              (double)sq_t, live, &t);                           \
        } else {                                                                                 \
            /* long, wide, small budget: the order-statistics bracket (width ≤ 1) from one       \
               scan of x; then only the entries inside the window (lo, hi + 1) are               \
               kept (few, and a predictable branch) */                                           \
            int64_t up = (int64_t)floor(k) + 1, down = (int64_t)ceil(k);                         \
            double a, b, mass_hi = ceil(k) - 1.0;                                                \
            if (ROW_SCANS && lo > -SPARSE_POLISH_SPAN) {                                         \
                /* A bracket for free: at least `up` entries reach the up-th largest of 16       \
                   lanes' maxima (mass ≥ up > k there), none lies above the top (mass 0); the    \
                   window holds a few more entries.  (Rows wider than SPARSE_POLISH_SPAN·τ keep  \
                   the order statistics' tight bracket: from this one, float64 rows at τ = 1e−4  \
                   ended 4× further from the root, 1e−12.) */                                    \
                a = (double)top_bar_##SUFFIX(x, n, (T)1, up), b = top, mass_hi = 0.0;            \
            } else {                                                                             \
                sparse_top_list_##SUFFIX(x, n, up, down < 1 ? 1 : down, &a, &b);                 \
            }                                                                                    \
            double low = (a - top) * inv - 1.0, hi = (b - top) * inv, fixed = 0.0;               \
            low = low > lo ? low : lo;                                                           \
            hi = hi < 0.0 ? hi : 0.0;                                                            \
            int64_t m = 0, i = 0;                                                                \
            if (ROW_SCANS) /* (m ≤ i: cand, n long, has room for 8 past m) */                    \
                for (; i + 8 <= n; i += 8)                                                       \
                    fixed += window_##SUFFIX(x + i, top, inv, low, hi + 1.0, cand + m, &m);      \
            for (; i < n; ++i) {                                                                 \
                double w = ((double)x[i] - top) * inv; /* −inf for masked entries */             \
                if (w >= hi + 1.0)                                                               \
                    fixed += 1.0;                                                                \
                else if (w > low)                                                                \
                    cand[m++] = w;                                                               \
            }                                                                                    \
            status = sparse_newton(cand, m, k, fixed, low, hi, floor(k) + 1.0, mass_hi,          \
                                   hi + 1.0 - low, 0.5 * (low + hi), &t);                        \
        }                                                                                        \
        if (status) return status;                                                               \
        sparse_finish_##SUFFIX(x, out, n, budget, top, inv, t, lo < -SPARSE_WRITE_SPAN);         \
        return 0;                                                                                \
    }                                                                                            \
                                                                                                 \
    /* grad_x = 1_F (g − mean_F g)/τ (NaN where p is NaN); returns mean_F g. */                \
    static double sparse_vjp_row_##SUFFIX(const T *g, const T *p, T *out, int64_t n,            \
                                          double inv_tau) {                                      \
        double count = 0.0, total = 0.0;                                                         \
        for (int64_t start = 0; start < n; start += BLOCK) { /* accurate partial sums */         \
            int64_t stop = start + BLOCK < n ? start + BLOCK : n;                                \
            T block_count = 0, block_total = 0;                                                  \
            _Pragma("omp simd reduction(+ : block_count, block_total)")                          \
            for (int64_t i = start; i < stop; ++i) {                                             \
                T free = (T)(p[i] > (T)0) * (T)(p[i] < (T)1);                                    \
                block_count += free;                                                             \
                block_total += free * g[i];                                                      \
            }                                                                                    \
            count += block_count;                                                                \
            total += block_total;                                                                \
        }                                                                                        \
        double mean = count > 0.0 ? total / count : 0.0;                                         \
        sparse_write_grad_##SUFFIX(g, p, out, n, (T)mean, inv_tau);                              \
        return mean;                                                                             \
    }

/* The short-row tiles' solve and backward (compiled for 256-bit vectors: see the top of the
   file). */
#define DEFINE_SPARSE_TILE_KERNELS(T, SUFFIX)                                                    \
    /* sparse_vjp_row for SPARSE_LANES (= LANES) short rows at once (rows l = 0..LANES−1 of g,   \
       p and out, each n long; 1/τ per row), their sums by tile_weighted_sums.  Writes           \
       mean_F g per row to means[0..LANES). */                                                   \
    static ALWAYS_INLINE void sparse_vjp_tile_##SUFFIX(const T *g, const T *p, T *out, T *means, \
                                                       int64_t n, const double *inv_tau) {       \
        T count[SPARSE_LANES], total[SPARSE_LANES];                                              \
        tile_weighted_sums_##SUFFIX(g, p, n, 1, count, total);                                   \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            double mean = count[l] > 0 ? (double)total[l] / (double)count[l] : 0.0;              \
            means[l] = (T)mean;                                                                  \
            sparse_write_grad_##SUFFIX(g + l * n, p + l * n, out + l * n, n, (T)mean,            \
                                       inv_tau[l]);                                              \
        }                                                                                        \
    }                                                                                            \
    /* sparse_vjp_tile with n a constant at the widths 8 and 16 (see ALWAYS_INLINE). */           \
    static void sparse_vjp_tiles_##SUFFIX(const T *g, const T *p, T *out, T *means, int64_t n,   \
                                          const double *inv_tau) {                               \
        if (n == 8) sparse_vjp_tile_##SUFFIX(g, p, out, means, 8, inv_tau);                      \
        else if (n == 16) sparse_vjp_tile_##SUFFIX(g, p, out, means, 16, inv_tau);               \
        else sparse_vjp_tile_##SUFFIX(g, p, out, means, n, inv_tau);                             \
    }                                                                                            \
                                                                                                 \
    /* Per lane l of a transposed tile xt (n ≤ SORT_N entries a lane): the ⌈k⌉-th and            \
       (⌊k⌋+1)-th largest entries, in a[l] and b[l] (lanes with go[l] = 0: anything), by a       \
       sorting network on a copy padded with −inf. */                                            \
    static void sparse_tile_order_##SUFFIX(const T *xt, int64_t n, const double *k,              \
                                           const int *go, T *a, T *b) {                          \
        T s[SORT_N * SPARSE_LANES];                                                              \
        n = n < SORT_N ? n : SORT_N; /* (called for n ≤ SORT_N: a bound the compiler can see) */ \
        memcpy(s, xt, (size_t)n * SPARSE_LANES * sizeof(T));                                     \
        tile_sort_##SUFFIX(s, n);                                                                \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            int64_t down = go[l] ? (int64_t)ceil(k[l]) - 1 : 0;                                  \
            int64_t up = go[l] ? (int64_t)floor(k[l]) : 0;                                       \
            a[l] = s[down * SPARSE_LANES + l];                                                   \
            b[l] = s[up * SPARSE_LANES + l];                                                     \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* The `slots` (≤ SPARSE_TOP_SLOTS) largest (largest = 1) or smallest entries of lanes       \
       h·WIDTH… of a transposed tile xt, in order from the end, by max/min insertion in          \
       registers; the other slots ±inf. */                                                       \
    static inline void sparse_tile_list_##SUFFIX(const T *xt, int64_t n, int h, int largest,     \
                                                 int slots, tile_vec_##SUFFIX *slot) {           \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T) };                                  \
        const tile_vec_##SUFFIX none = (tile_vec_##SUFFIX){0};                                   \
        for (int j = 0; j < SPARSE_TOP_SLOTS; ++j) slot[j] = none + (largest ? -1 : 1) * (T)INFINITY; \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            tile_vec_##SUFFIX v;                                                                 \
            memcpy(&v, xt + i * SPARSE_LANES + h * WIDTH, sizeof v);                             \
            for (int j = 0; j < slots; ++j) { /* (NaN lanes: not listed) */                      \
                tile_mask_##SUFFIX in = largest ? v > slot[j] : v < slot[j];                     \
                tile_vec_##SUFFIX kept = tile_select_##SUFFIX(in, v, slot[j]);                   \
                v = tile_select_##SUFFIX(in, slot[j], v);                                        \
                slot[j] = kept;                                                                  \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* Per lane l of a transposed tile xt (any n, go[l] set) whose budget k[l] lies below        \
       SPARSE_TOP_SLOTS (4 for n ≤ SORT_N), or as near n: the ⌈k⌉-th and (⌊k⌋+1)-th largest     \
       entries, in a[l] and b[l], off a list of the lane's largest (or smallest) entries         \
       (sparse_tile_list); NaN for the other lanes.  Returns the number of lanes listed. */      \
    static int sparse_tile_top_##SUFFIX(const T *xt, int64_t n, const double *k, const int *go,  \
                                        T *a, T *b) {                                            \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T), PARTS = SPARSE_LANES / WIDTH };    \
        int listed = 0;                                                                          \
        const double slots = n > SORT_N ? SPARSE_TOP_SLOTS : 4; /* (short rows: lists of 4) */   \
        const double near_n = (double)n - slots; /* (k above it: from the bottom) */             \
        T up[2][SPARSE_LANES], down[2][SPARSE_LANES]; /* (slot indices per list; −1: none) */    \
        double depth[2] = {0.0, 0.0}; /* (the slots each list needs: 0 for a list not used) */   \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            int top = go[l] && k[l] < slots;                                                     \
            int bottom = go[l] && !top && k[l] > near_n;                                         \
            double above = ceil(k[l]) - 1.0, below = floor(k[l]); /* (ranks from the top) */     \
            double last = (double)n - 1.0; /* (ranks from the bottom: last − rank) */            \
            up[0][l] = top ? (T)above : (T)-1;                                                   \
            down[0][l] = top ? (T)below : (T)-1;                                                 \
            up[1][l] = bottom ? (T)(last - above) : (T)-1;                                       \
            down[1][l] = bottom ? (T)(last - below) : (T)-1;                                     \
            depth[0] = top && below + 1.0 > depth[0] ? below + 1.0 : depth[0];                   \
            depth[1] = bottom && last - above + 1.0 > depth[1] ? last - above + 1.0 : depth[1];  \
            listed += top + bottom;                                                              \
        }                                                                                        \
        if (!listed) return 0;                                                                   \
        for (int h = 0; h < PARTS; ++h) {                                                        \
            tile_vec_##SUFFIX slot[SPARSE_TOP_SLOTS], none = (tile_vec_##SUFFIX){0};             \
            tile_vec_##SUFFIX at = none + (T)NAN, bt = none + (T)NAN, ua, db;                    \
            for (int end = 0; end < 2; ++end) {                                                  \
                if (depth[end] == 0.0) continue;                                                 \
                if (depth[end] <= 4) /* (two calls: each list's length a constant) */            \
                    sparse_tile_list_##SUFFIX(xt, n, h, end == 0, 4, slot);                      \
                else                                                                             \
                    sparse_tile_list_##SUFFIX(xt, n, h, end == 0, SPARSE_TOP_SLOTS, slot);       \
                memcpy(&ua, up[end] + h * WIDTH, sizeof ua);                                     \
                memcpy(&db, down[end] + h * WIDTH, sizeof db);                                   \
                for (int j = 0; j < SPARSE_TOP_SLOTS; ++j) {                                     \
                    at = tile_select_##SUFFIX(ua == (T)j, slot[j], at);                          \
                    bt = tile_select_##SUFFIX(db == (T)j, slot[j], bt);                          \
                }                                                                                \
            }                                                                                    \
            memcpy(a + h * WIDTH, &at, sizeof at);                                               \
            memcpy(b + h * WIDTH, &bt, sizeof bt);                                               \
        }                                                                                        \
        return listed;                                                                           \
    }                                                                                            \
                                                                                                 \
    /* w = (x − top)·inv per lane of a transposed tile xt, in double (∓DBL_MAX where masked or   \
       +inf: finite, so that 0·w = 0 in the sums); Σ finite w per lane added to sum. */          \
    static inline void sparse_tile_w_##SUFFIX(const T *xt, int64_t n, const double *top,         \
                                              const double *inv, double *w, double *sum) {       \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            _Pragma("omp simd")                                                                  \
            for (int l = 0; l < SPARSE_LANES; ++l) {                                             \
                T v = xt[i * SPARSE_LANES + l];                                                  \
                int finite = v - v == 0;                                                         \
                double value = ((double)(finite ? v : (T)0) - top[l]) * inv[l];                  \
                w[i * SPARSE_LANES + l] = finite ? value : (v > (T)0 ? DBL_MAX : -DBL_MAX);      \
                sum[l] += finite ? value : 0.0;                                                  \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* w in float for the float passes of a float32 tile (∓FLT_MAX where masked or +inf),       \
       computed in float: their root is made exact by sparse_tile_exact, which sums w over F    \
       in double, computed from x itself (sparse_tile_w only for lanes sent back to the double  \
       passes); Σ finite w per lane in sum. */                                                   \
    static inline void sparse_tile_wf_##SUFFIX(const float *xt, int64_t n, const double *top,    \
                                               const double *inv, float *wf, float *sum) {       \
        float top_f[SPARSE_LANES], inv_f[SPARSE_LANES];                                          \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            top_f[l] = (float)top[l], inv_f[l] = (float)inv[l];                                  \
            sum[l] = 0;                                                                          \
        }                                                                                        \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            _Pragma("omp simd")                                                                  \
            for (int l = 0; l < SPARSE_LANES; ++l) {                                             \
                float v = xt[i * SPARSE_LANES + l];                                              \
                int finite = v - v == 0;                                                         \
                float value = ((finite ? v : 0.0f) - top_f[l]) * inv_f[l];                       \
                wf[i * SPARSE_LANES + l] = finite ? value : (v > 0.0f ? FLT_MAX : -FLT_MAX);     \
                sum[l] += finite ? value : 0.0f;                                                 \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* SPARSE_LANES rows of n ≤ SPARSE_TILE_N at once by sparse_tile_solve (+inf entries      \
       included): float32 tiles whose rows all span at most SPARSE_FLOAT_SPAN τ, one more     \
       than 2 τ, take the passes in float, then sparse_tile_exact (sorted ones too: from their \
       order-statistics bracket).  Lanes of budgets near 0 or n (sparse_tile_top), in          \
       tiles spanning more than τ that do not sort, start from the order statistics off        \
       sparse_tile_top (from the all-free root, 6–10 passes a tile of 64 entries; from the     \
       lists, 2–3).  The rows it does not take (NaN, budgets with nothing to solve, overflow)  \
       or solve go to sparse_row. */                                                           \
    static void sparse_tile_##SUFFIX(const T *x, T *out, int64_t n, const double *k,            \
                                     const double *tau, int32_t *status, double *cand) {        \
        T xt[SPARSE_TILE_N * SPARSE_LANES];                                                      \
        double w[SPARSE_TILE_N * SPARSE_LANES];                                                  \
        float wf[SPARSE_TILE_N * SPARSE_LANES]; /* (w in float: float32 tiles, in_float) */      \
        tile_gather_##SUFFIX(x, n, xt);                                                          \
        T high[SPARSE_LANES], low[SPARSE_LANES], count[SPARSE_LANES], nan[SPARSE_LANES];         \
        T plus_t[SPARSE_LANES];                                                                  \
        for (int l = 0; l < SPARSE_LANES; ++l)                                                   \
            high[l] = (T)-INFINITY, low[l] = (T)INFINITY, count[l] = nan[l] = plus_t[l] = 0;     \
        for (int64_t i = 0; i < n; ++i) {                                                        \
            _Pragma("omp simd")                                                                  \
            for (int l = 0; l < SPARSE_LANES; ++l) {                                             \
                T v = xt[i * SPARSE_LANES + l];                                                  \
                int finite = v - v == 0;                                                         \
                T up_v = finite ? v : (T)-INFINITY, down_v = finite ? v : (T)INFINITY;           \
                high[l] = up_v > high[l] ? up_v : high[l];                                       \
                low[l] = down_v < low[l] ? down_v : low[l];                                      \
                count[l] += (T)finite;                                                           \
                nan[l] += (T)(v != v);                                                           \
                plus_t[l] += (T)(v == (T)INFINITY);                                              \
            }                                                                                    \
        }                                                                                        \
        double top[SPARSE_LANES], inv[SPARSE_LANES], lo[SPARSE_LANES], live[SPARSE_LANES];       \
        double sum[SPARSE_LANES], t[SPARSE_LANES], plus[SPARSE_LANES];                           \
        int go[SPARSE_LANES], taken[SPARSE_LANES];                                               \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            top[l] = (double)high[l];                                                            \
            inv[l] = 1.0 / tau[l];                                                               \
            live[l] = (double)count[l];                                                          \
            plus[l] = (double)plus_t[l]; /* (+inf entries: always in U, k − plus to share) */    \
            lo[l] = ((double)low[l] - top[l]) * inv[l] - 1.0;                                    \
            go[l] = nan[l] == 0 && k[l] - plus[l] > 0.0 && k[l] - plus[l] < live[l] &&           \
                    lo[l] >= -1.0 - SPARSE_PIVOT_SPAN; /* (wider: sparse_row's pivot) */         \
            taken[l] = go[l];                                                                    \
            if (!go[l]) top[l] = 0.0, inv[l] = 0.0, lo[l] = -1.0, live[l] = 1.0, plus[l] = 0.0;  \
            sum[l] = 0.0;                                                                        \
        }                                                                                        \
        double order_lo[SPARSE_LANES], order_hi[SPARSE_LANES];                                   \
        int wide = 0, near = 0; /* (see SPARSE_SORT_WIDE) */                                     \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            wide |= go[l] && lo[l] + 1.0 < -SPARSE_SORT_WIDE;                                    \
            near |= go[l] && lo[l] + 1.0 < -SPARSE_SORT_NEAR;                                    \
        }                                                                                        \
        for (int l = 0; near && !wide && l < SPARSE_LANES; ++l) { /* (budgets near 0 or live) */ \
            double budget = k[l] - plus[l], edge = SPARSE_SORT_SHARE * live[l];                  \
            near &= !go[l] || budget <= edge || budget >= live[l] - edge;                        \
        }                                                                                        \
        const int sorted = (wide || near) && n <= SORT_N && sizeof(T) == sizeof(float);          \
        /* float passes (from the all-free start or the sorted bracket), then the exact pass */  \
        int in_float = sizeof(T) == sizeof(float), spans = 0;                                    \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            in_float &= !go[l] || lo[l] >= -SPARSE_FLOAT_SPAN;                                   \
            spans |= go[l] && lo[l] < -2.0;                                                      \
        }                                                                                        \
        in_float &= spans;                                                                       \
        /* (two calls: each loop with or without the float copy) */                             \
        float sum_f[SPARSE_LANES]; /* (float32 tiles: w in float only, see sparse_tile_exact) */ \
        if (in_float) sparse_tile_wf_##SUFFIX((const float *)xt, n, top, inv, wf, sum_f);        \
        else sparse_tile_w_##SUFFIX(xt, n, top, inv, w, sum);                                    \
        /* (tiles that span more than τ and do not sort, of more than SORT_N entries or in      \
           float64: budgets near 0 or n from a list of the extreme entries) */                   \
        T a[SPARSE_LANES], b[SPARSE_LANES];                                                      \
        const int listed = !sorted && spans && (n > SORT_N || sizeof(T) == sizeof(double)) &&    \
                           sparse_tile_top_##SUFFIX(xt, n, k, go, a, b);                         \
        if (sorted) sparse_tile_order_##SUFFIX(xt, n, k, go, a, b);                              \
        if (sorted || listed) /* w_(⌈k⌉) and w_(⌊k⌋+1) − 1, as w is computed (NaN: none) */     \
            for (int l = 0; l < SPARSE_LANES; ++l) {                                             \
                order_hi[l] = go[l] ? ((double)a[l] - top[l]) * inv[l] : 0.0;                    \
                order_lo[l] = go[l] ? ((double)b[l] - top[l]) * inv[l] - 1.0 : -1.0;             \
            }                                                                                    \
        if (in_float) { /* (float32 tiles: float passes, then the exact pass) */                 \
            float kf[SPARSE_LANES], lof[SPARSE_LANES], livef[SPARSE_LANES], plusf[SPARSE_LANES];  \
            float sumf[SPARSE_LANES], tf[SPARSE_LANES], hif[SPARSE_LANES], lowf[SPARSE_LANES];   \
            for (int l = 0; l < SPARSE_LANES; ++l) {                                             \
                kf[l] = (float)k[l], lof[l] = (float)lo[l], livef[l] = (float)live[l];           \
                plusf[l] = (float)plus[l], sumf[l] = sum_f[l];                                   \
                hif[l] = (float)order_hi[l], lowf[l] = (float)order_lo[l];                       \
            }                                                                                    \
            sparse_tile_solve_f32(wf, n, kf, lof, livef, plusf, sumf, NULL, listed || sorted ? lowf : NULL, \
                                  hif, tf, go);                                                  \
            for (int l = 0; l < SPARSE_LANES; ++l) t[l] = tf[l];                                 \
            sparse_tile_exact((const float *)xt, wf, n, top, inv, k, lo, t, go);                \
            int again = 0;                                                                       \
            for (int l = 0; l < SPARSE_LANES; ++l) again += go[l] = go[l] && taken[l];           \
            if (again) { /* (w in double now: the double passes from t) */                       \
                COUNT_EVENTS(sparse_tile_retries, again);                                        \
                sparse_tile_w_##SUFFIX(xt, n, top, inv, w, sum);                                 \
                sparse_tile_solve_f64(w, n, k, lo, live, plus, sum, t, NULL, NULL, t, go);       \
            }                                                                                    \
        } else {                                                                                 \
            /* lanes whose finite entries all lie free at the all-free root are solved by it     \
               (the root the passes would take, (Σw + |U| − k)/|F| with the same Σw) */          \
            int left = 0;                                                                        \
            for (int l = 0; l < SPARSE_LANES; ++l) {                                             \
                double root = (sum[l] + plus[l] - k[l]) / live[l];                               \
                double bottom = ((double)low[l] - top[l]) * inv[l]; /* (the least w) */          \
                int free = go[l] && root > -1.0 && bottom > root;                                \
                t[l] = free ? root : t[l];                                                       \
                go[l] = go[l] && !free;                                                          \
                left += go[l];                                                                   \
            }                                                                                    \
            if (left)                                                                            \
                sparse_tile_solve_f64(w, n, k, lo, live, plus, sum, NULL,                        \
                                      sorted || listed ? order_lo : NULL, order_hi, t, go);      \
        }                                                                                        \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            if (!taken[l] || go[l]) {                                                            \
                if (taken[l]) COUNT_EVENTS(sparse_tile_fallbacks, 1);                            \
                status[l] = sparse_row_##SUFFIX(x + l * n, out + l * n, n, k[l], tau[l], cand);  \
                continue;                                                                        \
            }                                                                                    \
            /* p row by row from x, in T as sparse_row: no transposition back */                 \
            sparse_finish_##SUFFIX(x + l * n, out + l * n, n, k[l] - plus[l], top[l], inv[l],    \
                                   t[l], lo[l] < -SPARSE_WRITE_SPAN);                            \
            status[l] = 0;                                                                       \
        }                                                                                        \
    }

#define SPARSE_TILE_N 64 /* rows this short are solved SPARSE_LANES at a time, one per lane */
#define SPARSE_LANES 8
#define SPARSE_VJP_TILE_N 128 /* rows this short are differentiated SPARSE_LANES at a time */

/* The short-row tiles' passes: in double, and in float for float32 tiles (then
   sparse_tile_exact). */
#define DEFINE_SPARSE_TILE_SOLVE(T, SUFFIX, EPS)                                                 \
    /* sparse_stats for the lanes of a tile: |U|, |F| and Σ_F w at at[h] per lane, the counts  \
       as integer mask sums and Σ_F w as a sum of masked entries (no conversions per entry),    \
       each in PARTS vectors of WIDTH lanes (SPARSE_LANES in all). */                           \
    static void sparse_tile_stats_##SUFFIX(const T *w, int64_t n, const tile_vec_##SUFFIX *at,  \
                                           tile_vec_##SUFFIX *upper, tile_vec_##SUFFIX *count,  \
                                           tile_vec_##SUFFIX *total) {                          \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T), PARTS = SPARSE_LANES / WIDTH };    \
        tile_mask_##SUFFIX up_count[PARTS], free_count[PARTS];                                   \
        for (int h = 0; h < PARTS; ++h) {                                                        \
            total[h] = at[h] * 0;                                                                \
            up_count[h] = free_count[h] = (tile_mask_##SUFFIX){0};                               \
        }                                                                                        \
        for (int64_t i = 0; i < n; ++i)                                                          \
            for (int h = 0; h < PARTS; ++h) {                                                    \
                tile_vec_##SUFFIX v;                                                             \
                memcpy(&v, w + i * SPARSE_LANES + h * WIDTH, sizeof v);                          \
                tile_mask_##SUFFIX up = v - at[h] >= 1, free = (v > at[h]) & ~up; /* (−1) */     \
                up_count[h] -= up;                                                               \
                free_count[h] -= free;                                                           \
                total[h] += (tile_vec_##SUFFIX)((tile_mask_##SUFFIX)v & free);                   \
            }                                                                                    \
        for (int h = 0; h < PARTS; ++h) {                                                        \
            upper[h] = __builtin_convertvector(up_count[h], tile_vec_##SUFFIX);                  \
            count[h] = __builtin_convertvector(free_count[h], tile_vec_##SUFFIX);                \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* One active-set step of sparse_tile_solve for a vector of lanes (sparse_step's, with      \
       selects for its branches), from the stats at *at: the bracket [*lo, *hi] and its masses,  \
       the next *at, and *active cleared where the lane is solved.  Returns *active (1: not      \
       solved yet). */                                                                           \
    static inline tile_vec_##SUFFIX sparse_tile_step_##SUFFIX(                                   \
        tile_vec_##SUFFIX u, tile_vec_##SUFFIX c, tile_vec_##SUFFIX s, tile_vec_##SUFFIX k,      \
        tile_vec_##SUFFIX *at, tile_vec_##SUFFIX *lo, tile_vec_##SUFFIX *hi,                     \
        tile_vec_##SUFFIX *mass_lo, tile_vec_##SUFFIX *mass_hi, tile_vec_##SUFFIX *active) {     \
        const tile_vec_##SUFFIX zero = u * 0, one = zero + 1, t = *at;                           \
        tile_vec_##SUFFIX mass = u + s - c * t;                                                  \
        tile_mask_##SUFFIX above = mass >= k, below = mass <= k, some = c > 0;                   \
        tile_vec_##SUFFIX low = tile_select_##SUFFIX(above, t, *lo);                             \
        tile_vec_##SUFFIX high = tile_select_##SUFFIX(below, t, *hi);                            \
        tile_vec_##SUFFIX m_low = tile_select_##SUFFIX(above, mass, *mass_lo);                   \
        tile_vec_##SUFFIX m_high = tile_select_##SUFFIX(below, mass, *mass_hi);                  \
        *lo = low, *hi = high, *mass_lo = m_low, *mass_hi = m_high;                              \
        tile_vec_##SUFFIX step = (s + u - k) / tile_select_##SUFFIX(some, c, one);               \
        tile_vec_##SUFFIX gap = step - t, scale = tile_select_##SUFFIX(t < 0, -t, t) + 1;        \
        gap = tile_select_##SUFFIX(gap < 0, -gap, gap);                                          \
        tile_mask_##SUFFIX stable = some & (gap <= 2 * (EPS) * scale);                           \
        tile_mask_##SUFFIX inside = some & (step > low) & (step < high);                         \
        tile_vec_##SUFFIX width = m_low - m_high;                                                \
        width = tile_select_##SUFFIX(width > (T)1e-30, width, zero + (T)1e-30);                  \
        tile_vec_##SUFFIX share = (m_low - k) / width;                                           \
        share = tile_select_##SUFFIX(share < (T)0.25, zero + (T)0.25,                            \
                                     tile_select_##SUFFIX(share > (T)0.75, zero + (T)0.75,     \
                                                          share));                               \
        tile_vec_##SUFFIX bisect = low + share * (high - low);                                   \
        tile_vec_##SUFFIX next = tile_select_##SUFFIX(inside, step, bisect);                     \
        next = tile_select_##SUFFIX(stable, step, tile_select_##SUFFIX(mass == k, t, next));      \
        tile_mask_##SUFFIX solved = stable | (mass == k);                                        \
        *at = tile_select_##SUFFIX(*active > 0, next, t);                                        \
        *active = tile_select_##SUFFIX(solved, zero, *active);                                   \
        return *active;                                                                          \
    }                                                                                            \
                                                                                                 \
    /* Active-set Newton for SPARSE_LANES short rows at once, one row per vector lane (the       \
       per-row costs of short rows, reductions and the step's branches, are shared): the steps   \
       of sparse_step, branch-free across lanes, from start_at[l] when given, else from the      \
       all-free root or, given order_lo and order_hi, from the order-statistics bracket          \
       (order_lo[l], order_hi[l]].  w[i·LANES + l] holds w_i of lane l (T's −max where masked,  \
       +max at +inf: finite, so that a zero mask times it is zero); k, lo, live, plus (the +inf  \
       entries, always in U) and sum (Σ finite w) per lane.  Lanes with go[l] = 0 are left       \
       alone.  On return t[l] holds the root where go[l] was cleared; a lane still at go[l] = 1  \
       did not converge. */                                                                      \
    static void sparse_tile_solve_##SUFFIX(const T *w, int64_t n, const T *k, const T *lo_in,    \
                                           const T *live, const T *plus, const T *sum,           \
                                           const T *start_at, const T *order_lo,                 \
                                           const T *order_hi, T *t, int *go) {                   \
        T lo[SPARSE_LANES], hi[SPARSE_LANES], mass_lo[SPARSE_LANES], mass_hi[SPARSE_LANES];      \
        T at[SPARSE_LANES], active[SPARSE_LANES];                                                \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            lo[l] = lo_in[l];                                                                    \
            hi[l] = 0;                                                                           \
            mass_lo[l] = live[l] + plus[l];                                                      \
            mass_hi[l] = plus[l];                                                                \
            T start = start_at ? start_at[l] : (sum[l] - (k[l] - plus[l])) / live[l];            \
            at[l] = start > lo[l] ? (start < 0 ? start : 0) : lo[l]; /* (all-free root) */       \
            active[l] = go[l] ? 1 : 0;                                                           \
        }                                                                                        \
        for (int l = 0; order_lo && l < SPARSE_LANES; ++l) {                                     \
            if (!go[l] || order_lo[l] != order_lo[l] || order_hi[l] != order_hi[l])              \
                continue; /* (NaN: no order statistics) */                                       \
            /* the order-statistics bracket (b − 1, a], and a start at the all-free root if it   \
               lies inside, else at the root where a and b alone are free (a − (k − ⌊k⌋) when    \
               a = b) */                                                                         \
            T up = (T)floor((double)k[l]), share = k[l] - up, low = order_lo[l];                 \
            T high = order_hi[l], start = share > 0 ? high - share : (T)0.5 * (low + high);      \
            if (low > lo[l]) lo[l] = low, mass_lo[l] = up + 1;                                   \
            if (high < hi[l]) hi[l] = high, mass_hi[l] = (T)ceil((double)k[l]) - 1;              \
            start = at[l] > lo[l] && at[l] < hi[l] ? at[l] : start;                              \
            at[l] = start > lo[l] ? (start < hi[l] ? start : hi[l]) : lo[l];                     \
        }                                                                                        \
        enum { WIDTH = sizeof(tile_vec_##SUFFIX) / sizeof(T), PARTS = SPARSE_LANES / WIDTH };    \
        tile_vec_##SUFFIX atv[PARTS], lov[PARTS], hiv[PARTS], mlo[PARTS], mhi[PARTS];           \
        tile_vec_##SUFFIX act[PARTS], kv[PARTS];                                                 \
        memcpy(atv, at, sizeof atv);                                                             \
        memcpy(lov, lo, sizeof lov);                                                             \
        memcpy(hiv, hi, sizeof hiv);                                                             \
        memcpy(mlo, mass_lo, sizeof mlo);                                                        \
        memcpy(mhi, mass_hi, sizeof mhi);                                                        \
        memcpy(act, active, sizeof act);                                                         \
        memcpy(kv, k, sizeof kv);                                                                \
        for (int pass = 0; pass < SPARSE_MAX_PASSES; ++pass) {                                   \
            tile_vec_##SUFFIX u[PARTS], c[PARTS], s[PARTS], pending = atv[0] * 0;                \
            sparse_tile_stats_##SUFFIX(w, n, atv, u, c, s);                                      \
            for (int h = 0; h < PARTS; ++h)                                                      \
                pending += sparse_tile_step_##SUFFIX(u[h], c[h], s[h], kv[h], &atv[h], &lov[h],  \
                                                     &hiv[h], &mlo[h], &mhi[h], &act[h]);        \
            if (!tile_any_##SUFFIX(pending != 0)) break;                                         \
        }                                                                                        \
        memcpy(at, atv, sizeof atv);                                                             \
        memcpy(active, act, sizeof act);                                                         \
        for (int l = 0; l < SPARSE_LANES; ++l) {                                                 \
            t[l] = at[l];                                                                        \
            go[l] = active[l] > 0;                                                               \
        }                                                                                        \
    }

DEFINE_SPARSE_KERNELS(float, f32)
DEFINE_SPARSE_KERNELS(double, f64)

TILE_CODE_BEGIN
DEFINE_SPARSE_TILE_SOLVE(float, f32, FLT_EPSILON)
DEFINE_SPARSE_TILE_SOLVE(double, f64, DBL_EPSILON)

/* For sparse_tile_exact: the unsigned minimum of two vectors of 32-bit words; WIDTH (4) floats
   from p widened to doubles; half h (lanes 4h…4h + 3) of a float mask widened to a double
   mask (AVX2's single instructions for these, else generic vector code). */
typedef uint32_t tile_bits_f32 __attribute__((vector_size(32)));
static inline tile_bits_f32 tile_umin(tile_bits_f32 a, tile_bits_f32 b) {
#if defined(__AVX2__)
    return (tile_bits_f32)_mm256_min_epu32((__m256i)a, (__m256i)b);
#else
    return (tile_bits_f32)((tile_mask_f32)a & (tile_mask_f32)(a < b)) |
           (tile_bits_f32)((tile_mask_f32)b & ~(tile_mask_f32)(a < b));
#endif
}
static inline tile_vec_f64 widen_f32(const float *p) {
#if defined(__AVX__)
    return (tile_vec_f64)_mm256_cvtps_pd(_mm_loadu_ps(p));
#else
    return (tile_vec_f64){p[0], p[1], p[2], p[3]};
#endif
}
static inline tile_mask_f64 widen_mask_f32(tile_mask_f32 m, int h) {
#if defined(__AVX2__)
    __m128i half = h ? _mm256_extracti128_si256((__m256i)m, 1) : _mm256_castsi256_si128((__m256i)m);
    return (tile_mask_f64)_mm256_cvtepi32_epi64(half);
#else
    return (tile_mask_f64){m[4 * h], m[4 * h + 1], m[4 * h + 2], m[4 * h + 3]};
#endif
}

/* sparse_tile_exact for lane l of the tile xt alone, in double throughout (w as sparse_tile_w
   computes it): |U|, |F| and Σ_F w at t, and the breakpoints of F nearest t on either side.
   Returns the exact root of the active set at t where it lies on t's piece of F (on a flat
   piece, |F| = 0 and |U| = k: t itself), else NaN. */
static double sparse_lane_exact(const float *xt, int64_t n, int l, double top, double inv,
                                double k, double t) {
    double u = 0.0, c = 0.0, s = 0.0, left = -DBL_MAX, right = DBL_MAX;
    for (int64_t i = 0; i < n; ++i) {
        double v = xt[i * SPARSE_LANES + l];
        v = v - v == 0 ? (v - top) * inv : (v > 0 ? DBL_MAX : -DBL_MAX);
        double v1 = v - 1.0;
        int up = v1 >= t, free = v > t && !up;
        u += up, c += free, s += free ? v : 0.0;
        /* t's piece: up, w − 1 bounds it on the right; free, w − 1 on the left and w on the
           right; down (w ≤ t), w on the left */
        double low = up ? left : (free ? v1 : v), high = up ? v1 : (free ? v : right);
        left = low > left ? low : left;
        right = high < right ? high : right;
    }
    double root = c > 0.0 ? (s + u - k) / c : t;
    return (c > 0.0 ? root >= left && root <= right : u == k) ? root : NAN;
}

/* float32 tiles take their passes in float (twice the lanes a vector), then this one pass: at
   each lane's float root t[l] (go[l] = 0) it classifies the entries by their float w (wf, as
   the float passes do: |U|, |F|), sums w over F in double (w = (x − top)·inv from the tile's
   entries xt, as sparse_tile_w computes it), and finds the breakpoints of F (w, and w − 1,
   where the active set changes) nearest t below and above it.  Where both lie further from t
   than the exact root of that active set, (Σ_F w + |U| − k)/|F|, does (plus float's rounding
   of w; scale: the lane's span |lo|), the classification in double at that root is the one in
   float at t: the root is the double solve's, and replaces t.  A lane on a flat piece of F
   (|F| = 0, |U| = k: every point of the piece is a root) keeps t, moved to the middle of the
   piece where t lies within rounding of its end.  Lanes with an entry that near a breakpoint
   are checked in double (sparse_lane_exact); a lane whose active set does not hold its root
   gets go[l] set again (the double passes take it). */
static void sparse_tile_exact(const float *xt, const float *wf, int64_t n, const double *top,
                              const double *inv, const double *k, const double *lo, double *t,
                              int *go) {
    enum { WIDTH = sizeof(tile_vec_f64) / sizeof(double), PARTS = SPARSE_LANES / WIDTH };
    tile_vec_f64 top_v[PARTS], inv_v[PARTS], sum[PARTS];
    memcpy(top_v, top, sizeof top_v);
    memcpy(inv_v, inv, sizeof inv_v);
    float at_f[SPARSE_LANES];
    for (int l = 0; l < SPARSE_LANES; ++l) at_f[l] = (float)t[l]; /* (t: a float root, exact) */
    tile_vec_f32 at;
    memcpy(&at, at_f, sizeof at);
    /* the distances from t to the breakpoints below and above it, as float bits compared
       unsigned: a negative distance (sign bit set) is larger than every other */
    const tile_mask_f32 sign = (tile_mask_f32){0} + INT32_MIN;
    tile_bits_f32 below = (tile_bits_f32){0} - 1, above = below;
    tile_mask_f32 up_count = {0}, free_count = {0};
    for (int h = 0; h < PARTS; ++h) sum[h] = top_v[h] * 0.0;
    for (int64_t i = 0; i < n; ++i) {
        tile_vec_f32 w;
        memcpy(&w, wf + i * SPARSE_LANES, sizeof w);
        /* a = t − w (−d of sparse_tile_stats, exactly), a₁ = t − (w − 1), d = −a, d₁ = d − 1 */
        tile_vec_f32 a = at - w, a1 = a + 1.0f;
        tile_vec_f32 d = (tile_vec_f32)((tile_mask_f32)a ^ sign), d1 = d - 1.0f;
        tile_mask_f32 up = a <= -1.0f, free = (a < 0.0f) & ~up; /* (as sparse_tile_stats) */
        up_count -= up;
        free_count -= free;
        /* below t: w where a ≥ +0 (down), w − 1 where a₁ > 0 (not up: a₁ = +0 is up, its
           bits less one are all ones); above t: w where d > 0, w − 1 where d₁ ≥ +0 (up) */
        below = tile_umin(below, tile_umin((tile_bits_f32)a, (tile_bits_f32)a1 - 1));
        above = tile_umin(above, tile_umin((tile_bits_f32)d, (tile_bits_f32)d1));
        for (int h = 0; h < PARTS; ++h) { /* Σ_F w in double, w as sparse_tile_w computes it */
            tile_vec_f64 v = widen_f32(xt + i * SPARSE_LANES + h * WIDTH);
            v = (v - top_v[h]) * inv_v[h]; /* (F: finite entries only) */
            sum[h] += (tile_vec_f64)((tile_mask_f64)v & widen_mask_f32(free, h));
        }
    }
    double s[SPARSE_LANES];
    float gap_below[SPARSE_LANES], gap_above[SPARSE_LANES];
    int32_t u[SPARSE_LANES], c[SPARSE_LANES];
    memcpy(s, sum, sizeof s);
    memcpy(gap_below, &below, sizeof gap_below); /* (all ones: NaN, none on that side) */
    memcpy(gap_above, &above, sizeof gap_above);
    memcpy(u, &up_count, sizeof u);
    memcpy(c, &free_count, sizeof c);
    for (int l = 0; l < SPARSE_LANES; ++l) {
        if (go[l]) continue;
        const double rounding = 8.0 * FLT_EPSILON * (fabs(lo[l]) + 2.0);
        double low = gap_below[l], high = gap_above[l], root = NAN;
        if (c[l] > 0) {
            root = (s[l] + (double)u[l] - k[l]) / (double)c[l];
            double margin = fabs(root - t[l]) + rounding;
            if (!(low > margin && high > margin)) /* (an entry near a breakpoint) */
                root = sparse_lane_exact(xt, n, l, top[l], inv[l], k[l], t[l]);
        } else if ((double)u[l] == k[l]) { /* (a flat piece) */
            root = low > rounding && high > rounding ? t[l] : t[l] + 0.5 * (high - low);
            if (!(low + high > 4.0 * rounding)) /* (too narrow for float to tell) */
                root = sparse_lane_exact(xt, n, l, top[l], inv[l], k[l], t[l]);
        }
        t[l] = root == root ? root : t[l];
        go[l] = root != root;
    }
}

DEFINE_SPARSE_TILE_KERNELS(float, f32)
DEFINE_SPARSE_TILE_KERNELS(double, f64)
TILE_CODE_END

typedef struct {
    int op; /* 0 solve f32, 1 solve f64, 2 vjp f32, 3 vjp f64 */
    const void *a, *b;
    void *out, *aux; /* aux: int32 status (solves) or the per-row mean_F g (vjps) */
    const double *budgets, *taus; /* per-row k and τ, or NULL */
    int64_t row_begin, row_end, n;
    double k, tau;
    int64_t unsolved; /* solves: rows of this job left with a nonzero status */
} SparseJob;

static void sparse_run_rows(const SparseJob *job) {
    double *scratch = NULL;
    if (job->op < 2 && !(scratch = malloc((size_t)(job->n > 0 ? job->n : 1) * sizeof(double)))) {
        for (int64_t row = job->row_begin; row < job->row_end; ++row) ((int32_t *)job->aux)[row] = 3;
        return;
    }
    int64_t row = job->row_begin;
    if (job->op >= 2 && job->n <= SPARSE_VJP_TILE_N) { /* short rows: LANES at a time */
        for (; row + SPARSE_LANES <= job->row_end; row += SPARSE_LANES) {
            double inv[SPARSE_LANES];
            for (int l = 0; l < SPARSE_LANES; ++l)
                inv[l] = 1.0 / (job->taus ? job->taus[row + l] : job->tau);
            int64_t offset = row * job->n;
            if (job->op == 2)
                sparse_vjp_tiles_f32((const float *)job->a + offset,
                                    (const float *)job->b + offset, (float *)job->out + offset,
                                    (float *)job->aux + row, job->n, inv);
            else
                sparse_vjp_tiles_f64((const double *)job->a + offset,
                                    (const double *)job->b + offset,
                                    (double *)job->out + offset, (double *)job->aux + row,
                                    job->n, inv);
        }
    }
    if (job->op < 2 && job->n <= SPARSE_TILE_N && SOLVE_TILES) { /* (SPARSE_LANES at a time) */
        for (; row + SPARSE_LANES <= job->row_end; row += SPARSE_LANES) {
            double ks[SPARSE_LANES], taus[SPARSE_LANES];
            for (int l = 0; l < SPARSE_LANES; ++l) {
                ks[l] = job->budgets ? job->budgets[row + l] : job->k;
                taus[l] = job->taus ? job->taus[row + l] : job->tau;
            }
            int64_t offset = row * job->n;
            int32_t *status = (int32_t *)job->aux + row;
            if (job->op == 0)
                sparse_tile_f32((const float *)job->a + offset, (float *)job->out + offset,
                                job->n, ks, taus, status, scratch);
            else
                sparse_tile_f64((const double *)job->a + offset, (double *)job->out + offset,
                                job->n, ks, taus, status, scratch);
        }
    }
    for (; row < job->row_end; ++row) {
        int64_t offset = row * job->n;
        double k = job->budgets ? job->budgets[row] : job->k;
        double tau = job->taus ? job->taus[row] : job->tau;
        switch (job->op) {
        case 0:
            ((int32_t *)job->aux)[row] = sparse_row_f32((const float *)job->a + offset,
                (float *)job->out + offset, job->n, k, tau, scratch);
            break;
        case 1:
            ((int32_t *)job->aux)[row] = sparse_row_f64((const double *)job->a + offset,
                (double *)job->out + offset, job->n, k, tau, scratch);
            break;
        case 2:
            ((float *)job->aux)[row] = (float)sparse_vjp_row_f32((const float *)job->a + offset,
                (const float *)job->b + offset, (float *)job->out + offset, job->n, 1.0 / tau);
            break;
        default:
            ((double *)job->aux)[row] = sparse_vjp_row_f64((const double *)job->a + offset,
                (const double *)job->b + offset, (double *)job->out + offset, job->n, 1.0 / tau);
        }
    }
    free(scratch);
}

/* A job's rows, then how many of a solve's it left unsolved. */
static void sparse_run_job(SparseJob *job) {
    sparse_run_rows(job);
    job->unsolved = job->op < 2 ? count_unsolved(job->aux, job->row_begin, job->row_end) : 0;
}

#ifndef _OPENMP
static void *sparse_thread_main(void *arg) {
    sparse_run_job((SparseJob *)arg);
    return NULL;
}
#endif

/* Runs the rows in up to `threads` jobs; returns, for a solve, the number of rows left with a
   nonzero status (0: every row solved, the caller need not read the statuses). */
static int64_t sparse_run_parallel(SparseJob base, int64_t rows, int threads) {
    int64_t useful = (rows * base.n) / MIN_ELEMENTS_PER_THREAD;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > useful) threads = (int)useful;
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    SparseJob jobs[MAX_THREADS];
    for (int j = 0; j < threads; ++j) {
        jobs[j] = base;
        jobs[j].row_begin = rows * j / threads;
        jobs[j].row_end = rows * (j + 1) / threads;
    }
    if (threads == 1) {
        sparse_run_job(&jobs[0]);
        return jobs[0].unsolved;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int j = 0; j < threads; ++j) sparse_run_job(&jobs[j]);
#else
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS];
    for (int j = 1; j < threads; ++j)
        started[j] = pthread_create(&handles[j], NULL, sparse_thread_main, &jobs[j]) == 0;
    sparse_run_job(&jobs[0]);
    for (int j = 1; j < threads; ++j) {
        if (started[j])
            pthread_join(handles[j], NULL);
        else
            sparse_run_job(&jobs[j]);
    }
#endif
    int64_t unsolved = 0;
    for (int j = 0; j < threads; ++j) unsolved += jobs[j].unsolved;
    return unsolved;
}

int64_t gradkit_sparse_solve(int is_double, const void *x, void *out, int32_t *status,
                             int64_t rows, int64_t n, double k, const double *budgets, double tau,
                             const double *taus, int threads) {
    SparseJob job = {is_double ? 1 : 0, x, NULL, out, status, budgets, taus, 0, rows, n, k, tau};
    return sparse_run_parallel(job, rows, threads);
}

int64_t gradkit_sparse_vjp(int is_double, const void *grad, const void *p, void *out, void *mean,
                           int64_t rows, int64_t n, double tau, const double *taus, int threads) {
    SparseJob job = {is_double ? 3 : 2, grad, p, out, mean, NULL, taus, 0, rows, n, 0.0, tau};
    return sparse_run_parallel(job, rows, threads);
}

/* For the tests: per row of x (n ≤ SPARSE_TILE_N entries, budgets k), the order statistics that
   sparse_tile_top reads off its lists (the ⌈k⌉-th and (⌊k⌋+1)-th largest entries) in a and b,
   NaN for budgets it does not list, SPARSE_LANES rows at a time; rows past the last whole tile
   are not written.  Returns 1 (nothing written) for n out of range. */
#define DEFINE_ORDER_TILE(T, SUFFIX)                                                             \
    static void order_tile_##SUFFIX(const T *x, const double *k, T *a, T *b, int64_t n) {        \
        T xt[SPARSE_TILE_N * SPARSE_LANES];                                                      \
        int go[SPARSE_LANES];                                                                    \
        for (int l = 0; l < SPARSE_LANES; ++l) go[l] = 1;                                        \
        tile_gather_##SUFFIX(x, n, xt);                                                          \
        if (!sparse_tile_top_##SUFFIX(xt, n, k, go, a, b))                                       \
            for (int l = 0; l < SPARSE_LANES; ++l) a[l] = b[l] = (T)NAN;                         \
    }

DEFINE_ORDER_TILE(float, f32)
DEFINE_ORDER_TILE(double, f64)

int gradkit_order_tiles(int is_double, const void *x, const double *k, void *a, void *b,
                        int64_t rows, int64_t n) {
    if (n < 1 || n > SPARSE_TILE_N) return 1;
    for (int64_t row = 0; row + SPARSE_LANES <= rows; row += SPARSE_LANES) {
        if (is_double)
            order_tile_f64((const double *)x + row * n, k + row, (double *)a + row,
                           (double *)b + row, n);
        else
            order_tile_f32((const float *)x + row * n, k + row, (float *)a + row,
                           (float *)b + row, n);
    }
    return 0;
}
/* ================================================================== end of sparse_topk */
