/*
 * smolvm-agent: the guest side of the smolvm control channel (agent/PROTOCOL.md).
 *
 * One process, one poll() loop, non-blocking fds, no threads. Memory is bounded: one input
 * frame, a 1 MiB output buffer (+ reserve), and per stream at most one credit window of stdin.
 * Children run in their own session so timeouts and cancels kill the whole process group.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "sha256.h"

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

static struct {
  int transport;
  const char *path;
  unsigned vsock_port;
  int listen_fd, conn_fd;
  int state;
  int64_t hup_until;
  int64_t close_at; /* S_CLOSING: when to give up on the host reading our last frames */
  int shut;
  int hup_logged;
  uint8_t secret[32];
  uint8_t host_nonce[32], agent_nonce[32];
  uint8_t in[IN_CAP];
  size_t in_len;
  uint8_t *out;
  size_t out_off, out_len;
  stream_t streams[MAX_STREAMS];
  int nstreams;
  int hi; /* one past the highest stream slot in use: the loops scan only that far */
  int sigpipe[2];
  const char *env_file, *milestones_file;
  char start_uptime[32];
  int verbose;
  volatile sig_atomic_t stop;
} G;

void logf_(const char *fmt, ...) {
  if (!G.verbose) return;
  va_list ap;
  va_start(ap, fmt);
  fputs("smolvm-agent: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

static void die(const char *fmt, ...) {
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

void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = (uint8_t)v; }
uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }

int set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void fill_random(uint8_t *buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    long r = syscall(SYS_getrandom, buf + got, n - got, 1 /* GRND_NONBLOCK */);
    if (r > 0) { got += (size_t)r; continue; }
    if (r < 0 && errno == EINTR) continue;
    break;
  }
  if (got < n) {
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    while (fd >= 0 && got < n) {
      ssize_t r = read(fd, buf + got, n - got);
      if (r <= 0) break;
      got += (size_t)r;
    }
    if (fd >= 0) close(fd);
  }
  if (got < n) die("no randomness available for nonces");
}

/* ------------------------------------------------------------------ output buffer */

static size_t out_room(void) { return OUT_CAP - G.out_off - G.out_len; }
size_t out_used(void) { return G.out_len; }

static void out_compact(void) {
  if (G.out_off && (G.out_len == 0 || G.out_off > OUT_CAP / 2)) {
    memmove(G.out, G.out + G.out_off, G.out_len);
    G.out_off = 0;
  }
}

/* Space for HDR+len at the end of the output buffer, or NULL (caller waits). */
uint8_t *out_reserve(size_t len) {
  if (out_room() < HDR + len) out_compact();
  if (out_room() < HDR + len) return NULL;
  return G.out + G.out_off + G.out_len;
}

void out_commit(uint8_t *p, uint8_t type, uint16_t flags, uint32_t stream, size_t len) {
  put32(p, MAGIC);
  p[4] = PROTO_VERSION;
  p[5] = type;
  put16(p + 6, flags);
  put32(p + 8, stream);
  put32(p + 12, (uint32_t)len);
  G.out_len += HDR + len;
}

int send_frame(uint8_t type, uint16_t flags, uint32_t stream, const void *payload, size_t len) {
  uint8_t *p = out_reserve(len);
  if (!p) return -1;
  if (len) memcpy(p + HDR, payload, len);
  out_commit(p, type, flags, stream, len);
  return 0;
}

void send_error(uint32_t stream, uint16_t code, int err, const char *fmt, ...) {
  uint8_t buf[6 + 1024];
  put16(buf, code);
  put32(buf + 2, (uint32_t)err);
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf((char *)buf + 6, 1024, fmt, ap);
  va_end(ap);
  if (n < 0) n = 0;
  if (n > 1023) n = 1023;
  send_frame(T_ERROR, 0, stream, buf, 6 + (size_t)n);
}

/* ------------------------------------------------------------------ signals */

static const struct { int num; const char *name; } SIGNALS[] = {
    {SIGHUP, "HUP"},   {SIGINT, "INT"},     {SIGQUIT, "QUIT"},   {SIGILL, "ILL"},   {SIGTRAP, "TRAP"},
    {SIGABRT, "ABRT"}, {SIGBUS, "BUS"},     {SIGFPE, "FPE"},     {SIGKILL, "KILL"}, {SIGUSR1, "USR1"},
    {SIGSEGV, "SEGV"}, {SIGUSR2, "USR2"},   {SIGPIPE, "PIPE"},   {SIGALRM, "ALRM"}, {SIGTERM, "TERM"},
    {SIGCHLD, "CHLD"}, {SIGCONT, "CONT"},   {SIGSTOP, "STOP"},   {SIGTSTP, "TSTP"}, {SIGTTIN, "TTIN"},
    {SIGTTOU, "TTOU"}, {SIGURG, "URG"},     {SIGXCPU, "XCPU"},   {SIGXFSZ, "XFSZ"}, {SIGVTALRM, "VTALRM"},
    {SIGPROF, "PROF"}, {SIGWINCH, "WINCH"}, {SIGIO, "IO"},       {SIGPWR, "PWR"},   {SIGSYS, "SYS"},
};

void signal_name(int sig, char *out, size_t n) {
  for (size_t i = 0; i < sizeof SIGNALS / sizeof *SIGNALS; i++)
    if (SIGNALS[i].num == sig) { snprintf(out, n, "%s", SIGNALS[i].name); return; }
  if (sig >= SIGRTMIN && sig <= SIGRTMAX) snprintf(out, n, "RTMIN+%d", sig - SIGRTMIN);
  else snprintf(out, n, "SIG%d", sig);
}

