/*
 * `smolvm-agent --inetd PORT PROG [ARG...]`: listens on TCP PORT (every IPv4 address) and runs
 * PROG once per connection, the connection as its stdin and stdout, the way inetd runs
 * `sshd -i`. The guest init uses it for sshd: no sshd starts at boot (under TCG a listening
 * sshd's start costs about a third of a second of guest CPU, in every boot and every VM restored
 * from a template), and each connection's sshd reads the host key file anew, so a restored VM
 * serves the key its IDENTITY wrote from its first connection on, whatever the OpenSSH version.
 *
 * Prints the listener's pid and exits 0 once listening; the listener goes on in its own session,
 * its stdio on /dev/null (the programs get the connection as stdin and stdout, /dev/null as stderr).
 * At most INETD_MAX programs run at once: a connection beyond that is closed at once.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include "agent.h"

#define INETD_MAX 100

/* Only wakes ppoll(): finished programs are reaped in the loop. */
static void on_child(int sig) { (void)sig; }

int inetd_main(int argc, char **argv) {
  char *end = NULL;
  long port = argc >= 4 ? strtol(argv[2], &end, 10) : 0;
  if (argc < 4 || !end || *end || port < 1 || port > 65535 || argv[3][0] != '/') {
    fputs("usage: smolvm-agent --inetd PORT /ABSOLUTE/PROG [ARG...]\n", stderr);
    return 2;
  }
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int one = 1;
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
  if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
      bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0) {
    fprintf(stderr, "smolvm-agent: cannot listen on port %ld: %s\n", port, strerror(errno));
    return 1;
  }
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "smolvm-agent: fork: %s\n", strerror(errno));
    return 1;
  }
  if (pid > 0) {
    printf("%d\n", (int)pid);
    return 0;
  }
  /* Detached: nothing of the caller's (its terminal, its pipes) stays open in the listener. */
  setsid();
  int null = open("/dev/null", O_RDWR);
  if (null >= 0) { dup2(null, 0); dup2(null, 1); dup2(null, 2); if (null > 2) close(null); }
  struct sigaction sa = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGCHLD, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  /* SIGCHLD is taken only inside ppoll(), so no exit is missed between reaping and waiting. */
  sigset_t chld, waiting, none;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, &waiting);
  sigdelset(&waiting, SIGCHLD);
  sigemptyset(&none);
  int live = 0;
  for (;;) {
    while (waitpid(-1, NULL, WNOHANG) > 0) live--;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (ppoll(&p, 1, NULL, &waiting) <= 0) continue;
    int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) {
      /* Out of descriptors: let running programs finish rather than spin. */
      if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) sleep(1);
      continue;
    }
    if (live >= INETD_MAX) { close(c); continue; }
    pid_t k = fork();
    if (k == 0) {
      signal(SIGCHLD, SIG_DFL);
      signal(SIGPIPE, SIG_DFL);
      sigprocmask(SIG_SETMASK, &none, NULL);
      dup2(c, 0);
      dup2(c, 1);
      execv(argv[3], argv + 3);
      _exit(127);
    }
    if (k > 0) live++;
    close(c);
  }
}
