/*
 * smolvm-agent: the guest side of the smolvm control channel (agent/PROTOCOL.md).
 *
 * One process, one poll() loop, non-blocking fds, no threads. Memory is bounded: one input
 * frame, a 1 MiB output buffer (+ reserve), and per stream at most one credit window of stdin.
 * Children run in their own session so timeouts and cancels kill the whole process group.
 *
 * This file holds the state, the stream table, the transport (socket, serial port or fd) and
 * main's poll loop. The rest: frames.c (framing, output buffer, fields), auth.c (handshake),
 * dispatch.c (routing frames, pump), exec.c, files.c (PUT/GET), wait.c (WAIT_PORT), fsops.c,
 * procs.c, identity.c, inetd.c (the per-connection listener sshd runs under); agent.h declares
 * what they share.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
struct sockaddr_vm_compat {
  sa_family_t svm_family;
  unsigned short svm_reserved1;
  unsigned int svm_port;
  unsigned int svm_cid;
  unsigned char svm_zero[sizeof(struct sockaddr) - sizeof(sa_family_t) - sizeof(unsigned short) -
                         2 * sizeof(unsigned int)];
};

#include "agent.h"

agent_state_t G;

void logf_(const char *fmt, ...) {
  if (!G.verbose) return;
  va_list ap;
  va_start(ap, fmt);
  fputs("smolvm-agent: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("smolvm-agent: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(2);
}

int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void on_signal(int sig) {
  int e = errno;
  if (sig == SIGTERM || sig == SIGINT) G.stop = 1;
  ssize_t r = write(G.sigpipe[1], "x", 1);
  (void)r;
  errno = e;
}

/* ------------------------------------------------------------------ streams */

stream_t *find_stream(uint32_t id) {
  if (!id) return NULL;
  for (int i = 0; i < G.hi; i++)
    if (G.streams[i].kind != K_FREE && G.streams[i].id == id) return &G.streams[i];
  return NULL;
}

stream_t *new_stream(uint32_t id, int kind) {
  for (int i = 0; i < MAX_STREAMS; i++) {
    stream_t *s = &G.streams[i];
    if (s->kind == K_FREE) {
      memset(s, 0, sizeof *s);
      s->kind = kind;
      s->id = id;
      s->send_credit = WINDOW;
      s->recv_window = WINDOW;
      s->fd_in = s->fd_out = s->fd_err = s->fd_file = s->sock = -1;
      G.nstreams++;
      if (i >= G.hi) G.hi = i + 1;
      return s;
    }
  }
  return NULL;
}

void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

/* Releases everything the stream holds. Exec process groups are SIGKILLed unless finished. */
void free_stream(stream_t *s) {
  if (s->kind == K_EXEC && s->pid > 0 && (!s->reaped || !s->done)) kill(-s->pid, SIGKILL);
  close_fd(&s->fd_in);
  close_fd(&s->fd_out);
  close_fd(&s->fd_err);
  close_fd(&s->fd_file);
  close_fd(&s->sock);
  if (s->tmp_path) unlink(s->tmp_path);
  if (s->kind == K_WATCH) watch_free(s);
  free(s->mem);
  free(s->tmp_path);
  free(s->final_path);
  free(s->inbuf);
  memset(s, 0, sizeof *s);
  s->kind = K_FREE;
  G.nstreams--;
  while (G.hi > 0 && G.streams[G.hi - 1].kind == K_FREE) G.hi--;
}

void set_terminal(stream_t *s, uint8_t type, const void *payload, size_t len) {
  if (s->done) return;
  s->done = 1;
  s->term_type = type;
  if (len > sizeof s->term) len = sizeof s->term;
  memcpy(s->term, payload, len);
  s->term_len = (uint16_t)len;
}

void set_error(stream_t *s, uint16_t code, int err, const char *fmt, ...) {
  uint8_t buf[ERROR_PAYLOAD_MAX];
  va_list ap;
  va_start(ap, fmt);
  size_t len = error_payload(buf, code, err, fmt, ap);
  va_end(ap);
  set_terminal(s, T_ERROR, buf, len);
}