int signal_number(const uint8_t *name, size_t len) {
  static const char *allowed[] = {"TERM", "INT", "KILL", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT", "WINCH"};
  for (size_t i = 0; i < sizeof allowed / sizeof *allowed; i++) {
    if (strlen(allowed[i]) == len && memcmp(allowed[i], name, len) == 0) {
      for (size_t j = 0; j < sizeof SIGNALS / sizeof *SIGNALS; j++)
        if (strcmp(SIGNALS[j].name, allowed[i]) == 0) return SIGNALS[j].num;
    }
  }
  return -1;
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
static void free_stream(stream_t *s) {
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
  uint8_t buf[6 + 1024];
  put16(buf, code);
  put32(buf + 2, (uint32_t)err);
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf((char *)buf + 6, 1024, fmt, ap);
  va_end(ap);
  if (n < 0) n = 0;
  if (n > 1023) n = 1023;
  set_terminal(s, T_ERROR, buf, 6 + (size_t)n);
}

static void drop_all_streams(void) {
  for (int i = 0; i < G.hi; i++)
    if (G.streams[i].kind != K_FREE) free_stream(&G.streams[i]);
}

/* ------------------------------------------------------------------ session */

static void close_conn(void) {
  drop_all_streams();
  G.in_len = 0;
  G.out_off = G.out_len = 0;
  if (G.transport == TR_SERIAL) {
    G.state = S_WAIT_HELLO;
    return;
  }
  close_fd(&G.conn_fd);
  G.state = S_OFF;
  if (G.transport == TR_FD) G.stop = 1;
}

/* The host went away on a port that stays open: back off instead of spinning on POLLHUP. */
static void host_gone(void) {
  if (G.transport == TR_SERIAL) {
    if (!G.hup_logged) logf_("host disconnected");
    G.hup_logged = 1;
    drop_all_streams();
    G.in_len = 0;
    G.out_off = G.out_len = 0;
    G.state = S_WAIT_HELLO;
    G.hup_until = now_ms() + HUP_BACKOFF_MS;
  } else {
    logf_("host disconnected");
    close_conn();
  }
}

/* A session-level failure: report it on stream 0 (best effort), then drop the session. */
static void session_fail(uint16_t code, const char *msg) {
  logf_("session error: %s", msg);
  drop_all_streams();
  G.in_len = 0;
  send_error(0, code, 0, "%s", msg);
  if (G.transport == TR_SERIAL) {
    G.state = S_WAIT_HELLO;
  } else {
    /* Flush the error, half-close, and drain what the host still sends before closing: closing
     * with unread input would reset the connection and the host could lose the error frame. */
    G.state = S_CLOSING;
    G.shut = 0;
    G.close_at = now_ms() + CLOSE_LINGER_MS;
  }
}

static void mac(const char *label, const uint8_t *a, const uint8_t *b, uint8_t out[32]) {
  hmac_sha256_ctx c;
  hmac_sha256_init(&c, G.secret, sizeof G.secret);
  hmac_sha256_update(&c, label, strlen(label));
  hmac_sha256_update(&c, a, 32);
  hmac_sha256_update(&c, b, 32);
  hmac_sha256_final(&c, out);
}

static int ct_equal(const uint8_t *a, const uint8_t *b, size_t n) {
  uint8_t d = 0;
  for (size_t i = 0; i < n; i++) d |= a[i] ^ b[i];
  return d == 0;
}

size_t put_field(uint8_t *p, uint8_t tag, const void *v, size_t len) {
  p[0] = tag;
  put32(p + 1, (uint32_t)len);
  if (len) memcpy(p + 5, v, len);
  return 5 + len;
}

static size_t info_fields(uint8_t *p, int full) {
  size_t n = 0;
  n += put_field(p + n, F_VERSION, AGENT_VERSION, strlen(AGENT_VERSION));
  n += put_field(p + n, F_CAPS, CAPS, strlen(CAPS));
  n += put_field(p + n, F_UPTIME, G.start_uptime, strlen(G.start_uptime));
  if (full) {
    uint8_t pid[4];
    put32(pid, (uint32_t)getpid());
    n += put_field(p + n, F_PID, pid, 4);
    char buf[MILESTONES_MAX];
    size_t len = 0;
    int fd = open(G.milestones_file, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) {
      while (len < sizeof buf) {
        ssize_t r = read(fd, buf + len, sizeof buf - len);
        if (r <= 0) break;
        len += (size_t)r;
      }
      close(fd);
    }
    n += put_field(p + n, F_MILESTONES, buf, len);
  }
  return n;
}

static void send_challenge(void) {
  uint8_t ch[36];
  put16(ch, PROTO_VERSION);
  put16(ch + 2, 0);
  memcpy(ch + 4, G.agent_nonce, 32);
  send_frame(T_CHALLENGE, 0, 0, ch, sizeof ch);
}

static void on_hello(const uint8_t *p, uint32_t len) {
  /* The host repeats an unanswered HELLO (a virtio port may drop bytes while the guest side is
   * closed); the same nonce again gets the same challenge, so either copy can be answered. */
  if (G.state == S_WAIT_AUTH && len == 36 && memcmp(G.host_nonce, p + 4, 32) == 0) {
    send_challenge();
    return;
  }
  drop_all_streams();
  if (len != 36 || get16(p) != PROTO_VERSION) {
    send_error(0, E_PROTOCOL, 0, "HELLO must carry protocol version %d and a 32-byte nonce", PROTO_VERSION);
    G.state = S_WAIT_HELLO;
    return;
  }
  memcpy(G.host_nonce, p + 4, 32);
  fill_random(G.agent_nonce, 32);
  send_challenge();
  G.state = S_WAIT_AUTH;
}

static void on_auth(const uint8_t *p, uint32_t len) {
  uint8_t want[32];
  mac("smolvm-agent-v1 host", G.agent_nonce, G.host_nonce, want);
  if (len != 32 || !ct_equal(p, want, 32)) {
    fill_random(G.agent_nonce, 32); /* a nonce is good for one attempt */
    session_fail(E_AUTH_FAILED, "authentication failed: the host does not hold this VM's agent secret");
    return;
  }
  uint8_t buf[32 + 256];
  mac("smolvm-agent-v1 agent", G.host_nonce, G.agent_nonce, buf);
  size_t n = 32 + info_fields(buf + 32, 0);
  send_frame(T_AUTH_OK, 0, 0, buf, n);
  G.state = S_READY;
  logf_("host authenticated");
}

/* ------------------------------------------------------------------ request fields */

field_t FIELDS[MAX_FIELDS];

int parse_fields(const uint8_t *p, uint32_t len, int *count) {
  uint32_t off = 0;
  int n = 0;
  while (off < len) {
    if (len - off < 5 || n >= MAX_FIELDS) return -1;
    uint32_t flen = get32(p + off + 1);
    if (flen > len - off - 5) return -1;
    FIELDS[n].tag = p[off];
    FIELDS[n].v = p + off + 5;
    FIELDS[n].len = flen;
    n++;
    off += 5 + flen;
  }
  *count = n;
  return 0;
}

/* Copies a field into a NUL-terminated string; fails on embedded NUL. */
char *field_str(const field_t *f) {
  if (memchr(f->v, 0, f->len)) return NULL;
  char *s = malloc(f->len + 1);
  if (!s) return NULL;
  memcpy(s, f->v, f->len);
  s[f->len] = 0;
  return s;
}

const char *path_problem(const field_t *f) {
  if (f->len == 0 || f->v[0] != '/') return "must be absolute";
  if (f->len > 4096) return "is longer than 4096 bytes";
  if (memchr(f->v, 0, f->len)) return "contains a NUL byte";
  if (f->v[f->len - 1] == '/') return "ends with /";
  uint32_t start = 1;
  for (uint32_t i = 1; i <= f->len; i++) {
    if (i == f->len || f->v[i] == '/') {
      uint32_t clen = i - start;
      if ((clen == 1 && f->v[start] == '.') || (clen == 2 && f->v[start] == '.' && f->v[start + 1] == '.'))
        return "has a . or .. component";
      start = i + 1;
    }
  }
  return NULL;
}

static int valid_env_name(const uint8_t *s, size_t n) {
  if (n == 0 || (s[0] >= '0' && s[0] <= '9')) return 0;
  for (size_t i = 0; i < n; i++) {
    uint8_t c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')) return 0;
  }
  return 1;
}

/* ------------------------------------------------------------------ exec */

/* Where the child of a vfork reports why exec failed (it shares our memory until it execs). */
static volatile int spawn_errno;

/*
 * vfork, not fork: under software emulation (TCG) fork's page-table copy and the copy-on-write
 * faults that follow cost several milliseconds per command; vfork shares our memory until the
 * child execs. The child therefore only makes syscalls (no malloc, no stdio): argv, envp and
 * cwd are built by the caller. Signals stay blocked across vfork so none of our handlers can
 * run in the child; it resets the dispositions we changed (ignored ones survive exec) first.
 * `file` is run as given when it holds a '/', else looked up on PATH.
 */
static pid_t spawn(const char *file, char *const argv[], char *const envp[], const char *cwd, const char *cwd_fallback,
                   const char *pts, const int fds[3]) {
  sigset_t all, old;
  sigfillset(&all);
  sigprocmask(SIG_SETMASK, &all, &old);
  spawn_errno = 0;
  pid_t pid = vfork();
  if (pid == 0) {
    static const int changed[] = {SIGCHLD, SIGTERM, SIGINT, SIGPIPE};
    for (size_t i = 0; i < sizeof changed / sizeof changed[0]; i++) signal(changed[i], SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setsid();
    int in = fds[0], out = fds[1], err = fds[2];
    if (pts) {
      int t = open(pts, O_RDWR);
      if (t < 0) goto fail;
      ioctl(t, TIOCSCTTY, 0);
      in = out = err = t;
    }
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) goto fail;
    if (cwd && chdir(cwd) < 0 && (!cwd_fallback || chdir(cwd_fallback) < 0)) goto fail;
    execvpe(file, argv, envp);
  fail:
    spawn_errno = errno ? errno : EINVAL;
    _exit(127);
  }
  int e = errno;
  sigprocmask(SIG_SETMASK, &old, NULL);
  if (pid < 0) { errno = e; return -1; }
  if (spawn_errno) { errno = spawn_errno; return 0; } /* exited 127; SIGCHLD reaps it */
  return pid;
}

/* The user we run as, from /etc/passwd (a static binary cannot use NSS). */
typedef struct { char name[64], home[256], shell[256]; } user_t;

static void lookup_user(user_t *u) {
  uid_t uid = getuid();
  snprintf(u->name, sizeof u->name, uid == 0 ? "root" : "%u", (unsigned)uid);
  snprintf(u->home, sizeof u->home, "%s", uid == 0 ? "/root" : "/");
  snprintf(u->shell, sizeof u->shell, "/bin/sh");
  FILE *f = fopen("/etc/passwd", "re");
  if (!f) return;
  char line[1024];
  while (fgets(line, sizeof line, f)) {
    char *fld[7];
    int n = 0;
    for (char *p = line, *tok; n < 7 && (tok = strsep(&p, ":\n")); ) fld[n++] = tok;
    if (n < 7 || strtoul(fld[2], NULL, 10) != uid || !*fld[2]) continue;
    snprintf(u->name, sizeof u->name, "%s", fld[0]);
    if (*fld[5]) snprintf(u->home, sizeof u->home, "%s", fld[5]);
    if (*fld[6]) snprintf(u->shell, sizeof u->shell, "%s", fld[6]);
    break;
  }
  fclose(f);
}

/* Adds or replaces NAME=value (kv is owned by the caller's list). */
static void env_put(char **envp, int *n, char *kv) {
  size_t name = strcspn(kv, "=");
  for (int i = 0; i < *n; i++) {
    if (strncmp(envp[i], kv, name + 1) == 0) { envp[i] = kv; return; }
  }
  envp[(*n)++] = kv;
}

extern char **environ;

void start_exec(uint32_t id, const uint8_t *p, uint32_t len) {
  int n;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "EXEC fields are malformed"); return; }
  int nargs = 0, have_pty = 0, shell = -1;
  const field_t *cwd = NULL;
  uint16_t rows = 24, cols = 80;
  uint32_t timeout = 0;
  for (int i = 0; i < n; i++) {
    field_t *f = &FIELDS[i];
    switch (f->tag) {
      case F_ARG:
        if (memchr(f->v, 0, f->len)) { send_error(id, E_BAD_REQUEST, 0, "argument contains a NUL byte"); return; }
        nargs++;
        break;
      case F_ENV: {
        const uint8_t *eq = memchr(f->v, '=', f->len);
        if (!eq || !valid_env_name(f->v, (size_t)(eq - f->v)) || memchr(f->v, 0, f->len)) {
          send_error(id, E_BAD_REQUEST, 0, "ENV must be NAME=value with a valid name and no NUL");
          return;
        }
        break;
      }
      case F_CWD:
        if (cwd || f->len == 0 || memchr(f->v, 0, f->len)) { send_error(id, E_BAD_REQUEST, 0, "bad CWD"); return; }
        cwd = f;
        break;
      case F_PTY:
        if (have_pty || f->len != 4) { send_error(id, E_BAD_REQUEST, 0, "bad PTY"); return; }
        have_pty = 1;
        rows = get16(f->v);
        cols = get16(f->v + 2);
        break;
      case F_TIMEOUT:
        if (timeout || f->len != 4 || get32(f->v) == 0) { send_error(id, E_BAD_REQUEST, 0, "bad TIMEOUT_MS"); return; }
        timeout = get32(f->v);
        break;
      case F_STDIN: /* SPAWN only (procs.c checks it) */
        break;
      case F_SHELL:
        if (shell >= 0 || f->len != 1 || f->v[0] > 1) { send_error(id, E_BAD_REQUEST, 0, "bad SHELL"); return; }
        shell = f->v[0];
        break;
      default:
        if (!(f->tag & 0x80)) { send_error(id, E_BAD_REQUEST, 0, "unknown EXEC field %d", f->tag); return; }
    }
  }
  if (nargs == 0) { send_error(id, E_BAD_REQUEST, 0, "EXEC needs at least one ARG"); return; }
  if (shell >= 0 && nargs != 1) { send_error(id, E_BAD_REQUEST, 0, "SHELL takes exactly one ARG, the script"); return; }
  stream_t *s = new_stream(id, K_EXEC);
  if (!s) { send_error(id, E_LIMIT, 0, "too many open streams (%d)", MAX_STREAMS); return; }

  /* Everything the child needs is built here: after vfork it may not allocate. */
  static char *argv[MAX_FIELDS + 3];
  static char *envp[MAX_FIELDS + 512];
  static char *owned[MAX_FIELDS + 8];
  int k = 0, ne = 0, no = 0;
  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, master = -1;
  char *pts = NULL, *cwds = NULL;
  const char *cwd_fallback = NULL;
  user_t u;
  if (shell >= 0) {
    /* The command the way sshd runs one: the user's shell, home directory and login variables. */
    lookup_user(&u);
    const char *base = strrchr(u.shell, '/');
    argv[k++] = shell ? u.shell : (char *)(base ? base + 1 : u.shell);
    argv[k++] = shell ? "-lc" : "-c";
    const char *vars[][2] = {{"HOME", u.home}, {"USER", u.name}, {"LOGNAME", u.name}, {"SHELL", u.shell},
                             {"PATH", getuid() == 0 ? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                                                    : "/usr/local/bin:/usr/bin:/bin"}};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
      char *kv = malloc(strlen(vars[i][0]) + strlen(vars[i][1]) + 2);
      if (!kv) goto oom;
      sprintf(kv, "%s=%s", vars[i][0], vars[i][1]);
      owned[no++] = kv;
      env_put(envp, &ne, kv);
    }
    if (!cwd) { cwds = strdup(u.home); cwd_fallback = "/"; if (!cwds) goto oom; }
  } else {
    for (char **e = environ; *e && ne < 500; e++) envp[ne++] = *e;
  }
  for (int i = 0; i < n; i++) {
    const field_t *f = &FIELDS[i];
    if (f->tag == F_ARG) {
      if (!(argv[k] = strndup((const char *)f->v, f->len))) goto oom;
      owned[no++] = argv[k++];
    } else if (f->tag == F_ENV) {
      char *kv = strndup((const char *)f->v, f->len);
      if (!kv) goto oom;
      owned[no++] = kv;
      env_put(envp, &ne, kv);
    }
  }
  argv[k] = NULL;
  envp[ne] = NULL;
  if (cwd && !(cwds = field_str(cwd))) goto oom;
  if (have_pty) {
    master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0) goto sysfail;
    char *name = ptsname(master);
    if (!name || !(pts = strdup(name))) goto sysfail;
    struct winsize ws = {.ws_row = rows, .ws_col = cols};
    ioctl(master, TIOCSWINSZ, &ws);
  } else {
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) goto sysfail;
  }
  int fds[3] = {in[0], out[1], err[1]};
  /* A shell runs from its passwd path (argv[0] may be just its basename, as sshd passes it). */
  pid_t pid = spawn(shell >= 0 ? u.shell : argv[0], argv, envp, cwds, cwd_fallback, pts, fds);
  if (pid < 0) goto sysfail;
  if (pid == 0) {
    int e = errno;
    set_error(s, E_SPAWN_FAILED, e, "could not start %s: %s", argv[0], strerror(e));
    close_fd(&in[0]); close_fd(&in[1]); close_fd(&out[0]); close_fd(&out[1]); close_fd(&err[0]); close_fd(&err[1]);
    close_fd(&master);
    goto cleanup;
  }
  s->pid = pid;
  if (have_pty) {
    s->pty = 1;
    s->fd_out = master;
    s->fd_in = dup(master);
    master = -1;
    if (s->fd_in >= 0) fcntl(s->fd_in, F_SETFD, FD_CLOEXEC);
  } else {
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&err[1]);
    s->fd_in = in[1];
    s->fd_out = out[0];
    s->fd_err = err[0];
  }
  if (s->fd_in >= 0) set_nonblock(s->fd_in);
  set_nonblock(s->fd_out);
  if (s->fd_err >= 0) set_nonblock(s->fd_err);
  if (timeout) s->deadline = now_ms() + timeout;
  logf_("stream %u: exec %s pid %d", id, argv[0], pid);
  goto cleanup;
