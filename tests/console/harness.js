// Starts deployd and headless Chromium for the console's browser test, and stops both.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CONSOLE_DIR = path.join(REPO, 'crates/server/console');
export const SCREENSHOTS = path.join(REPO, 'docs/console');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

export function deploydBinary() {
  const bin = process.env.DEPLOYD_BIN || path.join(REPO, 'target/debug/deployd');
  if (!fs.existsSync(bin)) {
    throw new Error(
      `no deployd binary at ${bin}: build it (cargo build -p deployd) or point DEPLOYD_BIN at one`,
    );
  }
  return bin;
}

// The example graph service (examples/graph-service, `cargo build -p graph-service`), which the
// test deploys as a plain command.
export function graphServiceBinary() {
  const bin = process.env.DEPLOYD_GRAPH_SERVICE_BIN || path.join(REPO, 'target/debug/graph-service');
  if (!fs.existsSync(bin)) {
    throw new Error(
      `no graph-service binary at ${bin}: build it (cargo build -p graph-service) or point ` +
        'DEPLOYD_GRAPH_SERVICE_BIN at one',
    );
  }
  return bin;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Polls `fn` until it returns a truthy value; throws `what` after `timeoutMs`.
export async function until(what, timeoutMs, fn, everyMs = 250) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await fn();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await sleep(everyMs);
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

// The pids of the processes whose environment has DEPLOYD_DATA_DIR=<dataDir> (the services
// deployd started), to end them if deployd itself could not.
function servicePids(dataDir) {
  const needle = Buffer.from(`DEPLOYD_DATA_DIR=${dataDir}`);
  const pids = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const environ = fs.readFileSync(`/proc/${entry}/environ`);
      if (environ.includes(needle)) pids.push(Number(entry));
    } catch {
      // gone, or not ours to read
    }
  }
  return pids;
}

// Every deployd started here, ended with the test process however it ends (deployd runs in a
// process group of its own, which a Ctrl-C in the terminal does not reach).
const running = new Set();
process.on('exit', () => {
  for (const server of running) server.killNow();
});
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    for (const server of running) {
      server.killNow();
      fs.rmSync(server.root, { recursive: true, force: true, maxRetries: 3 });
    }
    process.exit(128 + ({ SIGINT: 2, SIGTERM: 15, SIGHUP: 1 }[signal] || 0));
  });
}

