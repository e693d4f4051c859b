/* A C program that uses rfork: the child crashes (a real SIGSEGV), then asks for a restart,
 * then exits normally; every generation must start from the state at rfork time. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "rfork.h"

static int state = 0;

int main(int argc, char **argv) {
    int design = argc > 1 ? atoi(argv[1]) : RFORK_MONITOR;
    int k = rfork_rfork(design, RFORK_ON_CRASH, 10, 60000, 0, 0);
    if (k < 0) { fprintf(stderr, "rfork failed: %d\n", k); return 2; }
    if (k == 0) {
        unsigned g = rfork_generation();
        if (state != 0) _exit(9);          /* a predecessor's write leaked into this generation */
        state = 42;
        if (g == 1) { volatile int *p = 0; *p = 1; }   /* SIGSEGV */
        if (g == 2) rfork_request_restart();
        _exit(0);
    }
    struct rfork_event ev;
    int fd = rfork_events_fd(k);
    while (read(fd, &ev, sizeof ev) == (ssize_t)sizeof ev) {
        if (ev.magic != RFORK_EVENT_MAGIC) { fprintf(stderr, "bad magic\n"); return 3; }
        if (ev.kind == RFORK_EV_STANDBY_READY) continue;
        printf("event kind=%d reason=%d value=%d gen=%u\n", ev.kind, ev.reason, ev.value, ev.generation);
        if (ev.kind == RFORK_EV_REMOVED || ev.kind == RFORK_EV_GAVE_UP) break;
    }
    int st = rfork_wait(k);
    printf("final=%d\n", st);
    fflush(stdout);
    return st == 0 ? 0 : 1;
}