oom:
  errno = ENOMEM;
sysfail:;
  int e = errno;
  set_error(s, E_SPAWN_FAILED, e, "could not start the command: %s", strerror(e));
  close_fd(&in[0]); close_fd(&in[1]); close_fd(&out[0]); close_fd(&out[1]); close_fd(&err[0]); close_fd(&err[1]);
  close_fd(&master);
cleanup:
  for (int i = 0; i < no; i++) free(owned[i]);
  free(pts);
  free(cwds);
}

static void exec_stdin_flush(stream_t *s) {
  while (s->in_len && s->fd_in >= 0) {
    ssize_t w = write(s->fd_in, s->inbuf, s->in_len);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) return;
    if (w <= 0) { /* the child closed stdin: drop what is left, but keep the host's credit flowing */
      s->credit_pending += (uint32_t)s->in_len;
      s->in_len = 0;
      s->in_dead = 1;
      close_fd(&s->fd_in);
      return;
    }
    s->credit_pending += (uint32_t)w;
    memmove(s->inbuf, s->inbuf + w, s->in_len - (size_t)w);
    s->in_len -= (size_t)w;
  }
  if (!s->in_len && s->in_eof == 1 && s->fd_in >= 0) {
    if (s->pty) {
      ssize_t w = write(s->fd_in, "\x04", 1);
      if (w < 0 && errno == EAGAIN) return;
      s->in_eof = 2;
    } else {
      close_fd(&s->fd_in);
      s->in_eof = 2;
    }
  }
}

