/*
 * Processes that belong to the guest, not to a host call (agent/PROTOCOL.md, "Processes"):
 * SPAWN starts one detached from any stream, so it survives the host connection; the agent
 * always drains its stdout/stderr into a bounded ring per stream (RING_CAP, oldest bytes
 * dropped), so the child never blocks on a host that is away; ATTACH replays what no host saw
 * and then streams live; PROCS lists the table (finished entries stay until evicted by a newer
 * SPAWN; a host still attached to an evicted one gets NOT_FOUND); PINPUT feeds stdin; PSIGNAL signals the process group.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define RING_MIN (64u << 10)
#define STDIN_CAP (256u << 10)
enum { REPLAY_MISSED = 0, REPLAY_ALL = 1, REPLAY_NONE = 2 };

typedef struct {
  uint8_t *buf;
  size_t cap;
  uint64_t total; /* bytes ever written; the ring holds the last min(total, cap) */
} ring_t;

typedef struct {
  int used;
  pid_t pid;
  uint64_t seq;
  char cmd[256];
  uint64_t started_ms;
  int reaped, status, finished;
  int64_t reaped_at;
  int fd_in, fd_out, fd_err;
  uint8_t *inbuf;
  size_t in_len;
  int in_eof; /* 1: close stdin once inbuf drained */
  ring_t ring[2];
  uint64_t delivered[2]; /* how far any attached host was sent each stream */
} proc_t;

static proc_t P[MAX_PROCS];
static uint64_t next_seq = 1;

static void ring_write(ring_t *r, const uint8_t *d, size_t n) {
  if (r->cap < RING_CAP && r->total + n > r->cap) {
    /* Not wrapped yet (cap only grows before the first wrap): grow in place. */
    size_t cap = r->cap ? r->cap : RING_MIN;
    while (cap < r->total + n && cap < RING_CAP) cap *= 2;
    if (cap > RING_CAP) cap = RING_CAP;
    uint8_t *nb = realloc(r->buf, cap);
    if (!nb) { r->total += n; return; } /* out of memory: the bytes are lost, the count stays true */
    r->buf = nb;
    r->cap = cap;
  }
  if (n > r->cap) { d += n - r->cap; r->total += n - r->cap; n = r->cap; }
  size_t pos = (size_t)(r->total % r->cap);
  size_t first = r->cap - pos < n ? r->cap - pos : n;
  memcpy(r->buf + pos, d, first);
  memcpy(r->buf, d + first, n - first);
  r->total += n;
}

static uint64_t ring_start(const ring_t *r) { return r->total > r->cap ? r->total - r->cap : 0; }

/* Copies up to max bytes from absolute offset `from` (>= ring_start). */
static size_t ring_read(const ring_t *r, uint64_t from, uint8_t *out, size_t max) {
  if (from >= r->total || !r->cap) return 0;
  size_t n = r->total - from < max ? (size_t)(r->total - from) : max;
  size_t pos = (size_t)(from % r->cap);
  size_t first = r->cap - pos < n ? r->cap - pos : n;
  memcpy(out, r->buf + pos, first);
  memcpy(out + first, r->buf, n - first);
  return n;
}

static void proc_release(proc_t *p) {
  close_fd(&p->fd_in);
  close_fd(&p->fd_out);
  close_fd(&p->fd_err);
  free(p->inbuf);
  free(p->ring[0].buf);
  free(p->ring[1].buf);
  memset(p, 0, sizeof *p);
}

static proc_t *proc_by_pid(uint32_t pid) {
  for (int i = 0; i < MAX_PROCS; i++)
    if (P[i].used && (uint32_t)P[i].pid == pid) return &P[i];
  return NULL;
}

/* A free slot, evicting the oldest finished process if the table is full; -1 when all run. */
static int proc_slot(void) {
  int oldest = -1;
  for (int i = 0; i < MAX_PROCS; i++) {
    if (!P[i].used) return i;
    if (P[i].finished && (oldest < 0 || P[i].seq < P[oldest].seq)) oldest = i;
  }
  if (oldest >= 0) proc_release(&P[oldest]);
  return oldest;
}

static uint32_t get_pid_field(int n, int *ok) {
  *ok = 0;
  for (int i = 0; i < n; i++)
    if (FIELDS[i].tag == F_PID && FIELDS[i].len == 4) { *ok = 1; return get32(FIELDS[i].v); }
  return 0;
}

