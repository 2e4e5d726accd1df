/*
 * When does an OpenMP team's second thread start work, after the process spent a
 * while elsewhere? Run by bench/thread_wake.py (which compiles it with -fopenmp).
 *
 * For each gap (none, a busy loop, a sleep), `rounds` times: the gap, then one
 * parallel region of two threads, as the CPU kernels open for a call. Each thread
 * notes when it entered the region (from just before it was opened) and on which
 * CPU, then both pass `barriers` barriers with about 20 us of arithmetic before
 * each (the kernels pass one after every pass over a split row). Prints one
 * "name value" line per figure: per gap, the median, 90th percentile and largest
 * entry delay of the later thread (us), the median region time (us) and the share
 * of regions in which both threads were seen on one CPU.
 */
#define _GNU_SOURCE
#include <omp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void spin_us(double us) {
    const double end = now_us() + us;
    while (now_us() < end) {
    }
}

static void sleep_us(double us) {
    struct timespec t = {(time_t)(us / 1e6), (long)((us - (time_t)(us / 1e6) * 1e6) * 1e3)};
    nanosleep(&t, NULL);
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static volatile float sink;

/* About 20 us of dependent arithmetic. */
static void work(void) {
    float s = 1.0f;
    for (int i = 0; i < 20000; i++) s = s * 1.0000001f + 1e-7f;
    sink = s;
}

typedef struct {
    const char *name;
    int busy;   /* 1: a busy loop, 0: a sleep */
    double us;  /* its length (0: none) */
} Gap;

int main(int argc, char **argv) {
    const int rounds = argc > 1 ? atoi(argv[1]) : 40;
    const int barriers = argc > 2 ? atoi(argv[2]) : 50;
    const Gap gaps[] = {{"none", 1, 0.0},
                        {"spin_20ms", 1, 20000.0},
                        {"sleep_2ms", 0, 2000.0},
                        {"sleep_30ms", 0, 30000.0}};
    double *delay = malloc(sizeof(double) * rounds);
    double *region = malloc(sizeof(double) * rounds);
#pragma omp parallel num_threads(2) /* the team exists before the first gap */
    work();
    for (size_t g = 0; g < sizeof gaps / sizeof gaps[0]; g++) {
        int shared_cpu = 0;
        for (int r = 0; r < rounds; r++) {
            if (gaps[g].us > 0) {
                if (gaps[g].busy)
                    spin_us(gaps[g].us);
                else
                    sleep_us(gaps[g].us);
            }
            double entered[2] = {0, 0};
            int cpu[2][2] = {{-1, -1}, {-1, -1}};
            const double start = now_us();
#pragma omp parallel num_threads(2)
            {
                const int t = omp_get_thread_num();
                entered[t] = now_us() - start;
                cpu[t][0] = sched_getcpu();
                for (int b = 0; b < barriers; b++) {
                    work();
#pragma omp barrier
                }
                cpu[t][1] = sched_getcpu();
            }
            region[r] = now_us() - start;
            delay[r] = entered[0] > entered[1] ? entered[0] : entered[1];
            shared_cpu += cpu[0][0] == cpu[1][0] || cpu[0][1] == cpu[1][1];
        }
        qsort(delay, rounds, sizeof(double), by_value);
        qsort(region, rounds, sizeof(double), by_value);
        printf("%s_delay_median_us %.1f\n", gaps[g].name, delay[rounds / 2]);
        printf("%s_delay_p90_us %.1f\n", gaps[g].name, delay[rounds * 9 / 10]);
        printf("%s_delay_max_us %.1f\n", gaps[g].name, delay[rounds - 1]);
        printf("%s_region_median_us %.1f\n", gaps[g].name, region[rounds / 2]);
        printf("%s_one_cpu_share %.3f\n", gaps[g].name, (double)shared_cpu / rounds);
    }
    free(delay);
    free(region);
    return 0;
}