static void exec_data(stream_t *s, const uint8_t *p, uint32_t len) {
  if (s->in_eof || s->in_dead || s->fd_in < 0) { s->credit_pending += len; return; }
  if (!s->inbuf) {
    s->inbuf = malloc(WINDOW);
    if (!s->inbuf) { s->credit_pending += len; return; }
  }
  /* recv_window accounting guarantees in_len + len <= WINDOW */
  memcpy(s->inbuf + s->in_len, p, len);
  s->in_len += len;
  exec_stdin_flush(s);
}

/* Reads one fd of an exec into DATA frames while credit and buffer room allow. */
static void exec_pump_fd(stream_t *s, int *fd, uint16_t which) {
  while (*fd >= 0 && s->send_credit > 0) {
    size_t want = s->send_credit < MAX_PAYLOAD ? s->send_credit : MAX_PAYLOAD;
    if (G.out_len + HDR + want > OUT_SOFT) {
      if (G.out_len + HDR + 4096 > OUT_SOFT) return;
      want = OUT_SOFT - G.out_len - HDR;
    }
    uint8_t *p = out_reserve(want);
    if (!p) return;
    ssize_t r = read(*fd, p + HDR, want);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) return;
    if (r <= 0) { /* EOF, or EIO on a PTY whose slave side closed */
      close_fd(fd);
      if (s->pty) close_fd(&s->fd_in);
      return;
    }
    out_commit(p, T_DATA, which, s->id, (size_t)r);
    s->send_credit -= (uint32_t)r;
  }
}

