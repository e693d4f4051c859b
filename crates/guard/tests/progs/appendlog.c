/* zdtm-style: an append-only log; every line must appear exactly once, in order. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    const char *path = argc > 2 ? argv[2] : "append.log";
    setvbuf(stdout, NULL, _IOLBF, 0);
    unlink(path);
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) { puts("FAIL open"); return 1; }
    for (int i = 0; i < n; i++) {
        char line[32];
        int l = snprintf(line, sizeof line, "line %d\n", i);
        if (write(fd, line, l) != l) { printf("FAIL write %d\n", i); return 1; }
        printf("tick %d\n", i);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    FILE *f = fopen(path, "r");
    if (!f) { puts("FAIL reopen"); return 1; }
    char buf[64]; int want = 0;
    while (fgets(buf, sizeof buf, f)) {
        int got;
        if (sscanf(buf, "line %d", &got) != 1 || got != want) { printf("FAIL line %d got %s", want, buf); return 1; }
        want++;
    }
    if (want != n) { printf("FAIL count %d\n", want); return 1; }
    puts("PASS");
    return 0;
}