void start_spawn(uint32_t id, const uint8_t *p, uint32_t len) {
  int n;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "SPAWN fields are malformed"); return; }
  int want_stdin = 0;
  char cmd[256] = "";
  size_t cl = 0;
  for (int i = 0; i < n; i++) {
    field_t *f = &FIELDS[i];
    if (f->tag == F_PTY || f->tag == F_TIMEOUT) {
      send_error(id, E_BAD_REQUEST, 0, "SPAWN takes no PTY or TIMEOUT_MS");
      return;
    }
    if (f->tag == F_STDIN) {
      if (f->len != 1 || f->v[0] > 1) { send_error(id, E_BAD_REQUEST, 0, "bad STDIN"); return; }
      want_stdin = f->v[0];
    }
    if (f->tag == F_ARG && cl < sizeof cmd - 1) {
      if (cl) cmd[cl++] = ' ';
      size_t k = f->len < sizeof cmd - 1 - cl ? f->len : sizeof cmd - 1 - cl;
      memcpy(cmd + cl, f->v, k);
      cl += k;
    }
  }
  cmd[cl] = 0;
  for (size_t i = 0; i < cl; i++)
    if (cmd[i] == 0) cmd[i] = ' ';
  int slot = proc_slot();
  if (slot < 0) {
    send_error(id, E_LIMIT, 0, "%d background processes are running: kill one first", MAX_PROCS);
    return;
  }
  start_exec(id, p, len);
  stream_t *s = find_stream(id);
  if (!s || s->done || s->pid <= 0) return; /* start_exec reported the failure */
  proc_t *pr = &P[slot];
  memset(pr, 0, sizeof *pr);
  pr->used = 1;
  pr->pid = s->pid;
  pr->seq = next_seq++;
  memcpy(pr->cmd, cmd, cl + 1);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  pr->started_ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
  pr->fd_out = s->fd_out;
  pr->fd_err = s->fd_err;
  pr->fd_in = s->fd_in;
  s->fd_out = s->fd_err = s->fd_in = -1;
  if (!want_stdin) close_fd(&pr->fd_in);
  s->pid = 0; /* the process is the table's now: the stream's end must not kill it */
  uint8_t b[4];
  put32(b, (uint32_t)pr->pid);
  set_terminal(s, T_OK, b, 4);
  logf_("stream %u: spawned pid %d (%s)", id, pr->pid, pr->cmd);
}

int procs_reaped(pid_t pid, int status) {
  for (int i = 0; i < MAX_PROCS; i++) {
    proc_t *p = &P[i];
    if (p->used && p->pid == pid && !p->reaped) {
      p->reaped = 1;
      p->status = status;
      p->reaped_at = now_ms();
      return 1;
    }
  }
  return 0;
}

/* Reads what a pipe holds into the ring; closes it at EOF. */
static void proc_drain(proc_t *p, int *fd, int which) {
  uint8_t buf[65536];
  while (*fd >= 0) {
    ssize_t r = read(*fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) return;
    if (r <= 0) { close_fd(fd); return; }
    ring_write(&p->ring[which], buf, (size_t)r);
  }
}

static void proc_stdin_flush(proc_t *p) {
  while (p->in_len && p->fd_in >= 0) {
    ssize_t w = write(p->fd_in, p->inbuf, p->in_len);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) return;
    if (w <= 0) { p->in_len = 0; close_fd(&p->fd_in); return; }
    memmove(p->inbuf, p->inbuf + w, p->in_len - (size_t)w);
    p->in_len -= (size_t)w;
  }
  if (!p->in_len && p->in_eof && p->fd_in >= 0) close_fd(&p->fd_in);
}

void procs_poll_fds(struct pollfd *pfd, int *n, int64_t now, int *timeout) {
  for (int i = 0; i < MAX_PROCS; i++) {
    proc_t *p = &P[i];
    if (!p->used || p->finished) continue;
    if (p->fd_out >= 0) pfd[(*n)++] = (struct pollfd){.fd = p->fd_out, .events = POLLIN};
    if (p->fd_err >= 0) pfd[(*n)++] = (struct pollfd){.fd = p->fd_err, .events = POLLIN};
    if (p->fd_in >= 0 && (p->in_len || p->in_eof)) pfd[(*n)++] = (struct pollfd){.fd = p->fd_in, .events = POLLOUT};
    if (p->reaped) {
      int t = (int)(p->reaped_at + EXIT_GRACE_MS - now);
      if (t < 0) t = 0;
      if (*timeout < 0 || t < *timeout) *timeout = t;
    }
  }
}

