/*
 * Shared internals of smolvm-agent: the wire constants of agent/PROTOCOL.md (checked equal to
 * src/channel/agent-protocol.ts by test/unit/agent-constants.test.ts), the stream table entry,
 * the agent's state, and what each source file offers the others: agent.c (state, streams,
 * transport, main), frames.c, auth.c, dispatch.c, exec.c, files.c, wait.c, fsops.c, procs.c,
 * identity.c.
 */
#ifndef SMOLVM_AGENT_H
#define SMOLVM_AGENT_H
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <poll.h>
#include <signal.h>
#include <sys/types.h>

#define AGENT_VERSION "0.1.0"
#define PROTO_VERSION 1
#define MAGIC 0x534d4147u
#define HDR 16
#define MAX_PAYLOAD 65536
#define WINDOW 262144u
#define MAX_STREAMS 512
#define MAX_PROCS 64
#define RING_CAP (1u << 20)
#define OUT_SOFT (1u << 20)
#define OUT_CAP (OUT_SOFT + (256u << 10))
#define IN_CAP (2 * (HDR + MAX_PAYLOAD))
/* Consumed bytes are credited back once a quarter of the window piled up: a command with a
 * small stdin costs no CREDIT frame (each one is an interrupt on the host side of emulation). */
#define CREDIT_AT (WINDOW / 4)
#define CREDIT_DUE(s) ((s)->credit_pending >= CREDIT_AT)
#define EXIT_GRACE_MS 200
#define HUP_BACKOFF_MS 100
#define WAIT_RETRY_MS 50
#define MILESTONES_MAX 16384
#define CAPS "exec,pty,put,get,env,wait_port,info,shell,fs,watch,proc,identity"

enum {
  T_HELLO = 0x01, T_CHALLENGE = 0x02, T_AUTH = 0x03, T_AUTH_OK = 0x04,
  T_EXEC = 0x10, T_PUT = 0x11, T_GET = 0x12, T_WAIT_PORT = 0x13, T_PING = 0x14, T_INFO = 0x15,
  T_STAT = 0x16, T_LIST = 0x17, T_FSOP = 0x18, T_WATCH = 0x19, T_SPAWN = 0x1a, T_ATTACH = 0x1b, T_PROCS = 0x1c,
  T_PINPUT = 0x1d, T_PSIGNAL = 0x1e, T_IDENTITY = 0x1f,
  T_DATA = 0x20, T_EOF = 0x21, T_CREDIT = 0x22, T_SIGNAL = 0x23, T_RESIZE = 0x24, T_CANCEL = 0x25,
  T_EXIT = 0x30, T_OK = 0x31, T_ERROR = 0x32,
};
enum {
  F_ARG = 1, F_ENV = 2, F_CWD = 3, F_PTY = 4, F_TIMEOUT = 5, F_SHELL = 6, F_PATH = 10, F_MODE = 11, F_MKDIRS = 12,
  F_ENVFILE = 13, F_PORT = 20, F_VERSION = 30, F_CAPS = 31, F_UPTIME = 32, F_MILESTONES = 33, F_PID = 34,
  F_STDIN = 7, F_TO = 14, F_RECURSIVE = 15, F_DEPTH = 16, F_OP = 17, F_REPLAY = 18, F_BYTES = 19,
  F_FTYPE = 40, F_SIZE = 41, F_MTIME = 42, F_TARGET = 43, F_RUNNING = 44, F_EXITCODE = 45, F_SIGNAME = 46,
  F_STARTED = 47, F_COMMAND = 48,
  F_SECRET = 50, F_ENTROPY = 51, F_TIME_NS = 52, F_HOSTNAME = 53, F_FILE = 54, F_RUN = 55,
};
enum {
  E_PROTOCOL = 1, E_AUTH_FAILED, E_BAD_REQUEST, E_INVALID_PATH, E_NOT_FOUND, E_IO, E_SPAWN_FAILED,
  E_TIMEOUT, E_LIMIT, E_CANCELLED, E_UNSUPPORTED, E_NOT_READY,
};
enum { K_FREE = 0, K_EXEC, K_PUT, K_GET, K_WAIT, K_MEM, K_WATCH, K_ATTACH };
enum { S_OFF, S_WAIT_HELLO, S_WAIT_AUTH, S_READY, S_CLOSING };
#define CLOSE_LINGER_MS 1000
enum { TR_FD, TR_UNIX, TR_VSOCK, TR_SERIAL };

