/* rfork.h: rebootable fork, C ABI of kintsugi's rfork library (librfork.so / librfork.a).
 *
 * rfork_rfork() returns twice, like fork(): the keeper pid in the parent, 0 in the child.
 * The child returns there again, from the same memory, after every crash (death by signal),
 * watchdog kill or rfork_request_restart(); it is removed when it exits normally (policy
 * permitting). The parent reads struct rfork_event records from rfork_events_fd() and reaps
 * with rfork_wait(). The program's own SIGCHLD handling is untouched in parent and child.
 */
#ifndef KINTSUGI_RFORK_H
#define KINTSUGI_RFORK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum rfork_design { RFORK_MONITOR = 0, RFORK_KEPT_IMAGE = 1 };
enum rfork_restart_on { RFORK_ON_CRASH = 0, RFORK_ON_FAILURE = 1, RFORK_ALWAYS = 2, RFORK_ON_REQUEST = 3 };

enum rfork_event_kind {
    RFORK_EV_STARTED = 1, RFORK_EV_RESTARTED = 2, RFORK_EV_REMOVED = 3,
    RFORK_EV_GAVE_UP = 4, RFORK_EV_STANDBY_READY = 5
};
enum rfork_reason {
    RFORK_R_NONE = 0, RFORK_R_EXITED = 1, RFORK_R_SIGNALED = 2, RFORK_R_REQUESTED = 3,
    RFORK_R_HUNG = 4, RFORK_R_OPERATOR = 5
};

#define RFORK_EVENT_MAGIC 0x4b524656u
#define RFORK_GAVE_UP 0x100

/* One event, exactly as read(2) from the events fd (little-endian x86-64 layout). */
struct rfork_event {
    uint32_t magic;          /* RFORK_EVENT_MAGIC */
    uint8_t kind;            /* enum rfork_event_kind */
    uint8_t reason;          /* enum rfork_reason */
    uint16_t reserved;
    int32_t value;           /* exit code or signal number */
    int32_t pid;             /* worker the event is about */
    uint32_t generation;     /* 1 = first worker */
    uint32_t restarts_in_window;
    uint64_t at_ns;          /* CLOCK_MONOTONIC */
};

/* max_restarts 0 = unlimited; watchdog_ms 0 = none; notify_signal 0 = none.
 * Returns the keeper pid (> 0) in the parent, 0 in the child, -errno on error. */
int rfork_rfork(int design, int restart_on, unsigned max_restarts, unsigned within_ms,
                unsigned watchdog_ms, int notify_signal);
int rfork_events_fd(int keeper);
int rfork_wait(int keeper);      /* shell-style status | RFORK_GAVE_UP, or -errno */
int rfork_shutdown(int keeper);  /* as rfork_wait, after terminating the child */
int rfork_restart(int keeper);   /* 0 or -errno */

void rfork_heartbeat(void);
void rfork_request_restart(void) __attribute__((noreturn));
unsigned rfork_generation(void);

#ifdef __cplusplus
}
#endif
#endif
