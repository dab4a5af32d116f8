/**
 * A parser of server-sent events (the `text/event-stream` format of the HTML standard) over a
 * `fetch` body, for runtimes without `EventSource` (Node 20).
 */

/** One dispatched server-sent event. */
export interface SseMessage {
  /** The last `id:` field seen on this stream (per the standard it carries over to later events). */
  id: string | undefined;
  /** The `event:` field, or `"message"` when the event had none. */
  event: string;
  /** The `data:` lines, joined with `\n`. */
  data: string;
}

/**
 * Yields each complete event of `body`. An event is dispatched at the blank line that ends it;
 * an event cut off by the end of the stream is dropped, as the standard says, so that a reader
 * which resumes with `Last-Event-ID` gets it again whole. Comments (`:` lines) and events with no
 * `data:` are skipped; `onChunk` is called for every chunk read (keep-alive comments included),
 * e.g. to reset an idle timer.
 */
export async function* parseSse(
  body: ReadableStream<Uint8Array>,
  onChunk?: () => void,
): AsyncGenerator<SseMessage, void, undefined> {
  const reader = body.getReader();
  // `TextDecoder` removes a leading byte order mark by itself, as the standard wants.
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  let lastId: string | undefined;
  let eventName = "";
  let data: string[] = [];
  let finished = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        finished = true;
        // A `\r` held back at the very end was a line end after all; anything else left is a
        // line or an event without its end, and is dropped.
        if (!buffer.endsWith("\r")) return;
        buffer += "\n";
      } else {
        onChunk?.();
        buffer += decoder.decode(value, { stream: true });
      }
      let start = 0;
      for (;;) {
        let end = -1;
        for (let i = start; i < buffer.length; i++) {
          const c = buffer.charCodeAt(i);
          if (c === 10 || c === 13) {
            end = i;
            break;
          }
        }
        if (end === -1) break;
        let next: number;
        if (buffer.charCodeAt(end) === 13) {
          // A `\r` at the very end of what was read may be the first half of `\r\n`.
          if (end + 1 === buffer.length) break;
          next = buffer.charCodeAt(end + 1) === 10 ? end + 2 : end + 1;
        } else {
          next = end + 1;
        }
        const line = buffer.slice(start, end);
        start = next;

        if (line.length === 0) {
          // The end of an event.
          if (data.length > 0) {
            const message: SseMessage = {
              id: lastId,
              event: eventName.length > 0 ? eventName : "message",
              data: data.join("\n"),
            };
            data = [];
            eventName = "";
            yield message;
          } else {
            eventName = "";
          }
          continue;
        }
        if (line.charCodeAt(0) === 58 /* ':' */) continue; // a comment (keep-alive)
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let fieldValue = colon === -1 ? "" : line.slice(colon + 1);
        if (fieldValue.charCodeAt(0) === 32 /* ' ' */) fieldValue = fieldValue.slice(1);
        switch (field) {
          case "event":
            eventName = fieldValue;
            break;
          case "data":
            data.push(fieldValue);
            break;
          case "id":
            if (!fieldValue.includes("\u0000")) lastId = fieldValue;
            break;
          default:
            // `retry:` and unknown fields: not used here (the caller has its own backoff).
            break;
        }
      }
      buffer = buffer.slice(start);
      if (done) return;
    }
  } finally {
    if (!finished) {
      // Stopped early (the consumer left, or reading failed): let go of the connection.
      await reader.cancel().catch(() => undefined);
    }
    reader.releaseLock();
  }
}
