/**
 * Drives tests/browser/index.html in headless Chromium over the DevTools
 * protocol (a WebSocket, no puppeteer): serves the page and the browser
 * bundle on 127.0.0.1, picks each image in the page's file input
 * (DOM.setFileInputFiles) and prints, as one JSON array on stdout, what the
 * page shows for it. tests/browser_test.ts runs it as its own process, with
 * --allow-net=127.0.0.1, which the test task does not grant.
 *
 * With `--serve` it only serves the page, for a person's browser
 * (`deno task page`).
 *
 * @example Usage
 * ```sh
 * deno run --allow-net=127.0.0.1 --allow-read --allow-write --allow-run --allow-env \
 *   tests/browser/chromium.ts --dist dist --others /tmp/base.qcow2 /tmp/a.qcow2 /tmp/b.vmdk
 * deno run --allow-net=127.0.0.1 --allow-read tests/browser/chromium.ts --serve --port 8080
 * ```
 * @module
 */

/** What the page shows for one image. */
export interface PageResult {
  /** The image's file name (the File's name). */
  name: string;
  /** "done: NAME" or "error: NAME" (or the last status seen, on a timeout). */
  status: string;
  /** The #info text: `info()` as JSON. */
  info: string;
  /** The #map text: qemu-img map's JSON. */
  map: string;
  /** The #sha256 text: the guest's bytes' SHA-256, hex. */
  sha256: string;
  /** The #error text. */
  error: string;
}

const ROOT = new URL("../../", import.meta.url).pathname;
const TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8",
  js: "text/javascript; charset=utf-8",
  mjs: "text/javascript; charset=utf-8",
};

/** Serves the project's tests/browser/ and the bundle in `dist` as /dist/, on 127.0.0.1 only. */
function serve(dist: string, port = 0): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ hostname: "127.0.0.1", port, onListen() {} }, async (req) => {
    const path = decodeURIComponent(new URL(req.url).pathname);
    let file: string | undefined;
    if (/^\/tests\/browser\/[\w.]+$/.test(path)) file = ROOT + path.slice(1);
    else if (/^\/dist\/[\w.]+\.mjs$/.test(path)) file = `${dist}/${path.slice(6)}`;
    const type = TYPES[path.slice(path.lastIndexOf(".") + 1)];
    if (!file || !type) return new Response("not found", { status: 404 });
    try {
      return new Response(await Deno.readFile(file), { headers: { "content-type": type } });
    } catch {
      return new Response("not found", { status: 404 });
    }
  });
}

/** A DevTools protocol connection: commands with replies, events by name. */
class Cdp {
  #ws: WebSocket;
  #next = 1;
  #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  /** Page exceptions and console errors, for the report of a page that never finishes. */
  readonly log: string[] = [];

  private constructor(ws: WebSocket) {
    this.#ws = ws;
    ws.onmessage = (ev) => {
      const msg = JSON.parse(String(ev.data));
      if (msg.id !== undefined) {
        const p = this.#pending.get(msg.id);
        this.#pending.delete(msg.id);
        if (msg.error) p?.reject(new Error(`${msg.error.message} (${msg.error.code})`));
        else p?.resolve(msg.result);
      } else if (msg.method === "Runtime.exceptionThrown") {
        const d = msg.params.exceptionDetails;
        this.log.push(`exception: ${d.exception?.description ?? d.text}`);
      } else if (msg.method === "Runtime.consoleAPICalled" && msg.params.type === "error") {
        this.log.push(
          `console.error: ${
            JSON.stringify(msg.params.args.map((a: { value?: unknown; description?: string }) =>
              a.value ?? a.description
            ))
          }`,
        );
      }
    };
    ws.onclose = () => {
      for (const p of this.#pending.values()) p.reject(new Error("DevTools connection closed"));
      this.#pending.clear();
    };
  }

  static connect(url: string): Promise<Cdp> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.onopen = () => resolve(new Cdp(ws));
      ws.onerror = () => reject(new Error(`cannot connect to ${url}`));
    });
  }

  send<T>(method: string, params: Record<string, unknown> = {}, sessionId?: string): Promise<T> {
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.#ws.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
    });
  }

  close(): void {
    this.#ws.close();
  }
}

