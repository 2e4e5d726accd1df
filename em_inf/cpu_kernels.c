/*
 * Fused EM-INF on CPU: both modes over a [rows, vocab] float32 batch, in place.
 *
 * Built by em_inf/cpu_build.py with the system C compiler (GCC 12 or later, or
 * clang: -O3 -march=native -fno-math-errno -ffp-contract=fast -fopenmp, never
 * -ffast-math: masked logits are -inf and must stay so) and called through ctypes
 * by em_inf/cpu_backend.py. No Python or torch headers: the compile takes about a
 * second. Vectors are GCC vector extensions (one source for AVX-512, AVX2, NEON),
 * with x86 intrinsics where the generic code compiles slowly (max and min, and on
 * AVX-512 the exp's scaling and the widening to double).
 *
 * Layout of the work
 * ------------------
 * A row is cut into chunks of about CHUNK logits (chunk_length). Every pass over
 * a row runs chunk by chunk; each chunk reduces into its own Partial in a fixed
 * lane order, and a row's Partials are combined in chunk order. The chunks depend
 * on the vocabulary size alone, so a row's bits never depend on the batch, on the
 * thread count or on which thread ran which chunk (batch invariance).
 *
 * Rows go one per thread while there are at least as many rows as threads; the
 * rows left over are processed one after another by all threads together
 * ("split": the chunks of one row shared out, an OpenMP barrier after each pass,
 * every thread combining the same Partials into the same row scalars). In logits
 * mode every row is split where that lets each thread's share of the update's
 * rows fit in its L2 (split_for_l2).
 *
 * Logits mode, per row and Adam step t (g = q (E_q[z] - z) + kl (q - p0)):
 *   update pass: reads z, e = exp(z - M) of the previous statistics pass, m, v
 *                (and p0 when kl != 0); writes z, m, v (step 1: z, m; step 2
 *                reads no v); tracks max(z).
 *   stats pass:  reads z, writes e = exp(z - M), sums e and e (z - M) in double.
 * so two passes and one exp per logit and step (docs/cost-model.md has each pass
 * against its floors). On Zen 4 both are bound by arithmetic, not memory (the time
 * per logit is the same whether the row fits in L2 or not), so the scratch, five
 * float rows (3 MB per thread at V = 151,936), may live in L3: the update by its
 * square root and division (16 cycles per 16 logits in the divider), the
 * statistics pass by the exp's FMAs; fusing the two (bench/kernel_variants/)
 * measured no faster. On an Intel Xeon the divider is slower (an Intel build takes
 * the root from an estimate, see vroot) and the updates wait on memory beyond L2
 * (hence split_for_l2). The first statistics pass also keeps a copy of the row,
 * from which the fail-safe restores it exactly.
 *
 * Temperature mode, per row: Halley's method on u = log(1/T), safeguarded by a
 * bracket; one read of the row per solver pass for sum exp(b zs) zs^j, j = 0..3
 * (zs = z - max z, b = 1/T as float32; the entropy's sums, j = 0, 1, in double,
 * the slope's and curvature's in float), then one pass writing z * b.
 *
 * Masked logits are those <= MASKED_AT (-inf, finfo(float32).min, ...): their
 * probability is exactly 0 and they keep their input value.
 *
 * Counting (stats given; em_inf/counters.py has the layout): every processed row
 * adds its entropy before (the first statistics pass / the solver's pass at T = 1)
 * and after, as fixed-point sums and bins. After: a row left alone keeps its
 * entropy; a logits-mode row that stopped below its threshold has it from its last
 * statistics pass; one that ran all its steps from its last update pass, which then
 * also accumulates the new logits' softmax statistics (online: per lane a shift,
 * raised when a new logit exceeds it; chunks combined in chunk order, so counts
 * are batch and thread invariant like the rows). That is one exp per logit more in
 * that pass: on a kernel bound by arithmetic it costs about one statistics pass
 * (logits mode, 3 steps, V = 151,936: about 15% more time; bench/latency.py
 * --counting). Temperature mode: the solver's evaluation at the 1/T applied (no
 * extra work). Without stats nothing of this runs.
 *
 * Entry points
 * ------------
 * Each function em_inf/cpu_backend.py calls is defined through ENTRY_POINT, which
 * also exports the text of its prototype as a string named after it:
 * em_inf_lanes_prototype is "int em_inf_lanes(void)". The prototype is written once,
 * here; cpu_backend.py declares the same prototypes, sets ctypes' argument types from
 * them, and refuses to load a library whose text differs in any argument's name or
 * type, or in a return type (a mismatch would otherwise pass the wrong bytes).
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

/* Lanes: one AVX-512 vector of floats, else 8 (one AVX2 vector; two NEON or SSE
 * vectors). With 16 lanes an AVX2 build splits every vector in two and, with 16
 * registers, spills most of a pass's constants to the stack: its exp pass ran 4.5x
 * slower than with 8 lanes. Reductions keep one accumulator per lane, so a row's
 * bits depend on the build (as on the compiler), never on the batch or threads. */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
/* Logits per chunk, about (chunk_length): enough chunks to share one row among
 * the threads of a larger machine, few enough that what each costs apart from its
 * logits (its Partial, the start of its loops) is nothing beside them. */
#define CHUNK 8192
/* A row of more than one chunk has a multiple of this many, so that a row split
 * among 2, 3 or 6 threads gives each the same share (chunk_length). 12 would also
 * even out 4 threads, but would cut V = 49,152 (SmolLM2; 6 chunks of 8,192 with 6,
 * as before) into 12 of 4,096: one thread read -1% to +5% there over three runs
 * (kernel_ab), inside its noise, and 6 leaves those rows as they were. */
#define EVEN_SHARES 6
/* Logits at or below this are masked. */
#define MASKED_AT (-1e37f)
/* exp of anything below this is returned as 0 (float32's normal range ends near
 * -87.34; the probabilities lost are below 1e-38 of the largest). */
#define EXP_FLOOR (-87.0f)
/* Temperature solver: most passes per row (bisection alone needs < 30 to reach
 * float32's resolution of 1/T from the widest bracket, [1e-4, 1e4]). */
#define TEMPERATURE_MAX_PASSES 60

/* Defines entry point `name` and exports its prototype's text as name##_prototype
 * (whitespace runs become one space): `ENTRY_POINT(int, f, (int n)) { ... }`. */
#define ENTRY_POINT(ret, name, params)                                          \
    const char *const name##_prototype = #ret " " #name #params;               \
    ret name params

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
/* Half a vf, widened to double: one AVX-512 vector of doubles. */
typedef double vd __attribute__((vector_size(LANES * 4)));
/* The same, at any address (rows of an odd vocabulary are not aligned). */
typedef float vf_any __attribute__((vector_size(LANES * 4), aligned(4), may_alias));

static inline vf load(const float *p) { return *(const vf_any *)p; }

static inline void store(float *p, vf x) { *(vf_any *)p = x; }

static inline vf splat(float x) { return (vf){0} + x; }

/* m ? a : b per lane (m: all ones or all zeros). */
static inline vf vselect(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* a > b ? a : b and a < b ? a : b per lane (b where either is NaN): what x86's
 * max and min instructions compute, which compilers do not emit for the select. */
#if defined(__AVX512F__) && LANES == 16
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }

static inline vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
#elif defined(__AVX__) && LANES == 8
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }

static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
#else
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }

static inline vf vmin(vf a, vf b) { return vselect(a < b, a, b); }
#endif

static inline vf vabs(vf x) { return (vf)((vi)x & 0x7FFFFFFF); }

/* The square root of the update's second moment. Correctly rounded by the divider
 * (vsqrtps), or, where the build defines EM_INF_SQRT_ESTIMATE (AVX-512 only; see
 * em_inf/cpu_build.py), by the 14-bit estimate and one Newton step on the FMA
 * units, within 1 ulp of it (87% of floats exact): h = x r ~ sqrt(x) for
 * r ~ 1/sqrt(x), then h + h (1 - h r) / 2. An Intel Xeon's divider takes 13
 * cycles per 512-bit square root and 11 per division, and a further step's update
 * waits on them (one thread: 56 cycles per 16 logits with the divider's root, 32
 * with the estimate); Zen 4's takes 10 and 6, and its one 512-bit FMA per cycle
 * makes the Newton step cost as much as it saves (docs/cost-model.md).
 * 0, -0, infinities and NaN pass through unchanged, as vsqrtps returns them for
 * the x >= 0 given here. */
#if defined(EM_INF_SQRT_ESTIMATE) && defined(__AVX512F__) && LANES == 16
#define FPCLASS_ZERO_INF_NAN 0x9F /* QNaN, +-0, +-inf, SNaN */
static inline vf vroot(vf x) {
    const vf r = (vf)_mm512_rsqrt14_ps((__m512)x);
    const vf h = x * r;
    const vf root = h + h * (0.5f - (h * 0.5f) * r);
    const __mmask16 special = _mm512_fpclass_ps_mask((__m512)x, FPCLASS_ZERO_INF_NAN);
    return (vf)_mm512_mask_mov_ps((__m512)root, special, (__m512)x);
}
#else
static inline vf vroot(vf x) {
    vf r;
    for (int j = 0; j < LANES; j++) r[j] = __builtin_sqrtf(x[j]);
    return r;
}
#endif

/* Per-lane double accumulators (two vector halves: a single 16-double vector
 * type would live in memory). */
typedef struct {
    vd lo, hi;
} Acc;

#if defined(__AVX512F__) && LANES == 16
/* The compiler's generic widening goes through 128-bit pieces; converting the two
 * 256-bit halves directly makes a statistics pass about 20% faster. */
