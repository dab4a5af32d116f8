/**
 * A typed client of deployd's HTTP API, on `openapi-fetch` and the types that
 * `openapi-typescript` generated from deployd's OpenAPI document (`src/schema.ts`).
 *
 * Every method resolves to the answer's body and throws a `DeploydError` (with the HTTP
 * `status`, deployd's `detail` and the whole body) for any answer that is not a success. A
 * network failure rejects with `fetch`'s own error. `raw` is the underlying `openapi-fetch`
 * client, typed for every route of the document, for what the methods do not cover.
 */
import createClient, { type Client } from "openapi-fetch";
import { DeploydError } from "./errors.js";
import { streamEvents, type EventLine, type StreamEventsOptions } from "./events.js";
import type { components, paths } from "./schema.js";

type Schemas = components["schemas"];
export type Root = Schemas["Root"];
export type Status = Schemas["Status"];
export type DeploymentName = Schemas["DeploymentName"];
export type DeploymentStatus = Schemas["DeploymentStatus"];
export type Deployed = Schemas["Deployed"];
export type TaskDefinition = Schemas["TaskDefinition"];
export type TaskResult = Schemas["TaskResult"];
export type TaskSummary = Schemas["TaskSummary"];
export type EventDefinition = Schemas["EventDefinition"];
export type SessionDefinition = Schemas["SessionDefinition"];
export type ErrorBody = Schemas["ErrorBody"];
export type Diagnostic = Schemas["Diagnostic"];

export interface DeploydClientOptions {
  /** deployd's URL, e.g. `http://127.0.0.1:4501`; a path prefix (behind a proxy) is kept. */
  baseUrl: string | URL;
  /** The token (`DEPLOYD_TOKEN` or the task token), sent as `Authorization: Bearer <token>`. */
  token?: string | undefined;
  /** More headers for every request. */
  headers?: Record<string, string> | undefined;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof globalThis.fetch | undefined;
}

/** `POST /deployments/create`'s query. */
export interface CreateDeploymentOptions {
  /** The folder on the server's machine that the file's local sources are relative to. */
  basePath?: string | undefined;
  /** Replace a deployment of the same name. */
  reload?: boolean | undefined;
  /** Answer once every service serves (the server's default, `true`), or once the sources are
   * synced (`false`). */
  wait?: boolean | undefined;
}

/** `GET /deployments/{name}/tasks`'s paging. */
export interface ListTasksOptions {
  /** At most this many tasks (1 to 1000). */
  limit?: number | undefined;
  /** The tasks after this task id (the last of the previous page). */
  after?: string | undefined;
}

/** A task to create or run; `input` is the keyword arguments as a JSON string or an object. */
export type TaskInput = Omit<TaskDefinition, "task_id" | "input"> & {
  input?: string | Record<string, unknown> | undefined;
};

type Outcome<T> = { data?: T; error?: unknown; response: Response };

/** The body of a success, or a `DeploydError` for anything else. */
function ok<T>(outcome: Outcome<T>): T {
  if (!outcome.response.ok) {
    throw new DeploydError(outcome.response.status, outcome.error, undefined, outcome.response.headers);
  }
  return outcome.data as T;
}

export class DeploydClient {
  /** deployd's URL, without a trailing slash. */
  readonly baseUrl: string;
  /** The `openapi-fetch` client, typed from deployd's OpenAPI document. */
  readonly raw: Client<paths>;
  readonly #token: string | undefined;
  readonly #headers: Record<string, string> | undefined;
  readonly #fetch: typeof globalThis.fetch | undefined;

  constructor(options: DeploydClientOptions) {
    this.baseUrl = String(options.baseUrl).replace(/\/+$/, "");
    this.#token = options.token;
    this.#headers = options.headers;
    this.#fetch = options.fetch;
    const headers: Record<string, string> = { ...options.headers };
    if (options.token !== undefined) headers["authorization"] = `Bearer ${options.token}`;
    const fetchFn = options.fetch;
    this.raw = createClient<paths>({
      baseUrl: this.baseUrl,
      headers,
      // Looked up at each call, so that a `fetch` replaced later (tests, polyfills) is used.
      fetch: (request: Request) => (fetchFn ?? globalThis.fetch)(request),
    });
  }

