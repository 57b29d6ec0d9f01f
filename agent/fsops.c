/*
 * File operations beyond PUT/GET (agent/PROTOCOL.md, "File operations"): STAT, LIST, FSOP
 * (mkdir, remove, rename) and WATCH (inotify). Kept apart from the session (auth.c) and exec
 * (exec.c) so each stays readable. Nothing here follows a symlink out of the tree it was asked
 * about: LIST and recursive remove use lstat/openat(O_NOFOLLOW) and descend only into real
 * directories.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

#define LIST_MAX (16u << 20) /* bytes of one listing */
#define LIST_DEPTH_MAX 16
#define RM_DEPTH_MAX 256
#define WATCH_MAX_DIRS 8192
#define WATCH_PENDING_MAX 65536
#define WATCH_COALESCE_MS 50

enum { FT_FILE = 0, FT_DIR = 1, FT_SYMLINK = 2, FT_OTHER = 3 };
enum { OP_MKDIR = 1, OP_REMOVE = 2, OP_RENAME = 3 };
enum { EV_CREATE = 1, EV_MODIFY = 2, EV_DELETE = 3, EV_RENAME = 4 };

/* Like path_problem, but "/" itself is allowed (it names a directory). */
static const char *any_path_problem(const field_t *f) {
  if (f->len == 1 && f->v[0] == '/') return NULL;
  return path_problem(f);
}

/* Finds the single PATH field, validates it and copies it; errors are sent on `id`. */
static char *request_path(uint32_t id, int n, uint8_t tag, const char *what) {
  const field_t *path = NULL;
  for (int i = 0; i < n; i++) {
    if (FIELDS[i].tag != tag) continue;
    if (path) { send_error(id, E_BAD_REQUEST, 0, "duplicate %s", what); return NULL; }
    path = &FIELDS[i];
  }
  if (!path) { send_error(id, E_BAD_REQUEST, 0, "%s is required", what); return NULL; }
  const char *why = any_path_problem(path);
  if (why) { send_error(id, E_INVALID_PATH, 0, "guest path %s", why); return NULL; }
  char *s = field_str(path);
  if (!s) send_error(id, E_IO, ENOMEM, "out of memory");
  return s;
}

static int u8_field(const field_t *f, int max) { return f->len == 1 && f->v[0] <= max ? f->v[0] : -1; }

static uint8_t file_type(mode_t m) {
  return S_ISREG(m) ? FT_FILE : S_ISDIR(m) ? FT_DIR : S_ISLNK(m) ? FT_SYMLINK : FT_OTHER;
}

/* Encodes one entry's fields (type, mode, size, mtime, symlink target) at p; returns bytes. */
static size_t stat_fields(uint8_t *p, const struct stat *st, int dirfd, const char *name) {
  size_t n = 0;
  uint8_t t = file_type(st->st_mode), b[8];
  n += put_field(p + n, F_FTYPE, &t, 1);
  put32(b, (uint32_t)(st->st_mode & 07777));
  n += put_field(p + n, F_MODE, b, 4);
  put64(b, (uint64_t)st->st_size);
  n += put_field(p + n, F_SIZE, b, 8);
  put64(b, (uint64_t)st->st_mtim.tv_sec * 1000 + (uint64_t)st->st_mtim.tv_nsec / 1000000);
  n += put_field(p + n, F_MTIME, b, 8);
  if (t == FT_SYMLINK) {
    char target[PATH_MAX];
    ssize_t l = readlinkat(dirfd, name, target, sizeof target);
    if (l > 0) n += put_field(p + n, F_TARGET, target, (size_t)l);
  }
  return n;
}

void start_stat(uint32_t id, const uint8_t *p, uint32_t len) {
  int n;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "STAT fields are malformed"); return; }
  char *path = request_path(id, n, F_PATH, "PATH");
  if (!path) return;
  struct stat st;
  if (lstat(path, &st) < 0) {
    int e = errno;
    send_error(id, errno_code(e), e, "could not stat %s: %s", path, strerror(e));
    free(path);
    return;
  }
  uint8_t buf[64 + PATH_MAX];
  size_t l = stat_fields(buf, &st, AT_FDCWD, path);
  send_frame(T_OK, 0, id, buf, l);
  free(path);
}