static inline void acc_add(Acc *a, vf x) {
    const __m512 v = (__m512)x;
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    a->lo += (vd)_mm512_cvtps_pd(_mm512_castps512_ps256(v));
    a->hi += (vd)_mm512_cvtps_pd(high);
}
#else
#if LANES == 16
#define LOW_HALF 0, 1, 2, 3, 4, 5, 6, 7
#define HIGH_HALF 8, 9, 10, 11, 12, 13, 14, 15
#else
#define LOW_HALF 0, 1, 2, 3
#define HIGH_HALF 4, 5, 6, 7
#endif
static inline void acc_add(Acc *a, vf x) {
    a->lo += __builtin_convertvector(__builtin_shufflevector(x, x, LOW_HALF), vd);
    a->hi += __builtin_convertvector(__builtin_shufflevector(x, x, HIGH_HALF), vd);
}
#endif

static inline float hmax(vf x) {
    float m = x[0];
    for (int j = 1; j < LANES; j++) m = x[j] > m ? x[j] : m;
    return m;
}

static inline float hmin(vf x) {
    float m = x[0];
    for (int j = 1; j < LANES; j++) m = x[j] < m ? x[j] : m;
    return m;
}

static inline double acc_sum(Acc a) {
    double s = 0.0;
    for (int j = 0; j < LANES / 2; j++) s += a.lo[j];
    for (int j = 0; j < LANES / 2; j++) s += a.hi[j];
    return s;
}

static inline int hany(vi x) {
    int any = 0;
    for (int j = 0; j < LANES; j++) any |= x[j] != 0;
    return any;
}

/* -- exp ------------------------------------------------------------------------- */

/* exp(x) for x <= 0 (x = -inf allowed; NaN gives 0): x = k ln2 + r with
 * |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (relative error 2e-9 before
 * rounding; fitted for this file), times 2^k. Below EXP_FLOOR the result is 0.
 * Accurate to about 2 ulp. */
#define EXP_SHIFT 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer */
#define EXP_POLY(r)                                                              \
    ((((((r * 0.0013844391f + 0.0083741462f) * r + 0.041667990f) * r + 0.16666432f) * \
          r +                                                                    \
      0.49999994f) *                                                             \
         r +                                                                     \
     1.0f) * r +                                                                 \
     1.0f)
#if defined(__AVX512F__) && LANES == 16
/* With AVX-512 the scaling by 2^k (vscalefps) and the zeroing of the lanes below
 * EXP_FLOOR (a mask register) take one instruction, where the generic code below
 * needs six; the same k, r and polynomial, so the same results. exp_kept: exp(x)
 * in the lanes of `keep` (those where x > EXP_FLOOR, or fewer), 0 elsewhere. */
static inline vf exp_kept(vf x, __mmask16 keep) {
    const vf kf = (vf)_mm512_fmadd_ps((__m512)x, _mm512_set1_ps(1.44269504088896341f),
                                      _mm512_set1_ps(EXP_SHIFT)) -
                  EXP_SHIFT;
    vf r = x - kf * 0.693145751953125f; /* ln2 in two parts: k * hi is exact */
    r = r - kf * 1.428606765330187e-06f;
    return (vf)_mm512_maskz_scalef_ps(keep, (__m512)EXP_POLY(r), (__m512)kf);
}

/* The lanes of `lanes` where exp(x) is not 0. */
static inline __mmask16 exp_lanes(vf x, __mmask16 lanes) {
    return _mm512_mask_cmp_ps_mask(lanes, (__m512)x, _mm512_set1_ps(EXP_FLOOR), _CMP_GT_OQ);
}

static inline vf exp_nonpos(vf x) { return exp_kept(x, exp_lanes(x, 0xFFFF)); }

/* exp(x) for x <= 0, and *ex = exp(x) x: 0 where exp(x) is (x below EXP_FLOOR, or
 * -inf), by the exp's own mask instead of clamping x first. */
static inline vf exp_times(vf x, vf *ex) {
    const __mmask16 keep = exp_lanes(x, 0xFFFF);
    const vf e = exp_kept(x, keep);
    *ex = (vf)_mm512_maskz_mul_ps(keep, (__m512)e, (__m512)x);
    return e;
}
#else
static inline vf exp_nonpos(vf x) {
    vi keep = x > EXP_FLOOR;
    vf xc = vselect(keep, x, splat(EXP_FLOOR));
    vf kf = xc * 1.44269504088896341f + EXP_SHIFT;
    vi kbits = (vi)kf;
    kf -= EXP_SHIFT;
    vf r = xc - kf * 0.693145751953125f; /* ln2 in two parts: k * hi is exact */
    r = r - kf * 1.428606765330187e-06f;
    vi sbits = (kbits - (0x4B400000 - 127)) << 23; /* 2^k, k in [-126, 0] for x <= 0 */
    return (vf)((vi)(EXP_POLY(r) * (vf)sbits) & keep);
}

static inline vf exp_times(vf x, vf *ex) {
    const vf xc = vmax(x, splat(-FLT_MAX)); /* -inf: 0 * -inf would be NaN */
    const vf e = exp_nonpos(xc);
    *ex = e * xc;
    return e;
}
#endif

/* z - m with -inf (and overflow) clamped to -FLT_MAX, so that 0 * zs stays 0. */
static inline vf shifted(vf z, float m) { return vmax(z - m, splat(-FLT_MAX)); }

/* -- partials -------------------------------------------------------------------- */

typedef struct {
    double sum_e;   /* sum of exp(.) */
    double sum_ez;  /* sum of exp(.) * zs */
    double sum_ez2; /* sum of exp(.) * zs^2 (temperature mode) */
    double sum_ez3; /* sum of exp(.) * zs^3 (temperature mode) */
    float max;      /* largest logit (scan), largest new logit (update) */
    float min;      /* smallest unmasked logit (scan for the temperature mode) */
    float shift;    /* counted last update: the shift of sum_e and sum_ez */
    int32_t count;  /* temperature passes: logits at the max */
    int32_t bad;    /* scan: NaN or +inf seen; update: a non-finite result */
} Partial;

static inline int64_t padded(int64_t vocab) { return (vocab + LANES - 1) / LANES * LANES; }

static inline void partial_init(Partial *p) {
    p->sum_e = p->sum_ez = p->sum_ez2 = p->sum_ez3 = 0.0;
    p->max = -INFINITY;
    p->min = INFINITY;
    p->shift = -INFINITY;
    p->count = 0;
    p->bad = 0;
}

/* Combine a row's chunk Partials in chunk order. */
static Partial combine(const Partial *parts, int64_t n) {
    Partial total;
    partial_init(&total);
    for (int64_t c = 0; c < n; c++) {
        total.sum_e += parts[c].sum_e;
        total.sum_ez += parts[c].sum_ez;
        total.sum_ez2 += parts[c].sum_ez2;
        total.sum_ez3 += parts[c].sum_ez3;
        total.max = parts[c].max > total.max ? parts[c].max : total.max;
        total.min = parts[c].min < total.min ? parts[c].min : total.min;
        total.count += parts[c].count;
        total.bad |= parts[c].bad;
    }
    return total;
}

/* -- chunk passes ---------------------------------------------------------------- */
/* Each pass runs over z[lo, hi) in blocks of BLOCK logits (BLOCK_VECTORS
 * independent vectors, which overlap in the pipeline). The last, partial block is
 * copied into local buffers padded with fillers (-inf for logits: masked, they add
 * nothing), processed the same way, and the real values of its outputs copied
 * back. Sums: a block's vectors are added in float as a fixed tree, and the sums of
 * GROUP_BLOCKS blocks in float as a fixed tree again, then per lane into double
 * accumulators (terms of one sign: an error of at most four float32 ulp per group
 * of 256 logits). Converting every block's sums took about 2.5 of the statistics
 * pass's ~29 vector instructions per 16 logits (now about 0.6); with the masked
 * products below the pass is 13-17% faster (bench/cpu_units.py). */
#define BLOCK_VECTORS 4
#define BLOCK (BLOCK_VECTORS * LANES)
#define EACH_VECTOR _Pragma("GCC unroll 4") for (int k = 0; k < BLOCK_VECTORS; k++)

/* Logits per chunk of a row of `vocab`: ceil(vocab / CHUNK) chunks, that number
 * rounded up to a multiple of EVEN_SHARES when above 1, all of the same length in
 * whole blocks but the last (shorter by less than a block per chunk). At
 * V = 151,936 (AVX-512): 24 chunks of 6,336 logits, the last 6,208, so that two
 * threads take 76,032 and 75,904 of a split row. With chunks of 8,192 they took
 * 73,728 and 78,208 (9 and 10 chunks), and the first waited for the second at
 * every barrier: on an Intel Xeon, three steps at B = 8 (about 1.1 ms a call), the
 * first thread waited 0.08-0.12 ms a call and the second 0.03-0.06; evened out,
 * both 0.05-0.10, and the call 1.5% faster (medians of 14 runs of 300 calls each,
 * in a build timing its barriers).
 * The chunks depend on the vocabulary (and the build's LANES) alone, as a row's
 * bits must. */
static inline int64_t chunk_length(int64_t vocab) {
    int64_t n = (vocab + CHUNK - 1) / CHUNK;
    if (n > 1) n = (n + EVEN_SHARES - 1) / EVEN_SHARES * EVEN_SHARES;
    const int64_t length = (vocab + n - 1) / n;
    return (length + BLOCK - 1) / BLOCK * BLOCK;
}

static inline int64_t chunk_count(int64_t vocab) {
    const int64_t length = chunk_length(vocab);
    return (vocab + length - 1) / length;
}

typedef struct {
    float v[BLOCK] __attribute__((aligned(64)));
} Tail;

static inline float *tail_in(Tail *t, const float *src, int64_t n, float fill) {
    for (int64_t j = 0; j < BLOCK; j++) t->v[j] = j < n ? src[j] : fill;
    return t->v;
}

static inline void tail_out(float *dst, const Tail *t, int64_t n) {
    memcpy(dst, t->v, (size_t)n * sizeof(float));
}

/* (x0 + x1) + (x2 + x3): a block's contributions, in a fixed order. */
static inline vf block_sum(const vf x[BLOCK_VECTORS]) {
    return (x[0] + x[1]) + (x[2] + x[3]);
}

