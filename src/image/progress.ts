/**
 * Build progress: an `onProgress` callback for SDK users, and on a TTY a single updating
 * stderr line with the step and elapsed time. Silent when stderr is not a TTY.
 */

export interface ImageBuildProgress {
  /** Tells these apart from other progress events (SmolVM.create's onProgress also reports the accelerator). */
  kind: "image";
  image: string;
  step: string;
  /** 1-based index of the step, and how many steps the build has. */
  index: number;
  total: number;
  elapsedMs: number;
  done: boolean;
}

export class ProgressReporter {
  private readonly started = performance.now();
  private index = 0;
  private step = "starting";
  private timer: NodeJS.Timeout | undefined;
  private readonly tty: boolean;

  constructor(
    private readonly image: string,
    private readonly total: number,
    private readonly onProgress?: (p: ImageBuildProgress) => void,
    stream: NodeJS.WriteStream = process.stderr,
    private readonly out = stream,
  ) {
    this.tty = Boolean(stream.isTTY);
    if (this.tty) {
      this.timer = setInterval(() => this.draw(), 250);
      this.timer.unref();
    }
  }

  begin(step: string): void {
    this.index = Math.min(this.index + 1, this.total);
    this.step = step;
    this.emit(false);
  }

  /** Updates the current step's label without advancing (e.g. debootstrap's package lines). */
  detail(step: string): void {
    this.step = step;
    this.emit(false);
  }

  finish(step = "done"): void {
    this.step = step;
    this.index = this.total;
    this.emit(true);
    this.stop();
    if (this.tty) this.out.write("\n");
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  private emit(done: boolean): void {
    this.onProgress?.({
      kind: "image",
      image: this.image,
      step: this.step,
      index: this.index,
      total: this.total,
      elapsedMs: Math.round(performance.now() - this.started),
      done,
    });
    this.draw();
  }

  private draw(): void {
    if (!this.tty) return;
    const s = ((performance.now() - this.started) / 1000).toFixed(1);
    this.out.write(`\r\x1b[2Ksmolvm image ${this.image}: [${this.index}/${this.total}] ${this.step} (${s}s)`);
  }
}
