/* zdtm-style: a listening TCP socket on 127.0.0.1 that answers every connection with
 * "pong <count>"; it must keep accepting after a restore. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    int port = argc > 2 ? atoi(argv[2]) : 47011;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET; a.sin_port = htons(port); a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { printf("FAIL bind %d\n", errno); return 1; }
    int served = 0;
    for (int i = 0; i < n; i++) {
        struct pollfd p = {s, POLLIN, 0};
        if (poll(&p, 1, 10) > 0) {
            int c = accept(s, NULL, NULL);
            if (c >= 0) {
                char msg[32];
                int l = snprintf(msg, sizeof msg, "pong %d\n", served++);
                write(c, msg, l);
                close(c);
            }
        }
        printf("tick %d\n", i);
    }
    printf("served %d\n", served);
    puts(served > 0 ? "PASS" : "FAIL nobody served");
    return served > 0 ? 0 : 1;
}
