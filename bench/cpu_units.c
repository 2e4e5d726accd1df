/*
 * What one core's vector units cost: the clock (a chain of dependent integer adds
 * of a register, one cycle each) and, in cycles, the throughput of the
 * instructions the CPU kernels' passes are made of (eight independent
 * instructions per loop turn, so latency does not count). Built and run by
 * bench/cpu_units.py; prints one "name cycles" line per measurement (names ending
 * in _per_turn: cycles per loop turn). x86-64 with AVX2 (and AVX-512 where built
 * for it).
 */
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define TURNS 20000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Eight copies of one instruction writing registers 0-7 from registers 8 and 9. */
#define EIGHT(op, r)                                                                  \
    op " %%" r "9, %%" r "8, %%" r "0\n\t" op " %%" r "9, %%" r "8, %%" r "1\n\t" op       \
       " %%" r "9, %%" r "8, %%" r "2\n\t" op " %%" r "9, %%" r "8, %%" r "3\n\t" op       \
       " %%" r "9, %%" r "8, %%" r "4\n\t" op " %%" r "9, %%" r "8, %%" r "5\n\t" op       \
       " %%" r "9, %%" r "8, %%" r "6\n\t" op " %%" r "9, %%" r "8, %%" r "7\n\t"
#define EIGHT_UNARY(op, r)                                                            \
    op " %%" r "9, %%" r "0\n\t" op " %%" r "9, %%" r "1\n\t" op " %%" r "9, %%" r         \
       "2\n\t" op " %%" r "9, %%" r "3\n\t" op " %%" r "9, %%" r "4\n\t" op " %%" r         \
       "9, %%" r "5\n\t" op " %%" r "9, %%" r "6\n\t" op " %%" r "9, %%" r "7\n\t"
/* Eight independent FMAs, into registers 10-17. */
#define EIGHT_FMA_APART                                                               \
    "vfmadd231ps %%zmm9, %%zmm8, %%zmm10\n\tvfmadd231ps %%zmm9, %%zmm8, %%zmm11\n\t"        \
    "vfmadd231ps %%zmm9, %%zmm8, %%zmm12\n\tvfmadd231ps %%zmm9, %%zmm8, %%zmm13\n\t"        \
    "vfmadd231ps %%zmm9, %%zmm8, %%zmm14\n\tvfmadd231ps %%zmm9, %%zmm8, %%zmm15\n\t"        \
    "vfmadd231ps %%zmm9, %%zmm8, %%zmm16\n\tvfmadd231ps %%zmm9, %%zmm8, %%zmm17\n\t"
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7"
/* The same and registers 10-17 (AVX-512 only: 16-17 exist there alone). */
#define CLOBBERS_APART                                                                \
    CLOBBERS, "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17"

/* Cycles per instruction of a body of `count` instructions, at `ghz`. */
#define MEASURE_CLOBBERING(name, body, count, ...)                                   \
    do {                                                                             \
        const double t0 = now();                                                     \
        for (long i = 0; i < TURNS; i++) __asm__ volatile(body ::: __VA_ARGS__);     \
        printf("%s %.3f\n", name, (now() - t0) * ghz * 1e9 / (TURNS * (count)));     \
    } while (0)
#define MEASURE(name, body, count) MEASURE_CLOBBERING(name, body, count, CLOBBERS)

int main(void) {
    /* the fastest of five runs: another process only ever slows one down */
    /* adds of a register: recent Intel cores fold a chain of adds of an immediate
     * into fewer operations (such a chain read 16 GHz on a 4 GHz Xeon) */
    uint64_t x = 1, step = 1;
    const long adds = 2 * TURNS;
    double ghz = 0.0;
    for (int run = 0; run < 5; run++) {
        const double t0 = now();
        for (long i = 0; i < adds; i++)
            __asm__ volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0"
                             : "+r"(x)
                             : "r"(step));
        const double g = 4.0 * (double)adds / (now() - t0) / 1e9;
        ghz = g > ghz ? g : ghz;
    }
    printf("clock_ghz %.3f\n", ghz);
    /* registers 8 and 9 hold 1.0001 (no denormals, no special values) */
    const float one[16] __attribute__((aligned(64))) = {
        1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f,
        1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f};
