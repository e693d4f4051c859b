/* zdtm-style: a parent (pid 1) and the child it forked each keep their own counter in
 * anonymous memory at the same address (copy-on-write after fork) with a checksum shadow, and
 * check that their pids, parent pid, group and session (the child makes its own) stay what
 * they were, and that the SIGUSR2 handler set before the fork is still in place in both. The
 * child exits 0 when its invariants hold; the parent checks that, then its own, and prints
 * PASS. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t usr2;
static void on_usr2(int s) { (void)s; usr2++; }

static int run(const char *who, int n, unsigned long mul) {
    unsigned long *map = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned long *heap = malloc(4096 * sizeof(unsigned long));
    if (map == MAP_FAILED || !heap) { printf("FAIL %s alloc\n", who); return 1; }
    memset(heap, 0, 4096 * sizeof(unsigned long));
    pid_t me = getpid(), parent = getppid(), pgrp = getpgrp(), sid = getsid(0);
    unsigned long sum = 0;
    for (int i = 0; i < n; i++) {
        map[(i * 613) % ((1 << 20) / sizeof(unsigned long))] = i * mul;
        heap[i % 4096] = i * mul;
        sum += i * mul;
        map[0] = sum;
        if (getpid() != me || getppid() != parent || getpgrp() != pgrp || getsid(0) != sid) {
            printf("FAIL %s pid %d ppid %d pgrp %d sid %d, was %d %d %d %d\n", who, getpid(),
                   getppid(), getpgrp(), getsid(0), me, parent, pgrp, sid);
            return 1;
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
    }
    unsigned long check = 0;
    for (int i = 0; i < n; i++) check += i * mul;
    if (sum != check || map[0] != check) { printf("FAIL %s sum %lu %lu %lu\n", who, sum, map[0], check); return 1; }
    if (heap[(n - 1) % 4096] != (unsigned long)(n - 1) * mul) { printf("FAIL %s heap\n", who); return 1; }
    /* The handler installed before the fork is each process's own after a restore too. */
    raise(SIGUSR2);
    if (usr2 != 1) { printf("FAIL %s SIGUSR2 handler ran %d times\n", who, (int)usr2); return 1; }
    return 0;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR2, &sa, NULL);
    pid_t c = fork();
    if (c == 0) {
        /* Its own session (and group): restore must replay setsid. */
        if (setsid() != getpid()) { puts("FAIL setsid"); _exit(1); }
        _exit(run("child", n, 3));
    }
    int bad = run("parent", n, 7);
    int st;
    if (waitpid(c, &st, 0) != c) { puts("FAIL wait"); return 1; }
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("FAIL child status %#x\n", st); return 1; }
    if (bad) return 1;
    puts("PASS");
    return 0;
}
