/** Shared benchmark helpers: timing loops, percentiles, a text table, JSON results with environment. */
import { mkdirSync, writeFileSync } from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

export interface Stats {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  min: number;
  max: number;
  mean: number;
}

/** Nearest-rank percentile of an ascending array. */
export function percentile(sorted: number[], p: number): number {
  if (!sorted.length) return Number.NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export function stats(samples: number[]): Stats {
  const s = [...samples].sort((a, b) => a - b);
  const round = (x: number) => Math.round(x * 1000) / 1000;
  return {
    n: s.length,
    p50: round(percentile(s, 50)),
    p90: round(percentile(s, 90)),
    p99: round(percentile(s, 99)),
    min: round(s[0] ?? Number.NaN),
    max: round(s.at(-1) ?? Number.NaN),
    mean: round(s.reduce((a, b) => a + b, 0) / (s.length || 1)),
  };
}

/** Times `fn` `n` times after `warmup` untimed calls; returns milliseconds per call. */
export async function measure(fn: () => Promise<unknown>, n: number, warmup = 10): Promise<Stats> {
  for (let i = 0; i < warmup; i++) await fn();
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await fn();
    out.push(performance.now() - t);
  }
  return stats(out);
}

/**
 * Two or more arms measured side by side: alternating blocks of `block` calls, the leading arm
 * rotated each round, so load drift on the host falls on every arm alike. Each arm is called 10
 * times first. Returns ms per call, per arm.
 */
export async function measureInterleaved<K extends string>(
  fns: Record<K, () => Promise<unknown>>,
  n: number,
  block = 20,
): Promise<Record<K, Stats>> {
  const keys = Object.keys(fns) as K[];
  for (let i = 0; i < 10; i++) for (const k of keys) await fns[k]();
  const out = Object.fromEntries(keys.map((k) => [k, [] as number[]])) as Record<K, number[]>;
  for (let round = 0; out[keys[0]!].length < n; round++) {
    const order = keys.map((_, i) => keys[(i + round) % keys.length]!);
    for (const k of order) {
      const m = Math.min(block, n - out[k].length);
      for (let i = 0; i < m; i++) {
        const t = performance.now();
        await fns[k]();
        out[k].push(performance.now() - t);
      }
    }
  }
  return Object.fromEntries(keys.map((k) => [k, stats(out[k])])) as Record<K, Stats>;
}

export function printTable(rows: Record<string, string | number>[]): void {
  if (!rows.length) return;
  const cols = Object.keys(rows[0]!);
  const text = rows.map((r) => cols.map((c) => String(r[c] ?? "")));
  const width = cols.map((c, i) => Math.max(c.length, ...text.map((t) => t[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(width[i]!)).join("  ");
  console.log(line(cols));
  console.log(line(width.map((w) => "-".repeat(w))));
  for (const t of text) console.log(line(t));
}

export function environment(): Record<string, unknown> {
  return {
    node: process.version,
    platform: `${os.platform()} ${os.release()}`,
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    loadavg: os.loadavg(),
    date: new Date().toISOString(),
  };
}

/** Writes bench/results/<name>.json with the environment attached; returns the path. */
export function writeResults(name: string, data: Record<string, unknown>): string {
  const dir = path.join(import.meta.dirname, "..", "results");
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.json`);
  writeFileSync(file, `${JSON.stringify({ environment: environment(), ...data }, null, 2)}\n`);
  return file;
}