/* ------------------------------------------------------------------ LIST */

typedef struct {
  uint8_t *buf;
  size_t len, cap;
  uint32_t count;
  int full;
} listing_t;

static int listing_add(listing_t *L, const char *path, const struct stat *st, int dirfd, const char *name) {
  uint8_t rec[4 + 64 + 2 * PATH_MAX + 16];
  size_t plen = strlen(path);
  if (plen > PATH_MAX) return 0;
  size_t n = 4;
  n += put_field(rec + n, F_PATH, path, plen);
  n += stat_fields(rec + n, st, dirfd, name);
  put32(rec, (uint32_t)(n - 4));
  if (L->len + n > LIST_MAX) { L->full = 1; return -1; }
  if (L->len + n > L->cap) {
    size_t cap = L->cap ? L->cap * 2 : 65536;
    while (cap < L->len + n) cap *= 2;
    if (cap > LIST_MAX) cap = LIST_MAX;
    uint8_t *nb = realloc(L->buf, cap);
    if (!nb) { L->full = 1; return -1; }
    L->buf = nb;
    L->cap = cap;
  }
  memcpy(L->buf + L->len, rec, n);
  L->len += n;
  L->count++;
  return 0;
}

/* Lists dirfd (whose path is `path`) into L; consumes dirfd. Returns 0 or an errno. */
static int list_dir(listing_t *L, int dirfd, const char *path, int depth) {
  DIR *d = fdopendir(dirfd);
  if (!d) { int e = errno; close(dirfd); return e; }
  struct dirent *de;
  int err = 0;
  while (!err && (de = readdir(d))) {
    if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
    struct stat st;
    if (fstatat(dirfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue; /* vanished meanwhile */
    char child[PATH_MAX];
    int cl = snprintf(child, sizeof child, "%s/%s", strcmp(path, "/") ? path : "", de->d_name);
    if (cl < 0 || (size_t)cl >= sizeof child) continue;
    if (listing_add(L, child, &st, dirfd, de->d_name) < 0) { err = EFBIG; break; }
    if (depth > 1 && S_ISDIR(st.st_mode)) {
      int sub = openat(dirfd, de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub >= 0) {
        int e = list_dir(L, sub, child, depth - 1);
        if (e == EFBIG) err = e;
      }
    }
  }
  closedir(d);
  return err;
}

void start_list(uint32_t id, const uint8_t *p, uint32_t len) {
  int n;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "LIST fields are malformed"); return; }
  int depth = 1;
  for (int i = 0; i < n; i++) {
    if (FIELDS[i].tag == F_DEPTH) {
      depth = u8_field(&FIELDS[i], LIST_DEPTH_MAX);
      if (depth < 1) { send_error(id, E_BAD_REQUEST, 0, "DEPTH must be 1..%d", LIST_DEPTH_MAX); return; }
    } else if (FIELDS[i].tag != F_PATH && !(FIELDS[i].tag & 0x80)) {
      send_error(id, E_BAD_REQUEST, 0, "unknown LIST field %d", FIELDS[i].tag);
      return;
    }
  }
  char *path = request_path(id, n, F_PATH, "PATH");
  if (!path) return;
  int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    send_error(id, errno_code(e), e, "could not list %s: %s", path, strerror(e));
    free(path);
    return;
  }
  listing_t L = {0};
  int e = list_dir(&L, fd, path, depth);
  free(path);
  if (e == EFBIG) {
    free(L.buf);
    send_error(id, E_LIMIT, EFBIG, "the listing exceeds %u bytes: list a smaller tree or a lower depth", LIST_MAX);
    return;
  }
  stream_t *s = new_stream(id, K_MEM);
  if (!s) { free(L.buf); send_error(id, E_LIMIT, 0, "too many open streams (%d)", MAX_STREAMS); return; }
  s->mem = L.buf;
  s->mem_len = L.len;
  s->bytes = L.count;
}

