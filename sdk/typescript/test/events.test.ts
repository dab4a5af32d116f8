/**
 * `streamEvents`' retry rules, against a scripted local HTTP server that misbehaves on purpose
 * (the happy path and real cuts are tested against deployd in client.test.ts).
 */
import assert from "node:assert/strict";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { describe, test } from "node:test";
import { DeploydError, streamEvents, type EventLine, type ReconnectInfo } from "../src/index.js";

type Step = (request: http.IncomingMessage, response: http.ServerResponse) => void;

function sse(seq: number, type = "event"): string {
  return `id: ${seq}\nevent: ${type}\ndata: ${JSON.stringify({ seq, type, data: { n: seq }, attempt: 1 })}\n\n`;
}

/** Serves the steps in order, one per request, and records each request's `Last-Event-ID`. */
async function scripted(steps: Step[]): Promise<{ url: string; lastEventIds: (string | undefined)[]; close: () => Promise<void> }> {
  const lastEventIds: (string | undefined)[] = [];
  let next = 0;
  const server = http.createServer((request, response) => {
    lastEventIds.push(request.headers["last-event-id"] as string | undefined);
    const step = steps[Math.min(next, steps.length - 1)]!;
    next += 1;
    step(request, response);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    url,
    lastEventIds,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

const streamHead = { "content-type": "text/event-stream" };

async function collect(stream: AsyncIterable<EventLine>): Promise<EventLine[]> {
  const lines: EventLine[] = [];
  for await (const line of stream) lines.push(line);
  return lines;
}

describe("streamEvents", { timeout: 60_000 }, () => {
  test("retries 503, 429 (Retry-After), a stream ended early and an idle one; never repeats an entry", async () => {
    const server = await scripted([
      (_, res) => {
        res.writeHead(503, { "content-type": "application/json" }).end('{"detail":"shutting down"}');
      },
      // Two events, then the end of the body before the result.
      (_, res) => {
        res.writeHead(200, streamHead).end(sse(1) + sse(2));
      },
      (_, res) => {
        res.writeHead(429, { "content-type": "application/json", "retry-after": "0" }).end('{"detail":"too many"}');
      },
      // A server that repeats entry 2 (the client must drop it), then goes quiet.
      (_, res) => {
        res.writeHead(200, streamHead);
        res.write(sse(2) + sse(3));
      },
      (_, res) => {
        res.writeHead(200, streamHead).end(sse(4) + sse(5, "result") + sse(6));
      },
    ]);
    const reconnects: ReconnectInfo[] = [];
    try {
      const lines = await collect(
        streamEvents({
          baseUrl: server.url,
          deployment: "d",
          taskId: "t",
          initialDelayMs: 10,
          idleTimeoutMs: 1_000,
          onReconnect: (info) => reconnects.push(info),
        }),
      );
      assert.deepEqual(
        lines.map((line) => [line.seq, line.type]),
        [
          [1, "event"],
          [2, "event"],
          [3, "event"],
          [4, "event"],
          [5, "result"],
        ],
      );
      assert.deepEqual(server.lastEventIds, [undefined, undefined, "2", "2", "3"]);
      assert.equal(reconnects.length, 4);
      assert.ok(reconnects[0]!.error instanceof DeploydError && reconnects[0]!.error.status === 503);
      assert.match(String(reconnects[1]!.error), /ended before/);
      assert.ok(reconnects[2]!.error instanceof DeploydError && reconnects[2]!.error.status === 429);
      assert.equal(reconnects[2]!.delayMs, 0, "Retry-After is obeyed");
      assert.match(String(reconnects[3]!.error), /no data/);
    } finally {
      await server.close();
    }
  });

  test("gives up after maxRetries failures in a row", async () => {
    const server = await scripted([
      (_, res) => {
        res.writeHead(502).end();
      },
    ]);
    try {
      await assert.rejects(
        collect(streamEvents({ baseUrl: server.url, deployment: "d", taskId: "t", maxRetries: 2, initialDelayMs: 1 })),
        /failed 3 times in a row/,
      );
      assert.equal(server.lastEventIds.length, 3);
    } finally {
      await server.close();
    }
  });

  test("a 404 and an answer that is not an event stream are not retried", async () => {
    const server = await scripted([
      (_, res) => {
        res.writeHead(404, { "content-type": "application/json" }).end('{"detail":"task `t` not found"}');
      },
      (_, res) => {
        res.writeHead(200, { "content-type": "application/x-ndjson" }).end("{}\n");
      },
    ]);
    try {
      await assert.rejects(collect(streamEvents({ baseUrl: server.url, deployment: "d", taskId: "t" })), (err: unknown) => {
        assert.ok(err instanceof DeploydError);
        assert.equal(err.status, 404);
        assert.equal(err.detail, "task `t` not found");
        return true;
      });
      await assert.rejects(collect(streamEvents({ baseUrl: server.url, deployment: "d", taskId: "t" })), /text\/event-stream/);
      assert.equal(server.lastEventIds.length, 2);
    } finally {
      await server.close();
    }
  });

  test("an abort stops a stream that waits", async () => {
    const server = await scripted([
      (_, res) => {
        res.writeHead(200, streamHead);
        res.write(sse(1));
      },
    ]);
    try {
      const controller = new AbortController();
      const lines: EventLine[] = [];
      const done = (async () => {
        for await (const line of streamEvents({ baseUrl: server.url, deployment: "d", taskId: "t", signal: controller.signal })) {
          lines.push(line);
          setTimeout(() => controller.abort(new Error("enough")), 50);
        }
      })();
      await assert.rejects(done, /enough/);
      assert.deepEqual(
        lines.map((line) => line.seq),
        [1],
      );
    } finally {
      await server.close();
    }
  });

  test("the URL keeps a base path and escapes the names", async () => {
    const server = await scripted([
      (req, res) => {
        res.writeHead(200, streamHead).end(sse(1, "error").replace('"n":1', JSON.stringify({ url: req.url }).slice(1, -1)));
      },
    ]);
    try {
      const lines = await collect(streamEvents({ baseUrl: `${server.url}/prefix/`, deployment: "a b", taskId: "t/1" }));
      assert.deepEqual(lines[0]!.data, { url: "/prefix/deployments/a%20b/tasks/t%2F1/events" });
    } finally {
      await server.close();
    }
  });
});
