/**
 * Test helpers: a real deployd started from `DEPLOYD_BIN`, a deployment whose service is a small
 * Python (standard library) program, and a TCP proxy that cuts event streams.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";

/** The deployd binary the tests run; they fail (never skip) without it. */
export function deploydBin(): string {
  const bin = process.env["DEPLOYD_BIN"];
  if (bin === undefined || bin === "") {
    throw new Error(
      "DEPLOYD_BIN is not set: these tests run against a real deployd. Build it (cargo build -p deployd) " +
        "and run `DEPLOYD_BIN=$PWD/target/debug/deployd npm test`, or `bash sdk/typescript/run-tests.sh`.",
    );
  }
  if (!existsSync(bin)) {
    throw new Error(`DEPLOYD_BIN is ${bin}, which does not exist: build deployd first (cargo build -p deployd).`);
  }
  return bin;
}

export interface Deployd {
  /** `http://127.0.0.1:<port>` */
  url: string;
  port: number;
  /** The temporary folder of this server (data dir, deployment files). */
  dir: string;
  /** What the server printed so far (stdout and stderr), for failure messages. */
  output(): string;
  /** Stops the server (SIGTERM, then SIGKILL) and removes its folder. */
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();
// Whatever happens to the test process, no deployd outlives it.
process.on("exit", () => {
  for (const child of running) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
});

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout>;
  return Promise.race([
    promise,
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * Starts `deployd serve` on a free loopback port (`--listen 127.0.0.1:0`; the port is read from
 * its "listening on" line) with a fresh data directory, and waits until `/status/` answers.
 * `127.0.0.1` on any port is allowed as `Host`, so that a proxy on another port can be put in
 * front of it.
 */
export async function startDeployd(options: { env?: Record<string, string>; args?: string[] } = {}): Promise<Deployd> {
  const bin = deploydBin();
  const dir = await mkdtemp(path.join(tmpdir(), "deployd-ts-"));
  // Nothing of the caller's deployd settings leaks in: only what the test says.
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (value === undefined) continue;
    if (key.startsWith("DEPLOYD_") || key.startsWith("LLAMA_DEPLOY_") || key === "DEPLOYMENT_FILE_PATH") continue;
    env[key] = value;
  }
  env["NO_COLOR"] = "1";
  Object.assign(env, options.env);
  const args = [
    "serve",
    "--listen",
    "127.0.0.1:0",
    "--data-dir",
    path.join(dir, "data"),
    "--rc-path",
    path.join(dir, "rc"),
    "--allow-host",
    "127.0.0.1",
    "--drain-timeout",
    "2",
    ...(options.args ?? []),
  ];
  const child = spawn(bin, args, { cwd: dir, env, stdio: ["ignore", "pipe", "pipe"] });
  running.add(child);
  let output = "";
  const append = (chunk: Buffer) => {
    output += chunk.toString("utf8");
    if (output.length > 200_000) output = output.slice(-100_000);
  };
  child.stdout!.on("data", append);
  child.stderr!.on("data", append);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));

  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      try {
        await withTimeout(exited, 15_000, "deployd stopping");
      } catch {
        child.kill("SIGKILL");
        await withTimeout(exited, 5_000, "deployd killed").catch(() => undefined);
      }
    }
    running.delete(child);
    await rm(dir, { recursive: true, force: true }).catch(() => undefined);
  };

  try {
    const port = await withTimeout(
      new Promise<number>((resolve, reject) => {
        const look = () => {
          // ANSI colours are stripped in case the logger ignores NO_COLOR.
          const plain = output.replace(/\u001b\[[0-9;]*m/g, "");
          const match = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(plain);
          if (match !== null) {
            cleanup();
            resolve(Number(match[1]));
          }
        };
        const onExit = (code: number | null, signal: string | null) => {
          cleanup();
          reject(new Error(`deployd exited (code ${code}, signal ${signal}) before listening:\n${output}`));
        };
        const cleanup = () => {
          child.stdout!.off("data", look);
          child.stderr!.off("data", look);
          child.off("exit", onExit);
        };
        child.stdout!.on("data", look);
        child.stderr!.on("data", look);
        child.once("exit", onExit);
        look();
      }),
      30_000,
      "deployd starting",
    );
    const url = `http://127.0.0.1:${port}`;
    const deadline = Date.now() + 15_000;
    for (;;) {
      try {
        const response = await fetch(`${url}/status/`, { signal: AbortSignal.timeout(2_000) });
        await response.body?.cancel();
        if (response.ok) break;
      } catch {
        // not yet
      }
      if (Date.now() > deadline) throw new Error(`deployd at ${url} does not answer /status/:\n${output}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    return { url, port, dir, output: () => output, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * A service speaking deployd's service protocol (docs/service-protocol.md) with the Python
 * standard library: `POST /tasks` streams `count` events (`{"i": 1..count}`), `delay` seconds
 * apart, then the result `{"events": count, "message": message}` (or, with `fail`, the error
 * `fail`).
 */
export const TICKER_PY = String.raw`
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("ticker: " + (fmt % args) + "\n")

    def do_GET(self):
        if self.path != "/healthz":
            self.send_error(404)
            return
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if self.path != "/tasks":
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length", "0"))
        task = json.loads(self.rfile.read(length) or b"{}")
        args = task.get("input") or {}
        count = int(args.get("count", 20))
        delay = float(args.get("delay", 0.05))
        message = args.get("message", "")
        fail = args.get("fail")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(1, count + 1):
            self.line({"type": "event", "data": {"i": i, "of": count, "message": message}})
            time.sleep(delay)
        if fail:
            self.line({"type": "error", "message": str(fail)})
        else:
            self.line({"type": "result", "data": {"events": count, "message": message}})
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def line(self, obj):
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


ThreadingHTTPServer.request_queue_size = 128
server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
server.daemon_threads = True
print("ticker: listening on 127.0.0.1:%s" % os.environ["PORT"], flush=True)
server.serve_forever()
`;

/** Writes a deployment `name` with the one service `ticker` under `dir`; answers its folder
 * (the `base_path`) and its file's text. */
export async function writeTickerDeployment(dir: string, name: string): Promise<{ basePath: string; yaml: string }> {
  const basePath = path.join(dir, `deployment-${name}`);
  await mkdir(path.join(basePath, "src"), { recursive: true });
  await writeFile(path.join(basePath, "src", "ticker.py"), TICKER_PY);
  const yaml = [
    `name: ${name}`,
    "default-service: ticker",
    "services:",
    "  ticker:",
    "    name: Ticker",
    "    source:",
    "      type: local",
    "      location: src",
    "    command: python3 ticker.py",
    "",
  ].join("\n");
  await writeFile(path.join(basePath, "deployment.yaml"), yaml);
  return { basePath, yaml };
}

export interface ProxyConnection {
  /** The request's head, as the client sent it. */
  requestHead: string;
  /** Whether the answer was a server-sent event stream. */
  sse: boolean;
  /** Whether the proxy cut this connection. */
  cut: boolean;
  /** Bytes of the answer's body forwarded to the client. */
  bodyBytes: number;
}

/**
 * A TCP proxy in front of `target` that cuts the first `cuts` server-sent event streams after
 * `cutAfter` bytes of their body (both sockets destroyed, usually in the middle of an event).
 * Only the first answer of each connection is looked at, which is the stream's when the proxy
 * carries nothing but event streams.
 */
export class CuttingProxy {
  readonly connections: ProxyConnection[] = [];
  #server: net.Server;
  #sockets = new Set<net.Socket>();
  #cutsLeft: number;
  port = 0;

  constructor(
    readonly targetPort: number,
    readonly cutAfter: number,
    cuts: number,
  ) {
    this.#cutsLeft = cuts;
    this.#server = net.createServer((client) => this.#handle(client));
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async listen(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.#server.once("error", reject);
      this.#server.listen(0, "127.0.0.1", () => resolve());
    });
    this.port = (this.#server.address() as net.AddressInfo).port;
  }

  async close(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  #handle(client: net.Socket): void {
    const upstream = net.connect(this.targetPort, "127.0.0.1");
    this.#sockets.add(client);
    this.#sockets.add(upstream);
    const record: ProxyConnection = { requestHead: "", sse: false, cut: false, bodyBytes: 0 };
    this.connections.push(record);
    const both = () => {
      client.destroy();
      upstream.destroy();
      this.#sockets.delete(client);
      this.#sockets.delete(upstream);
    };
    client.on("error", both);
    upstream.on("error", both);
    client.on("close", both);
    upstream.on("close", both);

    let requestSeen = "";
    client.on("data", (chunk: Buffer) => {
      if (!record.requestHead) {
        requestSeen += chunk.toString("latin1");
        const end = requestSeen.indexOf("\r\n\r\n");
        if (end !== -1) record.requestHead = requestSeen.slice(0, end);
      }
      upstream.write(chunk);
    });

    let head: Buffer | null = Buffer.alloc(0); // null once the answer's head has passed
    let cutting = false;
    upstream.on("data", (chunk: Buffer) => {
      if (head !== null) {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf("\r\n\r\n");
        if (end === -1) return;
        const headText = head.subarray(0, end).toString("latin1");
        record.sse = /^content-type:\s*text\/event-stream/im.test(headText);
        if (record.sse && this.#cutsLeft > 0) {
          this.#cutsLeft -= 1;
          cutting = true;
        }
        client.write(head.subarray(0, end + 4));
        chunk = head.subarray(end + 4);
        head = null;
        if (chunk.length === 0) return;
      }
      if (cutting && record.bodyBytes + chunk.length >= this.cutAfter) {
        const keep = this.cutAfter - record.bodyBytes;
        record.bodyBytes += keep;
        record.cut = true;
        client.write(chunk.subarray(0, keep), () => both());
        return;
      }
      record.bodyBytes += chunk.length;
      client.write(chunk);
    });
  }
}

/** The value of header `name` in a request head (`undefined` when absent). */
export function headerOf(requestHead: string, name: string): string | undefined {
  for (const line of requestHead.split("\r\n").slice(1)) {
    const colon = line.indexOf(":");
    if (colon !== -1 && line.slice(0, colon).trim().toLowerCase() === name.toLowerCase()) {
      return line.slice(colon + 1).trim();
    }
  }
  return undefined;
}
