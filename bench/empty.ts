// The bench's start-up floor: an empty program that Deno starts exactly as it
// starts qimg (same flags, and from this project, so with the same deno.json,
// import map and lockfile).
