/* zdtm-style: a pipe between two processes the program forked. The writer child sends a
 * counter stream 0..N*16-1 (16 numbers per 10 ms tick); the reader child checks that every
 * number comes exactly once and in order (no gap, no duplicate) and exits 0; the parent (pid 1)
 * waits for both and prints PASS. Survives the whole tree being killed and restored. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void tick(void) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    while (nanosleep(&ts, &ts) != 0) {}
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    unsigned total = (unsigned)n * 16;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int p[2];
    if (pipe(p) != 0) { puts("FAIL pipe"); return 1; }
    pid_t w = fork();
    if (w == 0) {
        close(p[0]);
        for (unsigned i = 0; i < total;) {
            unsigned batch[16];
            for (int k = 0; k < 16; k++) batch[k] = i + k;
            size_t off = 0;
            while (off < sizeof batch) {
                ssize_t r = write(p[1], (char *)batch + off, sizeof batch - off);
                if (r <= 0) { puts("FAIL write"); _exit(2); }
                off += r;
            }
            i += 16;
            tick();
        }
        close(p[1]);
        _exit(0);
    }
    pid_t r = fork();
    if (r == 0) {
        close(p[1]);
        unsigned want = 0, v;
        size_t have = 0;
        char buf[sizeof v];
        for (;;) {
            ssize_t got = read(p[0], buf + have, sizeof buf - have);
            if (got < 0) { puts("FAIL read"); _exit(3); }
            if (got == 0) break;
            have += got;
            if (have < sizeof buf) continue;
            have = 0;
            __builtin_memcpy(&v, buf, sizeof v);
            if (v != want) { printf("FAIL stream: got %u, want %u\n", v, want); _exit(4); }
            want++;
            if (want % 160 == 0) printf("reader at %u\n", want);
        }
        if (want != total) { printf("FAIL stream ended at %u of %u\n", want, total); _exit(5); }
        _exit(0);
    }
    close(p[0]);
    close(p[1]);
    int sw, sr;
    if (waitpid(w, &sw, 0) != w || waitpid(r, &sr, 0) != r) { puts("FAIL wait"); return 1; }
    if (!WIFEXITED(sw) || WEXITSTATUS(sw) != 0 || !WIFEXITED(sr) || WEXITSTATUS(sr) != 0) {
        printf("FAIL children: writer %#x reader %#x\n", sw, sr);
        return 1;
    }
    puts("PASS");
    return 0;
}
