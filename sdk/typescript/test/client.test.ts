/**
 * The client and `streamEvents` against a real deployd (`DEPLOYD_BIN`), with a deployment whose
 * service streams 20 events, and a TCP proxy that cuts the event stream twice.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { DeploydClient, DeploydError, streamEvents, type EventLine, type ReconnectInfo } from "../src/index.js";
import { CuttingProxy, deploydBin, headerOf, startDeployd, writeTickerDeployment, type Deployd } from "./helpers.js";

const NAME = "ticker";
const TEST_TIMEOUT = 120_000;

/** Collects a stream, failing the test rather than hanging if it does not end in time. */
async function collect(stream: AsyncIterable<EventLine>, ms = 60_000): Promise<EventLine[]> {
  const lines: EventLine[] = [];
  const work = (async () => {
    for await (const line of stream) lines.push(line);
    return lines;
  })();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`the stream did not end within ${ms} ms; got ${JSON.stringify(lines)}`)), ms);
  });
  try {
    return await Promise.race([work, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function rejectsWithStatus(promise: Promise<unknown>, status: number): Promise<DeploydError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof DeploydError, `expected a DeploydError, got ${String(err)}`);
    assert.equal(err.status, status, `expected ${status}, got ${err.status}: ${err.message}`);
    return err;
  }
  assert.fail(`expected a DeploydError with status ${status}, but the call succeeded`);
}

// Its own test, so that a run without a deployd fails with this message (not only cancelled tests).
test("DEPLOYD_BIN names the deployd binary to test", () => {
  deploydBin();
});

