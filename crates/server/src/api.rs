//! The routes.

use std::path::PathBuf;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use deployd_manager::{EventKind, Manager, NewTask, SessionInfo, TaskEvent, TaskInfo, TaskStatus};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::wire::{EventLine, TaskDefinition, TaskResult, result_text};

/// The largest request body accepted.
const MAX_BODY: usize = deployd_config::MAX_FILE_SIZE + 64 * 1024;

type ApiResult<T> = Result<T, ApiError>;

/// The API's routes over `manager`.
pub fn router(manager: Manager) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/status", get(status))
        .route("/status/", get(status))
        .route("/deployments", get(list_deployments))
        .route("/deployments/", get(list_deployments))
        .route("/deployments/create", post(create_deployment))
        .route(
            "/deployments/{name}",
            get(get_deployment).delete(delete_deployment),
        )
        .route("/deployments/{name}/delete", delete(delete_deployment))
        .route("/deployments/{name}/tasks", get(list_tasks))
        .route("/deployments/{name}/tasks/create", post(create_task))
        .route("/deployments/{name}/tasks/run", post(run_task))
        .route(
            "/deployments/{name}/tasks/{task_id}/results",
            get(task_result),
        )
        .route(
            "/deployments/{name}/tasks/{task_id}/events",
            get(task_events).post(send_event),
        )
        .route("/deployments/{name}/sessions", get(list_sessions))
        .route("/deployments/{name}/sessions/", get(list_sessions))
        .route("/deployments/{name}/sessions/create", post(create_session))
        .route("/deployments/{name}/sessions/delete", post(delete_session))
        .route(
            "/deployments/{name}/sessions/{session_id}",
            get(get_session),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }))
        .with_state(manager)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not Found")
}

/// `Query` with a JSON error.
struct Q<T>(T);

impl<T, S> axum::extract::FromRequestParts<S> for Q<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Q(value))
            .map_err(|err: QueryRejection| ApiError::bad_request(err.body_text()))
    }
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    body.map(|Json(value)| value)
        .map_err(|err| ApiError::new(err.status(), err.body_text()))
}

async fn root() -> Json<Value> {
    Json(json!({
        "name": "deployd",
        "version": env!("CARGO_PKG_VERSION"),
        "links": { "status": "/status/", "deployments": "/deployments/" },
    }))
}

async fn status(State(manager): State<Manager>) -> Json<Value> {
    Json(json!({
        "status": "Healthy",
        "status_message": "",
        "max_deployments": manager.options().max_deployments,
        "deployments": manager.list(),
    }))
}

async fn list_deployments(State(manager): State<Manager>) -> Json<Value> {
    Json(Value::Array(
        manager
            .list()
            .into_iter()
            .map(|name| json!({ "name": name }))
            .collect(),
    ))
}

async fn get_deployment(
    State(manager): State<Manager>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let status = manager.status(&name)?;
    Ok(Json(json!(status)))
}

async fn delete_deployment(
    State(manager): State<Manager>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    manager.delete(&name).await?;
    Ok(Json(json!({ "name": name })))
}

#[derive(Debug, Deserialize)]
struct CreateParams {
    base_path: Option<String>,
    #[serde(default)]
    reload: bool,
    #[serde(default)]
    #[allow(dead_code)]
    local: bool,
}

async fn create_deployment(
    State(manager): State<Manager>,
    Q(params): Q<CreateParams>,
    request: Request,
) -> ApiResult<Response> {
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (text, origin) = if is_multipart {
        read_multipart(request).await?
    } else {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(|err| ApiError::new(err.status(), err.body_text()))?;
        (utf8(body.to_vec())?, "deployment.yaml".to_owned())
    };
    let base = match params.base_path {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => std::env::current_dir()
            .map_err(|err| ApiError::bad_request(format!("no base_path given: {err}")))?,
    };
    let deployed = manager.deploy(&text, &origin, &base, params.reload).await?;
    Ok((
        StatusCode::OK,
        Json(json!({ "name": deployed.status.name, "warnings": deployed.warnings })),
    )
        .into_response())
}

