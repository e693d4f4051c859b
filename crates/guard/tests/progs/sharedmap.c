/* zdtm-style: a MAP_SHARED file mapping written through memory and read back through the
 * file (and the reverse); both views must agree after a restore. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#define LEN (64 * 1024)
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    const char *path = argc > 2 ? argv[2] : "shared.map";
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, LEN)) { puts("FAIL file"); return 1; }
    unsigned *m = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { puts("FAIL mmap"); return 1; }
    for (int i = 0; i < n; i++) {
        m[(i * 97) % (LEN / 4)] = i + 1;           /* through memory */
        unsigned v = 1000000 + i;
        pwrite(fd, &v, 4, (off_t)((LEN / 4 - 1 - i % 100) * 4)); /* through the file */
        unsigned back;
        if (pread(fd, &back, 4, (off_t)((i * 97) % (LEN / 4)) * 4) != 4 || back != (unsigned)i + 1) { printf("FAIL file view %d\n", i); return 1; }
        if (m[LEN / 4 - 1 - i % 100] != v) { printf("FAIL memory view %d\n", i); return 1; }
        printf("tick %d\n", i);
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    for (int i = 0; i < n; i++) {
        int last = i;
        for (int j = i + 1; j < n; j++) if ((j * 97) % (LEN / 4) == (i * 97) % (LEN / 4)) last = j;
        if (m[(i * 97) % (LEN / 4)] != (unsigned)last + 1 && (i * 97) % (LEN / 4) < LEN / 4 - 100) { printf("FAIL final %d\n", i); return 1; }
    }
    puts("PASS");
    return 0;
}
