// The console's SSE parser and line splitter (crates/server/console/sse.js), without a browser.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

// The console's folder has no package.json saying its files are ES modules: load the file (it
// imports nothing) as one.
const source = readFileSync(new URL('../../crates/server/console/sse.js', import.meta.url));
const { LineSplitter, SseParser } = await import(
  `data:text/javascript;base64,${source.toString('base64')}`
);

function parse(chunks) {
  const events = [];
  const parser = new SseParser((e) => events.push(e));
  for (const chunk of chunks) parser.push(chunk);
  parser.end();
  return events;
}

test('events as deployd sends them, whatever the chunking', () => {
  const text =
    'id: 1\nevent: event\ndata: {"seq":1,"type":"event","data":{"step":1},"attempt":1}\n\n' +
    ': keep-alive\n\n' +
    'id: 2\nevent: result\ndata: {"seq":2,"type":"result","data":"done","attempt":1}\n\n';
  const expected = [
    { id: '1', event: 'event', data: '{"seq":1,"type":"event","data":{"step":1},"attempt":1}' },
    { id: '2', event: 'result', data: '{"seq":2,"type":"result","data":"done","attempt":1}' },
  ];
  assert.deepEqual(parse([text]), expected);
  // One character at a time.
  assert.deepEqual(parse([...text]), expected);
  // Cut at every position.
  for (let i = 1; i < text.length; i++) {
    assert.deepEqual(parse([text.slice(0, i), text.slice(i)]), expected, `cut at ${i}`);
  }
});

test('CRLF and CR line ends, multi-line data, no space after the colon, BOM', () => {
  const text = '\ufeffid:7\r\nevent:error\r\ndata:first\r\ndata: second\r\r' + 'data: x\n\n';
  assert.deepEqual(parse([text]), [
    { id: '7', event: 'error', data: 'first\nsecond' },
    { id: '7', event: 'message', data: 'x' },
  ]);
  // A "\r\n" split between two chunks is one line end, not two.
  assert.deepEqual(parse(['data: a\r', '\n\r', '\n']), [{ id: '', event: 'message', data: 'a' }]);
});

test('an event without its blank line at the end of the stream is dropped', () => {
  assert.deepEqual(parse(['id: 1\nevent: event\ndata: {}\n']), []);
});

test('lines of a followed log, split anywhere', () => {
  const lines = [];
  const splitter = new LineSplitter((l) => lines.push(l));
  for (const chunk of ['one\ntw', 'o\r\nthr', 'ee\n', 'last']) splitter.push(chunk);
  splitter.end();
  assert.deepEqual(lines, ['one', 'two', 'three', 'last']);
});
