/** A queue that runs async critical sections one at a time, in call order. */

/** Serialises async sections: each `run` starts after every earlier one settled. */
export class Lock {
  #tail: Promise<unknown> = Promise.resolve();

  /** Runs `fn` after every earlier section; its result or error is the caller's. */
  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(fn);
    this.#tail = result.catch(() => {});
    return result;
  }
}
