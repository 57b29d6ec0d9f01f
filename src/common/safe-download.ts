/**
 * Downloads land safely whatever the guest sends, on every channel: bytes go to a new temp file
 * beside the destination (created exclusively, mode 0600, so nothing can be pre-planted there),
 * then the temp file is renamed over the destination. A symlink at the destination is replaced,
 * never written through; a failed or cancelled transfer removes its partial file and leaves any
 * old destination untouched; `maxBytes` stops a guest that sends more than the caller will take.
 */
import { randomBytes } from "node:crypto";
import { type FileHandle, open, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { SmolVMError, ValidationError } from "../errors.js";

export function validateMaxBytes(maxBytes: number | undefined): void {
  if (maxBytes === undefined) return;
  if (!(Number.isSafeInteger(maxBytes) && maxBytes >= 0)) {
    throw new ValidationError(`maxBytes must be a non-negative integer, got ${String(maxBytes)}.`);
  }
}

export function fileTooLargeError(what: string, maxBytes: number): SmolVMError {
  return new SmolVMError(
    `${what} is larger than maxBytes (${maxBytes} bytes): the partial file was removed; raise maxBytes if the file is expected to be that big.`,
    { code: "FILE_TOO_LARGE", details: { maxBytes } },
  );
}

/**
 * Runs `transfer`, which hands every received chunk to `write` in order, and publishes the
 * result at `dest` atomically. Resolves with the byte count.
 */
export async function downloadTo(
  dest: string,
  what: string,
  maxBytes: number | undefined,
  transfer: (write: (chunk: Buffer) => Promise<void>) => Promise<void>,
): Promise<number> {
  validateMaxBytes(maxBytes);
  const tmp = join(dirname(dest), `.${basename(dest)}.smolvm-${randomBytes(6).toString("hex")}.part`);
  let fh: FileHandle | undefined;
  let written = 0;
  let published = false;
  try {
    fh = await open(tmp, "wx", 0o600);
    const file = fh;
    await transfer(async (chunk) => {
      if (maxBytes !== undefined && written + chunk.length > maxBytes)
        throw fileTooLargeError(what, maxBytes);
      await file.write(chunk, 0, chunk.length, null);
      written += chunk.length;
    });
    await file.sync();
    await file.close();
    fh = undefined;
    await rename(tmp, dest);
    published = true;
    return written;
  } finally {
    await fh?.close().catch(() => {});
    if (!published) await rm(tmp, { force: true }).catch(() => {});
  }
}