typedef struct {
  int kind;
  uint32_t id;
  uint32_t send_credit; /* bytes we may still send to the host */
  uint32_t recv_window; /* bytes the host may still send us */
  uint32_t credit_pending;
  int done; /* terminal frame queued in term[] or sent */
  uint8_t term_type;
  uint16_t term_len;
  uint8_t term[8 + 1030];
  /* exec */
  pid_t pid;
  int reaped, status, pty, timed_out, cancelled;
  int fd_in, fd_out, fd_err;
  int in_eof, in_dead;
  uint8_t *inbuf;
  size_t in_len;
  int64_t deadline, reaped_at;
  /* put/get */
  int fd_file;
  char *tmp_path, *final_path;
  uint32_t mode;
  uint64_t bytes;
  /* wait_port */
  int sock;
  uint16_t port;
  int64_t next_try, started;
  /* list: a prepared reply sent as DATA within credit (K_MEM) */
  uint8_t *mem;
  size_t mem_len, mem_off;
  /* watch (K_WATCH): inotify state owned by fsops.c */
  void *watch;
  /* attach (K_ATTACH): the process table slot and how far each output ring was sent */
  int proc;
  uint64_t cursor[2];
} stream_t;

typedef struct {
  uint8_t tag;
  const uint8_t *v;
  uint32_t len;
} field_t;

#define MAX_FIELDS 4200
extern field_t FIELDS[MAX_FIELDS];

typedef struct {
  int transport;
  const char *path;
  unsigned vsock_port;
  int listen_fd, conn_fd;
  int state;
  int64_t hup_until;
  int64_t close_at; /* S_CLOSING: when to give up on the host reading our last frames */
  int shut;
  int hup_logged;
  uint8_t secret[32];
  uint8_t host_nonce[32], agent_nonce[32];
  uint8_t in[IN_CAP];
  size_t in_len;
  uint8_t *out;
  size_t out_off, out_len;
  stream_t streams[MAX_STREAMS];
  int nstreams;
  int hi; /* one past the highest stream slot in use: the loops scan only that far */
  int sigpipe[2];
  const char *env_file, *milestones_file;
  char start_uptime[32];
  int verbose;
  volatile sig_atomic_t stop;
} agent_state_t;

/* The agent's one state: transport, session, buffers and the stream table (agent.c). */
extern agent_state_t G;

/* agent.c: state, logging, the stream table, transport and main */
void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
int64_t now_ms(void);
int set_nonblock(int fd);
stream_t *find_stream(uint32_t id);
stream_t *new_stream(uint32_t id, int kind);
void free_stream(stream_t *s);
void drop_all_streams(void);
void close_fd(int *fd);
void set_terminal(stream_t *s, uint8_t type, const void *payload, size_t len);
void set_error(stream_t *s, uint16_t code, int err, const char *fmt, ...);

/* frames.c: integers, the output buffer, request fields */
void put16(uint8_t *p, uint16_t v);
void put32(uint8_t *p, uint32_t v);
uint16_t get16(const uint8_t *p);
uint32_t get32(const uint8_t *p);
void put64(uint8_t *p, uint64_t v);
size_t out_used(void);
uint8_t *out_reserve(size_t len);
void out_commit(uint8_t *p, uint8_t type, uint16_t flags, uint32_t stream, size_t len);
int send_frame(uint8_t type, uint16_t flags, uint32_t stream, const void *payload, size_t len);
/* An ERROR payload (code, errno, message of at most 1023 bytes); returns its length. */
#define ERROR_PAYLOAD_MAX (6 + 1024)
size_t error_payload(uint8_t buf[ERROR_PAYLOAD_MAX], uint16_t code, int err, const char *fmt, va_list ap);
void send_error(uint32_t stream, uint16_t code, int err, const char *fmt, ...);
size_t put_field(uint8_t *p, uint8_t tag, const void *v, size_t len);
int parse_fields(const uint8_t *p, uint32_t len, int *count);
char *field_str(const field_t *f);
const char *path_problem(const field_t *f);