static void exec_maybe_finish(stream_t *s, int64_t now) {
  if (s->done || !s->reaped) return;
  int open_fds = s->fd_out >= 0 || s->fd_err >= 0;
  if (open_fds && now - s->reaped_at < EXIT_GRACE_MS) return;
  /* A background process may still hold the pipes: once they are empty, stop reading them.
   * Output still queued in a pipe waits for the host's credit instead. */
  int queued = 0, q;
  if (s->fd_out >= 0 && ioctl(s->fd_out, FIONREAD, &q) == 0 && q > 0) queued = 1;
  if (s->fd_err >= 0 && ioctl(s->fd_err, FIONREAD, &q) == 0 && q > 0) queued = 1;
  if (queued) return;
  close_fd(&s->fd_out);
  close_fd(&s->fd_err);
  close_fd(&s->fd_in);
  uint8_t buf[5 + 16];
  set_terminal(s, T_EXIT, buf, encode_exit(s->status, s->timed_out, s->cancelled, buf));
}

/* An EXIT payload for a wait status: i32 code (-1 if signalled), u8 flags, signal name. */
size_t encode_exit(int status, int timed_out, int cancelled, uint8_t *buf) {
  size_t n = 5;
  char name[20] = "";
  if (WIFSIGNALED(status)) {
    put32(buf, (uint32_t)-1);
    signal_name(WTERMSIG(status), name, sizeof name);
    size_t l = strlen(name);
    if (l > 16) l = 16;
    memcpy(buf + 5, name, l);
    n += l;
  } else {
    put32(buf, (uint32_t)WEXITSTATUS(status));
  }
  buf[4] = (uint8_t)((timed_out ? 1 : 0) | (cancelled ? 2 : 0));
  return n;
}

static void reap_children(void) {
  for (;;) {
    int status;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    if (procs_reaped(pid, status)) continue;
    for (int i = 0; i < G.hi; i++) {
      stream_t *s = &G.streams[i];
      if (s->kind == K_EXEC && s->pid == pid && !s->reaped) {
        s->reaped = 1;
        s->status = status;
        s->reaped_at = now_ms();
        if (s->timed_out || s->cancelled) kill(-pid, SIGKILL);
        logf_("stream %u: pid %d exited", s->id, pid);
      }
    }
  }
}

/* ------------------------------------------------------------------ files */

int mkdirs_for(char *path) {
  for (char *p = path + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    int r = mkdir(path, 0755);
    int e = errno;
    *p = '/';
    if (r < 0 && e != EEXIST) { errno = e; return -1; }
  }
  return 0;
}

uint16_t errno_code(int e) { return e == ENOENT || e == ENOTDIR ? E_NOT_FOUND : E_IO; }

static int target_path(uint32_t id, int n, char **out, int *is_env) {
  const field_t *path = NULL;
  int env = 0;
  for (int i = 0; i < n; i++) {
    if (FIELDS[i].tag == F_PATH) {
      if (path) { send_error(id, E_BAD_REQUEST, 0, "duplicate PATH"); return -1; }
      path = &FIELDS[i];
    } else if (FIELDS[i].tag == F_ENVFILE) {
      env = 1;
    }
  }
  if (env == !!path) { send_error(id, E_BAD_REQUEST, 0, "give exactly one of PATH and ENVFILE"); return -1; }
  if (path) {
    const char *why = path_problem(path);
    if (why) { send_error(id, E_INVALID_PATH, 0, "guest path %s", why); return -1; }
    *out = field_str(path);
  } else {
    *out = strdup(G.env_file);
  }
  if (!*out) { send_error(id, E_IO, ENOMEM, "out of memory"); return -1; }
  *is_env = env;
  return 0;
}