/* Sends a prepared reply as DATA within credit, then OK with the u32 record count. */
void mem_pump(stream_t *s) {
  while (!s->done && s->send_credit > 0 && s->mem_off < s->mem_len) {
    size_t want = s->mem_len - s->mem_off;
    if (want > MAX_PAYLOAD) want = MAX_PAYLOAD;
    if (want > s->send_credit) want = s->send_credit;
    if (out_used() + HDR + want > OUT_SOFT) return;
    uint8_t *p = out_reserve(want);
    if (!p) return;
    memcpy(p + HDR, s->mem + s->mem_off, want);
    out_commit(p, T_DATA, 0, s->id, want);
    s->send_credit -= (uint32_t)want;
    s->mem_off += want;
  }
  if (!s->done && s->mem_off >= s->mem_len) {
    uint8_t b[4];
    put32(b, (uint32_t)s->bytes);
    set_terminal(s, T_OK, b, 4);
  }
}

/* ------------------------------------------------------------------ FSOP */

/* Removes `name` under dirfd without following symlinks. Returns 0 or an errno. */
static int rm_tree(int dirfd, const char *name, int depth) {
  if (unlinkat(dirfd, name, 0) == 0) return 0;
  if (errno != EISDIR && errno != EPERM) return errno;
  if (depth > RM_DEPTH_MAX) return ELOOP;
  int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno;
  DIR *d = fdopendir(fd);
  if (!d) { int e = errno; close(fd); return e; }
  struct dirent *de;
  int err = 0;
  while (!err && (de = readdir(d))) {
    if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
    err = rm_tree(fd, de->d_name, depth + 1);
    if (err == ENOENT) err = 0;
  }
  closedir(d);
  if (!err && unlinkat(dirfd, name, AT_REMOVEDIR) < 0) err = errno;
  return err;
}

void start_fsop(uint32_t id, const uint8_t *p, uint32_t len) {
  int n;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "FSOP fields are malformed"); return; }
  int op = 0, recursive = 0;
  for (int i = 0; i < n; i++) {
    field_t *f = &FIELDS[i];
    if (f->tag == F_OP) op = u8_field(f, OP_RENAME);
    else if (f->tag == F_RECURSIVE) recursive = u8_field(f, 1);
    else if (f->tag != F_PATH && f->tag != F_TO && !(f->tag & 0x80)) {
      send_error(id, E_BAD_REQUEST, 0, "unknown FSOP field %d", f->tag);
      return;
    }
    if (op < 0 || recursive < 0) { send_error(id, E_BAD_REQUEST, 0, "bad OP or RECURSIVE"); return; }
  }
  if (op < OP_MKDIR) { send_error(id, E_BAD_REQUEST, 0, "FSOP needs OP"); return; }
  char *path = request_path(id, n, F_PATH, "PATH");
  if (!path) return;
  char *to = NULL;
  int e = 0;
  if (op == OP_MKDIR) {
    if (recursive && mkdirs_for(path) < 0) e = errno;
    if (!e && mkdir(path, 0755) < 0) {
      struct stat st;
      e = errno;
      if (e == EEXIST && recursive && stat(path, &st) == 0 && S_ISDIR(st.st_mode)) e = 0;
    }
  } else if (op == OP_REMOVE) {
    if (!strcmp(path, "/")) e = EBUSY;
    else if (recursive) e = rm_tree(AT_FDCWD, path, 0);
    else if (unlink(path) < 0) {
      e = errno;
      if ((e == EISDIR || e == EPERM) && rmdir(path) == 0) e = 0;
      else if (e == EISDIR || e == EPERM) e = errno;
    }
  } else {
    to = request_path(id, n, F_TO, "TO");
    if (!to) { free(path); return; }
    if (rename(path, to) < 0) e = errno;
  }
  if (e) send_error(id, errno_code(e), e, "%s failed for %s: %s", op == OP_MKDIR ? "mkdir" : op == OP_REMOVE ? "remove" : "rename", path, strerror(e));
  else send_frame(T_OK, 0, id, NULL, 0);
  free(path);
  free(to);
}

/* ------------------------------------------------------------------ WATCH */

typedef struct {
  int fd;
  int recursive;
  int ndirs;
  struct { int wd; char *path; } dirs[WATCH_MAX_DIRS];
  uint8_t pending[WATCH_PENDING_MAX];
  size_t pending_len;
  int64_t first_at;
} watch_t;

