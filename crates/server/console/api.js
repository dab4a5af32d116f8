// deployd's JSON API at the same origin: the token, errors, and the streams (lines and SSE).

import { LineSplitter, SseParser } from './sse.js';

const TOKEN_KEY = 'deployd.console.token';

export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return '';
  }
}

export function setToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage refused (private mode): the token lives until the page is left
  }
}

// An answer that was not 2xx: `status` and the server's `detail` (or the body's text).
export class ApiError extends Error {
  constructor(status, detail, body) {
    super(detail);
    this.name = 'ApiError';
    this.status = status;
    this.detail = detail;
    this.body = body;
  }
}

async function errorOf(response, method, path) {
  let text = '';
  try {
    text = await response.text();
  } catch {
    // the body broke off
  }
  let body = null;
  let detail = '';
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  if (body && typeof body === 'object' && body.detail !== undefined) {
    detail = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
    if (Array.isArray(body.diagnostics) && body.diagnostics.length) {
      detail +=
        '\n' +
        body.diagnostics
          .map((d) => `${d.file}:${d.line ?? '?'}:${d.column ?? '?'}: ${d.severity}: ${d.message}`)
          .join('\n');
    }
  } else {
    detail = text.trim() || response.statusText || 'request failed';
  }
  const where = method && path ? ` (${method} ${path.split('?')[0]})` : '';
  return new ApiError(response.status, `${response.status}: ${detail}${where}`, body);
}

// The console asks for a token when the server answers 401; `handler(message)` shows the form
// and resolves once a token was entered. One form for all the requests that got a 401 at once.
let authHandler = null;
let pendingPrompt = null;

export function setAuthHandler(handler) {
  authHandler = handler;
}

function askToken(message) {
  if (!authHandler) return Promise.reject(new ApiError(401, message));
  if (!pendingPrompt) {
    pendingPrompt = Promise.resolve(authHandler(message)).finally(() => {
      pendingPrompt = null;
    });
  }
  return pendingPrompt;
}

// fetch with the token; a 401 shows the token form and retries; other errors throw ApiError.
export async function request(path, options = {}) {
  const { method = 'GET', json, headers = {}, signal, body } = options;
  for (let tries = 0; ; tries++) {
    const h = new Headers(headers);
    const token = getToken();
    if (token) h.set('Authorization', `Bearer ${token}`);
    let payload = body;
    if (json !== undefined) {
      h.set('Content-Type', 'application/json');
      payload = JSON.stringify(json);
    }
    const tokenSent = token;
    const response = await fetch(path, { method, headers: h, body: payload, signal, cache: 'no-store' });
    if (response.status === 401 && tries < 20) {
      const error = await errorOf(response, method, path);
      // Another request may already have got a new token while this one was in flight.
      if (getToken() !== tokenSent) continue;
      await askToken(error.detail);
      continue;
    }
    if (!response.ok) throw await errorOf(response, method, path);
    return response;
  }
}

export async function getJSON(path, options) {
  const response = await request(path, options);
  return response.json();
}

export async function postJSON(path, json, options = {}) {
  const response = await request(path, { ...options, method: 'POST', json });
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

// POST without a body (cancel, rollback).
export async function postEmpty(path, options = {}) {
  const response = await request(path, { ...options, method: 'POST' });
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

export async function getText(path, options) {
  const response = await request(path, options);
  return response.text();
}

async function pump(response, sink, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const cancel = () => reader.cancel().catch(() => {});
  signal?.addEventListener('abort', cancel, { once: true });
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      sink.push(decoder.decode(value, { stream: true }));
    }
    sink.push(decoder.decode());
    sink.end();
  } finally {
    signal?.removeEventListener('abort', cancel);
  }
}

// Streams a text answer line by line (logs with follow, NDJSON); resolves when it ends.
export async function streamLines(path, onLine, { signal } = {}) {
  const response = await request(path, { signal });
  await pump(response, new LineSplitter(onLine), signal);
}

// Reads server-sent events with fetch (EventSource cannot send the token). Sends
// `Last-Event-ID` when given; resolves when the server ends the stream. `onEvent` gets
// `{id, event, data}`.
export async function streamSse(path, onEvent, { signal, lastEventId } = {}) {
  const headers = { Accept: 'text/event-stream' };
  if (lastEventId !== undefined && lastEventId !== null && lastEventId !== '') {
    headers['Last-Event-ID'] = String(lastEventId);
  }
  const response = await request(path, { signal, headers });
  const type = response.headers.get('content-type') || '';
  if (!type.startsWith('text/event-stream')) {
    throw new ApiError(response.status, `expected text/event-stream, got ${type || 'no content type'}`);
  }
  await pump(response, new SseParser(onEvent), signal);
}

// `/deployments/{name}` and friends, with each part encoded.
export function path(...parts) {
  return '/' + parts.map((p) => encodeURIComponent(p)).join('/');
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') q.set(key, String(value));
  }
  const text = q.toString();
  return text ? `?${text}` : '';
}
