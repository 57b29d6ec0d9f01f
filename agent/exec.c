/*
 * EXEC (agent/PROTOCOL.md "Exec"): spawning a command (vfork, optional PTY, the user's shell the
 * way sshd runs it), its stdin within credit, its output, signals by name, and reaping it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

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

void exec_stdin_flush(stream_t *s) {
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

void exec_data(stream_t *s, const uint8_t *p, uint32_t len) {
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
void exec_pump_fd(stream_t *s, int *fd, uint16_t which) {
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

void exec_maybe_finish(stream_t *s, int64_t now) {
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

void reap_children(void) {
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