/* Blocks whose float sums go into the double accumulators together, as
 * block_sum's tree of their sums. */
#define GROUP_BLOCKS 4

/* Sums of e and e zs over a chunk: the float sums of a group of blocks, then the
 * double accumulators. */
typedef struct {
    Acc e, ez;
    vf group_e[GROUP_BLOCKS], group_ez[GROUP_BLOCKS];
} Sums;

/* Add a whole group's block sums (n = GROUP_BLOCKS) as one tree, or the n < GROUP_BLOCKS
 * blocks left at the end of a chunk one by one. */
static inline void sums_add(Sums *a, int n) {
    if (n == GROUP_BLOCKS) {
        acc_add(&a->e, block_sum(a->group_e));
        acc_add(&a->ez, block_sum(a->group_ez));
        return;
    }
    for (int g = 0; g < n; g++) {
        acc_add(&a->e, a->group_e[g]);
        acc_add(&a->ez, a->group_ez[g]);
    }
}

/* The max of the logits (a masked one is the max only when all are), whether any
 * is NaN (then the row is not processed, like a row whose max is +inf), and, with
 * WITH_MIN, the min of the unmasked ones. */
typedef struct {
    vf max[BLOCK_VECTORS], min[BLOCK_VECTORS];
    vi nan;
} Scan;

static inline void scan_block(const float *z, const int with_min, Scan *a) {
    EACH_VECTOR {
        vf x = load(z + k * LANES);
        a->max[k] = vmax(a->max[k], x);
        a->nan |= x != x;
        if (with_min)
            a->min[k] = vmin(a->min[k], vselect(x > MASKED_AT, x, splat(INFINITY)));
    }
}

static inline void scan_body(const float *z, int64_t lo, int64_t hi, const int with_min,
                             Partial *out) {
    Scan a;
    EACH_VECTOR {
        a.max[k] = splat(-INFINITY);
        a.min[k] = splat(INFINITY);
    }
    a.nan = (vi){0};
    int64_t i = lo;
    for (; i + BLOCK <= hi; i += BLOCK) scan_block(z + i, with_min, &a);
    if (i < hi) {
        Tail tz;
        scan_block(tail_in(&tz, z + i, hi - i, -INFINITY), with_min, &a);
    }
    partial_init(out);
    EACH_VECTOR {
        float mx = hmax(a.max[k]), mn = hmin(a.min[k]);
        out->max = mx > out->max ? mx : out->max;
        out->min = mn < out->min ? mn : out->min;
    }
    out->bad = hany(a.nan) || out->max == INFINITY;
}

static void scan_chunk(const float *z, int64_t lo, int64_t hi, int with_min,
                       Partial *out) {
    if (with_min)
        scan_body(z, lo, hi, 1, out);
    else
        scan_body(z, lo, hi, 0, out);
}

/* Logits-mode statistics at shift m: e = exp(z - m) into e_out, the block's sums of
 * e and e (z - m) (in float, a fixed tree) into se and sez. With keep != NULL,
 * also copies z into keep. */
static inline void stats_block(const float *restrict z, float *restrict e_out,
                               float *restrict keep, float m, vf *se, vf *sez) {
    vf e[BLOCK_VECTORS], ez[BLOCK_VECTORS];
    EACH_VECTOR {
        vf x = load(z + k * LANES);
        e[k] = exp_times(x - m, &ez[k]);
        store(e_out + k * LANES, e[k]);
        if (keep) store(keep + k * LANES, x);
    }
    *se = block_sum(e);
    *sez = block_sum(ez);
}

static inline void stats_body(const float *z, float *e_out, float *keep, int64_t lo,
                              int64_t hi, float m, Partial *out) {
    Sums a = {{{0}, {0}}, {{0}, {0}}, {{0}}, {{0}}};
    int64_t i = lo;
    for (; i + GROUP_BLOCKS * BLOCK <= hi; i += GROUP_BLOCKS * BLOCK) {
        for (int g = 0; g < GROUP_BLOCKS; g++) {
            const int64_t at = i + g * BLOCK;
            stats_block(z + at, e_out + at, keep ? keep + at : NULL, m, &a.group_e[g],
                        &a.group_ez[g]);
        }
        sums_add(&a, GROUP_BLOCKS);
    }
    int n = 0;
    for (; i + BLOCK <= hi; i += BLOCK, n++)
        stats_block(z + i, e_out + i, keep ? keep + i : NULL, m, &a.group_e[n],
                    &a.group_ez[n]);
    if (i < hi) {
        const int64_t left = hi - i;
        Tail tz, te, tk;
        stats_block(tail_in(&tz, z + i, left, -INFINITY), te.v, keep ? tk.v : NULL, m,
                    &a.group_e[n], &a.group_ez[n]);
        n++;
        tail_out(e_out + i, &te, left);
        if (keep) tail_out(keep + i, &tk, left);
    }
    sums_add(&a, n);
    partial_init(out);
    out->sum_e = acc_sum(a.e);
    out->sum_ez = acc_sum(a.ez);
}

static void stats_chunk(const float *z, float *e_out, int64_t lo, int64_t hi, float m,
                        Partial *out) {
    stats_body(z, e_out, NULL, lo, hi, m, out);
}

static void stats_keep_chunk(const float *z, float *e_out, float *keep, int64_t lo,
                             int64_t hi, float m, Partial *out) {
    stats_body(z, e_out, keep, lo, hi, m, out);
}

/* Lanes where a result y is non-finite though its logit x was finite (x is
 * never NaN or +inf: such rows are not processed), as a lane mask. With AVX-512DQ
 * a compare and a classification masked by it, kept in a mask register: the
 * generic two subtractions and two compares, their result widened to a vector,
 * were 5 of the update's ~30 instructions per vector. */
#if defined(__AVX512DQ__) && LANES == 16
typedef __mmask16 Lanes;
static inline Lanes broke(vf x, vf y) {
    const __mmask16 finite =
        _mm512_cmp_ps_mask((__m512)x, (__m512)splat(-INFINITY), _CMP_NEQ_UQ);
    return _mm512_mask_fpclass_ps_mask(finite, (__m512)y, 0x99); /* NaN, +-inf */
}

static inline int lanes_any(Lanes m) { return m != 0; }
#else
typedef vi Lanes;
static inline Lanes broke(vf x, vf y) { return ((y - y) != 0.0f) & ((x - x) == 0.0f); }

static inline int lanes_any(Lanes m) { return hany(m); }
#endif

/* Row scalars of one Adam step. */
typedef struct {
    float shift;        /* M: the max the previous statistics pass used */
    float inv_sum;      /* 1 / sum exp(z - M) */
    float mean;         /* E_q[z - M] */
    float inv_sum0;     /* 1 / sum exp(z0 - M0), for p0 */
    float kl;           /* kl_weight */
    float step;         /* lr (1 - beta1) / (1 - beta1^t): lr at t = 1 */
    float sqrt_bc;      /* sqrt((1 - beta2) / (1 - beta2^t)): 1 at t = 1 */
    float beta1, beta2, eps;
    int v_is_m_squared; /* at t = 2: v = m * m (step 1 left m = g1, v = g1^2) */
} Step;

/* The max of the new logits (one accumulator, given each block's max, which the
 * online statistics use too) and the lanes where a result is non-finite where z
 * was finite. With one max per vector of the block and the non-finite lanes in a
 * vector, the logits mode took 1.5-2% longer. */
typedef struct {
    vf max;
    Lanes bad;
} Moved;

/* The softmax statistics of the new logits y, accumulated while the last step
 * writes them (only when the caller counts entropies): per lane a shift, which
 * starts at the previous statistics pass's max and is raised to a new logit that
 * exceeds it (exp_nonpos needs y - shift <= 0), and double sums of
 * e = exp(y - shift) and e (y - shift), rescaled when the shift is raised. The
 * top logits move by about lr per step, so raises are few (a handful per row). */
typedef struct {
    vf shift;
    Acc s, t;
} Online;

/* Lane j of an Acc (acc_add puts the low half of a vector's lanes in lo). */
#define ACC_LANE(a, j) \
    (((double *)((j) < LANES / 2 ? (void *)&(a).lo : (void *)&(a).hi))[(j) % (LANES / 2)])

/* Raise lane j's shift to top[j] where top[j] exceeds it: s' = r s,
 * t' = r (t + d s) with d = old - new shift (exact in double), r = exp(d). */
static __attribute__((noinline, cold)) void online_raise(Online *o, vf top) {
    for (int j = 0; j < LANES; j++) {
        if (!(top[j] > o->shift[j])) continue;
        const double d = (double)o->shift[j] - (double)top[j], r = exp(d);
        double *s = &ACC_LANE(o->s, j), *t = &ACC_LANE(o->t, j);
        *t = *s == 0.0 ? 0.0 : r * (*t + d * *s);
        *s *= r;
        o->shift[j] = top[j];
    }
}

/* Whether any lane of a exceeds b's (one compare and mask test on x86; hany
 * extracts the lanes one by one). */
#if defined(__AVX512F__) && LANES == 16
static inline int any_above(vf a, vf b) {
    return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GT_OQ) != 0;
}
#elif defined(__AVX__) && LANES == 8
static inline int any_above(vf a, vf b) {
    return _mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_GT_OQ)) != 0;
}
#else
static inline int any_above(vf a, vf b) { return hany(a > b); }
#endif

/* top: the block's largest y. */
static inline void online_block(Online *o, const vf y[BLOCK_VECTORS], vf top) {
    if (__builtin_expect(any_above(top, o->shift), 0)) online_raise(o, top);
    vf e[BLOCK_VECTORS], ez[BLOCK_VECTORS];
    EACH_VECTOR {
        e[k] = exp_times(y[k] - o->shift, &ez[k]);
    }
    acc_add(&o->s, block_sum(e));
    acc_add(&o->t, block_sum(ez));
}

/* Fold a chunk's lanes, in lane order, into out: shift = the lanes' largest,
 * sum_e and sum_ez relative to it. */
