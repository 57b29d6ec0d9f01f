/**
 * Build progress as `onProgress` events: the step, its index and the elapsed time. The library
 * never draws; the CLI turns these into a line on a TTY (cli/progress-line.ts).
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

  constructor(
    private readonly image: string,
    private readonly total: number,
    private readonly onProgress?: (p: ImageBuildProgress) => void,
  ) {}

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
  }
}
