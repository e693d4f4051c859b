/* zdtm-style: children that exit before a checkpoint. A exits 7 and is reaped at once (it must
 * not come back); B exits 9 and D is killed by SIGUSR1, and both stay zombies (not reaped)
 * across checkpoints and restores: at the end waitpid must find B exited 9, D killed by
 * SIGUSR1, and then no child at all; and no more than three SIGCHLDs. Meanwhile the parent (pid 1) counts in memory. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t chld;
static void on_chld(int s) { (void)s; chld++; }

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGCHLD, &sa, NULL);
    int st;
    pid_t a = fork();
    if (a == 0) _exit(7);
    if (waitpid(a, &st, 0) != a || !WIFEXITED(st) || WEXITSTATUS(st) != 7) { puts("FAIL reap A"); return 1; }
    pid_t b = fork();
    if (b == 0) _exit(9);
    pid_t d = fork();
    if (d == 0) { raise(SIGUSR1); _exit(1); }
    volatile unsigned long count = 0;
    for (int i = 0; i < n; i++) {
        count++;
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
    }
    if (count != (unsigned long)n) { printf("FAIL count %lu\n", count); return 1; }
    /* Three children ended (SIGCHLDs may merge); recreating the zombies sends none again. */
    if (chld < 1 || chld > 3) { printf("FAIL %d SIGCHLDs\n", (int)chld); return 1; }
    if (waitpid(b, &st, 0) != b || !WIFEXITED(st) || WEXITSTATUS(st) != 9) { printf("FAIL B %#x\n", st); return 1; }
    if (waitpid(d, &st, 0) != d || !WIFSIGNALED(st) || WTERMSIG(st) != SIGUSR1) { printf("FAIL D %#x\n", st); return 1; }
    if (waitpid(-1, &st, WNOHANG) != -1 || errno != ECHILD) { puts("FAIL an extra child"); return 1; }
    puts("PASS");
    return 0;
}