static void online_finish(Online *o, Partial *out) {
    float m = hmax(o->shift);
    double s = 0.0, t = 0.0;
    for (int j = 0; j < LANES; j++) {
        double sj = ACC_LANE(o->s, j), tj = ACC_LANE(o->t, j);
        if (sj == 0.0) continue;
        const double d = (double)o->shift[j] - (double)m;
        if (d != 0.0) {
            const double r = exp(d);
            tj = r * (tj + d * sj);
            sj *= r;
        }
        s += sj;
        t += tj;
    }
    out->shift = m;
    out->sum_e = s;
    out->sum_ez = t;
}

/* One Adam step: z = the logits x_in after it (x_in is z, but for the first step
 * of a call out of place). e holds exp(z - M) of the last statistics pass, p0
 * exp(z0 - M0) (read only when WITH_KL). FIRST: m = v = 0 before the step (not
 * read), and only m = g is written: the second step takes v = g^2 as m * m
 * (s->v_is_m_squared), the same float, which spares the update passes a row of
 * memory traffic each (on an Intel Xeon, whose updates wait on memory, about 10%
 * less time for three steps with whole rows per thread). LAST: m and v are not
 * needed after the step (not written). ONLINE (the last step, counted): the new
 * logits' softmax statistics into o. A masked logit has e = p0 = 0, hence
 * g = m = v = 0 and moves by exactly 0.
 *
 * The moments are kept scaled, m = sum_j beta1^(t-j) g_j and v likewise (Adam's
 * divided by 1 - beta1 and 1 - beta2), so that the constants go into the row
 * scalars (s->step, s->sqrt_bc) and each element's update rounds as little as
 * it can: at step 1 z - lr g / (|g| + eps) with no rounded 0.1 on the way (99% of
 * near-flat rows' logits within 1 ulp (of the row's largest) of the exact z1,
 * against 1.45 ulp with Adam's scaling; their second step divides by |g1| ~ 1e-4,
 * magnifying every ulp of z1 ~1e4 times). */
static inline void update_block(float *z, const float *x_in, const float *restrict e,
                                const float *restrict p0, float *restrict m,
                                float *restrict v, const Step *restrict s,
                                const int first, const int with_kl, const int last,
                                const int online, Moved *a, Online *o) {
    vf xs[BLOCK_VECTORS], ys[BLOCK_VECTORS];
    EACH_VECTOR xs[k] = load(x_in + k * LANES); /* before any store: x_in may be z */
    EACH_VECTOR {
        const int at = k * LANES;
        const vf x = xs[k];
        vf zs = shifted(x, s->shift);
        vf q = load(e + at) * s->inv_sum;
        vf g = q * (s->mean - zs);
        if (with_kl) g += s->kl * (q - load(p0 + at) * s->inv_sum0);
        vf gm = g, gv = g * g;
        if (!first) {
            const vf m_before = load(m + at);
            gm += s->beta1 * m_before;
            gv += s->beta2 * (s->v_is_m_squared ? m_before * m_before : load(v + at));
        }
        /* At step 1, sqrt(v) = |g|: no square root. */
        vf den = (first ? vabs(g) : vroot(gv) * s->sqrt_bc) + s->eps;
        vf y = x - s->step * (gm / den);
        if (!last) {
            store(m + at, gm);
            if (!first) store(v + at, gv);
        }
        store(z + at, y);
        a->bad |= broke(x, y);
        ys[k] = y;
    }
    const vf top = vmax(vmax(ys[0], ys[1]), vmax(ys[2], ys[3]));
    a->max = vmax(a->max, top);
    if (online) online_block(o, ys, top);
}

/* Floats in one 64-byte cache line. */
#define LINE_FLOATS 16

/* Inlined into each case of update_chunk, so that every flag is a constant there.
 * ahead (may be NULL): logits the thread reads next, at the same offsets as
 * [lo, hi), asked into its L2 (prefetcht1) a block at a time, while this pass's
 * arithmetic keeps the core busy. */
static inline __attribute__((always_inline)) void update_body(
    float *z, const float *x_in, const float *e, const float *p0, float *m, float *v,
    int64_t lo, int64_t hi, const Step *s, const int first, const int with_kl,
    const int last, const int online, const float *ahead, Partial *out) {
    Moved a;
    a.max = splat(-INFINITY);
    a.bad = (Lanes){0};
    Online o = {splat(s->shift), {{0}, {0}}, {{0}, {0}}};
    int64_t i = lo;
    for (; i + BLOCK <= hi; i += BLOCK) {
        if (ahead)
            for (int l = 0; l < BLOCK; l += LINE_FLOATS)
                __builtin_prefetch(ahead + i + l, 0, 2);
        update_block(z + i, x_in + i, e + i, p0 + i, m + i, v + i, s, first, with_kl,
                     last, online, &a, &o);
    }
    if (i < hi) {
        const int64_t n = hi - i;
        Tail tz, te, tp, tm, tv;
        float *tail = tail_in(&tz, x_in + i, n, -INFINITY);
        update_block(tail, tail, tail_in(&te, e + i, n, 0.0f),
                     with_kl ? tail_in(&tp, p0 + i, n, 0.0f) : NULL,
                     first ? tm.v : tail_in(&tm, m + i, n, 0.0f),
                     first ? tv.v : tail_in(&tv, v + i, n, 0.0f), s, first, with_kl, last,
                     online, &a, &o);
        tail_out(z + i, &tz, n);
        if (!last) {
            tail_out(m + i, &tm, n);
            if (!first) tail_out(v + i, &tv, n);
        }
    }
    partial_init(out);
    out->max = hmax(a.max);
    out->bad = lanes_any(a.bad);
    if (online) online_finish(&o, out);
}

static void update_chunk(float *z, const float *x_in, const float *e, const float *p0,
                         float *m, float *v, int64_t lo, int64_t hi, const Step *s,
                         int first, int with_kl, int last, int online,
                         const float *ahead, Partial *out) {
    /* One specialised loop per case; q == p0 at step 1: no KL term there. ONLINE
     * only with LAST. */
    if (first && last && online)
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 1, 0, 1, 1, ahead, out);
    else if (first && last)
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 1, 0, 1, 0, ahead, out);
    else if (first)
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 1, 0, 0, 0, ahead, out);
    else if (with_kl && last && online)
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 0, 1, 1, 1, ahead, out);
    else if (with_kl && last)
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 0, 1, 1, 0, ahead, out);
    else if (with_kl)
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 0, 1, 0, 0, ahead, out);
    else if (last && online)
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 0, 0, 1, 1, ahead, out);
    else if (last)
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 0, 0, 1, 0, ahead, out);
    else
        update_body(z, x_in, e, p0, m, v, lo, hi, s, 0, 0, 0, 0, ahead, out);
}

/* The entropy of the new logits from a counted last step's chunk Partials
 * (combined in chunk order); NAN where their largest shift lies more than
 * LOST_RANGE above the new max (the top logits fell so far that exp(y - shift)
 * may have lost part of the row below float32's range: the caller recomputes it
 * with a statistics pass; no ordinary step moves a logit so far). */
#define LOST_RANGE 40.0
static double online_entropy(const Partial *parts, int64_t n, float new_max) {
    float m = -INFINITY;
    for (int64_t c = 0; c < n; c++) m = parts[c].shift > m ? parts[c].shift : m;
    if (!((double)m - (double)new_max <= LOST_RANGE)) return NAN;
    double s = 0.0, t = 0.0;
    for (int64_t c = 0; c < n; c++) {
        double sc = parts[c].sum_e, tc = parts[c].sum_ez;
        if (sc == 0.0) continue;
        const double d = (double)parts[c].shift - (double)m;
        if (d != 0.0) {
            const double r = exp(d);
            tc = r * (tc + d * sc);
            sc *= r;
        }
        s += sc;
        t += tc;
    }
    return log(s) - t / s;
}

/* Temperature mode at inverse temperature b: sums of e = exp(b zs), e zs, e zs^2
 * and, with THIRD, e zs^3 (zs = z - m). Logits equal to the max (e = 1 exactly,
 * e zs = 0) are counted in `ties` instead of summed, so that the float32 block
 * sums err relative to the mass of the other logits: a confident row's entropy
 * is that mass times a few nats, and must be resolved to 1e-6 of itself.
 *
 * Only the entropy's sums (e, e zs) are accumulated in double (Sums). The other two
 * give the slope and curvature, which only steer the solver's step (whether it
 * has converged is decided by the entropy): they add up per lane in float over a
 * chunk (128 block sums of terms of one sign, relative error ~1e-6 at most).
 * Converting them to double every block (two conversions and two double
 * additions per sum) cost 11% of a pass; the passes per row stayed the same on
 * bench/latency.py's rows. */
typedef struct {
    Sums sums;
    vf ez2, ez3;
    vi ties;
} Moments;

/* e = exp(b zs) and its products e zs, e zs^2, e zs^3, all 0 where zs = 0 (a logit
 * at the max: those lanes counted in ties) or where e is 0 (zs below the exp's
 * range, -inf for a masked logit). With AVX-512 the exp's zeroing leaves out the
 * ties and a masked subtraction counts them, and the products are masked the same
 * way instead of zs being clamped (0 * -inf would be NaN): three instructions per
 * vector fewer than the select, the count from a widened compare and the clamp. */
