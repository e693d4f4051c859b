/* zdtm-style: an epoll loop over a timerfd, an eventfd and a pipe (both ends ours), plus a
 * pipe with a growing backlog whose buffered bytes must survive a restore in order. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int tf = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    int ev = eventfd(0, EFD_NONBLOCK);
    int p[2]; if (pipe(p)) { puts("FAIL pipe"); return 1; }
    int q[2]; if (pipe(q)) { puts("FAIL pipe"); return 1; }
    long qw = 0, qr = 0;
    struct itimerspec its = {{0, 5000000}, {0, 5000000}};
    timerfd_settime(tf, 0, &its, NULL);
    struct epoll_event e;
    e.events = EPOLLIN; e.data.u64 = 1; epoll_ctl(ep, EPOLL_CTL_ADD, tf, &e);
    e.events = EPOLLIN; e.data.u64 = 2; epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e);
    e.events = EPOLLIN; e.data.u64 = 3; epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e);
    long timer_ev = 0, event_ev = 0, pipe_ev = 0, mark_t = 0, mark_e = 0, mark_p = 0;
    for (int i = 0; i < n; i++) {
        if (i == n - 40) { mark_t = timer_ev; mark_e = event_ev; mark_p = pipe_ev; }
        uint64_t one = 1;
        write(ev, &one, 8);
        char c = 'x';
        write(p[1], &c, 1);
        struct epoll_event out[4];
        int k = epoll_wait(ep, out, 4, 10);
        for (int j = 0; j < k; j++) {
            uint64_t v; char b;
            if (out[j].data.u64 == 1 && read(tf, &v, 8) == 8) timer_ev++;
            if (out[j].data.u64 == 2 && read(ev, &v, 8) == 8) event_ev++;
            if (out[j].data.u64 == 3 && read(p[0], &b, 1) == 1 && b == 'x') pipe_ev++;
        }
        /* two bytes in, one byte out: the backlog grows by one per iteration */
        for (int k = 0; k < 2; k++) { unsigned char b = qw % 251; if (write(q[1], &b, 1) == 1) qw++; }
        { unsigned char b; if (read(q[0], &b, 1) == 1) { if (b != qr % 251) { printf("FAIL backlog byte %ld\n", qr); return 1; } qr++; } }
        usleep(5000);
        printf("tick %d\n", i);
    }
    close(q[1]);
    unsigned char b;
    while (read(q[0], &b, 1) == 1) { if (b != qr % 251) { printf("FAIL drain byte %ld\n", qr); return 1; } qr++; }
    if (qr != qw) { printf("FAIL backlog %ld of %ld\n", qr, qw); return 1; }
    if (timer_ev - mark_t < 5 || event_ev - mark_e < 5 || pipe_ev - mark_p < 5) {
        printf("FAIL events t=%ld e=%ld p=%ld\n", timer_ev - mark_t, event_ev - mark_e, pipe_ev - mark_p);
        return 1;
    }
    puts("PASS");
    return 0;
}