async fn read_multipart(request: Request) -> ApiResult<(String, String)> {
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|err| ApiError::bad_request(err.body_text()))?;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|err| ApiError::bad_request(err.body_text()))?
    {
        if field.name() == Some("config_file") {
            let origin = field
                .file_name()
                .filter(|n| !n.is_empty())
                .unwrap_or("deployment.yaml")
                .to_owned();
            let bytes = field
                .bytes()
                .await
                .map_err(|err| ApiError::bad_request(err.body_text()))?;
            return Ok((utf8(bytes.to_vec())?, origin));
        }
    }
    Err(ApiError::bad_request(
        "the multipart body has no `config_file` field",
    ))
}

fn utf8(bytes: Vec<u8>) -> ApiResult<String> {
    String::from_utf8(bytes).map_err(|err| {
        ApiError::bad_request(format!(
            "the deployment file is not UTF-8 (invalid byte at offset {})",
            err.utf8_error().valid_up_to()
        ))
    })
}

#[derive(Debug, Default, Deserialize)]
struct SessionParam {
    session_id: Option<String>,
}

/// Parses a `TaskDefinition`'s input: a JSON string of keyword arguments, or an object.
fn task_input(input: Value) -> ApiResult<Value> {
    match input {
        Value::Null => Ok(json!({})),
        Value::String(text) if text.trim().is_empty() => Ok(json!({})),
        Value::String(text) => serde_json::from_str(&text).map_err(|err| {
            ApiError::bad_request(format!(
                "`input` must be a JSON string of keyword arguments: {err}"
            ))
        }),
        other => Ok(other),
    }
}

fn definition(task: &TaskInfo, input: Value) -> TaskDefinition {
    TaskDefinition {
        input,
        task_id: Some(task.id.clone()),
        session_id: Some(task.session_id.clone()),
        service_id: Some(task.service.clone()),
    }
}

async fn new_task(
    manager: &Manager,
    name: &str,
    session: SessionParam,
    body: Result<Json<TaskDefinition>, JsonRejection>,
) -> ApiResult<(TaskInfo, Value)> {
    let body = json_body(body)?;
    let raw_input = body.input.clone();
    let task = manager
        .create_task(
            name,
            NewTask {
                service: body.service_id,
                session_id: body.session_id.or(session.session_id),
                input: task_input(body.input)?,
            },
        )
        .await?;
    let input = match raw_input {
        Value::Null => Value::String(String::new()),
        other => other,
    };
    Ok((task, input))
}

async fn create_task(
    State(manager): State<Manager>,
    Path(name): Path<String>,
    Q(session): Q<SessionParam>,
    body: Result<Json<TaskDefinition>, JsonRejection>,
) -> ApiResult<Json<TaskDefinition>> {
    let (task, input) = new_task(&manager, &name, session, body).await?;
    Ok(Json(definition(&task, input)))
}

async fn run_task(
    State(manager): State<Manager>,
    Path(name): Path<String>,
    Q(session): Q<SessionParam>,
    body: Result<Json<TaskDefinition>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let (task, _) = new_task(&manager, &name, session, body).await?;
    let task = manager.wait_task(&name, &task.id).await?;
    match task.status {
        TaskStatus::Succeeded => Ok(Json(task.result.unwrap_or(Value::Null))),
        TaskStatus::Failed => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "task {} failed: {}",
                task.id,
                task.error.as_deref().unwrap_or("unknown error")
            ),
        )),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "deployd is shutting down; the task will run after it restarts",
        )),
    }
}

fn task_definition_of(task: &TaskInfo) -> TaskDefinition {
    let input = Value::String(task.input.to_string());
    definition(task, input)
}