#if defined(__AVX512F__) && LANES == 16
static inline vf exp_moments(vf zs, float b, vi *ties, vf *ez, vf *ez2, vf *ez3) {
    const __mmask16 top = _mm512_cmp_ps_mask((__m512)zs, _mm512_setzero_ps(), _CMP_EQ_OQ);
    *ties = (vi)_mm512_mask_sub_epi32((__m512i)*ties, top, (__m512i)*ties,
                                      _mm512_set1_epi32(-1));
    const vf x = b * zs;
    const __mmask16 keep = exp_lanes(x, (__mmask16)~top);
    const vf e = exp_kept(x, keep);
    *ez = (vf)_mm512_maskz_mul_ps(keep, (__m512)e, (__m512)zs);
    *ez2 = (vf)_mm512_maskz_mul_ps(keep, (__m512)*ez, (__m512)zs);
    *ez3 = (vf)_mm512_maskz_mul_ps(keep, (__m512)*ez2, (__m512)zs);
    return e;
}
#else
static inline vf exp_moments(vf zs, float b, vi *ties, vf *ez, vf *ez2, vf *ez3) {
    zs = vmax(zs, splat(-FLT_MAX)); /* -inf: 0 * -inf would be NaN */
    const vi top = zs == 0.0f;
    *ties -= top;
    const vf e = vselect(top, splat(0.0f), exp_nonpos(b * zs));
    *ez = e * zs;
    *ez2 = *ez * zs;
    *ez3 = *ez2 * zs;
    return e;
}
#endif

/* The block's sums of e and e zs (in float, a fixed tree) into se and sez; those of
 * e zs^2 and e zs^3 added to a's. */
static inline void temperature_block(const float *restrict z, float m, float b,
                                     const int third, Moments *a, vf *se, vf *sez) {
    vf e[BLOCK_VECTORS], ez[BLOCK_VECTORS], ez2[BLOCK_VECTORS], ez3[BLOCK_VECTORS];
    EACH_VECTOR {
        e[k] = exp_moments(load(z + k * LANES) - m, b, &a->ties, &ez[k], &ez2[k], &ez3[k]);
    }
    *se = block_sum(e);
    *sez = block_sum(ez);
    a->ez2 += block_sum(ez2);
    if (third) a->ez3 += block_sum(ez3);
}

/* Inlined into each case of temperature_chunk, so that THIRD is a constant there. */
static inline __attribute__((always_inline)) void temperature_body(
    const float *z, int64_t lo, int64_t hi, float m, float b, const int third,
    Partial *out) {
    Moments a = {{{{0}, {0}}, {{0}, {0}}, {{0}}, {{0}}}, {0}, {0}, {0}};
    Sums *sums = &a.sums;
    int64_t i = lo;
    for (; i + GROUP_BLOCKS * BLOCK <= hi; i += GROUP_BLOCKS * BLOCK) {
        for (int g = 0; g < GROUP_BLOCKS; g++)
            temperature_block(z + i + g * BLOCK, m, b, third, &a, &sums->group_e[g],
                              &sums->group_ez[g]);
        sums_add(sums, GROUP_BLOCKS);
    }
    int n = 0;
    for (; i + BLOCK <= hi; i += BLOCK, n++)
        temperature_block(z + i, m, b, third, &a, &sums->group_e[n], &sums->group_ez[n]);
    if (i < hi) {
        Tail tz;
        temperature_block(tail_in(&tz, z + i, hi - i, -INFINITY), m, b, third, &a,
                          &sums->group_e[n], &sums->group_ez[n]);
        n++;
    }
    sums_add(sums, n);
    partial_init(out);
    out->sum_e = acc_sum(sums->e);
    out->sum_ez = acc_sum(sums->ez);
    for (int j = 0; j < LANES; j++) out->sum_ez2 += a.ez2[j];
    for (int j = 0; j < LANES; j++) out->sum_ez3 += a.ez3[j];
    for (int j = 0; j < LANES; j++) out->count += a.ties[j];
}

static void temperature_chunk(const float *z, int64_t lo, int64_t hi, float m, float b,
                              int third, Partial *out) {
    if (third)
        temperature_body(z, lo, hi, m, b, 1, out);
    else
        temperature_body(z, lo, hi, m, b, 0, out);
}

/* z[lo, hi) *= b for unmasked logits, or /= t when t > 0 (a temperature given
 * exactly: the ends of [t_min, t_max], where z / T rounds correctly and z times
 * float32(1 / T) can be off by most of an ulp). */
static inline void scale_block(float *z, const float *x_in, float b, float t) {
    EACH_VECTOR {
        vf x = load(x_in + k * LANES);
        store(z + k * LANES, vselect(x > MASKED_AT, t > 0.0f ? x / t : x * b, x));
    }
}

/* z[lo, hi) = x_in[lo, hi) scaled (x_in may be z). */
static void scale_chunk(float *z, const float *x_in, int64_t lo, int64_t hi, float b,
                        float t) {
    int64_t i = lo;
    for (; i + BLOCK <= hi; i += BLOCK) scale_block(z + i, x_in + i, b, t);
    if (i < hi) {
        Tail tz;
        float *tail = tail_in(&tz, x_in + i, hi - i, -INFINITY);
        scale_block(tail, tail, b, t);
        tail_out(z + i, &tz, hi - i);
    }
}

static void copy_chunk(float *restrict dst, const float *restrict src, int64_t lo,
                       int64_t hi) {
    memcpy(dst + lo, src + lo, (size_t)(hi - lo) * sizeof(float));
}

/* -- per-row drivers --------------------------------------------------------------- */

/* Chunk c of a row of `vocab` logits: [chunk_start, chunk_end). */
static inline int64_t chunk_start(int64_t c, int64_t vocab) {
    return c * chunk_length(vocab);
}

static inline int64_t chunk_end(int64_t c, int64_t vocab) {
    const int64_t end = (c + 1) * chunk_length(vocab);
    return end < vocab ? end : vocab;
}

#ifdef _OPENMP
/* The first chunk thread t of n runs in a split row: thread t runs chunks
 * [split_first(t), split_first(t + 1)), the chunk boundary nearest t / n of the row
 * starting each range: balanced in logits, not in chunks, where the thread count
 * does not divide the chunks (with 19 chunks of 8,192 at V = 151,936, OpenMP's
 * static schedule gave two threads 81,920 + 70,016 logits, and B = 1 took 5% longer
 * than with 73,728 + 78,208; chunk_length now evens them out); the same
 * chunks every pass, so that a thread finds its part of the row's scratch in its
 * own cache (a dynamic schedule, which moves chunks between threads from pass to
 * pass, made B = 1 twice as slow). */
static int64_t split_first(int64_t vocab, int t, int n) {
    const int64_t nc = chunk_count(vocab);
    if (t >= n) return nc;
    const int64_t length = chunk_length(vocab);
    const int64_t c = (vocab * t / n + length / 2) / length;
    return c < nc ? c : nc;
}

/* Run BODY for every chunk c of the row: split among the team (with a barrier at
 * the end) when SPLIT, else all by the calling thread. */
#define FOR_CHUNKS(split, c, vocab, BODY)                                            \
    do {                                                                         \
        if (split) {                                                             \
            const int t_ = omp_get_thread_num(), n_ = omp_get_num_threads();     \
            const int64_t end_ = split_first((vocab), t_ + 1, n_);               \
            for (int64_t c = split_first((vocab), t_, n_); c < end_; c++) {      \
                BODY;                                                            \
            }                                                                    \
            _Pragma("omp barrier");                                              \
        } else {                                                                 \
            for (int64_t c = 0; c < chunk_count(vocab); c++) {                   \
                BODY;                                                            \
            }                                                                    \
        }                                                                        \
    } while (0)
#else
#define FOR_CHUNKS(split, c, vocab, BODY)                                            \
    do {                                                                         \
        for (int64_t c = 0; c < chunk_count(vocab); c++) {                       \
            BODY;                                                                \
        }                                                                        \
    } while (0)
#endif

/* Scratch of one row being processed: two sets (alternating from pass to pass) of
 * chunk Partials, then five float rows, placed for each row of logits by
 * slot_place.
 *
 * Where the rows lie against the logits row matters: with all five starting 64 to
 * 512 bytes below the logits row's address modulo 4 KiB (or 128 above), the
 * logits mode took up to 24% longer (Zen 4, one thread, B = 8, V = 49,152 or
 * 151,936), and where a caller's logits lie is chance. So the rows are a whole
 * number of 4 KiB apart and start 2 KiB from the logits row modulo 4 KiB, for
 * every row processed (4 KiB of slack per slot); bench/scratch_placement.py moves
 * a batch through a page to show it. */
typedef struct {
    char *rows;     /* the slot's float area: 5 rows of scratch_stride floats + 4 KiB */
    int64_t stride; /* floats from one row to the next */
    float *keep, *p0, *e, *m, *v;
    Partial *parts[2];
} Slot;

/* Floats from one scratch row to the next: the row rounded up to whole 4 KiB. */
static inline int64_t scratch_stride(int64_t vocab) {
    return (padded(vocab) + 1023) / 1024 * 1024;
}

static size_t partials_bytes(int64_t vocab) {
    return (2 * (size_t)chunk_count(vocab) * sizeof(Partial) + 63) / 64 * 64;
}

static size_t slot_bytes(int64_t vocab) {
    return partials_bytes(vocab) + 5 * (size_t)scratch_stride(vocab) * sizeof(float) +
           4096;
}

static Slot slot_at(void *scratch, int64_t vocab, int index) {
    char *base = (char *)scratch + (size_t)index * slot_bytes(vocab);
    Slot s;
    s.parts[0] = (Partial *)base;
    s.parts[1] = s.parts[0] + chunk_count(vocab);
    s.rows = base + partials_bytes(vocab);
    s.stride = scratch_stride(vocab);
    s.keep = s.p0 = s.e = s.m = s.v = NULL;
    return s;
}

/* Place the slot's five rows for the logits row z: 64-byte aligned, starting
 * 2 KiB (to 64 bytes) above z's address modulo 4 KiB. */
static void slot_place(Slot *s, const float *z) {
    const uintptr_t gap =
        ((uintptr_t)z + 2048 - (uintptr_t)s->rows) & 4095 & ~(uintptr_t)63;
    float *f = (float *)(s->rows + gap);
    s->keep = f;
    s->p0 = f + s->stride;
    s->e = f + 2 * s->stride;
    s->m = f + 3 * s->stride;
    s->v = f + 4 * s->stride;
}

