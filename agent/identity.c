/*
 * IDENTITY: what a VM restored from a snapshot must change before its first user command, since
 * every clone wakes up with the same memory: the agent secret (the next session must prove the
 * new one), the kernel RNG (host entropy credited, then an immediate CRNG reseed, so no two
 * clones produce the same random bytes), the wall clock (it resumes from the moment of the
 * save) and the hostname. Each field is optional; all are applied or the request fails.
 */
#include <errno.h>
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

static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

void start_identity(uint32_t id, const uint8_t *p, uint32_t len) {
  int n = 0;
  if (parse_fields(p, len, &n) < 0) { send_error(id, E_BAD_REQUEST, 0, "malformed IDENTITY fields"); return; }
  const field_t *secret = NULL, *entropy = NULL, *time_ns = NULL, *host = NULL;
  for (int i = 0; i < n; i++) {
    const field_t *f = &FIELDS[i];
    if (f->tag == F_SECRET) secret = f;
    else if (f->tag == F_ENTROPY) entropy = f;
    else if (f->tag == F_TIME_NS) time_ns = f;
    else if (f->tag == F_HOSTNAME) host = f;
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
  send_frame(T_OK, 0, id, NULL, 0);
}