describe("DeploydClient against deployd", { timeout: 300_000 }, () => {
  let deployd: Deployd;
  let client: DeploydClient;

  before(async () => {
    deployd = await startDeployd();
    client = new DeploydClient({ baseUrl: deployd.url });
    const { basePath, yaml } = await writeTickerDeployment(deployd.dir, NAME);
    const deployed = await client.createDeployment(yaml, { basePath });
    assert.equal(deployed.name, NAME);
  });

  after(async () => {
    await deployd?.stop();
  });

  test("status, deployments and a deployment", { timeout: TEST_TIMEOUT }, async () => {
    const status = await client.status();
    assert.equal(status.status, "Healthy");
    assert.deepEqual(status.deployments, [NAME]);
    assert.deepEqual(await client.listDeployments(), [{ name: NAME }]);
    const deployment = await client.getDeployment(NAME);
    assert.equal(deployment.name, NAME);
    assert.deepEqual(
      deployment.services.map((service) => service.id),
      ["ticker"],
    );
    const root = await client.root();
    assert.equal(root.name, "deployd");
    const missing = await rejectsWithStatus(client.getDeployment("no-such-deployment"), 404);
    assert.equal(missing.detail, "Deployment not found");
  });

  test("streams a task's events across forced reconnects, each once and in order", { timeout: TEST_TIMEOUT }, async () => {
    const created = await client.createTask(NAME, { input: { count: 20, delay: 0.05, message: "hi" } });
    assert.ok(created.task_id, "the created task has an id");
    assert.equal(created.service_id, "ticker");
    const taskId = created.task_id;

    // Cuts the first two event streams after 600 bytes of body each: a few events in, usually
    // in the middle of one.
    const proxy = new CuttingProxy(deployd.port, 600, 2);
    await proxy.listen();
    const reconnects: ReconnectInfo[] = [];
    let lines: EventLine[];
    try {
      lines = await collect(
        streamEvents({
          baseUrl: proxy.url,
          deployment: NAME,
          taskId,
          initialDelayMs: 50,
          onReconnect: (info) => reconnects.push(info),
        }),
      );
    } finally {
      await proxy.close();
    }

    // Every entry exactly once, in order: seq 1..21 without gaps or repeats.
    assert.deepEqual(
      lines.map((line) => line.seq),
      Array.from({ length: 21 }, (_, i) => i + 1),
    );
    assert.deepEqual(
      lines.slice(0, 20).map((line) => [line.type, (line.data as { i: number }).i]),
      Array.from({ length: 20 }, (_, i) => ["event", i + 1]),
    );
    const last = lines[lines.length - 1]!;
    assert.equal(last.type, "result");
    assert.deepEqual(last.data, { events: 20, message: "hi" });
    assert.ok(lines.every((line) => line.attempt === 1));

    // The proxy cut two streams, so the helper connected three times and resumed twice, each time
    // with the `Last-Event-ID` of the last event it had delivered.
    const streams = proxy.connections.filter((connection) => connection.sse);
    assert.equal(streams.length, 3, `event stream connections: ${JSON.stringify(proxy.connections)}`);
    assert.deepEqual(
      streams.map((connection) => connection.cut),
      [true, true, false],
    );
    assert.equal(reconnects.length, 2, `reconnects: ${JSON.stringify(reconnects)}`);
    assert.equal(headerOf(streams[0]!.requestHead, "last-event-id"), undefined);
    assert.equal(headerOf(streams[0]!.requestHead, "accept"), "text/event-stream");
    for (const [i, info] of reconnects.entries()) {
      assert.ok(info.lastEventId !== undefined && info.lastEventId >= 1 && info.lastEventId < 21, JSON.stringify(info));
      assert.equal(headerOf(streams[i + 1]!.requestHead, "last-event-id"), String(info.lastEventId));
    }
    assert.ok(reconnects[0]!.lastEventId! < reconnects[1]!.lastEventId!, JSON.stringify(reconnects));

    // The result, read through the client, is the stream's last entry.
    const result = await client.getTaskResult(NAME, taskId);
    assert.ok(result !== null);
    assert.equal(result.task_id, taskId);
    assert.equal(result.status, "succeeded");
    assert.deepEqual(JSON.parse(result.result), last.data);

    const tasks = await client.listTasks(NAME);
    assert.ok(
      tasks.some((task) => task.task_id === taskId),
      `the task is listed: ${JSON.stringify(tasks)}`,
    );
    const page = await client.listTasks(NAME, { limit: 1 });
    assert.equal(page.length, 1);
  });

  test("resumes after a given seq, and stops when the consumer leaves", { timeout: TEST_TIMEOUT }, async () => {
    const { task_id: taskId } = await client.createTask(NAME, { input: { count: 5, delay: 0.01, message: "again" } });
    assert.ok(taskId);
    const rest = await collect(client.streamEvents(NAME, taskId, { after: 3 }));
    assert.deepEqual(
      rest.map((line) => [line.seq, line.type]),
      [
        [4, "event"],
        [5, "event"],
        [6, "result"],
      ],
    );

    let seen = 0;
    for await (const line of client.streamEvents(NAME, taskId)) {
      assert.equal(line.seq, 1);
      seen += 1;
      break;
    }
    assert.equal(seen, 1);

    const aborted = new AbortController();
    aborted.abort(new Error("stopped by the test"));
    await assert.rejects(collect(client.streamEvents(NAME, taskId, { signal: aborted.signal })), /stopped by the test/);
  });

  test("a failed task ends its stream with an error entry", { timeout: TEST_TIMEOUT }, async () => {
    const { task_id: taskId } = await client.createTask(NAME, { input: { count: 2, delay: 0, fail: "it broke" } });
    assert.ok(taskId);
    const lines = await collect(client.streamEvents(NAME, taskId));
    assert.deepEqual(
      lines.map((line) => [line.seq, line.type]),
      [
        [1, "event"],
        [2, "event"],
        [3, "error"],
      ],
    );
    assert.match(JSON.stringify(lines[2]!.data), /it broke/);
    const result = await client.getTaskResult(NAME, taskId);
    assert.ok(result !== null);
    assert.equal(result.status, "failed");
    assert.match(result.error ?? "", /it broke/);

    const failed = await rejectsWithStatus(client.runTask(NAME, { input: { count: 0, fail: "no luck" } }), 502);
    assert.match(failed.detail ?? "", /no luck/);
  });

  test("a cancelled task ends its stream with a cancelled entry", { timeout: TEST_TIMEOUT }, async () => {
    const { task_id: taskId } = await client.createTask(NAME, { input: { count: 100, delay: 0.05 } });
    assert.ok(taskId);
    const lines: EventLine[] = [];
    let cancelled = false;
    const stream = client.streamEvents(NAME, taskId);
    const reading = collect(
      (async function* () {
        for await (const line of stream) {
          yield line;
          if (line.seq === 3 && !cancelled) {
            cancelled = true;
            const summary = await client.cancelTask(NAME, taskId);
            assert.equal(summary.status, "cancelled");
          }
        }
      })(),
    );
    lines.push(...(await reading));
    assert.ok(cancelled);
    const last = lines[lines.length - 1]!;
    assert.equal(last.type, "cancelled", JSON.stringify(last));
    assert.ok(lines.length < 101, "the stream ended before the task would have");
    assert.deepEqual(
      lines.map((line) => line.seq),
      Array.from({ length: lines.length }, (_, i) => i + 1),
    );
    assert.ok(lines.slice(0, -1).every((line) => line.type === "event"));
    const task = await client.getTask(NAME, taskId);
    assert.equal(task.status, "cancelled");
    const result = await client.getTaskResult(NAME, taskId);
    assert.equal(result?.status, "cancelled");
    await rejectsWithStatus(client.cancelTask(NAME, taskId), 409);
  });

  test("runs tasks in a session; sessions are created, listed, read and deleted", { timeout: TEST_TIMEOUT }, async () => {
    const session = await client.createSession(NAME);
    assert.ok(session.session_id);
    const output = await client.runTask(
      NAME,
      { input: JSON.stringify({ count: 1, delay: 0, message: "in a session" }) },
      { sessionId: session.session_id },
    );
    assert.deepEqual(output, { events: 1, message: "in a session" });
    const read = await client.getSession(NAME, session.session_id);
    assert.equal(read.session_id, session.session_id);
    assert.equal(read.task_ids?.length, 1);
    const sessions = await client.listSessions(NAME);
    assert.ok(sessions.some((s) => s.session_id === session.session_id));
    await client.deleteSession(NAME, session.session_id);
    await rejectsWithStatus(client.getSession(NAME, session.session_id), 404);
  });

  test("sends an event into a running task; errors carry deployd's status and detail", { timeout: TEST_TIMEOUT }, async () => {
    const { task_id: taskId } = await client.createTask(NAME, { input: { count: 20, delay: 0.05 } });
    assert.ok(taskId);
    // Once its first event is out, the task runs on the service.
    for await (const line of client.streamEvents(NAME, taskId)) {
      assert.equal(line.seq, 1);
      break;
    }
    const event = { event_obj_str: JSON.stringify({ answer: 42 }) };
    // The ticker has no `POST /tasks/{id}/events` (it answers 404), which deployd reports as a
    // 409 naming the task.
    const refused = await rejectsWithStatus(client.sendEvent(NAME, taskId, event), 409);
    assert.match(refused.detail ?? "", new RegExp(taskId));
    const unknown = await rejectsWithStatus(client.sendEvent(NAME, "no-such-task", event), 404);
    assert.match(unknown.detail ?? "", /no-such-task/);
    const bad = await rejectsWithStatus(client.createTask(NAME, { input: "[1, 2]" }), 400);
    assert.match(bad.detail ?? "", /JSON object/);

    const lines = await collect(client.streamEvents(NAME, taskId));
    assert.equal(lines.length, 21);
    assert.equal(lines[20]!.type, "result");
  });

  test("a service's logs and the metrics page are text", { timeout: TEST_TIMEOUT }, async () => {
    const logs = await client.serviceLogs(NAME, "ticker", { tail: 50 });
    assert.match(logs, /ticker: listening on/);
    const metrics = await client.metrics();
    assert.match(metrics, /deployd_http_requests_total/);
  });
});