/* A batch: the rows to process (row r is logits + index[r] * stride, or
 * logits + r * stride without an index) and their parameters (entry r). Out of
 * place (source != NULL), each row is computed from source's row of the same
 * index (source_stride apart), which is only read, into logits' row, which is
 * only written: every row processed is written whole, the rows left as they were
 * copied. */
typedef struct {
    float *logits;
    const float *source;
    const int64_t *index;
    int64_t rows, vocab, stride, source_stride;
    const float *threshold, *kl_weight, *lr, *alpha, *t_min, *t_max;
    const int64_t *steps;
    double beta1, beta2, eps, rtol;
    float *inv_t; /* temperature mode: receives each row's 1/T, when not NULL */
    int count;    /* whether the caller counts (stats given): entropies wanted */
    const double *edges; /* entropy bins' upper bounds, ascending (when counting) */
    int n_edges;
    int64_t sample; /* logits mode: measure the entropy after of one row in `sample`
                       (those whose llround(entropy before * FIXED_POINT) it divides) */
    int ask_ahead;  /* logits mode: whether a row's last update asks for the next
                       row's logits (see ask_ahead) */
} Batch;

/* The stats layout (em_inf/counters.py; em_inf_stats_layout reports it and
 * cpu_backend checks it against counters.py): one int64 per column. */
#define STAT_BELOW 0       /* rows left alone below their threshold */
#define STAT_WORK 1        /* Adam steps / solver passes of rows not restored */
#define STAT_RESTORED 2    /* rows restored by the fail-safe, or holding NaN / +inf */
#define STAT_ROWS 3        /* rows processed */
#define STAT_SUM_BEFORE 4  /* sum of llround(entropy before * FIXED_POINT) */
#define STAT_SUM_AFTER 5   /* the same, after */
#define STAT_HIST_BEFORE 6 /* n_edges + 1 bins of the entropy before, then after */
#define FIXED_POINT 1e6    /* SUM_* units per nat */
#define MAX_BINS 64        /* most entropy bins (n_edges + 1) a call may ask for */

/* What a thread's rows add to the caller's stats. */
typedef struct {
    int64_t below, work, restored, rows, sum_before, sum_after;
    int64_t hist_before[MAX_BINS], hist_after[MAX_BINS];
} Counts;

static void counts_add(Counts *to, const Counts *from) {
    to->below += from->below;
    to->work += from->work;
    to->restored += from->restored;
    to->rows += from->rows;
    to->sum_before += from->sum_before;
    to->sum_after += from->sum_after;
    for (int j = 0; j < MAX_BINS; j++) {
        to->hist_before[j] += from->hist_before[j];
        to->hist_after[j] += from->hist_after[j];
    }
}

/* The bin of entropy h: the number of edges strictly below it. */
static int entropy_bin(const Batch *b, double h) {
    int bin = 0;
    for (int j = 0; j < b->n_edges; j++) bin += b->edges[j] < h;
    return bin;
}

/* Whether the row whose entropy before is `before` has its entropy after measured
 * (every row, unless the batch samples them). */
static int sampled(const Batch *b, double before) {
    return b->sample <= 1 || llround(before * FIXED_POINT) % b->sample == 0;
}

/* A processed row's entropy before (nats) and, when sampled, after, when counting. */
static void count_entropy(const Batch *b, Counts *counts, double before, double after) {
    if (!b->count) return;
    counts->sum_before += llround(before * FIXED_POINT);
    counts->hist_before[entropy_bin(b, before)]++;
    if (!sampled(b, before)) return;
    counts->sum_after += llround(after * FIXED_POINT);
    counts->hist_after[entropy_bin(b, after)]++;
}

/* Row r's output, and the logits it is computed from (the same row in place). */
static float *row_out(const Batch *b, int64_t r) {
    return b->logits + (b->index ? b->index[r] : r) * b->stride;
}

static const float *row_in(const Batch *b, int64_t r) {
    if (!b->source) return row_out(b, r);
    return b->source + (b->index ? b->index[r] : r) * b->source_stride;
}

/* A row left as it came: nothing to do in place, its copy out of place. */
static void leave_row(float *z, const float *z_in, int64_t vocab, int split) {
    if (z_in != z)
        FOR_CHUNKS(split, c, vocab,
                   copy_chunk(z, z_in, chunk_start(c, vocab), chunk_end(c, vocab)));
}

/* The scan every row starts with. */
static Partial scan_row(const float *z, int64_t vocab, Slot *slot, int split,
                        int with_min) {
    int64_t nc = chunk_count(vocab);
    FOR_CHUNKS(split, c, vocab,
               scan_chunk(z, chunk_start(c, vocab), chunk_end(c, vocab), with_min,
                          &slot->parts[0][c]));
    return combine(slot->parts[0], nc);
}

static void logits_row(const Batch *b, int64_t r, Slot *slot, int split,
                       Counts *counts) {
    float *z = row_out(b, r);
    const float *z_in = row_in(b, r); /* z but for a call out of place */
    const int64_t vocab = b->vocab, nc = chunk_count(vocab);
    const int64_t steps = b->steps[r];
    const float threshold = b->threshold[r];
    /* asked for by the last update (ask_ahead) */
    const float *next = b->ask_ahead && r + 1 < b->rows ? row_in(b, r + 1) : NULL;
    if (steps <= 0) { /* not processed, not counted */
        leave_row(z, z_in, vocab, split);
        return;
    }
    slot_place(slot, z);
    counts->rows++;
    Partial total = scan_row(z_in, vocab, slot, split, 0);
    if (total.bad) { /* NaN or +inf in the input: left as it is, no entropy */
        counts->restored++;
        leave_row(z, z_in, vocab, split);
        return;
    }
    if (!(total.max > MASKED_AT)) { /* all masked: nothing to change, entropy 0 */
        if (0.0f < threshold)
            counts->below++;
        else
            counts->work += steps;
        count_entropy(b, counts, 0.0, 0.0);
        leave_row(z, z_in, vocab, split);
        return;
    }
    int set = 1; /* the Partials set the next pass writes */
    float shift = total.max;
    /* In place, the first pass keeps a copy of the row for the fail-safe; out of
     * place the input is that copy. */
    if (z_in == z)
        FOR_CHUNKS(split, c, vocab,
                   stats_keep_chunk(z, slot->p0, slot->keep, chunk_start(c, vocab),
                                    chunk_end(c, vocab), shift, &slot->parts[set][c]));
    else
        FOR_CHUNKS(split, c, vocab,
                   stats_chunk(z_in, slot->p0, chunk_start(c, vocab),
                               chunk_end(c, vocab), shift, &slot->parts[set][c]));
    total = combine(slot->parts[set], nc);
    set ^= 1;
    double sum = total.sum_e, mean = total.sum_ez / total.sum_e;
    double entropy = log(sum) - mean;
    const double before = entropy;
    if (entropy < threshold) {
        counts->below++;
        count_entropy(b, counts, before, before);
        leave_row(z, z_in, vocab, split);
        return;
    }
    Step s;
    s.inv_sum0 = (float)(1.0 / sum);
    s.kl = b->kl_weight[r];
    s.beta1 = (float)b->beta1;
    s.beta2 = (float)b->beta2;
    s.eps = (float)b->eps;
    const int with_kl = s.kl != 0.0f;
    const double lr = b->lr[r];
    int restored = 0, online = 0;
    int64_t taken = 0;
    for (int64_t t = 1; t <= steps; t++) {
        if (t > 1 && entropy < threshold) break;
        taken = t;
        s.shift = shift;
        s.inv_sum = (float)(1.0 / sum);
        s.mean = (float)mean;
        s.step = t == 1 ? (float)lr
                        : (float)(lr * (1.0 - b->beta1) / (1.0 - pow(b->beta1, (double)t)));
        s.sqrt_bc = t == 1 ? 1.0f
                           : (float)sqrt((1.0 - b->beta2) / (1.0 - pow(b->beta2, (double)t)));
        s.v_is_m_squared = t == 2;
        const float *e = t == 1 ? slot->p0 : slot->e;
        online = t == steps && b->count && sampled(b, before);
        FOR_CHUNKS(split, c, vocab,
                   update_chunk(z, t == 1 ? z_in : z, e, slot->p0, slot->m, slot->v,
                                chunk_start(c, vocab), chunk_end(c, vocab), &s, t == 1,
                                with_kl, t == steps, online, t == steps ? next : NULL,
                                &slot->parts[set][c]));
        total = combine(slot->parts[set], nc);
        set ^= 1;
        if (total.bad) {
            restored = 1;
            break;
        }
        if (t == steps) {
            if (online) { /* the entropy of the row returned, from the last step */
                entropy = online_entropy(slot->parts[set ^ 1], nc, total.max);
                if (isnan(entropy)) { /* its top fell past LOST_RANGE: recompute */
                    FOR_CHUNKS(split, c, vocab,
                               stats_chunk(z, slot->e, chunk_start(c, vocab),
                                           chunk_end(c, vocab), total.max,
                                           &slot->parts[set][c]));
                    total = combine(slot->parts[set], nc);
                    entropy = log(total.sum_e) - total.sum_ez / total.sum_e;
                }
            }
            break;
        }
        shift = total.max;
        FOR_CHUNKS(split, c, vocab,
                   stats_chunk(z, slot->e, chunk_start(c, vocab), chunk_end(c, vocab),
                               shift, &slot->parts[set][c]));
        total = combine(slot->parts[set], nc);
        set ^= 1;
        sum = total.sum_e;
        mean = total.sum_ez / total.sum_e;
        entropy = log(sum) - mean;
    }
    if (restored) { /* its steps are undone, and not counted */
        FOR_CHUNKS(split, c, vocab,
                   copy_chunk(z, z_in == z ? slot->keep : z_in, chunk_start(c, vocab),
                              chunk_end(c, vocab)));
        counts->restored++;
        count_entropy(b, counts, before, before);
        return;
    }
    counts->work += taken;
    /* entropy: the last statistics pass's (the row stopped below its threshold)
     * or the last step's (it ran all its steps) */
    count_entropy(b, counts, before, entropy);
}