static void watch_add(watch_t *w, const char *path, int depth);

static void watch_add_children(watch_t *w, const char *path, int depth) {
  if (depth > LIST_DEPTH_MAX * 4) return;
  int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return;
  DIR *d = fdopendir(fd);
  if (!d) { close(fd); return; }
  struct dirent *de;
  while ((de = readdir(d))) {
    if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
    struct stat st;
    if (fstatat(fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISDIR(st.st_mode)) continue;
    char child[PATH_MAX];
    int cl = snprintf(child, sizeof child, "%s/%s", strcmp(path, "/") ? path : "", de->d_name);
    if (cl > 0 && (size_t)cl < sizeof child) watch_add(w, child, depth + 1);
  }
  closedir(d);
}

static void watch_add(watch_t *w, const char *path, int depth) {
  if (w->ndirs >= WATCH_MAX_DIRS) return;
  uint32_t mask = IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO |
                  IN_DELETE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK;
  int wd = inotify_add_watch(w->fd, path, mask);
  if (wd < 0) return;
  for (int i = 0; i < w->ndirs; i++)
    if (w->dirs[i].wd == wd) return; /* already watched */
  char *copy = strdup(path);
  if (!copy) return;
  w->dirs[w->ndirs].wd = wd;
  w->dirs[w->ndirs].path = copy;
  w->ndirs++;
  if (w->recursive) watch_add_children(w, path, depth);
}

void start_watch(uint32_t id, const uint8_t *p, uint32_t len) {
  int n, recursive = 0;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "WATCH fields are malformed"); return; }
  for (int i = 0; i < n; i++) {
    if (FIELDS[i].tag == F_RECURSIVE) recursive = u8_field(&FIELDS[i], 1);
    else if (FIELDS[i].tag != F_PATH && !(FIELDS[i].tag & 0x80)) {
      send_error(id, E_BAD_REQUEST, 0, "unknown WATCH field %d", FIELDS[i].tag);
      return;
    }
    if (recursive < 0) { send_error(id, E_BAD_REQUEST, 0, "bad RECURSIVE"); return; }
  }
  char *path = request_path(id, n, F_PATH, "PATH");
  if (!path) return;
  struct stat st;
  int se = stat(path, &st) < 0 ? errno : !S_ISDIR(st.st_mode) ? ENOTDIR : 0;
  if (se) {
    int e = se;
    send_error(id, errno_code(e), e, "cannot watch %s: %s", path, strerror(e));
    free(path);
    return;
  }
  watch_t *w = calloc(1, sizeof *w);
  if (!w) { free(path); send_error(id, E_IO, ENOMEM, "out of memory"); return; }
  w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  w->recursive = recursive;
  if (w->fd < 0) {
    int e = errno;
    free(w);
    free(path);
    send_error(id, E_IO, e, "inotify is not available: %s", strerror(e));
    return;
  }
  watch_add(w, path, 0);
  free(path);
  if (w->ndirs == 0) {
    int e = errno;
    close(w->fd);
    free(w);
    send_error(id, E_IO, e, "could not watch the directory: %s", strerror(e));
    return;
  }
  stream_t *s = new_stream(id, K_WATCH);
  if (!s) {
    s = NULL;
    close(w->fd);
    free(w->dirs[0].path);
    free(w);
    send_error(id, E_LIMIT, 0, "too many open streams (%d)", MAX_STREAMS);
    return;
  }
  s->watch = w;
  /* A "ready" record (type 0, empty path): the host returns from watch() once it arrives. */
  static const uint8_t ready[3] = {0, 0, 0};
  if (send_frame(T_DATA, 0, id, ready, sizeof ready) == 0) s->send_credit -= sizeof ready;
}

void watch_free(stream_t *s) {
  watch_t *w = s->watch;
  if (!w) return;
  close(w->fd);
  for (int i = 0; i < w->ndirs; i++) free(w->dirs[i].path);
  free(w);
  s->watch = NULL;
}