static void start_put(uint32_t id, const uint8_t *p, uint32_t len) {
  int n, is_env;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "PUT fields are malformed"); return; }
  uint32_t mode = 0644;
  int mk = 0;
  for (int i = 0; i < n; i++) {
    field_t *f = &FIELDS[i];
    if (f->tag == F_MODE) {
      if (f->len != 4 || get32(f->v) > 07777) { send_error(id, E_BAD_REQUEST, 0, "bad MODE"); return; }
      mode = get32(f->v);
    } else if (f->tag == F_MKDIRS) {
      if (f->len != 1 || f->v[0] > 1) { send_error(id, E_BAD_REQUEST, 0, "bad MKDIRS"); return; }
      mk = f->v[0];
    } else if (f->tag != F_PATH && f->tag != F_ENVFILE && !(f->tag & 0x80)) {
      send_error(id, E_BAD_REQUEST, 0, "unknown PUT field %d", f->tag);
      return;
    }
  }
  char *path;
  if (target_path(id, n, &path, &is_env) < 0) return;
  if (is_env) { mode = 0600; mk = 1; }
  stream_t *s = new_stream(id, K_PUT);
  if (!s) { free(path); send_error(id, E_LIMIT, 0, "too many open streams (%d)", MAX_STREAMS); return; }
  s->final_path = path;
  s->mode = mode;
  if (mk && mkdirs_for(path) < 0) {
    int e = errno;
    set_error(s, errno_code(e), e, "could not create the parent directories of %s: %s", path, strerror(e));
    return;
  }
  char *slash = strrchr(path, '/');
  size_t dirlen = (size_t)(slash - path);
  const char *base = slash + 1;
  size_t tlen = dirlen + strlen(base) + 32;
  char *tmp = malloc(tlen);
  if (!tmp) { set_error(s, E_IO, ENOMEM, "out of memory"); return; }
  if (strlen(base) > 200) snprintf(tmp, tlen, "%.*s/.smolvm-put-XXXXXX", (int)dirlen, path);
  else snprintf(tmp, tlen, "%.*s/.%s.smolvm-XXXXXX", (int)dirlen, path, base);
  int fd = mkostemp(tmp, O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    free(tmp);
    set_error(s, errno_code(e), e, "could not create a file next to %s: %s", path, strerror(e));
    return;
  }
  s->fd_file = fd;
  s->tmp_path = tmp;
}

static void put_data(stream_t *s, const uint8_t *p, uint32_t len) {
  s->credit_pending += len;
  if (s->done || s->fd_file < 0) return;
  while (len) {
    ssize_t w = write(s->fd_file, p, len);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int e = w < 0 ? errno : EIO;
      set_error(s, E_IO, e, "could not write %s: %s", s->final_path, strerror(e));
      close_fd(&s->fd_file);
      return;
    }
    p += w;
    len -= (uint32_t)w;
    s->bytes += (uint64_t)w;
  }
}

static void put_finish(stream_t *s) {
  if (s->done || s->fd_file < 0) return;
  int e = 0;
  if (fchmod(s->fd_file, s->mode) < 0 || fsync(s->fd_file) < 0) e = errno;
  if (close(s->fd_file) < 0 && !e) e = errno;
  s->fd_file = -1;
  if (!e && rename(s->tmp_path, s->final_path) < 0) e = errno;
  if (e) {
    set_error(s, e == EISDIR ? E_IO : errno_code(e), e, "could not write %s: %s", s->final_path, strerror(e));
    return;
  }
  free(s->tmp_path);
  s->tmp_path = NULL;
  char *slash = strrchr(s->final_path, '/');
  *slash = 0;
  int dfd = open(slash == s->final_path ? "/" : s->final_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  *slash = '/';
  if (dfd >= 0) { fsync(dfd); close(dfd); }
  uint8_t buf[8];
  put32(buf, (uint32_t)(s->bytes >> 32));
  put32(buf + 4, (uint32_t)s->bytes);
  set_terminal(s, T_OK, buf, 8);
}

static void start_get(uint32_t id, const uint8_t *p, uint32_t len) {
  int n, is_env;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "GET fields are malformed"); return; }
  for (int i = 0; i < n; i++)
    if (FIELDS[i].tag != F_PATH && FIELDS[i].tag != F_ENVFILE && !(FIELDS[i].tag & 0x80)) {
      send_error(id, E_BAD_REQUEST, 0, "unknown GET field %d", FIELDS[i].tag);
      return;
    }
  char *path;
  if (target_path(id, n, &path, &is_env) < 0) return;
  stream_t *s = new_stream(id, K_GET);
  if (!s) { free(path); send_error(id, E_LIMIT, 0, "too many open streams (%d)", MAX_STREAMS); return; }
  s->final_path = path;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) < 0) {
    int e = errno;
    if (fd >= 0) close(fd);
    set_error(s, errno_code(e), e, "could not open %s: %s", path, strerror(e));
    return;
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    set_error(s, E_IO, EISDIR, "%s is not a regular file", path);
    return;
  }
  s->fd_file = fd;
}

static void get_pump(stream_t *s) {
  while (!s->done && s->fd_file >= 0 && s->send_credit > 0) {
    size_t want = s->send_credit < MAX_PAYLOAD ? s->send_credit : MAX_PAYLOAD;
    if (G.out_len + HDR + want > OUT_SOFT) return;
    uint8_t *p = out_reserve(want);
    if (!p) return;
    ssize_t r = read(s->fd_file, p + HDR, want);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      int e = errno;
      close_fd(&s->fd_file);
      set_error(s, E_IO, e, "could not read %s: %s", s->final_path, strerror(e));
      return;
    }
    if (r == 0) {
      close_fd(&s->fd_file);
      uint8_t buf[8];
      put32(buf, (uint32_t)(s->bytes >> 32));
      put32(buf + 4, (uint32_t)s->bytes);
      set_terminal(s, T_OK, buf, 8);
      return;
    }
    out_commit(p, T_DATA, 0, s->id, (size_t)r);
    s->send_credit -= (uint32_t)r;
    s->bytes += (uint64_t)r;
  }
}

/* ------------------------------------------------------------------ wait for a TCP port */

static void wait_try(stream_t *s, int64_t now) {
  s->sock = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (s->sock < 0) { s->next_try = now + WAIT_RETRY_MS; return; }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(s->port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(s->sock, (struct sockaddr *)&a, sizeof a) == 0) {
    close_fd(&s->sock);
    uint8_t buf[4];
    put32(buf, (uint32_t)(now - s->started));
    set_terminal(s, T_OK, buf, 4);
  } else if (errno != EINPROGRESS) {
    close_fd(&s->sock);
    s->next_try = now + WAIT_RETRY_MS;
  }
}

static void start_wait(uint32_t id, const uint8_t *p, uint32_t len) {
  int n;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "WAIT_PORT fields are malformed"); return; }
  uint32_t port = 0, timeout = 0;
  for (int i = 0; i < n; i++) {
    field_t *f = &FIELDS[i];
    if (f->tag == F_PORT && f->len == 2) port = get16(f->v);
    else if (f->tag == F_TIMEOUT && f->len == 4) timeout = get32(f->v);
    else if (!(f->tag & 0x80)) { send_error(id, E_BAD_REQUEST, 0, "bad WAIT_PORT field %d", f->tag); return; }
  }
  if (!port || !timeout) { send_error(id, E_BAD_REQUEST, 0, "WAIT_PORT needs PORT and TIMEOUT_MS"); return; }
  stream_t *s = new_stream(id, K_WAIT);
  if (!s) { send_error(id, E_LIMIT, 0, "too many open streams (%d)", MAX_STREAMS); return; }
  s->port = (uint16_t)port;
  s->started = now_ms();
  s->deadline = s->started + timeout;
  wait_try(s, s->started);
}

