export { DeploydClient } from "./client.js";
export type {
  CreateDeploymentOptions,
  Deployed,
  DeploydClientOptions,
  DeploymentName,
  DeploymentStatus,
  Diagnostic,
  ErrorBody,
  EventDefinition,
  ListTasksOptions,
  Root,
  SessionDefinition,
  Status,
  TaskDefinition,
  TaskInput,
  TaskResult,
  TaskSummary,
} from "./client.js";
export { DeploydError } from "./errors.js";
export { eventsUrl, streamEvents } from "./events.js";
export type { EventLine, ReconnectInfo, StreamEventsOptions } from "./events.js";
export { parseSse } from "./sse.js";
export type { SseMessage } from "./sse.js";
export type { components, operations, paths } from "./schema.js";
