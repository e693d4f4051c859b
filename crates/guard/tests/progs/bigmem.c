/* zdtm-style: 64 MB of anonymous memory, written everywhere while the guard takes its first
 * (large, partly copied while running) capture. Invariant: a running total kept apart equals
 * the sum of a counter in every page, so any page restored from the wrong moment fails it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define PAGES (64 * 256)
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned long *m = malloc((size_t)PAGES * 4096);
    if (!m) { puts("FAIL alloc"); return 1; }
    memset(m, 0, (size_t)PAGES * 4096);
    unsigned long total = 0, x = 12345;
    for (int i = 0; i < n; i++) {
        /* a sweep over many pages per iteration, so writes race the first capture */
        for (int k = 0; k < 2000; k++) {
            x = x * 6364136223846793005UL + 1442695040888963407UL;
            m[(size_t)((x >> 33) % PAGES) * 512] += 1;
            total += 1;
        }
        printf("tick %d\n", i);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    unsigned long sum = 0;
    for (size_t p = 0; p < PAGES; p++) sum += m[p * 512];
    if (sum != total) { printf("FAIL sum %lu total %lu\n", sum, total); return 1; }
    puts("PASS");
    return 0;
}
