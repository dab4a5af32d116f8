/**
 * `streamEvents`: a task's events as server-sent events, resumed across dropped connections.
 *
 * deployd answers `GET /deployments/{d}/tasks/{id}/events` with `Accept: text/event-stream` as
 * SSE: every entry of the task's log, each with `id:` its sequence number, `event:` its type and
 * `data:` deployd's `EventLine` (`{"seq", "type", "data", "attempt"}`); the result or error
 * comes last, and the stream ends after it. A request with `Last-Event-ID: N` gets what came
 * after entry N.
 */
import { DeploydError, readErrorBody } from "./errors.js";
import type { components } from "./schema.js";
import { parseSse } from "./sse.js";

/** One entry of a task's log: an `event`, or the task's `result` or `error` (the last entry). */
export type EventLine = components["schemas"]["EventLine"];

/** What `onReconnect` is told before each new connection after the first. */
export interface ReconnectInfo {
  /** How many connections in a row have failed without delivering an event (from 1). */
  attempt: number;
  /** The `seq` of the last event delivered, sent as `Last-Event-ID` (`undefined`: none yet). */
  lastEventId: number | undefined;
  /** How long the stream waits before connecting again, in ms. */
  delayMs: number;
  /** Why the connection ended: a network error, a retried status (a `DeploydError`), an idle
   * timeout, or a stream that ended before the task's last entry. */
  error: unknown;
}

export interface StreamEventsOptions {
  /** deployd's URL, e.g. `http://127.0.0.1:4501` (a path prefix is kept). */
  baseUrl: string | URL;
  /** The deployment. */
  deployment: string;
  /** The task. */
  taskId: string;
  /** deployd's token, sent as `Authorization: Bearer <token>`. */
  token?: string | undefined;
  /** Start after this `seq` (as if an event with this `seq` had been seen). */
  after?: number | undefined;
  /** Stops the stream: the iterator then throws the signal's reason. */
  signal?: AbortSignal | undefined;
  /** How many connections in a row may fail without delivering an event before the iterator
   * throws (default 8). A connection that delivers an event resets the count. */
  maxRetries?: number | undefined;
  /** The first wait before connecting again, in ms (default 250); it doubles with each failure
   * in a row, up to `maxDelayMs`. A 429's `Retry-After` is used instead when it is given. */
  initialDelayMs?: number | undefined;
  /** The longest wait before connecting again, in ms (default 5000). */
  maxDelayMs?: number | undefined;
  /** A connection on which nothing arrives for this long (deployd sends a comment every 15 s
   * on an idle stream) is dropped and made again; 0 turns this off (default 45000). */
  idleTimeoutMs?: number | undefined;
  /** More headers for every request. */
  headers?: Record<string, string> | undefined;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof globalThis.fetch | undefined;
  /** Called before each reconnection. */
  onReconnect?: ((info: ReconnectInfo) => void) | undefined;
}

/** An error that ends the stream at once, without retrying. */
class Fatal {
  constructor(readonly error: unknown) {}
}

/** Answers worth asking again: too many streams (429), and the server's transient 5xx. */
function retryable(status: number): boolean {
  return status === 408 || status === 429 || status >= 500;
}

function retryAfterMs(headers: Headers): number | undefined {
  const value = headers.get("retry-after");
  if (value === null) return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds) && seconds >= 0) return seconds * 1000;
  const date = Date.parse(value);
  if (!Number.isNaN(date)) return Math.max(0, date - Date.now());
  return undefined;
}

function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException("This operation was aborted", "AbortError");
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortReason(signal));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal!));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** The URL of a task's event stream under `baseUrl` (whose path, if any, is kept). */
export function eventsUrl(baseUrl: string | URL, deployment: string, taskId: string): string {
  const base = String(baseUrl).replace(/\/+$/, "");
  return `${base}/deployments/${encodeURIComponent(deployment)}/tasks/${encodeURIComponent(taskId)}/events`;
}

/**
 * A task's log as an `AsyncIterable` of `EventLine`s, in order and each once: `event`s, then the
 * task's `result` or `error` (any type other than `event` is taken as the last entry), after
 * which the iteration ends.
 *
 * When the connection drops (a network error, a 429 or 5xx answer, an idle connection, or a
 * stream that ends before the last entry), it connects again with `Last-Event-ID` set to the
 * last `seq` delivered, after a backoff, at most `maxRetries` times in a row without progress;
 * entries already delivered are never delivered again. Any other answer (401, 403, 404, 400, …)
 * throws a `DeploydError` at once. Leaving the loop early (`break`) closes the connection.
 *
 * ```ts
 * for await (const line of streamEvents({ baseUrl, deployment: "quickstart", taskId })) {
 *   if (line.type === "event") console.log(line.seq, line.data);
 *   else console.log("ended:", line.type, line.data);
 * }
 * ```
 */
