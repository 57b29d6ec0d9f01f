/*
 * The session and its authentication (agent/PROTOCOL.md "Handshake"): HELLO / CHALLENGE /
 * AUTH / AUTH_OK with HMAC-SHA256 over both nonces, the agent secret (read at start, replaced by
 * IDENTITY), session failures and the host going away, and the --self-test of the hash code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sha256.h"

#include "agent.h"

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

/* ------------------------------------------------------------------ session */

void close_conn(void) {
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
void host_gone(void) {
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
void session_fail(uint16_t code, const char *msg) {
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

size_t info_fields(uint8_t *p, int full) {
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

void on_hello(const uint8_t *p, uint32_t len) {
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

void on_auth(const uint8_t *p, uint32_t len) {
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

/* The secret the next HELLO must prove: a restored clone is re-keyed over its current session. */
void set_secret(const uint8_t secret[32]) { memcpy(G.secret, secret, 32); }

void read_secret(const char *path, int unlink_after) {
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

int self_test(void) {
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
