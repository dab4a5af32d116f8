//! The JSON of deployd's HTTP API: every body a request sends and every body an answer carries,
//! errors included, with their OpenAPI schemas (`utoipa`).
//!
//! The server (`deployd-server`) writes and reads these types and its typed client reads them
//! back; nothing of the manager is serialized onto the wire, so the manager's types can change
//! without changing the API. The names and fields of llama_deploy 0.9's bodies
//! (`TaskDefinition`, `TaskResult`, `SessionDefinition`, `EventDefinition`, `Status`) are
//! kept, so that its CLI and client read deployd's answers unchanged.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `GET /`: where the API's description and health check are (llama_deploy's two keys), and
/// which server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Root {
    /// The page that describes the API (`…/docs`).
    pub swagger_docs: String,
    /// The health check (`…/status`).
    pub status: String,
    /// The OpenAPI document (`…/openapi.json`).
    pub openapi: String,
    /// Always `deployd`.
    pub name: String,
    /// deployd's version.
    pub version: String,
}

/// `GET /status/`: the server's health and, for a caller with a token (or of a server without
/// tokens), its deployments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// `Healthy` while the server takes requests.
    pub status: String,
    /// Empty while healthy.
    #[serde(default)]
    pub status_message: String,
    /// The most deployments the server runs at once (absent for an anonymous caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deployments: Option<u64>,
    /// The names of the deployments (absent for an anonymous caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployments: Option<Vec<String>>,
    /// The cluster this node is part of, with its nodes (absent for a node alone, and for an
    /// anonymous caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// The cluster a node is part of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub name: String,
    /// The id of the node that answers.
    pub node: String,
    /// Every node with a lease in the store, live or not, by id.
    pub nodes: Vec<NodeStatus>,
}

/// A node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    /// The node's id.
    pub id: String,
    /// Where its HTTP API is reached, when it said (`--advertise`).
    #[serde(default)]
    pub address: Option<String>,
    /// Its deployd version (and store schema version).
    pub version: String,
    /// Whether its lease holds: it renewed it within the lease's length.
    pub live: bool,
    /// Whether it is the node that answers.
    pub this_node: bool,
    /// When it joined, in ms since the Unix epoch (the store's clock).
    pub started_ms: i64,
    /// How long its lease still holds, in ms (negative: expired that long ago).
    pub lease_left_ms: i64,
}

/// A deployment named in a list, or the deployment a delete removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentName {
    /// The deployment's name.
    pub name: String,
}

/// `POST /deployments/create`: the deployment that was deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Deployed {
    /// The deployment's name (its file's `name`).
    pub name: String,
    /// What the user should know about the file: keys accepted and ignored, settings not acted
    /// on.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Started, not yet answering its health check.
    Starting,
    /// Healthy: taking tasks.
    Ready,
    /// Exited or unhealthy; waiting before the next start.
    Restarting,
    /// Restarted too often, or ended and not to be restarted after a failure; given up on.
    Failed,
    /// Ended successfully and not restarted (restart policy `on-failure` or `never`).
    Exited,
    /// Stopped by deployd.
    Stopped,
    /// Not started yet: its deploy is under way.
    Pending,
}

/// The state of one service of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceStatus {
    /// The service id.
    pub id: String,
    /// Where it is in its life.
    pub phase: Phase,
    /// The process id of its current process, if one runs.
    pub pid: Option<u32>,
    /// The port it listens on (on 127.0.0.1).
    pub port: u16,
    /// How many times it has been restarted.
    pub restarts: u32,
    /// Why its last process ended, if one did.
    pub last_exit: Option<String>,
    /// Where the service is in its latest deploy.
    #[serde(default)]
    pub stage: Option<StageStatus>,
    /// With `replicas` above 1, each replica's process; the fields above are then the first
    /// replica's, except `phase` (`ready` while any replica is) and `restarts` (added up).
    /// Empty for a single process.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaStatus {
    /// Where it is in its life.
    pub phase: Phase,
    /// Its process id, if one runs.
    pub pid: Option<u32>,
    /// The port it listens on (on 127.0.0.1).
    pub port: u16,
    /// How many times it has been restarted.
    pub restarts: u32,
    /// Why its last process ended, if one did.
    pub last_exit: Option<String>,
}

/// Where a service is in the deploy pipeline (sync → prepare → launch → ready → switch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StageStatus {
    /// The stage it is in, waits for, failed in, or (when done) went through last.
    pub stage: String,
    /// `waiting`, `running`, `done` or `failed`.
    pub state: String,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// `GET /deployments/{name}`: the state of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentStatus {
    /// The deployment's name.
    pub name: String,
    /// The service that takes tasks naming none.
    pub default_service: String,
    /// Whether a deploy of it is under way.
    #[serde(default)]
    pub deploying: bool,
    /// The message queue its tasks go through (`in-memory`, `Redis at redis://…`), without
    /// credentials.
    #[serde(default)]
    pub message_queue: String,
    /// Its services, in the order of the file.
    pub services: Vec<ServiceStatus>,
    /// The process of its UI (the file's `ui:` section, served at `/deployments/{name}/ui`),
    /// when it has one; its `id` is `@ui`.
    #[serde(default)]
    pub ui: Option<ServiceStatus>,
}

