/** The server-sent events parser, on streams cut at awkward places. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { parseSse, type SseMessage } from "../src/sse.js";

function streamOf(chunks: (string | Uint8Array)[]): ReadableStream<Uint8Array> {
  const encoder = new TextEncoder();
  return new ReadableStream<Uint8Array>({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(typeof chunk === "string" ? encoder.encode(chunk) : chunk);
      controller.close();
    },
  });
}

async function parse(chunks: (string | Uint8Array)[]): Promise<SseMessage[]> {
  const messages: SseMessage[] = [];
  for await (const message of parseSse(streamOf(chunks))) messages.push(message);
  return messages;
}

/** Every way of cutting `text` in two. */
function splits(text: string): string[][] {
  return Array.from({ length: text.length + 1 }, (_, i) => [text.slice(0, i), text.slice(i)]);
}

describe("parseSse", () => {
  test("deployd's events: id, event and data", async () => {
    const text =
      'id: 1\nevent: event\ndata: {"seq":1,"type":"event","data":{"i":1},"attempt":1}\n\n' +
      ": keep-alive\n\n" +
      'id: 2\nevent: result\ndata: {"seq":2,"type":"result","data":"ok","attempt":1}\n\n';
    const expected = [
      { id: "1", event: "event", data: '{"seq":1,"type":"event","data":{"i":1},"attempt":1}' },
      { id: "2", event: "result", data: '{"seq":2,"type":"result","data":"ok","attempt":1}' },
    ];
    assert.deepEqual(await parse([text]), expected);
    for (const parts of splits(text)) assert.deepEqual(await parse(parts), expected, JSON.stringify(parts));
    // One byte at a time.
    assert.deepEqual(await parse(text.split("")), expected);
  });

  test("CRLF, CR and LF line ends, also split between chunks", async () => {
    const expected = [
      { id: "7", event: "a", data: "x" },
      { id: "8", event: "message", data: "y" },
    ];
    for (const text of ["id: 7\r\nevent: a\r\ndata: x\r\n\r\nid: 8\r\ndata: y\r\n\r\n", "id: 7\revent: a\rdata: x\r\rid: 8\rdata: y\r\r"]) {
      assert.deepEqual(await parse([text]), expected);
      for (const parts of splits(text)) assert.deepEqual(await parse(parts), expected, JSON.stringify(parts));
    }
  });

  test("multi-line data, a field without a space, unknown fields and retry", async () => {
    assert.deepEqual(await parse(["data:one\ndata: two\nretry: 10\nfoo: bar\ndata\n\n"]), [
      { id: undefined, event: "message", data: "one\ntwo\n" },
    ]);
  });

  test("an event cut off by the end of the stream is dropped", async () => {
    assert.deepEqual(await parse(['id: 1\nevent: event\ndata: {"seq":1}\n\nid: 2\nevent: event\ndata: {"se']), [
      { id: "1", event: "event", data: '{"seq":1}' },
    ]);
    assert.deepEqual(await parse(["id: 3\ndata: complete line but no blank line\n"]), []);
  });

  test("the id carries over; events without data are not dispatched", async () => {
    assert.deepEqual(await parse(["id: 5\nevent: nothing\n\ndata: a\n\nid\ndata: b\n\n"]), [
      { id: "5", event: "message", data: "a" },
      { id: "", event: "message", data: "b" },
    ]);
  });

  test("a byte order mark and UTF-8 split between chunks", async () => {
    const bytes = new TextEncoder().encode("\uFEFFdata: h\u00e9llo \u2603\n\n");
    for (let i = 0; i <= bytes.length; i++) {
      assert.deepEqual(await parse([bytes.slice(0, i), bytes.slice(i)]), [
        { id: undefined, event: "message", data: "h\u00e9llo \u2603" },
      ]);
    }
  });
});
