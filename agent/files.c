/*
 * PUT and GET (agent/PROTOCOL.md "Files"): uploads written to a temp file and renamed into place
 * when complete, downloads sent within credit; the managed env file is one more target.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

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

void start_put(uint32_t id, const uint8_t *p, uint32_t len) {
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

void put_data(stream_t *s, const uint8_t *p, uint32_t len) {
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

void put_finish(stream_t *s) {
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

void start_get(uint32_t id, const uint8_t *p, uint32_t len) {
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

void get_pump(stream_t *s) {
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