/// llama_deploy's `TaskDefinition`: a task to create, and the task created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskDefinition {
    /// The task's keyword arguments as a JSON string (an object is accepted too); the workflow
    /// runs as `run(**input)`.
    #[serde(default)]
    pub input: Value,
    /// Filled in by the server.
    #[serde(default)]
    pub task_id: Option<String>,
    /// The session to run in; a new one when absent.
    #[serde(default)]
    pub session_id: Option<String>,
    /// The service to run it; the default service when absent. `agent_id` is the older name.
    #[serde(default, alias = "agent_id")]
    pub service_id: Option<String>,
}

/// llama_deploy's `TaskResult`, plus deployd's `status` and `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskResult {
    /// The task.
    pub task_id: String,
    /// Always empty; kept for llama_deploy clients.
    #[serde(default)]
    pub history: Vec<Value>,
    /// The result as text: a string result as it is, anything else as JSON.
    pub result: String,
    /// Extra data; empty.
    #[serde(default)]
    pub data: Value,
    /// `succeeded`, `failed` or `cancelled`.
    #[serde(default)]
    pub status: String,
    /// The error of a failed task (of a cancelled one: who cancelled it).
    #[serde(default)]
    pub error: Option<String>,
}

/// One line of deployd's own event stream (`envelope=true`, and the `data` of each
/// server-sent event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventLine {
    /// Position in the task's log, from 1: pass the last one seen as `after` (or
    /// `Last-Event-ID`) to resume.
    pub seq: u64,
    /// `event`, `result`, `error` or `cancelled`; the last three end the stream.
    #[serde(rename = "type")]
    pub kind: String,
    /// The event's data, the result, or the error message.
    pub data: Value,
    /// The attempt that wrote the entry (from 1; 0 for an error written without running the
    /// task): the events of an attempt that broke off stay in the log, marked with it.
    #[serde(default)]
    pub attempt: u32,
}

/// A task as deployd keeps it: where it is, when it was created and changed, its input and
/// outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskSummary {
    /// The task.
    pub task_id: String,
    /// The service that runs it.
    pub service: String,
    /// The session it runs in.
    pub session_id: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// How many times it has been handed to its service.
    pub attempt: u32,
    /// When it was created (ms since the epoch).
    pub created_at: i64,
    /// When its status last changed (ms since the epoch).
    pub updated_at: i64,
    /// Its input, as given.
    pub input: Value,
    /// Its result, once it succeeded.
    pub result: Option<Value>,
    /// Its error once it failed; who cancelled it once cancelled.
    pub error: Option<String>,
}

/// One page of a task search, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    /// The tasks.
    pub tasks: Vec<TaskSummary>,
    /// Pass as `before` for the next (older) page; `null` on the last page.
    pub next: Option<String>,
}

/// One page of a session search, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionPage {
    /// The sessions.
    pub sessions: Vec<SessionDefinition>,
    /// Pass as `before` for the next (older) page; `null` on the last page.
    pub next: Option<String>,
}

/// What a revision's service ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevisionSource {
    /// The digest of its synced source tree.
    pub digest: String,
    /// The commit, for a git source.
    pub commit: Option<String>,
}

/// One deploy, reload or rollback of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevisionInfo {
    /// Its number, from 1.
    pub revision: u64,
    /// When it was made (ms since the epoch).
    pub created_at: i64,
    /// Who asked for it: `operator` (a file given to `serve`), or `client <address>`.
    pub by: String,
    /// `deploy`, `reload` or `rollback`.
    pub kind: String,
    /// Of a rollback: the revision it went back to.
    pub rollback_of: Option<u64>,
    /// `deploying`, then `deployed` or `failed`.
    pub outcome: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Each service's source, by service id.
    pub sources: std::collections::BTreeMap<String, RevisionSource>,
    /// The deployment file (only when one revision is asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<String>,
}

/// llama_deploy's `EventDefinition`: an event sent into a running task (a human's answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventDefinition {
    /// The service the event is for; the task's own when absent. `agent_id` (llama_deploy's
    /// name) is accepted for it.
    #[serde(default, alias = "agent_id")]
    pub service_id: Option<String>,
    /// The event, serialized as the workflow serializer writes it (usually JSON).
    pub event_obj_str: String,
}

/// llama_deploy's `SessionDefinition`: state carried from one task to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionDefinition {
    /// The session.
    pub session_id: String,
    /// The tasks run in it, oldest first.
    #[serde(default)]
    pub task_ids: Vec<String>,
    /// The state the last task left (`{}` before the first).
    #[serde(default)]
    pub state: Value,
}

/// Every error answer: `{"detail": …}` as FastAPI writes it, with a deployment file's
/// diagnostics when that is what failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub detail: String,
    /// Each problem found in a deployment file, with where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Vec<Diagnostic>>,
}

/// A problem found in a deployment file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Diagnostic {
    /// `error` or `warning`.
    pub severity: String,
    /// The file's name.
    pub file: String,
    /// The line, from 1, when known.
    pub line: Option<u64>,
    /// The column (in characters), from 1, when known.
    pub column: Option<u64>,
    /// The key at fault, as a path (`services.api.source`), when there is one.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to mend it, when there is a hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

/// The text form of a result: a string as it is, anything else as JSON.
pub fn result_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `POST /deployments/create` as a multipart form (what llamactl sends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentUpload {
    /// The deployment file (YAML); its file name names it in diagnostics.
    #[schema(value_type = String, format = Binary)]
    pub config_file: Vec<u8>,
}