static void wait_check(stream_t *s, int64_t now) {
  int err = 0;
  socklen_t l = sizeof err;
  getsockopt(s->sock, SOL_SOCKET, SO_ERROR, &err, &l);
  close_fd(&s->sock);
  if (err == 0) {
    uint8_t buf[4];
    put32(buf, (uint32_t)(now - s->started));
    set_terminal(s, T_OK, buf, 4);
  } else {
    s->next_try = now + WAIT_RETRY_MS;
  }
}

/* ------------------------------------------------------------------ frame dispatch */

static void cancel_stream(stream_t *s) {
  if (s->done) return;
  switch (s->kind) {
    case K_EXEC:
      s->cancelled = 1;
      if (s->pid > 0) kill(-s->pid, SIGKILL);
      break;
    case K_PUT:
      close_fd(&s->fd_file);
      if (s->tmp_path) { unlink(s->tmp_path); free(s->tmp_path); s->tmp_path = NULL; }
      set_error(s, E_CANCELLED, 0, "upload cancelled");
      break;
    default:
      close_fd(&s->fd_file);
      close_fd(&s->sock);
      set_error(s, E_CANCELLED, 0, "cancelled");
  }
}

/* Handles one authenticated frame. Returns -1 on a protocol violation (session dropped). */
static int dispatch(uint8_t type, uint16_t flags, uint32_t id, const uint8_t *p, uint32_t len) {
  if (type == T_HELLO && id == 0) { on_hello(p, len); return 0; }
  if (id == 0) { session_fail(E_PROTOCOL, "unexpected frame on stream 0"); return -1; }
  if (flags && type != T_DATA) { session_fail(E_PROTOCOL, "flags on a non-DATA frame"); return -1; }
  switch (type) {
    case T_EXEC: case T_PUT: case T_GET: case T_WAIT_PORT: case T_PING: case T_INFO:
    case T_STAT: case T_LIST: case T_FSOP: case T_WATCH: case T_SPAWN: case T_ATTACH: case T_PROCS:
    case T_PINPUT: case T_PSIGNAL: case T_IDENTITY:
      if (find_stream(id)) { session_fail(E_PROTOCOL, "stream id reused"); return -1; }
      if (type == T_EXEC) start_exec(id, p, len);
      else if (type == T_STAT) start_stat(id, p, len);
      else if (type == T_LIST) start_list(id, p, len);
      else if (type == T_FSOP) start_fsop(id, p, len);
      else if (type == T_WATCH) start_watch(id, p, len);
      else if (type == T_SPAWN) start_spawn(id, p, len);
      else if (type == T_ATTACH) start_attach(id, p, len);
      else if (type == T_PROCS) procs_list(id);
      else if (type == T_PINPUT) procs_input(id, p, len);
      else if (type == T_PSIGNAL) procs_signal(id, p, len);
      else if (type == T_IDENTITY) start_identity(id, p, len);
      else if (type == T_PUT) start_put(id, p, len);
      else if (type == T_GET) start_get(id, p, len);
      else if (type == T_WAIT_PORT) start_wait(id, p, len);
      else if (type == T_PING) send_frame(T_OK, 0, id, NULL, 0);
      else {
        static uint8_t buf[MILESTONES_MAX + 512];
        send_frame(T_OK, 0, id, buf, info_fields(buf, 1));
      }
      return 0;
    default: break;
  }
  stream_t *s = find_stream(id);
  if (!s) return 0; /* a frame racing the stream's end: ignore */
  switch (type) {
    case T_DATA:
      if (flags != 0 || (s->kind != K_EXEC && s->kind != K_PUT)) { session_fail(E_PROTOCOL, "DATA not allowed here"); return -1; }
      if (len == 0 || len > s->recv_window) { session_fail(E_PROTOCOL, "DATA beyond the granted credit"); return -1; }
      s->recv_window -= len;
      if (s->kind == K_EXEC) exec_data(s, p, len);
      else put_data(s, p, len);
      return 0;
    case T_EOF:
      if (len) { session_fail(E_PROTOCOL, "EOF with a payload"); return -1; }
      if (s->kind == K_EXEC) { if (!s->in_eof) s->in_eof = 1; exec_stdin_flush(s); }
      else if (s->kind == K_PUT) put_finish(s);
      return 0;
    case T_CREDIT: {
      if (len != 4 || get32(p) == 0) { session_fail(E_PROTOCOL, "bad CREDIT"); return -1; }
      uint64_t c = (uint64_t)s->send_credit + get32(p);
      if (c > 0x7fffffff) { session_fail(E_PROTOCOL, "CREDIT overflows the window"); return -1; }
      s->send_credit = (uint32_t)c;
      return 0;
    }
    case T_SIGNAL: {
      int sig = signal_number(p, len);
      if (sig < 0) { session_fail(E_PROTOCOL, "unknown signal name"); return -1; }
      if (s->kind == K_EXEC && s->pid > 0 && !s->done) kill(-s->pid, sig);
      return 0;
    }
    case T_RESIZE:
      if (len != 4) { session_fail(E_PROTOCOL, "bad RESIZE"); return -1; }
      if (s->kind == K_EXEC && s->pty && s->fd_out >= 0) {
        struct winsize ws = {.ws_row = get16(p), .ws_col = get16(p + 2)};
        ioctl(s->fd_out, TIOCSWINSZ, &ws);
      }
      return 0;
    case T_CANCEL:
      cancel_stream(s);
      return 0;
    default:
      session_fail(E_PROTOCOL, "frame type not allowed from the host");
      return -1;
  }
}

static int hello_header_at(const uint8_t *h) {
  return get32(h) == MAGIC && h[4] == PROTO_VERSION && h[5] == T_HELLO && get16(h + 6) == 0 &&
         get32(h + 8) == 0 && get32(h + 12) == 36;
}

