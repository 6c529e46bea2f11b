/** Assertions for tests, on node:assert/strict (JSR's @std/assert is not reachable here). */

import assert from "node:assert/strict";

/** Deep equality with a message. */
export function assertEquals<T>(actual: T, expected: T, message?: string): void {
  assert.deepStrictEqual(actual, expected, message);
}

/** Truthiness with a message. */
export function assertTrue(value: unknown, message?: string): void {
  assert.ok(value, message);
}

/** Asserts that `fn` rejects, optionally with a message matching `pattern`. */
export async function assertRejects(fn: () => Promise<unknown>, pattern?: RegExp): Promise<void> {
  await (pattern ? assert.rejects(fn, pattern) : assert.rejects(fn));
}

export { assert };
