/* zdtm-style: a counter in anonymous memory (heap + a private mmap) with a checksum shadow.
 * Runs N iterations of 10 ms; prints "tick I" each; at the end checks its own invariants and
 * prints PASS or FAIL. Survives being checkpointed, killed and restored mid-run. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* A lowered soft fd limit is kernel state too (setrlimit is not trapped; /proc shows it). */
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 321;
    setrlimit(RLIMIT_NOFILE, &rl);
    unsigned long *heap = malloc(64 * 1024 * sizeof(unsigned long));
    unsigned long *map = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!heap || map == MAP_FAILED) { puts("FAIL alloc"); return 1; }
    memset(heap, 0, 64 * 1024 * sizeof(unsigned long));
    unsigned long sum = 0;
    for (int i = 0; i < n; i++) {
        heap[i % (64 * 1024)] = i;
        map[(i * 4099) % ((1 << 20) / sizeof(unsigned long))] = i * 3;
        sum += i;
        map[0] = sum;
        printf("tick %d\n", i);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    unsigned long check = 0;
    for (int i = 0; i < n; i++) {
        check += i;
        if (heap[i % (64 * 1024)] != (unsigned long)i && i >= n - 64 * 1024) { printf("FAIL heap %d\n", i); return 1; }
        if (map[(i * 4099) % ((1 << 20) / sizeof(unsigned long))] != (unsigned long)i * 3 && (i * 4099) % ((1 << 20) / sizeof(unsigned long)) != 0) {
            /* a later i may have hit the same slot: only the last writer counts */
            int last = -1;
            for (int j = 0; j < n; j++) if ((j * 4099) % ((1 << 20) / sizeof(unsigned long)) == (i * 4099) % ((1 << 20) / sizeof(unsigned long))) last = j;
            if (last == i) { printf("FAIL map %d\n", i); return 1; }
        }
    }
    if (map[0] != check || sum != check) { printf("FAIL sum %lu %lu %lu\n", map[0], sum, check); return 1; }
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur != 321) { printf("FAIL rlimit %lu\n", (unsigned long)rl.rlim_cur); return 1; }
    puts("PASS");
    return 0;
}