void drop_all_streams(void) {
  for (int i = 0; i < G.hi; i++)
    if (G.streams[i].kind != K_FREE) free_stream(&G.streams[i]);
}

/* ------------------------------------------------------------------ transport */

static void accept_conn(void) {
  int fd = accept4(G.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) return;
  if (G.conn_fd >= 0) {
    logf_("new host connection replaces the old one");
    close_conn();
  }
  G.conn_fd = fd;
  G.state = S_WAIT_HELLO;
  G.in_len = 0;
  G.out_off = G.out_len = 0;
}

static void read_conn(void) {
  if (G.state == S_CLOSING) {
    uint8_t junk[4096];
    for (;;) {
      ssize_t r = read(G.conn_fd, junk, sizeof junk);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && errno == EAGAIN) return;
      if (r <= 0) { close_conn(); return; }
    }
  }
  for (;;) {
    if (G.in_len == IN_CAP) return;
    ssize_t r = read(G.conn_fd, G.in + G.in_len, IN_CAP - G.in_len);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) return;
    if (r <= 0) { host_gone(); return; }
    G.hup_logged = 0;
    G.in_len += (size_t)r;
    process_input();
    if (G.state == S_OFF || G.conn_fd < 0) return;
    if (G.out_len > OUT_SOFT) return;
  }
}

static void write_conn(void) {
  while (G.out_len && G.conn_fd >= 0) {
    ssize_t w = write(G.conn_fd, G.out + G.out_off, G.out_len);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) return;
    if (w <= 0) { host_gone(); return; }
    G.out_off += (size_t)w;
    G.out_len -= (size_t)w;
  }
  if (!G.out_len) G.out_off = 0;
}

static int open_listener(void) {
  int fd;
  if (G.transport == TR_UNIX) {
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(G.path) >= sizeof a.sun_path) die("unix socket path too long: %s", G.path);
    strcpy(a.sun_path, G.path);
    unlink(G.path);
    mode_t old = umask(077);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("cannot bind %s: %s", G.path, strerror(errno));
    umask(old);
  } else {
    fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_vm_compat a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_port = G.vsock_port;
    a.svm_cid = (unsigned)-1; /* VMADDR_CID_ANY */
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("cannot bind vsock port %u: %s", G.vsock_port, strerror(errno));
  }
  if (listen(fd, 4) < 0) die("listen failed: %s", strerror(errno));
  return fd;
}

