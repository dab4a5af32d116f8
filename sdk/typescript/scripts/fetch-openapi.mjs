// Writes deployd's OpenAPI document to openapi.json, as the server serves it (pretty-printed):
// starts `$DEPLOYD_BIN serve` on a free loopback port with a temporary data directory, reads
// `/openapi.json`, stops the server. With `--check`, writes nothing and exits 1 when the
// committed openapi.json differs from the server's (then run `npm run fetch-openapi` and
// `npm run generate`).
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const check = process.argv.includes("--check");
const bin = process.env.DEPLOYD_BIN;
if (!bin) {
  console.error("DEPLOYD_BIN is not set: name the deployd binary (e.g. ../../target/debug/deployd)");
  process.exit(2);
}
const target = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "openapi.json");
const dir = mkdtempSync(path.join(tmpdir(), "deployd-openapi-"));
const env = Object.fromEntries(
  Object.entries(process.env).filter(([key]) => !key.startsWith("DEPLOYD_") && !key.startsWith("LLAMA_DEPLOY_")),
);
const child = spawn(
  bin,
  ["serve", "--listen", "127.0.0.1:0", "--data-dir", path.join(dir, "data"), "--rc-path", path.join(dir, "rc")],
  { cwd: dir, env: { ...env, NO_COLOR: "1" }, stdio: ["ignore", "pipe", "pipe"] },
);
let output = "";
const stop = () => {
  child.kill("SIGTERM");
  rmSync(dir, { recursive: true, force: true });
};
const timer = setTimeout(() => {
  console.error(`deployd did not start within 30 s:\n${output}`);
  stop();
  process.exit(1);
}, 30_000);
child.on("exit", (code) => {
  if (!port) {
    console.error(`deployd exited (${code}) before listening:\n${output}`);
    process.exit(1);
  }
});
let port;
const onData = async (chunk) => {
  output += chunk.toString();
  const match = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(output.replace(/\u001b\[[0-9;]*m/g, ""));
  if (!match || port) return;
  port = Number(match[1]);
  clearTimeout(timer);
  try {
    const response = await fetch(`http://127.0.0.1:${port}/openapi.json`);
    if (!response.ok) throw new Error(`GET /openapi.json answered ${response.status}`);
    const text = `${JSON.stringify(await response.json(), null, 2)}\n`;
    if (check) {
      const same = readFileSync(target, "utf8") === text;
      console.log(same ? "openapi.json is the server's document" : "openapi.json differs from the server's document: run `npm run fetch-openapi && npm run generate`");
      process.exitCode = same ? 0 : 1;
    } else {
      writeFileSync(target, text);
      console.log(`wrote ${target}`);
    }
  } catch (err) {
    console.error(err);
    process.exitCode = 1;
  } finally {
    stop();
  }
};
child.stdout.on("data", onData);
child.stderr.on("data", onData);
