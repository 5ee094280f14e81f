/* membw: read bandwidth of this machine (GB/s), the bound for a memory-bound decode step.
 * Each of N threads sums its share of a 1 GiB buffer (vectorised loads); best of 5 passes.
 *   cc -O3 -march=native -pthread -o membw membw.c && ./membw [threads]
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES (1ull << 30)
static float *buf;
static size_t per;
static volatile float sink;

static void *work(void *arg) {
    const float *p = buf + (size_t)(uintptr_t)arg * per;
    float a[16] = {0};
    for (size_t i = 0; i < per; i += 16)
        for (int k = 0; k < 16; k++) a[k] += p[i + k];
    float s = 0;
    for (int k = 0; k < 16; k++) s += a[k];
    sink += s;
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    buf = aligned_alloc(64, BYTES);
    memset(buf, 1, BYTES);
    per = BYTES / sizeof(float) / n;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        pthread_t th[64];
        double t = now();
        for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, work, (void *)(uintptr_t)i);
        for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
        double gbs = BYTES / (now() - t) / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.2f\n", best);
    return 0;
}
