/* zdtm-style: a pipe whose writer has exited. The writer child writes the whole counter stream
 * 0..N*4-1 at once and exits (the parent reaps it and closes its own ends); the reader child
 * takes 4 numbers per 10 ms tick, checks every number comes once and in order, and must see
 * end-of-file right after the last one (no writer is left). The parent (pid 1) waits for the
 * reader and prints PASS. Restored mid-stream, the pipe comes back with its buffered bytes and
 * its write end closed. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    unsigned total = (unsigned)n * 4;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int p[2];
    if (pipe(p) != 0) { puts("FAIL pipe"); return 1; }
    pid_t w = fork();
    if (w == 0) {
        close(p[0]);
        for (unsigned i = 0; i < total; i++)
            if (write(p[1], &i, sizeof i) != sizeof i) { puts("FAIL write"); _exit(2); }
        _exit(0);
    }
    int st;
    if (waitpid(w, &st, 0) != w || !WIFEXITED(st) || WEXITSTATUS(st) != 0) { puts("FAIL writer"); return 1; }
    pid_t r = fork();
    if (r == 0) {
        close(p[1]);
        unsigned want = 0, v;
        for (;;) {
            for (int k = 0; k < 4; k++) {
                ssize_t got = read(p[0], &v, sizeof v);
                if (got == 0) {
                    if (want != total) { printf("FAIL end of file at %u of %u\n", want, total); _exit(5); }
                    _exit(0);
                }
                if (got != sizeof v) { printf("FAIL read %zd\n", got); _exit(3); }
                if (v != want) { printf("FAIL stream: got %u, want %u\n", v, want); _exit(4); }
                want++;
            }
            struct timespec ts = {0, 10 * 1000 * 1000};
            while (nanosleep(&ts, &ts) != 0) {}
        }
    }
    close(p[0]);
    close(p[1]);
    if (waitpid(r, &st, 0) != r || !WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("FAIL reader %#x\n", st); return 1; }
    puts("PASS");
    return 0;
}
