/*
 * Frames (agent/PROTOCOL.md "Framing"): big-endian integer helpers, the bounded output buffer
 * every frame is queued in, and the TLV request fields every request is parsed with.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = (uint8_t)v; }
uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }

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

size_t error_payload(uint8_t buf[ERROR_PAYLOAD_MAX], uint16_t code, int err, const char *fmt, va_list ap) {
  put16(buf, code);
  put32(buf + 2, (uint32_t)err);
  int n = vsnprintf((char *)buf + 6, ERROR_PAYLOAD_MAX - 6, fmt, ap);
  if (n < 0) n = 0;
  if (n > ERROR_PAYLOAD_MAX - 7) n = ERROR_PAYLOAD_MAX - 7;
  return 6 + (size_t)n;
}

void send_error(uint32_t stream, uint16_t code, int err, const char *fmt, ...) {
  uint8_t buf[ERROR_PAYLOAD_MAX];
  va_list ap;
  va_start(ap, fmt);
  size_t len = error_payload(buf, code, err, fmt, ap);
  va_end(ap);
  send_frame(T_ERROR, 0, stream, buf, len);
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