/* Entropy, its slope and its curvature in u = log b at inverse temperature b:
 * dH/du = -b^2 Var_q(z), d2H/du2 = -2 b^2 Var_q(z) - b^3 k3 (k3: q's third central
 * moment of z, the derivative of the variance in b; NAN where the pass did not sum
 * e zs^3). */
typedef struct {
    double entropy, slope, curvature;
} Entropy;

static Entropy temperature_eval(const float *z, int64_t vocab, Slot *slot, int split,
                                int set, float shift, float b, int third) {
    const int64_t nc = chunk_count(vocab);
    FOR_CHUNKS(split, c, vocab,
               temperature_chunk(z, chunk_start(c, vocab), chunk_end(c, vocab), shift, b,
                                 third, &slot->parts[set][c]));
    Partial total = combine(slot->parts[set], nc); /* count: logits at the max */
    const double sum = (double)total.count + total.sum_e;
    double mean = total.sum_ez / sum;
    const double ez2 = total.sum_ez2 / sum;
    double var = ez2 - mean * mean;
    var = var > 0.0 ? var : 0.0;
    const double k3 = total.sum_ez3 / sum - 3.0 * mean * ez2 + 2.0 * mean * mean * mean;
    const double bb = (double)b * (double)b;
    Entropy h = {log(sum) - (double)b * mean, -bb * var,
                 third ? -2.0 * bb * var - bb * b * k3 : NAN};
    return h;
}

/* A solver pass at u = log b, after one at prev_u (the last point evaluated).
 * After a step longer than SECANT_STEP the pass sums e zs^3 for the curvature.
 * After a shorter one (ordinarily from the third pass on, the one that finds the
 * entropy within tolerance, whose curvature is then not used) it does not (the
 * pass is about 12% faster), and the curvature is the slopes' secant over the
 * step, on so short a step as good a guide for Halley's step: the passes per row
 * stayed the same on bench/latency.py's rows, where the secant over the first,
 * long step cost 0.4 passes per row more. */
#define SECANT_STEP 1e-2
static Entropy temperature_next(const float *z, int64_t vocab, Slot *slot, int split,
                                int set, float shift, float b, double u, Entropy prev,
                                double prev_u) {
    const int third = !(fabs(u - prev_u) <= SECANT_STEP);
    Entropy h = temperature_eval(z, vocab, slot, split, set, shift, b, third);
    if (!third) h.curvature = (h.slope - prev.slope) / (u - prev_u);
    return h;
}

/* The solver's step towards H = target from an error err = H - target: Halley's
 * (cubic convergence: from T = 1 the rows of bench/latency.py reach 1e-6 of their
 * target in 3 passes instead of Newton's 4), or Newton's where the curvature term
 * would more than double or reverse it. */
static double halley_step(double err, Entropy h) {
    const double newton = err / h.slope;
    const double damping = 1.0 - 0.5 * newton * h.curvature / h.slope;
    return damping >= 0.5 ? newton / damping : newton;
}

/* What the adaptive temperature does to a row: divide it by t (t > 0: an end of
 * [t_min, t_max], given exactly), multiply it by inv_t (t == 0), or leave it as
 * it was (inv_t == 1, t == 0, scale == 0). */
typedef struct {
    float inv_t, t;
    int scale;
} Scaling;

static const Scaling UNCHANGED = {1.0f, 0.0f, 0};

/* The adaptive temperature for row z (its input logits). */
static Scaling temperature_solve(const Batch *b, int64_t r, const float *z, Slot *slot,
                                 int split, Counts *counts) {
    const int64_t vocab = b->vocab;
    const double threshold = b->threshold[r];
    counts->rows++;
    Partial total = scan_row(z, vocab, slot, split, 1);
    if (total.bad) { /* NaN or +inf in the input: left as it is, no entropy */
        counts->restored++;
        return UNCHANGED;
    }
    if (!(total.max > MASKED_AT)) { /* all masked: entropy 0 <= any threshold */
        counts->below++;
        count_entropy(b, counts, 0.0, 0.0);
        return UNCHANGED;
    }
    const float shift = total.max, lowest = total.min;
    int set = 1;
    Entropy h = temperature_eval(z, vocab, slot, split, set, shift, 1.0f, 1);
    set ^= 1;
    const double before = h.entropy;
    if (h.entropy <= threshold) {
        counts->below++;
        count_entropy(b, counts, before, before);
        return UNCHANGED;
    }
    int64_t passes = 1;
    const double target = fmax(threshold, (double)b->alpha[r] * h.entropy);
    /* Aim at half the tolerance: the other half covers the float32 rounding of
     * this evaluation (the entropy at the same 1/T in exact arithmetic differs by
     * about 1e-7 of itself). */
    const double tol = 0.5 * b->rtol * target;
    double lo = -log((double)b->t_max[r]), hi = -log((double)b->t_min[r]);
    if (lo > hi) {
        double swap = lo;
        lo = hi;
        hi = swap;
    }
    int lo_seen = 0, hi_seen = 0; /* whether lo / hi are evaluated points */
    double u = 0.0;
    float inv_t = 1.0f;
    if (u < lo || u > hi) {
        u = u < lo ? lo : hi;
        inv_t = (float)exp(u);
        h = temperature_next(z, vocab, slot, split, set, shift, inv_t, u, h, 0.0);
        set ^= 1;
        passes++;
    }
    double best_err = INFINITY, best_entropy = h.entropy;
    float best = inv_t;
    /* H decreases in u: err > 0 means the root lies at a larger u. */
    for (;;) {
        double err = h.entropy - target;
        if (fabs(err) <= best_err) { /* ties: the later point (an end, when H is flat) */
            best_err = fabs(err);
            best = inv_t;
            best_entropy = h.entropy; /* evaluated at exactly the b returned */
        }
        if (fabs(err) <= tol || passes >= TEMPERATURE_MAX_PASSES) break;
        if (err > 0) {
            lo = u;
            lo_seen = 1;
        } else {
            hi = u;
            hi_seen = 1;
        }
        /* The bracket is below float32's resolution of b: nothing better to find. */
        if (hi - lo <= 1e-7 * fmax(1.0, fabs(u))) break;
        double next = u - halley_step(err, h);
        if (!(next > lo && next < hi)) { /* outside the bracket (or NaN) */
            if (err > 0 && !hi_seen)
                next = hi; /* try the end it points to, once */
            else if (err < 0 && !lo_seen)
                next = lo;
            else
                next = 0.5 * (lo + hi);
        }
        float next_inv_t = (float)exp(next);
        if (next_inv_t == inv_t) break; /* the same float32 b again */
        h = temperature_next(z, vocab, slot, split, set, shift, next_inv_t, next, h, u);
        u = next;
        inv_t = next_inv_t;
        set ^= 1;
        passes++;
    }
    /* At an end of [t_min, t_max] the row is divided by that temperature. */
    const float t_min = b->t_min[r], t_max = b->t_max[r];
    const float t = best == (float)exp(-log((double)t_min))   ? t_min
                    : best == (float)exp(-log((double)t_max)) ? t_max
                                                              : 0.0f;
    /* z * b (z / t) is finite for every unmasked z iff it is for the extremes
     * (rounding is monotonic); otherwise the row stays as it came (its passes not
     * counted). */
    const float top = t > 0.0f ? shift / t : shift * best;
    const float bottom = t > 0.0f ? lowest / t : lowest * best;
    if (!isfinite(top) || !isfinite(bottom)) {
        counts->restored++;
        count_entropy(b, counts, before, before);
        return UNCHANGED;
    }
    counts->work += passes;
    count_entropy(b, counts, before, best_entropy);
    const Scaling scaling = {best, t, 1};
    return scaling;
}

static void temperature_row(const Batch *b, int64_t r, Slot *slot, int split,
                            Counts *counts) {
    float *z = row_out(b, r);
    const float *z_in = row_in(b, r);
    const int64_t vocab = b->vocab;
    const Scaling scaling = temperature_solve(b, r, z_in, slot, split, counts);
    if (scaling.scale)
        FOR_CHUNKS(split, c, vocab,
                   scale_chunk(z, z_in, chunk_start(c, vocab), chunk_end(c, vocab),
                               scaling.inv_t, scaling.t));
    else
        leave_row(z, z_in, vocab, split);
    int lead = 1;
#ifdef _OPENMP
    lead = !split || omp_get_thread_num() == 0;
#endif
    if (b->inv_t && lead) b->inv_t[r] = scaling.inv_t;
}

/* -- entry points ---------------------------------------------------------------- */

typedef void (*RowFn)(const Batch *, int64_t, Slot *, int, Counts *);

/* Bytes per logit an update pass streams: z, e, p0, m, v. */
#define UPDATE_STREAM_BYTES 20

/* One core's L2 in bytes; <= 0 where unknown. */
static long l2_bytes(void) { return sysconf(_SC_LEVEL2_CACHE_SIZE); }

/* Whether every logits-mode row is better split among the threads: when what an
 * update pass streams (UPDATE_STREAM_BYTES per logit) does not fit in one
 * core's L2 but each thread's share of it does, and the threads are no more than
 * the shares that takes (more would only add barriers). On an Intel Xeon with
 * 2 MiB of L2 per core, 2 threads, V = 151,936 (3 MB): B = 8 and 64 took 20% less
 * time split, with the same bits, as a row's result never depends on how it is
 * shared out. On Zen 4 (1 MiB) half a row does not fit, and nothing changes. */
static int split_for_l2(int64_t vocab, int threads) {
    const long l2 = l2_bytes();
    const int64_t streamed = UPDATE_STREAM_BYTES * vocab;
    if (threads < 2 || l2 <= 0 || streamed <= l2) return 0;
    const int64_t shares = (streamed + l2 - 1) / l2;
    return threads == shares;
}

