/**
 * The RAM of a VM restored from a snapshot is that snapshot's memory file mapped private
 * (copy-on-write) in its QEMU: the pages the guest has written since are anonymous pages of the
 * mapping, every other page is still the file's. A snapshot of such a VM is therefore a copy of
 * the file with those pages written over it, read out of QEMU's address space while its vCPUs are
 * stopped (/proc/<pid>/pagemap says which pages, /proc/<pid>/mem gives them): a few MB, where
 * QEMU's migration stream would carry all of the guest's RAM and every clone would load it into
 * memory of its own.
 */
import { readFileSync, realpathSync } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";

const PAGE = 4096;
/** pagemap entry, high 32 bits: page present, swapped, file-backed (or shared anonymous). */
const PRESENT = 1 << 31;
const SWAPPED = 1 << 30;
const FILE_PAGE = 1 << 29;
/** Pages copied per read of QEMU's memory. */
const CHUNK_PAGES = 256;
/** Pagemap entries read at a time (512 KiB of them, for 256 MiB of RAM). */
const PAGEMAP_WINDOW_PAGES = 65_536;

/** QEMU's private mapping of a memory file, opened for reading its written pages. */
export interface PrivateRam {
  /** Copies every page the guest wrote over `out` (a copy of the file), at the same offsets; resolves with the count. */
  writeDirtyPages(out: string): Promise<number>;
  close(): Promise<void>;
}

/** Where `pid` maps `file` whole, from offset 0; undefined when it does not. */
function mappingStart(pid: number, file: string, sizeBytes: number): number | undefined {
  const real = realpathSync(file);
  for (const line of readFileSync(`/proc/${pid}/maps`, "utf8").split("\n")) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \d+\s+(.*)$/.exec(line);
    if (!m || m[4] !== real || Number.parseInt(m[3]!, 16) !== 0) continue;
    const start = Number.parseInt(m[1]!, 16);
    if (Number.parseInt(m[2]!, 16) - start === sizeBytes) return start;
  }
  return undefined;
}

/**
 * Opens QEMU's private mapping of `file` (its RAM, `sizeBytes` long). Undefined when it cannot:
 * no such mapping, or no right to read another process's memory (ptrace rules); the caller then
 * has QEMU put the RAM in its migration stream.
 */
export async function openPrivateRam(
  pid: number,
  file: string,
  sizeBytes: number,
): Promise<PrivateRam | undefined> {
  let start: number | undefined;
  try {
    start = mappingStart(pid, file, sizeBytes);
  } catch {
    return undefined;
  }
  if (start === undefined) return undefined;
  const base = start;
  let pagemap: FileHandle | undefined;
  let mem: FileHandle | undefined;
  try {
    pagemap = await open(`/proc/${pid}/pagemap`, "r");
    mem = await open(`/proc/${pid}/mem`, "r");
  } catch {
    await pagemap?.close();
    return undefined;
  }
  const pm = pagemap;
  const mm = mem;
  return {
    async writeDirtyPages(out: string): Promise<number> {
      const pages = sizeBytes / PAGE;
      const entries = Buffer.alloc(Math.min(pages, PAGEMAP_WINDOW_PAGES) * 8);
      /** Whether page `i` of the window in `entries` was written (present and private, or swapped). */
      const written = (i: number) => {
        const hi = entries.readUInt32LE(i * 8 + 4);
        return ((hi & PRESENT) !== 0 && (hi & FILE_PAGE) === 0) || (hi & SWAPPED) !== 0;
      };
      const dst = await open(out, "r+");
      const buf = Buffer.alloc(CHUNK_PAGES * PAGE);
      let count = 0;
      try {
        // The pagemap a window at a time: its whole would be 2 MiB of host memory per GiB of RAM.
        for (let w = 0; w < pages; w += PAGEMAP_WINDOW_PAGES) {
          const wPages = Math.min(PAGEMAP_WINDOW_PAGES, pages - w);
          const want = wPages * 8;
          const { bytesRead } = await pm.read(entries, 0, want, (base / PAGE + w) * 8);
          if (bytesRead !== want) throw new Error(`short read of QEMU's pagemap (${bytesRead} bytes)`);
          for (let i = 0; i < wPages; ) {
            if (!written(i)) {
              i++;
              continue;
            }
            let n = 1;
            while (i + n < wPages && n < CHUNK_PAGES && written(i + n)) n++;
            const len = n * PAGE;
            const at = (w + i) * PAGE;
            const r = await mm.read(buf, 0, len, base + at);
            if (r.bytesRead !== len) throw new Error(`short read of QEMU's memory at page ${w + i}`);
            await dst.write(buf, 0, len, at);
            count += n;
            i += n;
          }
        }
      } finally {
        await dst.close();
      }
      return count;
    },
    async close() {
      await Promise.all([pm.close(), mm.close()]);
    },
  };
}
