/*
 * Runs inside the guest for `npm run bench:channels`: what starting processes costs there,
 * independent of any channel. Usage: spawn-cost N MODE [argv...]
 *   MODE fork | vfork: create a child that runs argv (or exits at once), wait for it, N times.
 * Prints the mean milliseconds per child (CLOCK_MONOTONIC).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  int n = atoi(argv[1]), use_vfork = strcmp(argv[2], "vfork") == 0;
  char **cmd = argv + 3;
  double t0 = now_ms();
  for (int i = 0; i < n; i++) {
    pid_t p = use_vfork ? vfork() : fork();
    if (p < 0) return 1;
    if (p == 0) {
      if (cmd[0]) execv(cmd[0], cmd);
      _exit(cmd[0] ? 127 : 0);
    }
    int st;
    if (waitpid(p, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) return 1;
  }
  printf("%.3f\n", (now_ms() - t0) / n);
  return 0;
}