void procs_on_ready(int fd, short revents) {
  (void)revents;
  for (int i = 0; i < MAX_PROCS; i++) {
    proc_t *p = &P[i];
    if (!p->used) continue;
    if (fd == p->fd_out) proc_drain(p, &p->fd_out, 0);
    else if (fd == p->fd_err) proc_drain(p, &p->fd_err, 1);
    else if (fd == p->fd_in) proc_stdin_flush(p);
    else continue;
    return;
  }
}

/* A reaped process is finished once its pipes hit EOF, or after the grace period (a background
 * grandchild may hold them: what it wrote so far is kept, later output is not read). */
void procs_tick(int64_t now) {
  for (int i = 0; i < MAX_PROCS; i++) {
    proc_t *p = &P[i];
    if (!p->used || p->finished || !p->reaped) continue;
    proc_drain(p, &p->fd_out, 0);
    proc_drain(p, &p->fd_err, 1);
    if ((p->fd_out >= 0 || p->fd_err >= 0) && now - p->reaped_at < EXIT_GRACE_MS) continue;
    close_fd(&p->fd_out);
    close_fd(&p->fd_err);
    close_fd(&p->fd_in);
    free(p->inbuf);
    p->inbuf = NULL;
    p->in_len = 0;
    p->finished = 1;
  }
}

void start_attach(uint32_t id, const uint8_t *p, uint32_t len) {
  int n, ok, replay = REPLAY_MISSED;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "ATTACH fields are malformed"); return; }
  for (int i = 0; i < n; i++) {
    field_t *f = &FIELDS[i];
    if (f->tag == F_REPLAY) {
      if (f->len != 1 || f->v[0] > REPLAY_NONE) { send_error(id, E_BAD_REQUEST, 0, "bad REPLAY"); return; }
      replay = f->v[0];
    } else if (f->tag != F_PID && !(f->tag & 0x80)) {
      send_error(id, E_BAD_REQUEST, 0, "unknown ATTACH field %d", f->tag);
      return;
    }
  }
  uint32_t pid = get_pid_field(n, &ok);
  if (!ok) { send_error(id, E_BAD_REQUEST, 0, "ATTACH needs PID"); return; }
  proc_t *pr = proc_by_pid(pid);
  if (!pr) { send_error(id, E_NOT_FOUND, ESRCH, "no background process with pid %u", pid); return; }
  stream_t *s = new_stream(id, K_ATTACH);
  if (!s) { send_error(id, E_LIMIT, 0, "too many open streams (%d)", MAX_STREAMS); return; }
  s->proc = (int)(pr - P);
  s->pid = pr->pid;
  for (int k = 0; k < 2; k++) {
    uint64_t start = ring_start(&pr->ring[k]);
    uint64_t from = replay == REPLAY_ALL ? start : replay == REPLAY_NONE ? pr->ring[k].total : pr->delivered[k];
    s->cursor[k] = from < start ? start : from;
  }
}

static proc_t *attach_proc(stream_t *s) {
  proc_t *p = &P[s->proc];
  return p->used && p->pid == s->pid ? p : NULL;
}

int attach_ready(stream_t *s) {
  if (s->done) return 0;
  proc_t *p = attach_proc(s);
  if (!p) return 1;
  if (p->finished) return 1;
  return s->send_credit > 0 && out_used() + HDR + 4096 <= OUT_SOFT &&
         (s->cursor[0] < p->ring[0].total || s->cursor[1] < p->ring[1].total);
}

void attach_pump(stream_t *s) {
  if (s->done) return;
  proc_t *p = attach_proc(s);
  if (!p) { set_error(s, E_NOT_FOUND, ESRCH, "the process left the table"); return; }
  for (int k = 0; k < 2; k++) {
    ring_t *r = &p->ring[k];
    if (s->cursor[k] < ring_start(r)) s->cursor[k] = ring_start(r); /* overrun: this host missed some */
    while (s->send_credit > 0 && s->cursor[k] < r->total) {
      size_t want = MAX_PAYLOAD < s->send_credit ? MAX_PAYLOAD : s->send_credit;
      if (out_used() + HDR + want > OUT_SOFT) {
        if (out_used() + HDR + 4096 > OUT_SOFT) return;
        want = OUT_SOFT - out_used() - HDR;
      }
      uint8_t *o = out_reserve(want);
      if (!o) return;
      size_t got = ring_read(r, s->cursor[k], o + HDR, want);
      if (!got) break;
      out_commit(o, T_DATA, (uint16_t)(k + 1), s->id, got);
      s->send_credit -= (uint32_t)got;
      s->cursor[k] += got;
      if (s->cursor[k] > p->delivered[k]) p->delivered[k] = s->cursor[k];
    }
  }
  if (p->finished && s->cursor[0] >= p->ring[0].total && s->cursor[1] >= p->ring[1].total) {
    uint8_t buf[5 + 16];
    set_terminal(s, T_EXIT, buf, encode_exit(p->status, 0, 0, buf));
  }
}