export class Deployd {
  // Starts `deployd serve` on a free loopback port with a new data directory and a token.
  static async start({ withToken = true } = {}) {
    const bin = deploydBinary();
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'deployd-console-'));
    const dataDir = path.join(root, 'data');
    fs.mkdirSync(dataDir);
    const port = await freePort();
    const token = withToken ? crypto.randomBytes(24).toString('hex') : null;
    const logPath = path.join(root, 'deployd.log');
    const log = fs.openSync(logPath, 'a');
    const cache = path.join(REPO, 'target/python-cache');
    const env = {
      ...process.env,
      RUST_LOG: process.env.RUST_LOG || 'info',
      // The Python environments' downloads are shared across runs, as the scenarios share them.
      UV_CACHE_DIR: process.env.UV_CACHE_DIR || path.join(cache, 'uv'),
      PIP_CACHE_DIR: process.env.PIP_CACHE_DIR || path.join(cache, 'pip'),
    };
    if (token) env.DEPLOYD_TOKEN = token;
    else delete env.DEPLOYD_TOKEN;
    delete env.DEPLOYD_TASK_TOKEN;
    // DEPLOYD_CONSOLE_DIR (the console's files read from disk) is passed on when set.
    const child = spawn(
      bin,
      ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--drain-timeout', '5'],
      { env, stdio: ['ignore', log, log], detached: true },
    );
    fs.closeSync(log);
    const server = new Deployd({ child, root, dataDir, port, token, logPath });
    child.on('exit', (code, signal) => {
      server.exited = { code, signal };
    });
    running.add(server);
    try {
      await until('deployd to answer GET /status/', 30_000, async () => {
        if (server.exited) throw new Error(`deployd exited (${JSON.stringify(server.exited)}):\n${server.logTail()}`);
        const res = await fetch(`${server.url}/status/`, { signal: AbortSignal.timeout(2000) });
        return res.status === 200;
      });
    } catch (err) {
      await server.stop();
      throw err;
    }
    return server;
  }

  constructor({ child, root, dataDir, port, token, logPath }) {
    Object.assign(this, { child, root, dataDir, port, token, logPath });
    this.url = `http://127.0.0.1:${port}`;
    this.exited = null;
  }

  logTail(lines = 60) {
    try {
      const text = fs.readFileSync(this.logPath, 'utf8').replace(/\x1b\[[0-9;]*m/g, '');
      return text.split('\n').slice(-lines).join('\n');
    } catch {
      return '(no log)';
    }
  }

  // A request with the token; `timeoutMs` bounds it. Answers {status, body (JSON or text)}.
  async api(method, route, { json, body, contentType, timeoutMs = 60_000, token = this.token } = {}) {
    const headers = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload = body;
    if (json !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(json);
    } else if (contentType) headers['Content-Type'] = contentType;
    const res = await fetch(`${this.url}${route}`, {
      method,
      headers,
      body: payload,
      signal: AbortSignal.timeout(timeoutMs),
    });
    const text = await res.text();
    let parsed = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // text
    }
    return { status: res.status, body: parsed, headers: res.headers };
  }

  // Deploys (or reloads) a deployment file through the API, as its YAML, without waiting for
  // its services; answers the API's answer.
  async deploy(file, { reload = false, text, wait = false } = {}) {
    const yaml = text ?? fs.readFileSync(file, 'utf8');
    const params = new URLSearchParams({ base_path: path.dirname(file) });
    if (reload) params.set('reload', 'true');
    if (!wait) params.set('wait', 'false');
    return this.api('POST', `/deployments/create?${params}`, {
      body: yaml,
      contentType: 'application/yaml',
      timeoutMs: 280_000,
    });
  }

  // Waits until every service of the deployment is ready and its deploy done; fails at once
  // with the error of a stage that failed.
  async waitReady(name, timeoutMs) {
    let last = null;
    let seen = '';
    return until(`deployment ${name} to be ready (last: ${JSON.stringify(last)})`, timeoutMs, async () => {
      const { status, body } = await this.api('GET', `/deployments/${name}`, { timeoutMs: 10_000 });
      if (status !== 200) throw new Error(`GET /deployments/${name}: ${status} ${JSON.stringify(body)}`);
      last = body.services.map((s) => [s.id, s.phase, s.stage?.stage, s.stage?.state]);
      const now = JSON.stringify(last);
      if (now !== seen) {
        seen = now;
        console.log(`${name}: ${now}`);
      }
      for (const s of body.services) {
        if (s.stage?.state === 'failed') {
          throw Object.assign(new Error(`service ${s.id} failed in ${s.stage.stage}: ${s.stage.error}`), {
            fatal: true,
          });
        }
      }
      return (
        !body.deploying &&
        body.services.length > 0 &&
        body.services.every((s) => s.phase === 'ready' && (!s.stage || s.stage.state === 'done')) &&
        body
      );
    }, 500).catch((err) => {
      throw new Error(`${err.message}\n--- deployd's log ---\n${this.logTail()}`);
    });
  }

  killNow() {
    if (this.exited || !this.child.pid) return;
    try {
      process.kill(-this.child.pid, 'SIGKILL');
    } catch {
      // gone
    }
    for (const pid of servicePids(this.dataDir)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  }

  // SIGTERM, up to 20 s for deployd to stop its services, then SIGKILL for what is left; the
  // data directory is removed; the log is kept (its path is printed) when `keepLog`.
  async stop({ keepLog = false } = {}) {
    if (!this.exited && this.child.pid) {
      try {
        process.kill(this.child.pid, 'SIGTERM');
      } catch {
        // gone
      }
      await until('deployd to stop', 20_000, () => this.exited, 100).catch(() => {});
    }
    this.killNow();
    for (const pid of servicePids(this.dataDir)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    if (keepLog) {
      const kept = path.join(os.tmpdir(), `deployd-console-test-${this.port}.log`);
      try {
        fs.copyFileSync(this.logPath, kept);
        console.log(`deployd's log: ${kept}`);
      } catch {
        // no log
      }
    }
    running.delete(this);
    fs.rmSync(this.root, { recursive: true, force: true, maxRetries: 3 });
  }
}

// Headless Chromium with a fresh profile; the flags keep it off the (closed) network.
export async function launchBrowser() {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'deployd-console-chromium-'));
  let context;
  try {
    context = await launchIn(profile);
  } catch (err) {
    fs.rmSync(profile, { recursive: true, force: true, maxRetries: 3 });
    throw err;
  }
  context.setDefaultTimeout(30_000);
  context.setDefaultNavigationTimeout(30_000);
  const close = async () => {
    await Promise.race([context.close().catch(() => {}), sleep(15_000)]);
    fs.rmSync(profile, { recursive: true, force: true, maxRetries: 3 });
  };
  return { context, close };
}

function launchIn(profile) {
  return chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 860 },
    timeout: 60_000,
  });
}
