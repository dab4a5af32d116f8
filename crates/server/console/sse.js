// A parser of server-sent events (the WHATWG "event stream" format), fed text as it arrives.
// Pure: no DOM, no fetch, so that Node's test runner can check it too.
//
// EventSource cannot send an Authorization header, so the console reads the stream with fetch
// and hands each decoded chunk to `push`; every complete event goes to `onEvent` as
// `{id, event, data}` (`id` is the stream's last event id, as the spec keeps it).

export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = '';
    this.lastEventId = '';
    this.resetEvent();
    this.sawBom = false;
  }

  resetEvent() {
    this.eventType = '';
    this.data = [];
    this.hasData = false;
  }

  // Feeds decoded text; lines end in "\n", "\r\n" or "\r".
  push(text) {
    if (!this.sawBom) {
      if (text.length === 0) return;
      this.sawBom = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    this.buffer += text;
    let start = 0;
    for (;;) {
      let end = -1;
      let next = -1;
      for (let i = start; i < this.buffer.length; i++) {
        const c = this.buffer[i];
        if (c === '\n') {
          end = i;
          next = i + 1;
          break;
        }
        if (c === '\r') {
          // A "\r" at the very end may be the first half of "\r\n": wait for more.
          if (i + 1 >= this.buffer.length) break;
          end = i;
          next = this.buffer[i + 1] === '\n' ? i + 2 : i + 1;
          break;
        }
      }
      if (end < 0) break;
      this.line(this.buffer.slice(start, end));
      start = next;
    }
    this.buffer = this.buffer.slice(start);
  }

  // The stream ended: a trailing "\r" ends its line; an event without its blank line is
  // dropped, as the spec says.
  end() {
    if (this.buffer.endsWith('\r')) {
      this.line(this.buffer.slice(0, -1));
    }
    this.buffer = '';
    this.resetEvent();
  }

  line(line) {
    if (line === '') {
      this.dispatch();
      return;
    }
    if (line.startsWith(':')) return; // a comment (keep-alive)
    const colon = line.indexOf(':');
    let field = line;
    let value = '';
    if (colon >= 0) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
    }
    switch (field) {
      case 'event':
        this.eventType = value;
        break;
      case 'data':
        this.data.push(value);
        this.hasData = true;
        break;
      case 'id':
        if (!value.includes('\0')) this.lastEventId = value;
        break;
      case 'retry':
      default:
        break;
    }
  }

  dispatch() {
    if (!this.hasData) {
      this.resetEvent();
      return;
    }
    const event = {
      id: this.lastEventId,
      event: this.eventType || 'message',
      data: this.data.join('\n'),
    };
    this.resetEvent();
    this.onEvent(event);
  }
}

// Splits a text stream into lines (for NDJSON and logs): `push` text, get each complete line;
// `end` gives the last line when the text did not end with a newline.
export class LineSplitter {
  constructor(onLine) {
    this.onLine = onLine;
    this.buffer = '';
  }

  push(text) {
    this.buffer += text;
    let nl;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      let line = this.buffer.slice(0, nl);
      if (line.endsWith('\r')) line = line.slice(0, -1);
      this.buffer = this.buffer.slice(nl + 1);
      this.onLine(line);
    }
  }

  end() {
    if (this.buffer !== '') {
      const line = this.buffer;
      this.buffer = '';
      this.onLine(line);
    }
  }
}