#if defined(__AVX512F__)
    __asm__ volatile("vmovaps %0, %%zmm8\n\tvmovaps %0, %%zmm9" ::"m"(one) : "xmm8", "xmm9");
    MEASURE("zmm_fma", EIGHT("vfmadd231ps", "zmm"), 8);
    MEASURE("zmm_add", EIGHT("vaddps", "zmm"), 8);
    MEASURE("zmm_mul", EIGHT("vmulps", "zmm"), 8);
    MEASURE("zmm_max", EIGHT("vmaxps", "zmm"), 8);
    MEASURE("zmm_scalef", EIGHT("vscalefps", "zmm"), 8);
    MEASURE("zmm_div", EIGHT("vdivps", "zmm"), 8);
    MEASURE("zmm_sqrt", EIGHT_UNARY("vsqrtps", "zmm"), 8);
    MEASURE("zmm_rcp14", EIGHT_UNARY("vrcp14ps", "zmm"), 8);
    MEASURE("zmm_rsqrt14", EIGHT_UNARY("vrsqrt14ps", "zmm"), 8);
    MEASURE("zmm_fma_and_add_alternating",
            "vfmadd231ps %%zmm9, %%zmm8, %%zmm0\n\tvaddps %%zmm9, %%zmm8, %%zmm1\n\t"
            "vfmadd231ps %%zmm9, %%zmm8, %%zmm2\n\tvaddps %%zmm9, %%zmm8, %%zmm3\n\t"
            "vfmadd231ps %%zmm9, %%zmm8, %%zmm4\n\tvaddps %%zmm9, %%zmm8, %%zmm5\n\t"
            "vfmadd231ps %%zmm9, %%zmm8, %%zmm6\n\tvaddps %%zmm9, %%zmm8, %%zmm7\n\t",
            8);
    /* eight FMAs beside one square root, and beside one division: what either
     * takes from the FMA units (cycles per turn of nine) */
    MEASURE_CLOBBERING("zmm_8_fma_beside_sqrt_per_turn",
                       "vsqrtps %%zmm9, %%zmm0\n\t" EIGHT_FMA_APART, 1, CLOBBERS_APART);
    MEASURE_CLOBBERING("zmm_8_fma_beside_div_per_turn",
                       "vdivps %%zmm9, %%zmm8, %%zmm0\n\t" EIGHT_FMA_APART, 1,
                       CLOBBERS_APART);
    MEASURE_CLOBBERING("zmm_8_fma_per_turn", EIGHT_FMA_APART, 1, CLOBBERS_APART);
    /* the square root and the division of one Adam step, beside six FMAs */
    MEASURE("zmm_sqrt_div_beside_6_fma",
            "vsqrtps %%zmm9, %%zmm0\n\tvfmadd231ps %%zmm9, %%zmm8, %%zmm2\n\t"
            "vfmadd231ps %%zmm9, %%zmm8, %%zmm3\n\tvfmadd231ps %%zmm9, %%zmm8, %%zmm4\n\t"
            "vdivps %%zmm9, %%zmm8, %%zmm1\n\tvfmadd231ps %%zmm9, %%zmm8, %%zmm5\n\t"
            "vfmadd231ps %%zmm9, %%zmm8, %%zmm6\n\tvfmadd231ps %%zmm9, %%zmm8, %%zmm7\n\t",
            8);
#endif
    __asm__ volatile("vmovaps %0, %%ymm8\n\tvmovaps %0, %%ymm9" ::"m"(one) : "xmm8", "xmm9");
    MEASURE("ymm_fma", EIGHT("vfmadd231ps", "ymm"), 8);
    MEASURE("ymm_add", EIGHT("vaddps", "ymm"), 8);
    MEASURE("ymm_div", EIGHT("vdivps", "ymm"), 8);
    MEASURE("ymm_sqrt", EIGHT_UNARY("vsqrtps", "ymm"), 8);
    return 0;
}
