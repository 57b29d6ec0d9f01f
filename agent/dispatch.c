/*
 * Frame dispatch: parses whole frames from the input buffer (resyncing on HELLO before
 * authentication), routes each authenticated frame to its request or stream, and pump() turns stream
 * state into frames (output within credit, credit grants, terminal frames).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

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
void process_input(void) {
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

/* Generates frames from stream state: data within credit, credit grants, terminal frames. */
void pump(int64_t now) {
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