  /** `GET /`: where the docs and health check are, and which server answers. */
  async root(): Promise<Root> {
    return ok(await this.raw.GET("/"));
  }

  /** `GET /status/`: the server's health (and its deployments, for a caller with a token). */
  async status(): Promise<Status> {
    return ok(await this.raw.GET("/status/"));
  }

  /** `GET /deployments/`. */
  async listDeployments(): Promise<DeploymentName[]> {
    return ok(await this.raw.GET("/deployments/"));
  }

  /** `GET /deployments/{name}`: the deployment's services and their state. */
  async getDeployment(name: string): Promise<DeploymentStatus> {
    return ok(await this.raw.GET("/deployments/{name}", { params: { path: { name } } }));
  }

  /**
   * `POST /deployments/create`: deploys a deployment file, given as its text (sent as
   * `application/yaml`; JSON is YAML too) or as an object (sent as JSON).
   */
  async createDeployment(file: string | Record<string, unknown>, options: CreateDeploymentOptions = {}): Promise<Deployed> {
    const query = {
      ...(options.basePath !== undefined ? { base_path: options.basePath } : {}),
      ...(options.reload !== undefined ? { reload: options.reload } : {}),
      ...(options.wait !== undefined ? { wait: options.wait } : {}),
    };
    if (typeof file === "string") {
      return ok(
        await this.raw.POST("/deployments/create", {
          params: { query },
          // The document lists JSON and multipart bodies; the server reads YAML as well.
          body: file as unknown as Record<string, unknown>,
          bodySerializer: (body: unknown) => body as string,
          headers: { "content-type": "application/yaml" },
        }),
      );
    }
    return ok(await this.raw.POST("/deployments/create", { params: { query }, body: file }));
  }

  /** `DELETE /deployments/{name}`: stops its services and forgets its tasks and sessions. */
  async deleteDeployment(name: string): Promise<DeploymentName> {
    return ok(await this.raw.DELETE("/deployments/{name}", { params: { path: { name } } }));
  }

  /** `POST /deployments/{d}/tasks/create`: queues a task; answers it with its `task_id`,
   * `session_id` and `service_id`. */
  async createTask(deployment: string, task: TaskInput = {}, options: { sessionId?: string } = {}): Promise<TaskDefinition> {
    return ok(
      await this.raw.POST("/deployments/{name}/tasks/create", {
        params: {
          path: { name: deployment },
          query: options.sessionId !== undefined ? { session_id: options.sessionId } : {},
        },
        body: task,
      }),
    );
  }

  /** `POST /deployments/{d}/tasks/run`: runs a task and answers its result (as JSON) once it
   * ends; a failed task is a `DeploydError` with status 502, a run that waited the server's
   * limit one with 504. */
  async runTask(deployment: string, task: TaskInput = {}, options: { sessionId?: string } = {}): Promise<unknown> {
    return ok(
      await this.raw.POST("/deployments/{name}/tasks/run", {
        params: {
          path: { name: deployment },
          query: options.sessionId !== undefined ? { session_id: options.sessionId } : {},
        },
        body: task,
      }),
    );
  }

  /** `GET /deployments/{d}/tasks`: the tasks, oldest first (one page with `limit`/`after`). */
  async listTasks(deployment: string, options: ListTasksOptions = {}): Promise<TaskDefinition[]> {
    const query = {
      ...(options.limit !== undefined ? { limit: options.limit } : {}),
      ...(options.after !== undefined ? { after: options.after } : {}),
    };
    return ok(await this.raw.GET("/deployments/{name}/tasks", { params: { path: { name: deployment }, query } }));
  }

  /**
   * `GET /deployments/{d}/tasks/{id}/results`: the task's result. By default the server waits
   * for the task to end (at most its run timeout, then `null`); with `wait: false`, `null` at
   * once while the task runs.
   */
  async getTaskResult(deployment: string, taskId: string, options: { wait?: boolean } = {}): Promise<TaskResult | null> {
    const result = ok(
      await this.raw.GET("/deployments/{name}/tasks/{task_id}/results", {
        params: {
          path: { name: deployment, task_id: taskId },
          query: options.wait !== undefined ? { wait: options.wait } : {},
        },
      }),
    );
    return result ?? null;
  }

