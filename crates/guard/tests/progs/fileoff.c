/* zdtm-style: a file written sequentially through the fd offset and read back at offsets. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#define REC 64
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    const char *path = argc > 2 ? argv[2] : "fileoff.dat";
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { puts("FAIL open"); return 1; }
    char rec[REC], back[REC];
    for (int i = 0; i < n; i++) {
        memset(rec, 0, REC);
        snprintf(rec, REC, "record %d", i);
        if (write(fd, rec, REC) != REC) { printf("FAIL write %d\n", i); return 1; }
        int j = i / 2;
        if (pread(fd, back, REC, (off_t)j * REC) != REC) { printf("FAIL pread %d\n", i); return 1; }
        char want[REC]; memset(want, 0, REC); snprintf(want, REC, "record %d", j);
        if (memcmp(back, want, REC)) { printf("FAIL content %d\n", j); return 1; }
        printf("tick %d\n", i);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (lseek(fd, 0, SEEK_CUR) != (off_t)n * REC) { puts("FAIL offset"); return 1; }
    for (int i = 0; i < n; i++) {
        char want[REC]; memset(want, 0, REC); snprintf(want, REC, "record %d", i);
        if (pread(fd, back, REC, (off_t)i * REC) != REC || memcmp(back, want, REC)) { printf("FAIL final %d\n", i); return 1; }
    }
    puts("PASS");
    return 0;
}