int watch_fd(stream_t *s) {
  watch_t *w = s->watch;
  return w && w->pending_len < WATCH_PENDING_MAX / 2 ? w->fd : -1;
}

int64_t watch_wake(stream_t *s) {
  watch_t *w = s->watch;
  return w && w->pending_len ? w->first_at + WATCH_COALESCE_MS : 0;
}

/* Queues one event record (u8 type, u16 length, path) unless the same one is already queued. */
static void watch_queue(watch_t *w, uint8_t type, const char *path) {
  size_t plen = strlen(path);
  for (size_t off = 0; off + 3 <= w->pending_len;) {
    size_t l = get16(w->pending + off + 1);
    if (w->pending[off] == type && l == plen && !memcmp(w->pending + off + 3, path, plen)) return;
    off += 3 + l;
  }
  if (w->pending_len + 3 + plen > WATCH_PENDING_MAX) return; /* burst beyond the buffer: dropped */
  if (!w->pending_len) w->first_at = now_ms();
  w->pending[w->pending_len] = type;
  put16(w->pending + w->pending_len + 1, (uint16_t)plen);
  memcpy(w->pending + w->pending_len + 3, path, plen);
  w->pending_len += 3 + plen;
}

static const char *watch_dir(watch_t *w, int wd) {
  for (int i = 0; i < w->ndirs; i++)
    if (w->dirs[i].wd == wd) return w->dirs[i].path;
  return NULL;
}

static void watch_forget(watch_t *w, int wd) {
  for (int i = 0; i < w->ndirs; i++) {
    if (w->dirs[i].wd != wd) continue;
    free(w->dirs[i].path);
    w->dirs[i] = w->dirs[--w->ndirs];
    return;
  }
}

/* Reads inotify events into the coalescing buffer; sends it once the burst settled. */
void watch_pump(stream_t *s) {
  watch_t *w = s->watch;
  if (!w || s->done) return;
  char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
  while (w->pending_len < WATCH_PENDING_MAX / 2) {
    ssize_t r = read(w->fd, buf, sizeof buf);
    if (r <= 0) break;
    for (char *q = buf; q < buf + r;) {
      struct inotify_event *ev = (struct inotify_event *)q;
      q += sizeof *ev + ev->len;
      const char *dir = watch_dir(w, ev->wd);
      if (!dir) continue;
      if (ev->mask & IN_IGNORED) { watch_forget(w, ev->wd); continue; }
      char path[PATH_MAX];
      if (ev->len && ev->name[0]) snprintf(path, sizeof path, "%s/%s", strcmp(dir, "/") ? dir : "", ev->name);
      else snprintf(path, sizeof path, "%s", dir);
      uint8_t type = 0;
      if (ev->mask & IN_CREATE) type = EV_CREATE;
      else if (ev->mask & (IN_MODIFY | IN_CLOSE_WRITE)) type = EV_MODIFY;
      else if (ev->mask & IN_DELETE) type = EV_DELETE;
      else if (ev->mask & (IN_MOVED_FROM | IN_MOVED_TO)) type = EV_RENAME;
      else if ((ev->mask & IN_DELETE_SELF) && w->dirs[0].wd == ev->wd) type = EV_DELETE;
      if (type) watch_queue(w, type, path);
      if (w->recursive && (ev->mask & IN_ISDIR) && (ev->mask & (IN_CREATE | IN_MOVED_TO))) watch_add(w, path, 0);
    }
  }
  if (!w->pending_len || now_ms() < w->first_at + WATCH_COALESCE_MS) return;
  /* Send whole records only, within credit and the frame limit. */
  size_t send = 0;
  while (send < w->pending_len) {
    size_t l = 3 + get16(w->pending + send + 1);
    if (send + l > MAX_PAYLOAD || send + l > s->send_credit) break;
    send += l;
  }
  if (!send || out_used() + HDR + send > OUT_SOFT) return;
  if (send_frame(T_DATA, 0, s->id, w->pending, send) < 0) return;
  s->send_credit -= (uint32_t)send;
  memmove(w->pending, w->pending + send, w->pending_len - send);
  w->pending_len -= send;
  if (w->pending_len) w->first_at = now_ms() - WATCH_COALESCE_MS;
}
