/* Things the guard cannot restore faithfully: it must refuse them (io_uring, userfaultfd)
 * or mark the image non-restorable (a device other than null/zero/random/urandom/tty). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    char params[120]; memset(params, 0, sizeof params);
    long r = syscall(SYS_io_uring_setup, 8, params);
    printf("io_uring_setup %s errno %d\n", r < 0 ? "refused" : "allowed", r < 0 ? errno : 0);
    r = syscall(SYS_userfaultfd, 0);
    printf("userfaultfd %s errno %d\n", r < 0 ? "refused" : "allowed", r < 0 ? errno : 0);
    int fd = open("/dev/full", O_WRONLY);
    if (fd < 0) { puts("FAIL open /dev/full"); return 1; }
    struct timespec ts = {0, 300 * 1000 * 1000};
    nanosleep(&ts, NULL);
    puts("PASS");
    return 0;
}