async fn list_tasks(
    State(manager): State<Manager>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<TaskDefinition>>> {
    let tasks = manager.tasks(&name).await?;
    Ok(Json(tasks.iter().map(task_definition_of).collect()))
}

async fn task_result(
    State(manager): State<Manager>,
    Path((name, task_id)): Path<(String, String)>,
) -> ApiResult<Json<Option<TaskResult>>> {
    manager.status(&name)?;
    let task = manager.task(&name, &task_id).await?;
    let result = match task.status {
        TaskStatus::Succeeded => Some(TaskResult {
            task_id: task.id,
            history: Vec::new(),
            result: task.result.as_ref().map(result_text).unwrap_or_default(),
            data: json!({}),
            status: "succeeded".to_owned(),
            error: None,
        }),
        TaskStatus::Failed => Some(TaskResult {
            task_id: task.id,
            history: Vec::new(),
            result: String::new(),
            data: json!({}),
            status: "failed".to_owned(),
            error: task.error,
        }),
        _ => None,
    };
    Ok(Json(result))
}

#[derive(Debug, Default, Deserialize)]
struct EventParams {
    #[serde(default)]
    #[allow(dead_code)]
    session_id: Option<String>,
    #[serde(default)]
    raw_event: bool,
    /// The last sequence number the client saw; the stream starts after it.
    #[serde(default)]
    after: u64,
}

async fn task_events(
    State(manager): State<Manager>,
    Path((name, task_id)): Path<(String, String)>,
    Q(params): Q<EventParams>,
) -> ApiResult<Response> {
    manager.status(&name)?;
    let events = manager.task_events(&name, &task_id, params.after).await?;
    let raw = params.raw_event;
    let lines = ReceiverStream::new(events).map(move |event: TaskEvent| {
        let value = if raw {
            event.data
        } else {
            json!(EventLine {
                seq: event.seq,
                kind: match event.kind {
                    EventKind::Event => "event",
                    EventKind::Result => "result",
                    EventKind::Error => "error",
                }
                .to_owned(),
                data: event.data,
            })
        };
        let mut line = value.to_string();
        line.push('\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

fn session_definition(session: SessionInfo) -> Value {
    json!({
        "session_id": session.id,
        "task_ids": session.task_ids,
        "state": session.state.unwrap_or_else(|| json!({})),
    })
}

async fn list_sessions(
    State(manager): State<Manager>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Value>>> {
    let sessions = manager.sessions(&name).await?;
    Ok(Json(sessions.into_iter().map(session_definition).collect()))
}

async fn get_session(
    State(manager): State<Manager>,
    Path((name, session_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(session_definition(
        manager.session(&name, &session_id).await?,
    )))
}

async fn create_session(
    State(manager): State<Manager>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(session_definition(
        manager.create_session(&name).await?,
    )))
}

async fn delete_session(
    State(manager): State<Manager>,
    Path(name): Path<String>,
    Q(session): Q<SessionParam>,
) -> ApiResult<Json<Value>> {
    let Some(id) = session.session_id else {
        return Err(ApiError::bad_request("`session_id` is required"));
    };
    manager.delete_session(&name, &id).await?;
    Ok(Json(Value::Null))
}

/// llama_deploy's `EventDefinition`.
#[derive(Debug, Deserialize, serde::Serialize)]
struct EventDefinition {
    #[serde(default)]
    service_id: Option<String>,
    event_obj_str: String,
}

async fn send_event(
    State(manager): State<Manager>,
    Path((name, task_id)): Path<(String, String)>,
    body: Result<Json<EventDefinition>, JsonRejection>,
) -> ApiResult<Json<EventDefinition>> {
    let event = json_body(body)?;
    // A serialized event is usually JSON; anything else is passed on as a string.
    let data = serde_json::from_str(&event.event_obj_str)
        .unwrap_or_else(|_| Value::String(event.event_obj_str.clone()));
    manager.send_event(&name, &task_id, data).await?;
    Ok(Json(event))
}
