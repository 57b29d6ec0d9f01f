/*
 * IDENTITY: what a VM restored from a snapshot must change before its first user command, since
 * every clone wakes up with the same memory: the agent secret (the next session must prove the
 * new one), the kernel RNG (host entropy credited, then an immediate CRNG reseed, so no two
 * clones produce the same random bytes), the wall clock (it resumes from the moment of the
 * save) and the hostname; plus files to write (host key, authorized key, env file, /etc/hosts)
 * and one command to start in the background (sshd's restart on the new host key), so a restore
 * costs one round trip and no process on its critical path. Each field is optional; the request
 * is checked whole before anything is applied.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include "agent.h"

static int add_entropy(const uint8_t *buf, uint32_t len) {
  int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  struct rand_pool_info *info = calloc(1, sizeof *info + len);
  if (!info) { close(fd); errno = ENOMEM; return -1; }
  info->entropy_count = (int)len * 8;
  info->buf_size = (int)len;
  memcpy(info->buf, buf, len);
  int r = ioctl(fd, RNDADDENTROPY, info);
  free(info);
  /* Reseed now rather than at the CRNG's next interval. */
  if (r == 0) r = ioctl(fd, RNDRESEEDCRNG);
  int e = errno;
  close(fd);
  errno = e;
  return r;
}

/* FILE: u32 mode, u16 path length, path, content. Written beside the target, then renamed. */
static int file_parts(const field_t *f, char *path, size_t cap, uint32_t *mode, const uint8_t **data, uint32_t *len) {
  if (f->len < 6) return -1;
  *mode = get32(f->v) & 07777;
  uint16_t plen = get16(f->v + 4);
  if (plen == 0 || plen >= cap || 6u + plen > f->len || f->v[6] != '/' || memchr(f->v + 6, 0, plen)) return -1;
  memcpy(path, f->v + 6, plen);
  path[plen] = 0;
  *data = f->v + 6 + plen;
  *len = f->len - 6 - plen;
  return 0;
}

static int write_file(const field_t *f) {
  char path[1024], tmp[1100];
  uint32_t mode, len;
  const uint8_t *data;
  if (file_parts(f, path, sizeof path, &mode, &data, &len) < 0) { errno = EINVAL; return -1; }
  if (mkdirs_for(path) < 0) return -1;
  snprintf(tmp, sizeof tmp, "%s.smolvm-new", path);
  unlink(tmp);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  for (uint32_t off = 0; off < len;) {
    ssize_t w = write(fd, data + off, len - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) { int e = errno; close(fd); unlink(tmp); errno = e; return -1; }
    off += (uint32_t)w;
  }
  if (fchmod(fd, mode) < 0 || close(fd) < 0 || rename(tmp, path) < 0) { int e = errno; unlink(tmp); errno = e; return -1; }
  return 0;
}

/*
 * RUN: `sh -c CMD` in its own session with no stdio, at the lowest priority (it must not slow
 * the VM's first commands), not waited for (the agent reaps it).
 */
static int run_detached(const field_t *f) {
  char *cmd = field_str(f);
  if (!cmd) { errno = EINVAL; return -1; }
  pid_t pid = fork();
  if (pid < 0) { int e = errno; free(cmd); errno = e; return -1; }
  if (pid == 0) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setsid();
    if (nice(19) < 0) { /* best effort */ }
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) { dup2(null, 0); dup2(null, 1); dup2(null, 2); }
    execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
    _exit(127);
  }
  free(cmd);
  return 0;
}

static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

void start_identity(uint32_t id, const uint8_t *p, uint32_t len) {
  int n = 0;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "malformed IDENTITY fields"); return; }
  const field_t *secret = NULL, *entropy = NULL, *time_ns = NULL, *host = NULL, *run = NULL;
  char path[1024];
  uint32_t mode, flen;
  const uint8_t *fdata;
  for (int i = 0; i < n; i++) {
    const field_t *f = &FIELDS[i];
    if (f->tag == F_SECRET) secret = f;
    else if (f->tag == F_ENTROPY) entropy = f;
    else if (f->tag == F_TIME_NS) time_ns = f;
    else if (f->tag == F_HOSTNAME) host = f;
    else if (f->tag == F_RUN) run = f;
    else if (f->tag == F_FILE && file_parts(f, path, sizeof path, &mode, &fdata, &flen) < 0) {
      send_error(id, E_BAD_REQUEST, 0, "FILE must be mode, path length, an absolute path and the content");
      return;
    }
  }
  if (secret && secret->len != 32) { send_error(id, E_BAD_REQUEST, 0, "SECRET must be 32 bytes"); return; }
  if (entropy && (entropy->len < 16 || entropy->len > 512)) {
    send_error(id, E_BAD_REQUEST, 0, "ENTROPY must be 16 to 512 bytes");
    return;
  }
  if (time_ns && time_ns->len != 8) { send_error(id, E_BAD_REQUEST, 0, "TIME_NS must be 8 bytes"); return; }
  if (host && (host->len == 0 || host->len > 63 || memchr(host->v, 0, host->len))) {
    send_error(id, E_BAD_REQUEST, 0, "HOSTNAME must be 1 to 63 bytes");
    return;
  }
  for (int i = 0; i < n; i++) {
    if (FIELDS[i].tag == F_FILE && write_file(&FIELDS[i]) < 0) {
      send_error(id, errno_code(errno), errno, "cannot write a file of the new identity");
      return;
    }
  }
  if (entropy && add_entropy(entropy->v, entropy->len) < 0) {
    send_error(id, E_IO, errno, "cannot reseed the kernel RNG");
    return;
  }
  if (time_ns) {
    uint64_t ns = get64(time_ns->v);
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u)};
    if (clock_settime(CLOCK_REALTIME, &ts) < 0) { send_error(id, E_IO, errno, "cannot set the clock"); return; }
  }
  if (host && sethostname((const char *)host->v, host->len) < 0) {
    send_error(id, E_IO, errno, "cannot set the hostname");
    return;
  }
  if (secret) set_secret(secret->v);
  if (run && run_detached(run) < 0) { send_error(id, E_SPAWN_FAILED, errno, "cannot start the identity command"); return; }
  send_frame(T_OK, 0, id, NULL, 0);
}
