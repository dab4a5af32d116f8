/**
 * The error every method of the client throws for an answer that is not a success, and that
 * `streamEvents` throws for an answer it does not retry.
 *
 * deployd's error bodies are `{"detail": "<message>"}` (plus `diagnostics` for a deployment file
 * that does not load); `detail` is copied here when the body has one.
 */
export class DeploydError extends Error {
  /** The HTTP status of the answer (401, 404, 502, …). */
  readonly status: number;
  /** The `detail` of deployd's error body, when it had one. */
  readonly detail: string | undefined;
  /** The whole error body: parsed JSON when it was JSON, else its text (or `undefined`). */
  readonly body: unknown;
  /** The answer's headers (e.g. `www-authenticate` on a 401, `retry-after` on a 429). */
  readonly headers: Headers | undefined;

  constructor(status: number, body: unknown, message?: string, headers?: Headers) {
    const detail =
      body !== null && typeof body === "object" && typeof (body as { detail?: unknown }).detail === "string"
        ? (body as { detail: string }).detail
        : typeof body === "string" && body.length > 0
          ? body
          : undefined;
    super(message ?? `deployd answered ${status}${detail !== undefined ? `: ${detail}` : ""}`);
    this.name = "DeploydError";
    this.status = status;
    this.detail = detail;
    this.body = body;
    this.headers = headers;
  }
}

/** Reads an error answer's body: JSON when it parses, else its text. */
export async function readErrorBody(response: Response): Promise<unknown> {
  let text: string;
  try {
    text = await response.text();
  } catch {
    return undefined;
  }
  if (text.length === 0) return undefined;
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return text;
  }
}