describe("DeploydClient with tokens", { timeout: 300_000 }, () => {
  const TOKEN = "test-token-0123456789abcdef";
  const TASK_TOKEN = "task-token-0123456789abcdef";
  let deployd: Deployd;
  let admin: DeploydClient;

  before(async () => {
    // Through the environment, as the docs advise (an option shows in `ps`).
    deployd = await startDeployd({ env: { DEPLOYD_TOKEN: TOKEN, DEPLOYD_TASK_TOKEN: TASK_TOKEN } });
    admin = new DeploydClient({ baseUrl: deployd.url, token: TOKEN });
    const { basePath, yaml } = await writeTickerDeployment(deployd.dir, NAME);
    await admin.createDeployment(yaml, { basePath });
  });

  after(async () => {
    await deployd?.stop();
  });

  test("no token or a wrong one is a 401", { timeout: TEST_TIMEOUT }, async () => {
    const anonymous = new DeploydClient({ baseUrl: deployd.url });
    const refused = await rejectsWithStatus(anonymous.listDeployments(), 401);
    assert.match(refused.headers?.get("www-authenticate") ?? "", /^Bearer/);
    assert.ok(refused.detail, "a 401 has a detail");
    const wrong = new DeploydClient({ baseUrl: deployd.url, token: "not-the-token-at-all" });
    await rejectsWithStatus(wrong.listDeployments(), 401);
    await rejectsWithStatus(wrong.getDeployment(NAME), 401);
    await rejectsWithStatus(wrong.createTask(NAME, { input: {} }), 401);

    // `/status/` answers anyone, without the deployments.
    const status = await anonymous.status();
    assert.equal(status.status, "Healthy");
    assert.equal(status.deployments, undefined);
  });

  test("the event stream with a wrong token throws the 401 without retrying", { timeout: TEST_TIMEOUT }, async () => {
    const { task_id: taskId } = await admin.createTask(NAME, { input: { count: 1, delay: 0 } });
    assert.ok(taskId);
    const reconnects: ReconnectInfo[] = [];
    const wrong = new DeploydClient({ baseUrl: deployd.url, token: "not-the-token-at-all" });
    await rejectsWithStatus(collect(wrong.streamEvents(NAME, taskId, { onReconnect: (r) => reconnects.push(r) })), 401);
    assert.equal(reconnects.length, 0);

    const lines = await collect(admin.streamEvents(NAME, taskId));
    assert.deepEqual(
      lines.map((line) => line.type),
      ["event", "result"],
    );
  });

  test("the right token works; the task token runs tasks but does not deploy", { timeout: TEST_TIMEOUT }, async () => {
    assert.deepEqual(await admin.listDeployments(), [{ name: NAME }]);
    const status = await admin.status();
    assert.deepEqual(status.deployments, [NAME]);

    const tasks = new DeploydClient({ baseUrl: deployd.url, token: TASK_TOKEN });
    const output = await tasks.runTask(NAME, { input: { count: 2, delay: 0, message: "task token" } });
    assert.deepEqual(output, { events: 2, message: "task token" });
    const { basePath, yaml } = await writeTickerDeployment(deployd.dir, "other");
    await rejectsWithStatus(tasks.createDeployment(yaml, { basePath }), 403);
    await rejectsWithStatus(tasks.deleteDeployment(NAME), 403);
  });
});
