/* zdtm-style: an interval timer (setitimer) delivering SIGALRM to a handler; the handler must
 * keep firing after a restore. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
static volatile sig_atomic_t ticks;
static void on_alarm(int sig) { (void)sig; ticks++; }
static volatile sig_atomic_t usr1;
static void on_usr1(int sig) { (void)sig; usr1++; }
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm; sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    /* A blocked, pending SIGUSR1 must still be pending after a restore. */
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t set; sigemptyset(&set); sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);
    raise(SIGUSR1);
    struct itimerval it = {{0, 5000}, {0, 5000}};
    setitimer(ITIMER_REAL, &it, NULL);
    int mark = 0;
    for (int i = 0; i < n; i++) {
        if (i == n - 40) mark = ticks;
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
        printf("tick %d alarms %d\n", i, (int)ticks);
    }
    sigset_t pend; sigpending(&pend);
    if (!sigismember(&pend, SIGUSR1)) { puts("FAIL SIGUSR1 no longer pending"); return 1; }
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    if (usr1 != 1) { printf("FAIL SIGUSR1 delivered %d times\n", (int)usr1); return 1; }
    int recent = ticks - mark;
    if (recent < 20) { printf("FAIL only %d alarms in the last 40 iterations\n", recent); return 1; }
    puts("PASS");
    return 0;
}
