/*
 * What each pass of the CPU kernels costs on one thread, in cycles per vector of
 * logits: the kernels' own source is included (its static passes called directly)
 * and each pass timed over one row of `vocab` logits, many times, from the same
 * inputs every time (the row and the Adam moments restored by a copy, whose own
 * time is measured alone and taken off). Built and run by bench/cpu_units.py;
 * prints one "name cycles" line per pass. Arguments: vocab, repetitions, the
 * clock in GHz (from bench/cpu_units.c). KERNELS_SOURCE, when defined, names
 * another version of the kernels' source to include (to compare two).
 */
#ifdef KERNELS_SOURCE
#include KERNELS_SOURCE
#else
#include "../em_inf/cpu_kernels.c"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float *row(int64_t n) {
    float *p = NULL;
    if (posix_memalign((void **)&p, 64, (size_t)padded(n) * sizeof(float))) exit(1);
    return p;
}

/* The inputs of a step, kept, and the buffers the passes work in. */
typedef struct {
    int64_t n;
    float *z0, *m0, *v0, *e0; /* inputs */
    float *z, *m, *v, *e, *p0, *keep;
} Rows;

static void restore(Rows *r) {
    memcpy(r->z, r->z0, (size_t)r->n * sizeof(float));
    memcpy(r->m, r->m0, (size_t)r->n * sizeof(float));
    memcpy(r->v, r->v0, (size_t)r->n * sizeof(float));
    memcpy(r->e, r->e0, (size_t)r->n * sizeof(float));
}

/* Seconds per call of BODY, fastest of RUNS runs of `reps` calls. */
#define RUNS 9
#define SECONDS(reps, BODY)                                                          \
    ({                                                                               \
        double best_ = 1e30;                                                         \
        for (int run_ = 0; run_ < RUNS; run_++) {                                    \
            const double t0_ = now();                                                \
            for (int k_ = 0; k_ < (reps); k_++) { BODY; }                            \
            const double t_ = (now() - t0_) / (reps);                                \
            best_ = t_ < best_ ? t_ : best_;                                         \
        }                                                                            \
        best_;                                                                       \
    })

/* Seconds per call of BODY alone, where each call needs restore(&r) first: the
 * fastest of RUNS runs of both together less the fastest of RUNS runs of the
 * restore alone, the two alternating run by run. */
#define SECONDS_AFTER_RESTORE(r, reps, BODY)                                         \
    ({                                                                               \
        double both_ = 1e30, alone_ = 1e30;                                          \
        for (int run_ = 0; run_ < RUNS; run_++) {                                    \
            double t0_ = now();                                                      \
            for (int k_ = 0; k_ < (reps); k_++) restore(r);                          \
            double t_ = (now() - t0_) / (reps);                                      \
            alone_ = t_ < alone_ ? t_ : alone_;                                      \
            t0_ = now();                                                             \
            for (int k_ = 0; k_ < (reps); k_++) {                                    \
                restore(r);                                                          \
                BODY;                                                                \
            }                                                                        \
            t_ = (now() - t0_) / (reps);                                             \
            both_ = t_ < both_ ? t_ : both_;                                         \
        }                                                                            \
        both_ - alone_;                                                              \
    })

