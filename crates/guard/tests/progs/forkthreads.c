/* zdtm-style: a child the program forked runs 3 threads, each counting in its own __thread
 * variable; the child exits 0 when every thread counted to N, and the parent (pid 1) prints
 * PASS when it sees that. Restored mid-run, the child comes back with its threads (clone3
 * set_tid inside a restored child process). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int n;
static __thread long mine;

static void *work(void *arg) {
    (void)arg;
    for (int i = 0; i < n; i++) {
        mine++;
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
    }
    return mine == n ? NULL : (void *)1;
}

int main(int argc, char **argv) {
    n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t c = fork();
    if (c == 0) {
        pthread_t t[3];
        for (long i = 0; i < 3; i++) pthread_create(&t[i], NULL, work, (void *)i);
        int bad = 0;
        for (int i = 0; i < 3; i++) {
            void *r;
            pthread_join(t[i], &r);
            if (r) bad = 1;
        }
        _exit(bad);
    }
    int st;
    if (waitpid(c, &st, 0) != c) { puts("FAIL wait"); return 1; }
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("FAIL child %#x\n", st); return 1; }
    puts("PASS");
    return 0;
}