static void read_start_uptime(void) {
  snprintf(G.start_uptime, sizeof G.start_uptime, "0");
  int fd = open("/proc/uptime", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  char buf[64];
  ssize_t r = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (r <= 0) return;
  buf[r] = 0;
  size_t i = 0;
  while (i < sizeof G.start_uptime - 1 && ((buf[i] >= '0' && buf[i] <= '9') || buf[i] == '.')) {
    G.start_uptime[i] = buf[i];
    i++;
  }
  G.start_uptime[i] = 0;
  if (!i) snprintf(G.start_uptime, sizeof G.start_uptime, "0");
}

static void usage(void) {
  fputs("usage: smolvm-agent (--serial DEV | --vsock PORT | --unix PATH | --fd N) --secret-file PATH\n"
        "                    [--env-file PATH] [--milestones PATH] [--unlink-secret] [--verbose]\n"
        "       smolvm-agent --inetd PORT /ABSOLUTE/PROG [ARG...]\n"
        "       smolvm-agent --version | --self-test\n",
        stderr);
  exit(2);
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "--inetd")) return inetd_main(argc, argv);
  const char *secret_path = NULL;
  int unlink_secret = 0, have_transport = 0;
  G.env_file = "/etc/profile.d/smolvm_env.sh";
  G.milestones_file = "/run/smolvm/milestones";
  G.listen_fd = G.conn_fd = -1;
  /* Keep fds 0-2 taken so no pipe ever lands there (the child's dup2 relies on it). */
  int nullfd;
  while ((nullfd = open("/dev/null", O_RDWR)) >= 0 && nullfd <= 2) {}
  if (nullfd > 2) close(nullfd);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED() do { if (!v) usage(); i++; } while (0)
    if (!strcmp(a, "--version")) { printf("smolvm-agent %s protocol %d\n", AGENT_VERSION, PROTO_VERSION); return 0; }
    else if (!strcmp(a, "--self-test")) return self_test();
    else if (!strcmp(a, "--serial")) { NEED(); G.transport = TR_SERIAL; G.path = v; have_transport++; }
    else if (!strcmp(a, "--unix")) { NEED(); G.transport = TR_UNIX; G.path = v; have_transport++; }
    else if (!strcmp(a, "--vsock")) { NEED(); G.transport = TR_VSOCK; G.vsock_port = (unsigned)strtoul(v, NULL, 10); have_transport++; }
    else if (!strcmp(a, "--fd")) { NEED(); G.transport = TR_FD; G.conn_fd = atoi(v); have_transport++; }
    else if (!strcmp(a, "--secret-file")) { NEED(); secret_path = v; }
    else if (!strcmp(a, "--env-file")) { NEED(); G.env_file = v; }
    else if (!strcmp(a, "--milestones")) { NEED(); G.milestones_file = v; }
    else if (!strcmp(a, "--unlink-secret")) unlink_secret = 1;
    else if (!strcmp(a, "--verbose")) G.verbose = 1;
    else usage();
  }
  if (have_transport != 1 || !secret_path) usage();
  read_start_uptime();
  read_secret(secret_path, unlink_secret);
  G.out = malloc(OUT_CAP);
  if (!G.out) die("out of memory");

  if (pipe2(G.sigpipe, O_CLOEXEC | O_NONBLOCK) < 0) die("pipe: %s", strerror(errno));
  struct sigaction sa = {.sa_handler = on_signal};
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
  sigaction(SIGCHLD, &sa, NULL);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  /* Orphaned grandchildren are reparented to us, so they are reaped, not left as zombies. */
  prctl(PR_SET_CHILD_SUBREAPER, 1);

  if (G.transport == TR_UNIX || G.transport == TR_VSOCK) {
    G.listen_fd = open_listener();
  } else if (G.transport == TR_SERIAL) {
    G.conn_fd = open(G.path, O_RDWR | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (G.conn_fd < 0) die("cannot open %s: %s", G.path, strerror(errno));
    G.state = S_WAIT_HELLO;
  } else {
    if (set_nonblock(G.conn_fd) < 0) die("--fd %d is not open", G.conn_fd);
    fcntl(G.conn_fd, F_SETFD, FD_CLOEXEC);
    G.state = S_WAIT_HELLO;
  }
  logf_("ready");

  static struct pollfd pfd[4 + 3 * MAX_STREAMS + 3 * MAX_PROCS];
  static stream_t *owner[4 + 3 * MAX_STREAMS + 3 * MAX_PROCS];
  while (!G.stop) {
    int64_t now = now_ms();
    if (G.state == S_CLOSING) {
      if (!G.out_len && !G.shut) { shutdown(G.conn_fd, SHUT_WR); G.shut = 1; }
      if (now >= G.close_at) close_conn();
    }
    if (G.in_len >= HDR && G.out_len <= OUT_SOFT && G.state != S_OFF && G.state != S_CLOSING) process_input();
    pump(now);
    write_conn();
    int n = 0, timeout = -1;
    pfd[n++] = (struct pollfd){.fd = G.sigpipe[0], .events = POLLIN};
    int li = -1, ci = -1;
    if (G.listen_fd >= 0) { li = n; pfd[n++] = (struct pollfd){.fd = G.listen_fd, .events = POLLIN}; }
    if (G.conn_fd >= 0) {
      if (G.hup_until && now < G.hup_until) {
        timeout = (int)(G.hup_until - now);
      } else {
        G.hup_until = 0;
        short ev = 0;
        if ((G.out_len <= OUT_SOFT && G.in_len < IN_CAP) || G.state == S_CLOSING) ev |= POLLIN;
        if (G.state == S_CLOSING) timeout = (int)(G.close_at > now ? G.close_at - now : 0);
        if (G.out_len) ev |= POLLOUT;
        ci = n;
        pfd[n++] = (struct pollfd){.fd = G.conn_fd, .events = ev};
      }
    }
    int base = n;
    for (int i = 0; i < G.hi; i++) {
      stream_t *s = &G.streams[i];
      if (s->kind == K_FREE) continue;
      int64_t wake = 0;
      if (s->kind == K_EXEC) {
        int room = s->send_credit > 0 && G.out_len + HDR + 4096 <= OUT_SOFT;
        if (s->fd_out >= 0 && room) { owner[n] = s; pfd[n++] = (struct pollfd){.fd = s->fd_out, .events = POLLIN}; }
        if (s->fd_err >= 0 && room) { owner[n] = s; pfd[n++] = (struct pollfd){.fd = s->fd_err, .events = POLLIN}; }
        if (s->fd_in >= 0 && (s->in_len || s->in_eof == 1)) { owner[n] = s; pfd[n++] = (struct pollfd){.fd = s->fd_in, .events = POLLOUT}; }
        if (s->deadline && !s->timed_out && !s->reaped) wake = s->deadline;
        if (s->reaped && !s->done && now < s->reaped_at + EXIT_GRACE_MS) wake = s->reaped_at + EXIT_GRACE_MS;
      } else if (s->kind == K_WAIT && !s->done) {
        if (s->sock >= 0) { owner[n] = s; pfd[n++] = (struct pollfd){.fd = s->sock, .events = POLLOUT}; }
        else wake = s->next_try;
        if (!wake || s->deadline < wake) wake = s->deadline;
      } else if (s->kind == K_GET && s->fd_file >= 0 && s->send_credit > 0 && G.out_len + HDR + MAX_PAYLOAD <= OUT_SOFT) {
        wake = now; /* regular files are always readable */
      } else if (s->kind == K_MEM && !s->done && s->send_credit > 0 && G.out_len + HDR + MAX_PAYLOAD <= OUT_SOFT) {
        wake = now;
      } else if (s->kind == K_WATCH && !s->done && s->send_credit > 0 && G.out_len + HDR + 4096 <= OUT_SOFT) {
        int wfd = watch_fd(s);
        if (wfd >= 0) { owner[n] = s; pfd[n++] = (struct pollfd){.fd = wfd, .events = POLLIN}; }
        wake = watch_wake(s);
      } else if (s->kind == K_ATTACH && attach_ready(s)) {
        wake = now;
      }
      if (s->done && s->term_type) wake = now;
      if (CREDIT_DUE(s)) wake = now;
      if (wake) {
        int t = wake <= now ? 0 : (int)(wake - now);
        if (timeout < 0 || t < timeout) timeout = t;
      }
    }
    int pbase = n;
    procs_poll_fds(pfd, &n, now, &timeout);
    if (G.state != S_READY && timeout == 0) timeout = 50;
    int r = poll(pfd, (nfds_t)n, timeout);
    if (r < 0 && errno != EINTR) die("poll: %s", strerror(errno));
    if (r <= 0) continue;
    if (pfd[0].revents) {
      char b[64];
      while (read(G.sigpipe[0], b, sizeof b) > 0) {}
      reap_children();
    }
    if (li >= 0 && pfd[li].revents) accept_conn();
    if (ci >= 0 && pfd[ci].revents && G.conn_fd == pfd[ci].fd) {
      short re = pfd[ci].revents;
      if (re & POLLIN) read_conn();
      if (G.conn_fd >= 0 && !G.hup_until && (re & POLLOUT)) write_conn();
      if (G.conn_fd >= 0 && !G.hup_until && (re & (POLLHUP | POLLERR | POLLNVAL)) && !(re & POLLIN)) host_gone();
    }
    int64_t t = now_ms();
    for (int i = base; i < n; i++) {
      if (!pfd[i].revents) continue;
      stream_t *s = owner[i];
      if (i >= pbase) { procs_on_ready(pfd[i].fd, pfd[i].revents); continue; }
      if (s->kind == K_FREE) continue;
      if (s->kind == K_EXEC) {
        if (pfd[i].fd == s->fd_in) exec_stdin_flush(s);
      } else if (s->kind == K_WAIT && pfd[i].fd == s->sock) {
        wait_check(s, t);
      }
    }
    /* exec output is read in pump() on the next iteration */
  }
  drop_all_streams();
  procs_kill_all();
  if (G.transport == TR_UNIX) unlink(G.path);
  return 0;
}
