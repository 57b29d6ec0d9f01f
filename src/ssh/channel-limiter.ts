/**
 * How many session channels one connection keeps open at once. The limit starts high and adapts
 * to the server: a refusal (OpenSSH MaxSessions, dropbear under load) lowers it to what is open
 * now, and it probes upward again now and then. Callers over the limit wait in order, each
 * bounded by its own signal. Pure bookkeeping: no I/O.
 */

const INITIAL_CHANNEL_LIMIT = 64;
/** Opens at the limit without a refusal before the limit is raised by one. */
const PROBE_AFTER_OPENS = 32;

interface Waiter {
  grant: () => void;
  signal: AbortSignal;
  onAbort: () => void;
}

export class ChannelLimiter {
  private inFlight = 0;
  private limit = INITIAL_CHANNEL_LIMIT;
  /** A ceiling for servers known to break with overlapping sessions (see serverQuirks). */
  private maxLimit = Number.POSITIVE_INFINITY;
  private opensSinceRefusal = 0;
  private readonly waiters: Waiter[] = [];

  /** Slots held or waited for. */
  get count(): number {
    return this.inFlight;
  }

  /** Never allows more than `max` at once from now on. */
  cap(max: number): void {
    this.maxLimit = max;
    this.limit = Math.min(this.limit, max);
  }

  /** Takes a slot, waiting in line while all are taken; rejects with `signal.reason`. */
  async acquire(signal: AbortSignal): Promise<void> {
    if (this.inFlight >= this.limit) await this.waitSlot(signal);
    else this.inFlight++;
  }

  /** Gives a slot back (to the first waiter, while under the limit). */
  release(): void {
    this.inFlight--;
    while (this.inFlight < this.limit && this.waiters.length) {
      this.inFlight++;
      this.waiters.shift()!.grant();
    }
  }

  /** The server refused a channel: what is open now is what it allows. */
  refused(): void {
    this.limit = Math.max(1, this.inFlight);
    this.opensSinceRefusal = 0;
  }

  /** A channel opened: at the limit, probe upward now and then (the limit may have been transient). */
  opened(): void {
    if (
      this.inFlight >= this.limit &&
      this.limit < this.maxLimit &&
      ++this.opensSinceRefusal >= PROBE_AFTER_OPENS
    ) {
      this.limit++;
      this.opensSinceRefusal = 0;
    }
  }

  /** Lets every waiter go (the transport closed: each finds it dead and fails). */
  wakeAll(): void {
    for (const w of this.waiters.splice(0)) w.grant();
  }

  private waitSlot(signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      const w: Waiter = {
        signal,
        grant: () => {
          signal.removeEventListener("abort", w.onAbort);
          resolve();
        },
        onAbort: () => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(signal.reason);
        },
      };
      signal.addEventListener("abort", w.onAbort, { once: true });
      this.waiters.push(w);
    });
  }
}
