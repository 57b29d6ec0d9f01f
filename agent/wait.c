/*
 * WAIT_PORT: polls 127.0.0.1:<port> in the guest with non-blocking connects until something
 * accepts or the request's deadline passes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent.h"

/* ------------------------------------------------------------------ wait for a TCP port */

void wait_try(stream_t *s, int64_t now) {
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

void start_wait(uint32_t id, const uint8_t *p, uint32_t len) {
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

void wait_check(stream_t *s, int64_t now) {
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
