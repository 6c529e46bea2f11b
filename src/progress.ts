/**
 * Progress reporting as qemu-img prints it with `-p`: `    (xx.xx/100%)`
 * followed by a carriage return, rewritten as the job advances, and a
 * newline at the end. The percentage is kept in single precision and
 * printed with C's `%3.2f`, so the figures match qemu-img's digit for digit.
 */

/** Where progress lines go (stdout in qemu-img). */
export type ProgressSink = (text: string) => void;

/** Formats a value as C's `%3.2f` (round half to even on exact ties, as glibc). */
export function formatPercent(value: number): string {
  const scaled = value * 100; // exact: value is a float32, 100 needs 7 bits
  let cents = Math.round(scaled);
  if (scaled - Math.floor(scaled) === 0.5) {
    const down = Math.floor(scaled);
    cents = down % 2 === 0 ? down : down + 1;
  }
  const neg = cents < 0;
  const abs = Math.abs(cents);
  const text = `${Math.floor(abs / 100)}.${String(abs % 100).padStart(2, "0")}`;
  return (neg ? "-" : "") + text.padStart(3, " ");
}

/** What a meter needs to print on SIGUSR1 (a command's Io has both). */
export interface ProgressSignals {
  /** Calls `handler` on each SIGUSR1 until the returned function is called. */
  onProgressSignal?(handler: () => void): () => void;
  /** Where a disabled meter prints on the signal. */
  stderr(text: string): void;
}

/**
 * A progress meter. Disabled meters print nothing, except after SIGUSR1
 * (see {@link Progress.listen}).
 */
export class Progress {
  #enabled: boolean;
  #minSkip: number;
  #current = 0;
  #lastPrint = 0;
  #sink: ProgressSink;
  #signalled = false;
  #unlisten?: () => void;
  #stderr?: (text: string) => void;

  /**
   * @param enabled whether to print at all (`-p` and not `-q`)
   * @param minSkip percentage points that must pass between two prints
   * @param sink where the text goes
   */
  constructor(enabled: boolean, minSkip: number, sink: ProgressSink) {
    this.#enabled = enabled;
    this.#minSkip = Math.fround(minSkip);
    this.#sink = sink;
  }

  /** The current percentage. */
  get current(): number {
    return this.#current;
  }

  /**
   * Reports progress: with `max` 0, `delta` is the absolute percentage;
   * otherwise `delta` percent of `max` percentage points are added.
   */
  print(delta: number, max: number): void {
    const d = Math.fround(delta);
    let current = max === 0
      ? d
      : Math.fround(this.#current + Math.fround(Math.fround(d / 100) * max));
    if (current > 100) current = 100;
    this.#current = current;
    if (
      current > Math.fround(this.#lastPrint + this.#minSkip) ||
      // A meter that goes back (amend adding a pass) prints too.
      current < Math.fround(this.#lastPrint - this.#minSkip) || current === 100 || current === 0
    ) {
      this.#lastPrint = current;
      if (this.#enabled) this.#sink(`    (${formatPercent(current)}/100%)\r`);
      else if (this.#signalled) {
        this.#signalled = false;
        this.#stderr?.(`    (${formatPercent(current)}/100%)\n`);
      }
    }
  }

  /**
   * Takes SIGUSR1 as qemu-img does: a disabled meter prints its next figure
   * to stderr on a line of its own; an enabled one (`-p`) ignores the
   * signal. {@link Progress.end} stops listening.
   */
  listen(io: ProgressSignals): void {
    this.#stderr = (text) => io.stderr(text);
    this.#unlisten = io.onProgressSignal?.(() => {
      if (!this.#enabled) this.#signalled = true;
    });
  }

  /** Ends the meter: a newline when enabled. */
  end(): void {
    this.#unlisten?.();
    this.#unlisten = undefined;
    if (this.#enabled) this.#sink("\n");
  }
}