/* Whether a logits-mode row's last update asks for the thread's share of the next
 * row (prefetcht1, a cache line per 16 logits), which that row's scan reads first:
 * where the threads take the rows in order (every row split among them, or one
 * thread) and each thread's share of the next row fits in its L2 beside what it
 * streams in an update (4 bytes per logit more). On a 2-core Intel Xeon
 * (2 MiB of L2 per core), 3 steps, the same bits: 2 threads at V = 151,936 (rows
 * split) took 4-7% less time at B = 8 and 1-8% at B = 64 with the batch out of the
 * caches, 1-5% and 3-7% with it in; one thread at V = 49,152 4-9% less; one thread
 * at V = 151,936, where a whole row does not fit, 2-5% more, hence the rule.
 * Several threads given whole rows take them in no fixed order: nothing to ask for. */
static int ask_ahead(int64_t vocab, int threads, int split) {
    const long l2 = l2_bytes();
    if (l2 <= 0 || !(split || threads <= 1)) return 0;
    const int64_t share = split ? (vocab + threads - 1) / threads : vocab;
    return (UPDATE_STREAM_BYTES + (int64_t)sizeof(float)) * share <= l2;
}

/* Rows [0, whole) one per thread, the rest split among all threads; with
 * split_every_row, all of them split. */
static void run_batch(const Batch *b, RowFn fn, void *scratch, int64_t *stats,
                      int threads, int split_every_row) {
    const int64_t rows = b->rows;
    if (threads < 1) threads = 1;
    const int64_t whole = split_every_row ? 0 : rows - rows % threads;
    Counts total;
    memset(&total, 0, sizeof total);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        Counts mine, split_counts;
        memset(&mine, 0, sizeof mine);
        memset(&split_counts, 0, sizeof split_counts);
        Slot own = slot_at(scratch, b->vocab, tid);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t r = 0; r < whole; r++) fn(b, r, &own, 0, &mine);
        Slot shared = slot_at(scratch, b->vocab, 0);
        for (int64_t r = whole; r < rows; r++) {
            fn(b, r, &shared, 1, &split_counts);
            /* Each thread reads the row's last Partials after the last barrier of
             * its passes; the next row's first pass writes them again. Without
             * this barrier a thread already on the next row could change what
             * another still reads, which then takes another path through the row
             * and waits at a barrier the others never reach. */
#ifdef _OPENMP
#pragma omp barrier
#endif
        }
        if (tid == 0) /* every thread saw the split rows; count them once */
            counts_add(&mine, &split_counts);
#ifdef _OPENMP
#pragma omp critical(em_inf_counts)
#endif
        counts_add(&total, &mine);
    }
    if (stats) {
        const int bins = b->n_edges + 1;
        stats[STAT_BELOW] += total.below;
        stats[STAT_WORK] += total.work;
        stats[STAT_RESTORED] += total.restored;
        stats[STAT_ROWS] += total.rows;
        stats[STAT_SUM_BEFORE] += total.sum_before;
        stats[STAT_SUM_AFTER] += total.sum_after;
        for (int j = 0; j < bins; j++) {
            stats[STAT_HIST_BEFORE + j] += total.hist_before[j];
            stats[STAT_HIST_BEFORE + bins + j] += total.hist_after[j];
        }
    }
}

/* The stats layout, for em_inf/cpu_backend.py to check against em_inf/counters.py:
 * out[0..9] = BELOW, WORK, RESTORED, ROWS, SUM_BEFORE, SUM_AFTER, HIST_BEFORE,
 * HIST_AFTER, WIDTH (the columns for n_edges edges), FIXED_POINT; out[10] the most
 * edges a call may pass. */
ENTRY_POINT(void, em_inf_stats_layout, (int n_edges, int64_t *out)) {
    const int64_t bins = n_edges + 1;
    const int64_t layout[11] = {STAT_BELOW,      STAT_WORK,       STAT_RESTORED,
                                STAT_ROWS,       STAT_SUM_BEFORE, STAT_SUM_AFTER,
                                STAT_HIST_BEFORE, STAT_HIST_BEFORE + bins,
                                STAT_HIST_BEFORE + 2 * bins, (int64_t)FIXED_POINT,
                                MAX_BINS - 1};
    memcpy(out, layout, sizeof layout);
}

/* Bytes of scratch em_inf_logits / em_inf_temperature need for `threads` threads. */
ENTRY_POINT(int64_t, em_inf_scratch_bytes, (int64_t vocab, int threads)) {
    return (int64_t)slot_bytes(vocab) * (threads < 1 ? 1 : threads);
}

/* EM-INF's logits mode on `rows` rows of `logits` (row r at
 * logits + index[r] * stride, or logits + r * stride when index is NULL; `vocab`
 * logits each): in place when source is NULL, else computed from source's rows
 * (row r at source + index[r] * source_stride, only read, not overlapping
 * logits' rows) into logits' rows (only written, every row listed, the rows left
 * as they were copied), which spares a caller that wants a new tensor its copy
 * of the batch, and the kernels the copy of each row kept for the fail-safe.
 * Parameters, entry r for row r: threshold, kl_weight, lr (float32),
 * steps (int64; a row with steps <= 0 is not processed, nor counted).
 *
 * stats (may be NULL: then nothing is counted, no entropy computed): one mode's
 * int64 counters of em_inf/counters.py, 6 + 2 (n_edges + 1) of them, to add to:
 * [0] rows below their threshold, [1] Adam steps taken (by rows not restored),
 * [2] rows restored by the fail-safe (and rows holding NaN or +inf, left as they
 * are), [3] rows processed, [4] / [5] the sum of the rows' entropy before / after
 * (each llround(h * 1e6)), [6, 6 + n_edges] / [7 + n_edges, 7 + 2 n_edges] rows per
 * entropy bin before / after (bin: the number of edges[] strictly below h; edges:
 * n_edges doubles, ascending, at most em_inf_stats_layout's out[10]). A row left as
 * it was (below its threshold, restored, all masked: entropy 0) has the same
 * entropy after as before; a row holding NaN or +inf counts in [2] and [3] only.
 * sample: the entropy after ([5], and the bins after) is measured and counted for
 * the rows whose llround(entropy before * 1e6) is a multiple of it (1: every row;
 * a row that runs all its steps pays one more exp per logit for it).
 * scratch: em_inf_scratch_bytes for `threads`. */
ENTRY_POINT(void, em_inf_logits,
            (float *logits, const int64_t *index, int64_t rows, int64_t vocab,
             int64_t stride, const float *source, int64_t source_stride,
             const float *threshold, const float *kl_weight, const float *lr,
             const int64_t *steps, double beta1, double beta2, double eps,
             void *scratch, int64_t *stats, const double *edges, int n_edges,
             int64_t sample, int threads)) {
    Batch b = {.logits = logits, .source = source, .index = index, .rows = rows,
               .vocab = vocab, .stride = stride, .source_stride = source_stride,
               .threshold = threshold, .kl_weight = kl_weight, .lr = lr,
               .steps = steps, .beta1 = beta1, .beta2 = beta2, .eps = eps,
               .count = stats != NULL, .edges = edges, .n_edges = n_edges,
               .sample = sample};
    const int split = split_for_l2(vocab, threads);
    b.ask_ahead = ask_ahead(vocab, threads, split);
    run_batch(&b, logits_row, scratch, stats, threads, split);
}

/* The adaptive-temperature mode on rows as em_inf_logits, in place or out of
 * place as there (every row is processed); parameters threshold, alpha, t_min,
 * t_max (float32); the entropy of a processed row ends within rtol of its target
 * (or at the end of [t_min, t_max] nearer to it). stats, edges, n_edges: as em_inf_logits, with [1] += entropy
 * evaluations (solver passes, the first at T = 1 included); the entropy after is
 * the solver's evaluation at the 1/T returned. inv_t (float32 [rows], may be NULL)
 * receives the factor 1/T each row got (1 for rows left as they were). */
ENTRY_POINT(void, em_inf_temperature,
            (float *logits, const int64_t *index, int64_t rows, int64_t vocab,
             int64_t stride, const float *source, int64_t source_stride,
             const float *threshold, const float *alpha, const float *t_min,
             const float *t_max, double rtol, float *inv_t, void *scratch,
             int64_t *stats, const double *edges, int n_edges, int threads)) {
    Batch b = {.logits = logits, .source = source, .index = index, .rows = rows,
               .vocab = vocab, .stride = stride, .source_stride = source_stride,
               .threshold = threshold, .alpha = alpha, .t_min = t_min, .t_max = t_max,
               .rtol = rtol, .inv_t = inv_t, .count = stats != NULL, .edges = edges,
               .n_edges = n_edges};
    run_batch(&b, temperature_row, scratch, stats, threads, 0);
}

/* The machine's floor for a batch: one pass computing exp of every logit (shifted
 * by the row's first one plus 80, so that nothing overflows) and summing it per
 * row into sums; nothing written. */
ENTRY_POINT(void, em_inf_exp_floor,
            (const float *logits, int64_t rows, int64_t vocab, double *sums,
             int threads)) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *z = logits + r * vocab;
        const float m = z[0] + 80.0f;
        vf s = {0};
        int64_t i = 0;
        for (; i + BLOCK <= vocab; i += BLOCK) {
            vf e[BLOCK_VECTORS];
            EACH_VECTOR e[k] = exp_nonpos(load(z + i + k * LANES) - m);
            s += block_sum(e);
        }
        for (; i < vocab; i++) s[0] += exp_nonpos(splat(z[i] - m))[0];
        double total = 0.0;
        for (int j = 0; j < LANES; j++) total += s[j];
        sums[r] = total;
    }
}

/* Floats per vector this build works in: 16 (AVX-512) or 8 (benchmarks record it). */
ENTRY_POINT(int, em_inf_lanes, (void)) { return LANES; }

/* exp_nonpos over n values (tests compare it with libm). */
ENTRY_POINT(void, em_inf_exp, (const float *x, float *out, int64_t n)) {
    for (int64_t i = 0; i < n; i++) out[i] = exp_nonpos(splat(x[i]))[0];
}
