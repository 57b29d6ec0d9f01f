/**
 * The CLI's progress line: draws the SDK's `onProgress` events (image build steps, accelerator
 * notices) as one updating line on a TTY, with the elapsed time ticking during long steps. Quiet
 * when the stream is not a TTY. The SDK itself never writes to a terminal; this is where its
 * progress becomes visible.
 */

import type { SmolVMProgress } from "../vm/smolvm.js";

export interface ProgressLine {
  /** Pass as `onProgress`. */
  readonly onProgress: (p: SmolVMProgress) => void;
  /** Stops the ticking and ends the line (idempotent). */
  close(): void;
}

export function progressLine(stream: NodeJS.WriteStream = process.stderr): ProgressLine {
  const tty = Boolean(stream.isTTY);
  let last: SmolVMProgress | undefined;
  let since = 0;
  let drawn = false;
  let timer: NodeJS.Timeout | undefined;

  const draw = (): void => {
    if (!tty || !last) return;
    const s = ((last.elapsedMs + performance.now() - since) / 1000).toFixed(1);
    const text =
      last.kind === "image"
        ? `smolvm image ${last.image}: [${last.index}/${last.total}] ${last.step} (${s}s)`
        : `smolvm: ${last.step}`;
    stream.write(`\r\x1b[2K${text}`);
    drawn = true;
  };
  const endLine = (): void => {
    if (timer) clearInterval(timer);
    timer = undefined;
    if (drawn) stream.write("\n");
    drawn = false;
  };

  return {
    onProgress(p) {
      last = p;
      since = performance.now();
      draw();
      if (p.done) {
        endLine();
      } else if (tty && !timer) {
        timer = setInterval(draw, 250);
        timer.unref();
      }
    },
    close: endLine,
  };
}