  /** `GET /deployments/{d}/tasks/{id}`: the task as deployd keeps it (status, times, input,
   * outcome). */
  async getTask(deployment: string, taskId: string): Promise<TaskSummary> {
    return ok(
      await this.raw.GET("/deployments/{name}/tasks/{task_id}", {
        params: { path: { name: deployment, task_id: taskId } },
      }),
    );
  }

  /** `POST /deployments/{d}/tasks/{id}/cancel`: cancels a queued or running task, whose log
   * then ends with a `cancelled` entry; 409 when the task has already ended. */
  async cancelTask(deployment: string, taskId: string): Promise<TaskSummary> {
    return ok(
      await this.raw.POST("/deployments/{name}/tasks/{task_id}/cancel", {
        params: { path: { name: deployment, task_id: taskId } },
      }),
    );
  }

  /** `POST /deployments/{d}/tasks/{id}/events`: sends an event into a running task (a
   * human's answer). */
  async sendEvent(deployment: string, taskId: string, event: EventDefinition): Promise<EventDefinition> {
    return ok(
      await this.raw.POST("/deployments/{name}/tasks/{task_id}/events", {
        params: { path: { name: deployment, task_id: taskId } },
        body: event,
      }),
    );
  }

  /** A task's events as server-sent events, resumed across dropped connections: see
   * `streamEvents` in `events.ts`. */
  streamEvents(
    deployment: string,
    taskId: string,
    options: Omit<StreamEventsOptions, "baseUrl" | "deployment" | "taskId" | "token" | "fetch"> = {},
  ): AsyncGenerator<EventLine, void, undefined> {
    return streamEvents({
      ...options,
      headers: { ...this.#headers, ...options.headers },
      baseUrl: this.baseUrl,
      deployment,
      taskId,
      token: this.#token,
      fetch: this.#fetch,
    });
  }

  /** `GET /deployments/{d}/sessions`. */
  async listSessions(deployment: string): Promise<SessionDefinition[]> {
    return ok(await this.raw.GET("/deployments/{name}/sessions", { params: { path: { name: deployment } } }));
  }

  /** `GET /deployments/{d}/sessions/{id}`. */
  async getSession(deployment: string, sessionId: string): Promise<SessionDefinition> {
    return ok(
      await this.raw.GET("/deployments/{name}/sessions/{session_id}", {
        params: { path: { name: deployment, session_id: sessionId } },
      }),
    );
  }

  /** `POST /deployments/{d}/sessions/create`. */
  async createSession(deployment: string): Promise<SessionDefinition> {
    return ok(await this.raw.POST("/deployments/{name}/sessions/create", { params: { path: { name: deployment } } }));
  }

  /** `POST /deployments/{d}/sessions/delete?session_id=…`. */
  async deleteSession(deployment: string, sessionId: string): Promise<void> {
    ok(
      await this.raw.POST("/deployments/{name}/sessions/delete", {
        params: { path: { name: deployment }, query: { session_id: sessionId } },
      }),
    );
  }

  /** `GET /deployments/{d}/services/{s}/logs`: the last `tail` lines of a service's output. */
  async serviceLogs(deployment: string, service: string, options: { tail?: number; replica?: number } = {}): Promise<string> {
    const query = {
      ...(options.tail !== undefined ? { tail: options.tail } : {}),
      ...(options.replica !== undefined ? { replica: options.replica } : {}),
    };
    return ok(
      await this.raw.GET("/deployments/{name}/services/{service}/logs", {
        params: { path: { name: deployment, service }, query },
        parseAs: "text",
      }),
    );
  }

  /** `GET /status/metrics`: Prometheus text. */
  async metrics(): Promise<string> {
    return ok(await this.raw.GET("/status/metrics", { parseAs: "text" }));
  }
}
