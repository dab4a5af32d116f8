//! The JSON of the API, as llama_deploy clients send and read it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// llama_deploy's `TaskDefinition`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskDefinition {
    /// The task's keyword arguments as a JSON string (an object is accepted too).
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// `succeeded` or `failed`.
    #[serde(default)]
    pub status: String,
    /// The error of a failed task.
    #[serde(default)]
    pub error: Option<String>,
}

/// One line of a task's event stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventLine {
    /// Position in the task's log, from 1: pass the last one seen as `after` to resume.
    pub seq: u64,
    /// `event`, `result` or `error`; the last two end the stream.
    #[serde(rename = "type")]
    pub kind: String,
    /// The event's data, the result, or the error message.
    pub data: Value,
    /// The attempt that wrote the entry (from 1; 0 for an error written without running the
    /// task): the events of an attempt that broke off stay in the log, marked with it.
    #[serde(default)]
    pub attempt: u32,
}

/// The text form of a result.
pub fn result_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}
