/* zdtm-style: a 1 GiB sparse anonymous mapping with one page touched every 16 MiB. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    size_t len = 1UL << 30, step = 16UL << 20;
    unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) { puts("FAIL mmap"); return 1; }
    for (int i = 0; i < n; i++) {
        size_t slot = (size_t)i % (len / step);
        *(unsigned long *)(m + slot * step) = (unsigned long)i;
        printf("tick %d\n", i);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    for (size_t slot = 0; slot < len / step; slot++) {
        unsigned long want = 0; int seen = 0;
        for (int i = 0; i < n; i++) if ((size_t)i % (len / step) == slot) { want = i; seen = 1; }
        if (seen && *(unsigned long *)(m + slot * step) != want) { printf("FAIL slot %zu\n", slot); return 1; }
        /* untouched bytes in between must still read as zero */
        if (m[slot * step + 4096 * 3] != 0) { printf("FAIL zero %zu\n", slot); return 1; }
    }
    puts("PASS");
    return 0;
}