/** Reads Chromium's stderr until it names its DevTools endpoint; drains the rest. */
async function devtoolsUrl(stderr: ReadableStream<Uint8Array>): Promise<string> {
  const reader = stderr.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`chromium exited before DevTools listened:\n${text}`);
    text += value;
    const m = /DevTools listening on (ws:\/\/\S+)/.exec(text);
    if (m) {
      (async () => {
        while (!(await reader.read()).done);
      })().catch(() => {});
      return m[1];
    }
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `promise`, or undefined after `ms`; the timer goes with it (a pending timer keeps Deno running). */
async function within<T>(promise: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<undefined>((r) => timer = setTimeout(() => r(undefined), ms)),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Evaluates `expression` in the page and returns its value. */
async function evaluate<T>(cdp: Cdp, session: string, expression: string): Promise<T> {
  const r = await cdp.send<{ result: { value: T } }>(
    "Runtime.evaluate",
    { expression, returnByValue: true },
    session,
  );
  return r.result.value;
}

/** Polls the page's #status until `done` accepts it or `ms` pass; returns the last status. */
async function waitStatus(
  cdp: Cdp,
  session: string,
  done: (s: string) => boolean,
  ms: number,
): Promise<string> {
  const until = Date.now() + ms;
  let status = "";
  while (Date.now() < until) {
    status = await evaluate<string>(
      cdp,
      session,
      `document.getElementById("status")?.textContent ?? ""`,
    );
    if (done(status)) return status;
    await sleep(50);
  }
  return status;
}

/** Sets the files of the page's `<input>` `selector` (absolute paths). */
async function pick(cdp: Cdp, session: string, selector: string, files: string[]): Promise<void> {
  const { root } = await cdp.send<{ root: { nodeId: number } }>(
    "DOM.getDocument",
    { depth: 0 },
    session,
  );
  const { nodeId } = await cdp.send<{ nodeId: number }>(
    "DOM.querySelector",
    { nodeId: root.nodeId, selector },
    session,
  );
  await cdp.send("DOM.setFileInputFiles", { files, nodeId }, session);
}

/** Options of {@linkcode showImages}. */
export interface ShowOptions {
  /** The chromium binary. */
  chromium: string;
  /** The directory holding qimg_browser.mjs. */
  dist: string;
  /** Files for the page's second input (backing files), absolute. */
  others?: string[];
  /** Per-image time limit in ms (default 60 s). */
  timeout?: number;
}

/** Opens the page in headless Chromium and returns what it shows for each image (absolute paths). */
export async function showImages(images: string[], options: ShowOptions): Promise<PageResult[]> {
  const server = serve(options.dist);
  const profile = await Deno.makeTempDir({ prefix: "qimg-chromium-" });
  const child = new Deno.Command(options.chromium, {
    args: [
      "--headless=new",
      "--no-sandbox", // root in CI has no user namespace sandbox
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--no-first-run",
      "--no-default-browser-check",
      "--remote-debugging-address=127.0.0.1",
      "--remote-debugging-port=0",
      `--user-data-dir=${profile}`,
      "about:blank",
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let cdp: Cdp | undefined;
  try {
    // Generous limits: CI runs this beside the other test files on two cores.
    const url = await within(devtoolsUrl(child.stderr), 60_000);
    if (!url) throw new Error("chromium did not start within 60 s");
    cdp = await Cdp.connect(url);
    const { targetId } = await cdp.send<{ targetId: string }>("Target.createTarget", {
      url: "about:blank",
    });
    const { sessionId } = await cdp.send<{ sessionId: string }>("Target.attachToTarget", {
      targetId,
      flatten: true,
    });
    await cdp.send("Runtime.enable", {}, sessionId);
    await cdp.send("Page.navigate", {
      url: `http://127.0.0.1:${server.addr.port}/tests/browser/index.html`,
    }, sessionId);
    const ready = await waitStatus(cdp, sessionId, (s) => s.startsWith("ready"), 60_000);
    if (!ready.startsWith("ready")) {
      throw new Error(`the page did not load (status "${ready}"):\n${cdp.log.join("\n")}`);
    }
    if (options.others?.length) await pick(cdp, sessionId, "#others", options.others);
    const results: PageResult[] = [];
    for (const image of images) {
      const name = image.slice(image.lastIndexOf("/") + 1);
      await pick(cdp, sessionId, "#file", [image]);
      const status = await waitStatus(
        cdp,
        sessionId,
        (s) => s === `done: ${name}` || s === `error: ${name}`,
        options.timeout ?? 60_000,
      );
      const shown = await evaluate<{ info: string; map: string; sha256: string; error: string }>(
        cdp,
        sessionId,
        `({ info: document.getElementById("info").textContent,
            map: document.getElementById("map").textContent,
            sha256: document.getElementById("sha256").textContent,
            error: document.getElementById("error").textContent })`,
      );
      if (!status.endsWith(`: ${name}`)) shown.error += `\n(timed out)\n${cdp.log.join("\n")}`;
      results.push({ name, status, ...shown });
    }
    await cdp.send("Browser.close").catch(() => {});
    return results;
  } finally {
    cdp?.close();
    if (!await within(child.status, 3000)) {
      try {
        child.kill("SIGKILL");
      } catch { /* already gone */ }
      await child.status;
    }
    await server.shutdown();
    await Deno.remove(profile, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) {
  const args = [...Deno.args];
  const take = (flag: string): string | undefined => {
    const i = args.indexOf(flag);
    return i < 0 ? undefined : args.splice(i, 2)[1];
  };
  const dist = take("--dist") ?? `${ROOT}dist`;
  const chromium = take("--chromium") ?? "chromium";
  const others = take("--others")?.split(",").filter((s) => s) ?? [];
  if (args.includes("--serve")) {
    const server = serve(dist, Number(take("--port") ?? 8080));
    console.log(`open http://127.0.0.1:${server.addr.port}/tests/browser/index.html`);
    await server.finished;
    Deno.exit(0);
  }
  const results = await showImages(args, { chromium, dist, others });
  console.log(JSON.stringify(results));
}