/* auth.c: the session and its handshake */
void close_conn(void);
void host_gone(void);
void session_fail(uint16_t code, const char *msg);
size_t info_fields(uint8_t *p, int full);
void on_hello(const uint8_t *p, uint32_t len);
void on_auth(const uint8_t *p, uint32_t len);
void set_secret(const uint8_t secret[32]);
void read_secret(const char *path, int unlink_after);
int self_test(void);
/* `--inetd PORT PROG [ARG...]` (inetd.c): a listener that runs PROG per connection. */
int inetd_main(int argc, char **argv);

/* dispatch.c: frames in, frames out */
void process_input(void);
void pump(int64_t now);

/* exec.c: EXEC, signals by name, reaping */
void signal_name(int sig, char *out, size_t n);
int signal_number(const uint8_t *name, size_t len);
size_t encode_exit(int status, int timed_out, int cancelled, uint8_t *buf);
void start_exec(uint32_t id, const uint8_t *p, uint32_t len);
void exec_stdin_flush(stream_t *s);
void exec_data(stream_t *s, const uint8_t *p, uint32_t len);
void exec_pump_fd(stream_t *s, int *fd, uint16_t which);
void exec_maybe_finish(stream_t *s, int64_t now);
void reap_children(void);

/* files.c: PUT and GET */
int mkdirs_for(char *path);
uint16_t errno_code(int e);
void start_put(uint32_t id, const uint8_t *p, uint32_t len);
void put_data(stream_t *s, const uint8_t *p, uint32_t len);
void put_finish(stream_t *s);
void start_get(uint32_t id, const uint8_t *p, uint32_t len);
void get_pump(stream_t *s);

/* wait.c: WAIT_PORT */
void start_wait(uint32_t id, const uint8_t *p, uint32_t len);
void wait_try(stream_t *s, int64_t now);
void wait_check(stream_t *s, int64_t now);

/* identity.c: IDENTITY (a VM restored from a snapshot becomes itself) */
void start_identity(uint32_t id, const uint8_t *p, uint32_t len);

/* fsops.c: STAT, LIST, FSOP, WATCH */
void start_stat(uint32_t id, const uint8_t *p, uint32_t len);
void start_list(uint32_t id, const uint8_t *p, uint32_t len);
void start_fsop(uint32_t id, const uint8_t *p, uint32_t len);
void start_watch(uint32_t id, const uint8_t *p, uint32_t len);
void mem_pump(stream_t *s);
void watch_pump(stream_t *s);
void watch_free(stream_t *s);
int watch_fd(stream_t *s);
int64_t watch_wake(stream_t *s);

/* procs.c: SPAWN, ATTACH, PROCS, PINPUT, PSIGNAL and the process table */
void start_spawn(uint32_t id, const uint8_t *p, uint32_t len);
void start_attach(uint32_t id, const uint8_t *p, uint32_t len);
void procs_list(uint32_t id);
void procs_input(uint32_t id, const uint8_t *p, uint32_t len);
void procs_signal(uint32_t id, const uint8_t *p, uint32_t len);
int procs_reaped(pid_t pid, int status);
void procs_poll_fds(struct pollfd *pfd, int *n, int64_t now, int *timeout);
int attach_ready(stream_t *s);
void procs_on_ready(int fd, short revents);
void procs_tick(int64_t now);
void attach_pump(stream_t *s);
void procs_kill_all(void);

#endif