void procs_list(uint32_t id) {
  static uint8_t buf[MAX_PROCS * 400];
  size_t n = 0;
  for (uint64_t seq = 0;;) {
    /* oldest first */
    proc_t *next = NULL;
    for (int i = 0; i < MAX_PROCS; i++)
      if (P[i].used && P[i].seq > seq && (!next || P[i].seq < next->seq)) next = &P[i];
    if (!next) break;
    seq = next->seq;
    uint8_t b[8];
    put32(b, (uint32_t)next->pid);
    n += put_field(buf + n, F_PID, b, 4);
    n += put_field(buf + n, F_COMMAND, next->cmd, strlen(next->cmd));
    uint8_t running = !next->reaped;
    n += put_field(buf + n, F_RUNNING, &running, 1);
    put64(b, next->started_ms);
    n += put_field(buf + n, F_STARTED, b, 8);
    if (next->reaped) {
      if (WIFSIGNALED(next->status)) {
        char name[20];
        signal_name(WTERMSIG(next->status), name, sizeof name);
        n += put_field(buf + n, F_SIGNAME, name, strlen(name) > 16 ? 16 : strlen(name));
      } else {
        put32(b, (uint32_t)WEXITSTATUS(next->status));
        n += put_field(buf + n, F_EXITCODE, b, 4);
      }
    }
  }
  send_frame(T_OK, 0, id, buf, n);
}

void procs_input(uint32_t id, const uint8_t *p, uint32_t len) {
  int n, ok, close_after = 0;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "PINPUT fields are malformed"); return; }
  const field_t *data = NULL;
  for (int i = 0; i < n; i++) {
    field_t *f = &FIELDS[i];
    if (f->tag == F_BYTES) data = f;
    else if (f->tag == F_STDIN) close_after = f->len == 1 && f->v[0] == 0;
    else if (f->tag != F_PID && !(f->tag & 0x80)) {
      send_error(id, E_BAD_REQUEST, 0, "unknown PINPUT field %d", f->tag);
      return;
    }
  }
  uint32_t pid = get_pid_field(n, &ok);
  if (!ok) { send_error(id, E_BAD_REQUEST, 0, "PINPUT needs PID"); return; }
  proc_t *pr = proc_by_pid(pid);
  if (!pr) { send_error(id, E_NOT_FOUND, ESRCH, "no background process with pid %u", pid); return; }
  if (pr->fd_in < 0 || pr->in_eof) {
    send_error(id, E_BAD_REQUEST, EPIPE, "the stdin of process %u is closed (start it with stdin: true)", pid);
    return;
  }
  uint32_t accepted = 0;
  if (data && data->len) {
    if (!pr->inbuf && !(pr->inbuf = malloc(STDIN_CAP))) { send_error(id, E_IO, ENOMEM, "out of memory"); return; }
    size_t room = STDIN_CAP - pr->in_len;
    accepted = data->len < room ? data->len : (uint32_t)room;
    memcpy(pr->inbuf + pr->in_len, data->v, accepted);
    pr->in_len += accepted;
  }
  if (close_after && (!data || accepted == data->len)) pr->in_eof = 1;
  proc_stdin_flush(pr);
  uint8_t b[4];
  put32(b, accepted);
  send_frame(T_OK, 0, id, b, 4);
}

void procs_signal(uint32_t id, const uint8_t *p, uint32_t len) {
  int n, ok, sig = -1;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "PSIGNAL fields are malformed"); return; }
  for (int i = 0; i < n; i++)
    if (FIELDS[i].tag == F_SIGNAME) sig = signal_number(FIELDS[i].v, FIELDS[i].len);
  uint32_t pid = get_pid_field(n, &ok);
  if (!ok || sig < 0) { send_error(id, E_BAD_REQUEST, 0, "PSIGNAL needs PID and a known SIGNAME"); return; }
  proc_t *pr = proc_by_pid(pid);
  if (!pr) { send_error(id, E_NOT_FOUND, ESRCH, "no background process with pid %u", pid); return; }
  if (!pr->finished) kill(-pr->pid, sig);
  send_frame(T_OK, 0, id, NULL, 0);
}

void procs_kill_all(void) {
  for (int i = 0; i < MAX_PROCS; i++)
    if (P[i].used && !P[i].reaped) kill(-P[i].pid, SIGKILL);
}
