/**
 * Whether a process with this pid exists. EPERM means it exists but belongs to another user;
 * a lock or temp dir named after it is then still held, never stale.
 */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}
