/* zdtm-style: 4 threads, each with its own state (a __thread counter, a stack variable and a
 * heap slot), a shared mutex-protected total, and pthread_join at the end. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static __thread long mine;
static long *slots;
static long total;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int n;
static void *work(void *arg) {
    long id = (long)arg;
    long local = 0;
    for (int i = 0; i < n; i++) {
        mine++;
        local += id + 1;
        slots[id] = local;
        pthread_mutex_lock(&lock);
        total++;
        pthread_mutex_unlock(&lock);
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
    }
    if (mine != n || local != (long)n * (id + 1)) return (void *)1;
    return NULL;
}
int main(int argc, char **argv) {
    n = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    slots = calloc(4, sizeof(long));
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, work, (void *)i);
    for (int i = 0; i < n; i++) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
        printf("tick %d\n", i);
    }
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        if (r) { printf("FAIL thread %d state\n", i); return 1; }
        if (slots[i] != (long)n * (i + 1)) { printf("FAIL slot %d\n", i); return 1; }
    }
    if (total != 4L * n) { printf("FAIL total %ld\n", total); return 1; }
    puts("PASS");
    return 0;
}