/* Parses as many whole frames as the input holds, while the output buffer has room. */
static void process_input(void) {
  size_t off = 0;
  while (G.state != S_OFF && G.state != S_CLOSING) {
    size_t avail = G.in_len - off;
    if (G.state == S_WAIT_HELLO) {
      /* Resync: skip to the next well-formed HELLO header. */
      while (avail >= HDR && !hello_header_at(G.in + off)) { off++; avail--; }
      if (avail < HDR) {
        break;
      }
    }
    if (avail < HDR) break;
    if (G.out_len > OUT_SOFT) break; /* back-pressure: let the host drain us first */
    const uint8_t *h = G.in + off;
    uint32_t len = get32(h + 12);
    if (get32(h) != MAGIC || h[4] != PROTO_VERSION || len > MAX_PAYLOAD) {
      if (G.state == S_READY) session_fail(E_PROTOCOL, "malformed frame header");
      else { G.state = S_WAIT_HELLO; off++; continue; }
      return;
    }
    if (avail < HDR + len) break;
    uint8_t type = h[5];
    uint16_t flags = get16(h + 6);
    uint32_t id = get32(h + 8);
    const uint8_t *p = h + HDR;
    off += HDR + len;
    if (G.state == S_WAIT_HELLO) {
      on_hello(p, len);
    } else if (G.state == S_WAIT_AUTH) {
      if (type == T_HELLO && id == 0) on_hello(p, len);
      else if (type == T_AUTH && id == 0) on_auth(p, len);
      else {
        drop_all_streams();
        send_error(0, E_NOT_READY, 0, "authenticate before sending requests");
        G.state = S_WAIT_HELLO;
      }
    } else if (dispatch(type, flags, id, p, len) < 0) {
      return; /* session dropped, input discarded */
    }
    if (G.in_len < off) return; /* the session was reset while handling the frame */
  }
  if (G.state == S_OFF || G.state == S_CLOSING) { G.in_len = 0; return; }
  if (off > G.in_len) off = G.in_len;
  memmove(G.in, G.in + off, G.in_len - off);
  G.in_len -= off;
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

/* Generates frames from stream state: data within credit, credit grants, terminal frames. */
static void pump(int64_t now) {
  procs_tick(now);
  if (G.state != S_READY) return;
  for (int i = 0; i < G.hi; i++) {
    stream_t *s = &G.streams[i];
    if (s->kind == K_FREE) continue;
    if (s->kind == K_EXEC) {
      if (s->fd_in >= 0 && s->in_len) exec_stdin_flush(s);
      if (s->deadline && now >= s->deadline && !s->timed_out && !s->reaped) {
        s->timed_out = 1;
        kill(-s->pid, SIGKILL);
      }
      exec_pump_fd(s, &s->fd_out, 1);
      if (s->fd_err >= 0) exec_pump_fd(s, &s->fd_err, 2);
      exec_maybe_finish(s, now);
    } else if (s->kind == K_GET) {
      get_pump(s);
    } else if (s->kind == K_MEM) {
      mem_pump(s);
    } else if (s->kind == K_WATCH) {
      watch_pump(s);
    } else if (s->kind == K_ATTACH) {
      attach_pump(s);
    } else if (s->kind == K_WAIT && !s->done) {
      if (now >= s->deadline) {
        close_fd(&s->sock);
        set_error(s, E_TIMEOUT, 0, "nothing accepted connections on 127.0.0.1:%u in time", s->port);
      } else if (s->sock < 0 && now >= s->next_try) {
        wait_try(s, now);
      }
    }
    if (CREDIT_DUE(s) && s->kind != K_FREE) {
      uint8_t b[4];
      put32(b, s->credit_pending);
      if (send_frame(T_CREDIT, 0, s->id, b, 4) == 0) {
        s->recv_window += s->credit_pending;
        s->credit_pending = 0;
      }
    }
    if (s->done && s->term_type) {
      if (send_frame(s->term_type, 0, s->id, s->term, s->term_len) == 0) {
        s->term_type = 0;
        if (s->kind == K_EXEC) s->pid = 0; /* finished: nothing to kill */
        free_stream(s);
      }
    }
  }
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

/* The secret the next HELLO must prove: a restored clone is re-keyed over its current session. */
void set_secret(const uint8_t secret[32]) { memcpy(G.secret, secret, 32); }

static void read_secret(const char *path, int unlink_after) {
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) die("cannot open the secret file %s: %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) == 0 && (st.st_mode & 077)) fchmod(fd, 0600);
  uint8_t buf[160];
  size_t n = 0;
  for (;;) {
    ssize_t r = read(fd, buf + n, sizeof buf - n);
    if (r <= 0) break;
    n += (size_t)r;
    if (n == sizeof buf) break;
  }
  close(fd);
  if (n == 32) {
    memcpy(G.secret, buf, 32);
  } else {
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) n--;
    if (n != 64) die("the secret file %s must hold 32 raw bytes or 64 hex digits", path);
    for (int i = 0; i < 32; i++) {
      int v = 0;
      for (int j = 0; j < 2; j++) {
        uint8_t c = buf[2 * i + j];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) die("the secret file %s must hold 32 raw bytes or 64 hex digits", path);
        v = v * 16 + d;
      }
      G.secret[i] = (uint8_t)v;
    }
  }
  memset(buf, 0, sizeof buf);
  if (unlink_after) unlink(path);
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

static int self_test(void) {
  /* FIPS 180-2 "abc" and RFC 4231 test case 2. */
  static const uint8_t abc[32] = {0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
                                  0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad};
  static const uint8_t rfc[32] = {0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75, 0xc7,
                                  0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9, 0x64, 0xec, 0x38, 0x43};
  uint8_t out[32];
  sha256_ctx c;
  sha256_init(&c);
  sha256_update(&c, "abc", 3);
  sha256_final(&c, out);
  if (memcmp(out, abc, 32)) return 1;
  hmac_sha256_ctx h;
  hmac_sha256_init(&h, (const uint8_t *)"Jefe", 4);
  hmac_sha256_update(&h, "what do ya want for nothing?", 28);
  hmac_sha256_final(&h, out);
  if (memcmp(out, rfc, 32)) return 1;
  puts("ok");
  return 0;
}

static void usage(void) {
  fputs("usage: smolvm-agent (--serial DEV | --vsock PORT | --unix PATH | --fd N) --secret-file PATH\n"
        "                    [--env-file PATH] [--milestones PATH] [--unlink-secret] [--verbose]\n"
        "       smolvm-agent --version | --self-test\n",
        stderr);
  exit(2);
}

int main(int argc, char **argv) {
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