export async function* streamEvents(options: StreamEventsOptions): AsyncGenerator<EventLine, void, undefined> {
  const fetchFn = options.fetch ?? globalThis.fetch;
  const url = eventsUrl(options.baseUrl, options.deployment, options.taskId);
  const maxRetries = options.maxRetries ?? 8;
  const initialDelay = options.initialDelayMs ?? 250;
  const maxDelay = options.maxDelayMs ?? 5000;
  const idleTimeout = options.idleTimeoutMs ?? 45_000;
  const signal = options.signal;
  let last = options.after;
  let failures = 0;

  for (;;) {
    if (signal?.aborted) throw abortReason(signal);
    const connection = new AbortController();
    const onAbort = () => connection.abort(abortReason(signal!));
    signal?.addEventListener("abort", onAbort, { once: true });
    let idleTimer: ReturnType<typeof setTimeout> | undefined;
    const resetIdle = () => {
      if (idleTimeout <= 0) return;
      if (idleTimer !== undefined) clearTimeout(idleTimer);
      idleTimer = setTimeout(
        () => connection.abort(new Error(`no data on the event stream for ${idleTimeout} ms`)),
        idleTimeout,
      );
    };
    let failure: unknown;
    let wait: number | undefined;
    try {
      const headers = new Headers(options.headers);
      headers.set("accept", "text/event-stream");
      headers.set("cache-control", "no-cache");
      if (options.token !== undefined) headers.set("authorization", `Bearer ${options.token}`);
      if (last !== undefined) headers.set("last-event-id", String(last));
      resetIdle();
      const response = await fetchFn(url, { headers, signal: connection.signal });
      if (!response.ok) {
        const error = new DeploydError(response.status, await readErrorBody(response), undefined, response.headers);
        if (!retryable(response.status)) throw new Fatal(error);
        failure = error;
        wait = retryAfterMs(response.headers);
      } else if (!(response.headers.get("content-type") ?? "").toLowerCase().startsWith("text/event-stream")) {
        await response.body?.cancel().catch(() => undefined);
        throw new Fatal(
          new Error(`expected text/event-stream from ${url}, got ${response.headers.get("content-type") ?? "no content type"}`),
        );
      } else if (response.body === null) {
        failure = new Error("the event stream had no body");
      } else {
        for await (const message of parseSse(response.body, resetIdle)) {
          let line: EventLine;
          try {
            line = JSON.parse(message.data) as EventLine;
          } catch (err) {
            throw new Fatal(new Error(`an event of ${url} is not JSON: ${message.data.slice(0, 200)}`, { cause: err }));
          }
          const seq = typeof line.seq === "number" ? line.seq : Number(message.id);
          if (!Number.isSafeInteger(seq)) {
            throw new Fatal(new Error(`an event of ${url} has no sequence number: ${message.data.slice(0, 200)}`));
          }
          // Never twice: a resumed stream starts after `last`, this only guards against a server
          // that would repeat itself.
          if (last !== undefined && seq <= last) continue;
          last = seq;
          failures = 0;
          yield line;
          if (line.type !== "event") return;
        }
        failure = new Error("the event stream ended before the task's last entry");
      }
    } catch (err) {
      if (err instanceof Fatal) throw err.error;
      if (signal?.aborted) throw abortReason(signal);
      // A network error, a connection cut, or the idle timeout: connect again.
      failure = connection.signal.aborted ? connection.signal.reason : err;
    } finally {
      if (idleTimer !== undefined) clearTimeout(idleTimer);
      signal?.removeEventListener("abort", onAbort);
      // Closes the connection when the consumer left early or the stream ended.
      connection.abort();
    }

    failures += 1;
    if (failures > maxRetries) {
      throw new Error(
        `the event stream of task ${options.taskId} failed ${failures} times in a row; last error: ${describe(failure)}`,
        { cause: failure },
      );
    }
    const delayMs = wait ?? Math.min(maxDelay, initialDelay * 2 ** (failures - 1));
    options.onReconnect?.({ attempt: failures, lastEventId: last, delayMs, error: failure });
    await sleep(delayMs, signal);
  }
}

function describe(error: unknown): string {
  if (error instanceof Error) {
    const cause = (error as { cause?: unknown }).cause;
    return cause instanceof Error ? `${error.message} (${cause.message})` : error.message;
  }
  return String(error);
}