int main(int argc, char **argv) {
    const int64_t n = argc > 1 ? atol(argv[1]) : 151936;
    const int reps = argc > 2 ? atoi(argv[2]) : 200;
    const double ghz = argc > 3 ? atof(argv[3]) : 3.0;
    Rows r = {n, row(n), row(n), row(n), row(n), row(n), row(n), row(n), row(n), row(n), row(n)};
    unsigned seed = 1;
    for (int64_t i = 0; i < n; i++) /* Gaussian-like logits of scale 3, one peak */
        r.z0[i] = 3.0f * ((float)rand_r(&seed) / RAND_MAX + (float)rand_r(&seed) / RAND_MAX +
                          (float)rand_r(&seed) / RAND_MAX - 1.5f) * 2.0f;
    r.z0[n / 2] += 12.0f;
    Partial scan, stats;
    scan_chunk(r.z0, 0, n, 0, &scan);
    stats_keep_chunk(r.z0, r.p0, r.keep, 0, n, scan.max, &stats);
    Step s;
    s.shift = scan.max;
    s.inv_sum = s.inv_sum0 = (float)(1.0 / stats.sum_e);
    s.mean = (float)(stats.sum_ez / stats.sum_e);
    s.kl = 0.05f;
    s.beta1 = 0.9f;
    s.beta2 = 0.999f;
    s.eps = 1e-8f;
    s.step = 0.1f;
    s.sqrt_bc = 1.0f;
    s.v_is_m_squared = 0;
    /* moments and exponentials of a second step: those the first leaves (it
     * writes m = g only; v = g^2 = m * m) */
    memcpy(r.z, r.z0, (size_t)n * sizeof(float));
    update_chunk(r.z, r.z, r.p0, r.p0, r.m0, r.v0, 0, n, &s, 1, 0, 0, 0, NULL, &stats);
    for (int64_t i = 0; i < n; i++) r.v0[i] = r.m0[i] * r.m0[i];
    stats_chunk(r.z, r.e0, 0, n, s.shift, &stats);
    Step s2 = s;
    s2.step = (float)(0.1 * 0.1 / (1.0 - 0.81));
    s2.sqrt_bc = (float)sqrt(0.001 / (1.0 - 0.999 * 0.999));
    s2.inv_sum = (float)(1.0 / stats.sum_e);
    s2.mean = (float)(stats.sum_ez / stats.sum_e);
    Step second = s2; /* the second step takes v as m * m; later ones read it */
    second.v_is_m_squared = 1;

    const double per_vector = ghz * 1e9 * LANES / (double)n;
    volatile float sink = 0.0f;
    double t;
    t = SECONDS(reps, {
        vf acc = {0};
        for (int64_t i = 0; i + LANES <= n; i += LANES)
            acc += exp_nonpos(load(r.z0 + i) - scan.max);
        sink += acc[0];
    });
    printf("exp_pass %.3f\n", t * per_vector);
    t = SECONDS(reps, scan_chunk(r.z0, 0, n, 0, &scan); sink += scan.max);
    printf("scan %.3f\n", t * per_vector);
    t = SECONDS(reps, stats_keep_chunk(r.z0, r.p0, r.keep, 0, n, scan.max, &stats));
    printf("statistics_with_copy %.3f\n", t * per_vector);
    t = SECONDS(reps, stats_chunk(r.z0, r.e, 0, n, scan.max, &stats));
    printf("statistics %.3f\n", t * per_vector);
    t = SECONDS_AFTER_RESTORE(&r, reps, update_chunk(r.z, r.z, r.p0, r.p0, r.m, r.v, 0, n, &s, 1, 0, 0, 0, NULL, &stats));
    printf("update_step_1 %.3f\n", t * per_vector);
    t = SECONDS_AFTER_RESTORE(&r, reps, update_chunk(r.z, r.z, r.e, r.p0, r.m, r.v, 0, n, &second, 0, 1, 0, 0, NULL, &stats));
    printf("update_second_step %.3f\n", t * per_vector);
    t = SECONDS_AFTER_RESTORE(&r, reps, update_chunk(r.z, r.z, r.e, r.p0, r.m, r.v, 0, n, &s2, 0, 1, 0, 0, NULL, &stats));
    printf("update_further_step %.3f\n", t * per_vector);
    t = SECONDS_AFTER_RESTORE(&r, reps, update_chunk(r.z, r.z, r.e, r.p0, r.m, r.v, 0, n, &s2, 0, 1, 1, 0, NULL, &stats));
    printf("update_last_step %.3f\n", t * per_vector);
    const float b = 1.3f; /* a solver pass at 1/T = 1.3, with and without e zs^3 */
    t = SECONDS(reps, temperature_chunk(r.z0, 0, n, scan.max, b, 1, &stats));
    printf("temperature_pass %.3f\n", t * per_vector);
    t = SECONDS(reps, temperature_chunk(r.z0, 0, n, scan.max, b, 0, &stats));
    printf("temperature_pass_without_third %.3f\n", t * per_vector);
    return sink == 12345.0f;
}
