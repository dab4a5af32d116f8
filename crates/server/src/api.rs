//! The routes.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::QueryRejection;
use axum::extract::{
    DefaultBodyLimit, FromRef, FromRequest, FromRequestParts, Multipart, OriginalUri, Path, Query,
    Request, State,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Extension, Json, Router};
use deployd_api::{
    Deployed, DeploymentName, DeploymentStatus, DeploymentUpload, ErrorBody, EventDefinition,
    EventLine, RevisionInfo, RevisionSource, Root, SessionDefinition, SessionPage, Status,
    TaskDefinition, TaskPage, TaskResult, TaskSummary, result_text,
};
use deployd_manager::{
    Error, EventKind, Manager, NewTask, Revision, SessionInfo, TaskEvent, TaskFilter, TaskInfo,
    TaskRecord, TaskStatus,
};
use futures::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::Access;
use crate::error::ApiError;
use crate::logs;
use crate::metrics::Metrics;
use crate::openapi::{self, Additions};
use crate::options::ApiOptions;

/// The most tasks one page of `GET …/tasks` holds.
const MAX_PAGE: usize = 1000;

/// The size of a page of `GET …/tasks` when only `after` is given.
const DEFAULT_PAGE: usize = 100;

type ApiResult<T> = Result<T, ApiError>;

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    manager: Manager,
    options: Arc<ApiOptions>,
    /// Set once the server has been told to stop: a wait that ends then is cut by shutdown.
    shutting_down: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// A permit per open event stream (see `ApiOptions::max_streams`).
    streams: Arc<tokio::sync::Semaphore>,
    /// The client the UI proxy sends requests upstream with.
    ui_client: reqwest::Client,
}

impl AppState {
    /// A permit for one more event stream, or the 429 that refuses it.
    fn stream_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Box<Response>> {
        Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many event streams are open ({}, the most this deployd keeps); close \
                     one or retry later",
                    self.options.max_streams
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Box::new(response)
        })
    }
}

impl FromRef<AppState> for Manager {
    fn from_ref(state: &AppState) -> Self {
        state.manager.clone()
    }
}

/// The API's routes over `manager`, behind the request guard (see `ApiOptions`). Serve it
/// with `into_make_service_with_connect_info::<SocketAddr>()` (as [`crate::serve`] does):
/// without the client's address, every client is taken for one on another machine.
pub fn router(manager: Manager, options: ApiOptions) -> Router {
    routes(manager, options, Arc::default())
}

pub(crate) fn routes(
    manager: Manager,
    options: ApiOptions,
    shutting_down: Arc<AtomicBool>,
) -> Router {
    let cors = cors_layer(&options);
    let max_body = options.max_body_bytes;
    let streams = Arc::new(tokio::sync::Semaphore::new(options.max_streams));
    let options = Arc::new(options);
    let metrics = Arc::new(Metrics::default());
    let state = AppState {
        manager,
        options: Arc::clone(&options),
        shutting_down,
        metrics: Arc::clone(&metrics),
        streams,
        ui_client: crate::ui_proxy::client(),
    };
    let router = Router::new()
        .route("/", get(root))
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs_page))
        .route("/status", get(status))
        .route("/status/", get(status))
        .route("/status/metrics", get(metrics_page))
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
        .route("/deployments/{name}/tasks/search", get(search_tasks))
        .route("/deployments/{name}/tasks/{task_id}", get(get_task))
        .route(
            "/deployments/{name}/tasks/{task_id}/cancel",
            post(cancel_task),
        )
        .route(
            "/deployments/{name}/tasks/{task_id}/results",
            get(task_result),
        )
        .route("/deployments/{name}/revisions", get(list_revisions))
        .route(
            "/deployments/{name}/revisions/{revision}",
            get(get_revision),
        )
        .route("/deployments/{name}/rollback", post(rollback))
        .route("/console", get(crate::console::page))
        .route("/console/", get(crate::console::page))
        .route("/console/{*path}", get(crate::console::asset))
        .route(
            "/deployments/{name}/tasks/{task_id}/events",
            get(task_events).post(send_event),
        )
        .route(
            "/deployments/{name}/services/{service}/logs",
            get(service_logs),
        )
        .route(
            "/deployments/{name}/services/{service}/graph",
            get(service_graph),
        )
        .route("/deployments/{name}/ui", any(ui))
        .route("/deployments/{name}/ui/", any(ui))
        .route("/deployments/{name}/ui/{*path}", any(ui))
        .route("/deployments/{name}/sessions", get(list_sessions))
        .route("/deployments/{name}/sessions/", get(list_sessions))
        .route("/deployments/{name}/sessions/create", post(create_session))
        .route("/deployments/{name}/sessions/search", get(search_sessions))
        .route("/deployments/{name}/sessions/delete", post(delete_session))
        .route(
            "/deployments/{name}/sessions/{session_id}",
            get(get_session),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            options,
            crate::guard::guard,
        ))
        // Outside the guard: refused requests are traced and counted too.
        .layer(axum::middleware::from_fn(trace_request))
        .layer(axum::middleware::from_fn_with_state(metrics, count_request))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }));
    // Outermost: a preflight is answered before the guard and the token check (a browser sends
    // it without the token).
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
    .with_state(state)
}

/// CORS for the `--cors-origin` origins, none without them: the methods and headers the API
/// uses, the token in `Authorization` (no cookies, so no credentials mode; never `*`).
fn cors_layer(options: &ApiOptions) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::Method;
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if options.cors_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = options
        .cors_origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin.as_str()).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                axum::http::HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([header::LINK])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

/// `Path` with a JSON error.
struct P<T>(T);

impl<T, S> FromRequestParts<S> for P<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| P(value))
            .map_err(|err| ApiError::new(err.status(), err.body_text()))
    }
}

/// The IP address of the client, when the server was given it (see [`router`]).
struct Peer(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            ConnectInfo::<SocketAddr>::from_request_parts(parts, state)
                .await
                .ok()
                .map(|ConnectInfo(address)| address.ip()),
        ))
    }
}

/// A JSON body that must be an object (serde would take an array for a struct, field by field).
struct JsonObject<T>(T);

impl<T, S> FromRequest<S> for JsonObject<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<Value>::from_request(request, state)
            .await
            .map_err(|err| ApiError::new(err.status(), err.body_text()))?;
        if !value.is_object() {
            return Err(ApiError::bad_request(format!(
                "the request body must be a JSON object, not {}",
                kind_of(&value)
            )));
        }
        serde_json::from_value(value)
            .map(JsonObject)
            .map_err(|err| ApiError::bad_request(format!("invalid request body: {err}")))
    }
}

/// What a JSON value is, for a message.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
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

#[utoipa::path(get, path = "/", tag = "health",
    summary = "Where the API's description and health check are",
    responses((status = 200, description = "Links, as llama_deploy answers them", body = Root)))]
async fn root(headers: HeaderMap) -> Json<Root> {
    let base = openapi::base_url(&headers);
    Json(Root {
        swagger_docs: format!("{base}docs"),
        status: format!("{base}status"),
        openapi: format!("{base}openapi.json"),
        name: "deployd".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

#[utoipa::path(get, path = "/openapi.json", tag = "health",
    summary = "This document: the API in OpenAPI 3.1",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document_json(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/docs", tag = "health",
    summary = "This document as a web page",
    responses((status = 200, description = "The page", content_type = "text/html", body = String)))]
async fn docs_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        openapi::document_page(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/status/", tag = "health",
    summary = "Health, and the deployments for a caller with a token",
    description = "Open to every caller: without a token it answers `status` and \
`status_message` only. `/status` answers the same.",
    security((), ("token" = [])),
    responses(
        (status = 200, description = "The server is healthy", body = Status),
        (status = 503, description = "A node of a cluster that does not hold its lease in the \
cluster's store (the store is unreachable): `status` is `Unhealthy` and `status_message` says \
why", body = Status)))]
/// `GET /status/`: health to anyone; the deployments and the cluster's nodes only to a caller
/// with a token (or to any caller of an open API).
async fn status(State(manager): State<Manager>, access: Option<Extension<Access>>) -> Response {
    let mut status = Status {
        status: "Healthy".to_owned(),
        status_message: String::new(),
        max_deployments: None,
        deployments: None,
        cluster: None,
    };
    let health = manager.cluster_health();
    if let Some((_, Some(problem))) = &health {
        status.status = "Unhealthy".to_owned();
        status.status_message.clone_from(problem);
    }
    if !matches!(access, Some(Extension(Access::Anonymous))) {
        status.max_deployments = u64::try_from(manager.options().max_deployments).ok();
        status.deployments = Some(manager.list());
        if let Some((name, _)) = &health {
            // The nodes are read from the store, which may be what fails.
            let nodes = manager.nodes().await.ok().flatten().unwrap_or_default();
            status.cluster = Some(deployd_api::ClusterStatus {
                name: name.clone(),
                node: manager.node_id().to_owned(),
                nodes: nodes
                    .into_iter()
                    .map(|node| deployd_api::NodeStatus {
                        id: node.id,
                        address: node.address,
                        version: node.version,
                        live: node.live,
                        this_node: node.this_node,
                        started_ms: node.started_ms,
                        lease_left_ms: node.lease_left_ms,
                    })
                    .collect(),
            });
        }
    }
    let code = if status.status == "Healthy" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status)).into_response()
}

/// Counts a request for `/status/metrics` once its answer's head is ready.
async fn count_request(
    State(metrics): State<Arc<Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics.record(
        &method,
        &path,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// With tracing on (`--otlp-endpoint`), a server span per request: a child of the client's
/// `traceparent` when it sends one, and the parent of what the request does (a task it creates
/// carries it through the queue; see `deployd_manager::trace`).
async fn trace_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use deployd_manager::trace;
    use opentelemetry::context::FutureExt as _;
    use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
    use opentelemetry::{Context, KeyValue};
    if !trace::enabled() {
        return next.run(request).await;
    }
    let parent = request
        .headers()
        .get(trace::TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .and_then(trace::context_of)
        .unwrap_or_else(Context::new);
    let route = crate::metrics::route_of(request.uri().path());
    let method = request.method().as_str().to_owned();
    let tracer = opentelemetry::global::tracer(trace::TRACER);
    let span = tracer
        .span_builder(format!("{method} {route}"))
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("http.request.method", method),
            KeyValue::new("http.route", route),
            KeyValue::new("url.path", request.uri().path().to_owned()),
        ])
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);
    let response = next.run(request).with_context(cx.clone()).await;
    let span = cx.span();
    let status = response.status().as_u16();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    if status >= 500 {
        span.set_status(Status::error(format!("answered {status}")));
    }
    span.end();
    response
}

#[utoipa::path(get, path = "/status/metrics", tag = "health",
    summary = "Metrics in Prometheus's text format",
    responses((status = 200, description = "Prometheus's text format 0.0.4", content_type = "text/plain", body = String)))]
/// `GET /status/metrics`: Prometheus's text format (see `metrics.rs`).
async fn metrics_page(State(state): State<AppState>) -> ApiResult<Response> {
    let manager = &state.manager;
    let deployments: Vec<deployd_manager::DeploymentStatus> = manager
        .list()
        .into_iter()
        .filter_map(|name| manager.status(&name).ok())
        .collect();
    let tasks = manager.task_counts().await?;
    let durations = manager
        .task_durations(&crate::metrics::TASK_BUCKETS)
        .await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let page = state.metrics.render(
        state.shutting_down.load(Ordering::SeqCst),
        &deployments,
        &tasks,
        &durations,
        now_ms,
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        page,
    )
        .into_response())
}

#[utoipa::path(get, path = "/deployments/", tag = "deployments",
    summary = "The deployments", description = "`/deployments` answers the same.",
    responses((status = 200, description = "Each deployment's name", body = Vec<DeploymentName>)))]
async fn list_deployments(State(manager): State<Manager>) -> Json<Vec<DeploymentName>> {
    Json(
        manager
            .list()
            .into_iter()
            .map(|name| DeploymentName { name })
            .collect(),
    )
}

#[utoipa::path(get, path = "/deployments/{name}", tag = "deployments",
    summary = "A deployment's state: its services, their phase, stage and restarts",
    params(("name" = String, Path, description = "The deployment")),
    responses((status = 200, description = "The deployment's state", body = DeploymentStatus)))]
async fn get_deployment(
    State(manager): State<Manager>,
    P(name): P<String>,
) -> ApiResult<Json<DeploymentStatus>> {
    let status = manager.status(&name)?;
    Ok(Json(openapi::deployment_status(status)))
}

#[utoipa::path(delete, path = "/deployments/{name}", tag = "deployments",
    summary = "Stops a deployment's services and removes it, with its tasks and sessions",
    description = "`DELETE /deployments/{name}/delete` does the same.",
    params(("name" = String, Path, description = "The deployment")),
    responses((status = 200, description = "The deployment was removed", body = DeploymentName),
        (status = 409, description = "A deploy of it is under way", body = ErrorBody)))]
async fn delete_deployment(
    State(manager): State<Manager>,
    P(name): P<String>,
) -> ApiResult<Json<DeploymentName>> {
    manager.delete(&name).await?;
    Ok(Json(DeploymentName { name }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct CreateParams {
    /// The folder local sources are read under (this server's working folder when absent).
    base_path: Option<String>,
    /// Replace a deployment of the same name.
    #[serde(default)]
    reload: bool,
    /// Sent by llamactl; accepted and ignored (the file's sources say where code is).
    #[serde(default)]
    #[allow(dead_code)]
    local: bool,
    /// Answer once every service serves (the default, as llama_deploy's server does), or,
    /// with `wait=false`, once the sources are synced (deployd's CLI follows the stages).
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

#[utoipa::path(post, path = "/deployments/create", tag = "deployments",
    summary = "Deploys a deployment file, or reloads a deployment with `reload=true`",
    description = "The file comes as the multipart field `config_file` (as llamactl sends \
it), or as the body itself (`application/yaml`, or `application/json`: the deployment as JSON). Local sources are \
read under `base_path`, which a client on another machine may name only within the folders \
the operator allowed.",
    params(CreateParams),
    request_body(content(
        (DeploymentUpload = "multipart/form-data"),
        (Object = "application/json"),
        (String = "application/yaml"))),
    responses((status = 200, description = "Deployed (with `wait=true`, every service serves)", body = Deployed),
        (status = 409, description = "A deployment of that name exists (send `reload=true`), or too many deployments", body = ErrorBody),
        (status = 413, description = "The body is larger than `--max-body-bytes`, or the file than `--max-deployment-file-bytes`", body = ErrorBody),
        (status = 503, description = "A service did not become ready, or deployd is stopping", body = ErrorBody)))]
async fn create_deployment(
    State(state): State<AppState>,
    Peer(peer): Peer,
    Q(params): Q<CreateParams>,
    request: Request,
) -> ApiResult<Response> {
    let requested = params
        .base_path
        .filter(|path| !path.is_empty())
        .map(PathBuf::from);
    let base = crate::base_path::resolve(
        peer,
        requested.as_deref(),
        &state.options.allowed_base_paths,
        std::env::current_dir(),
    )
    .map_err(ApiError::bad_request)?;
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    let (text, origin) = if is_multipart {
        read_multipart(request).await?
    } else {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(|err| ApiError::new(err.status(), err.body_text()))?;
        (utf8(body.to_vec())?, "deployment.yaml".to_owned())
    };
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "no deployment file: send it as the multipart field `config_file` (or as an \
             `application/json` body)",
        ));
    }
    if text.len() > state.options.max_file_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the deployment file `{origin}` is {} bytes; this server takes files of at most \
                 {} bytes (--max-deployment-file-bytes)",
                text.len(),
                state.options.max_file_bytes
            ),
        ));
    }
    let deployed = state
        .manager
        .deploy_as(
            &text,
            &origin,
            &base,
            params.reload,
            deployd_manager::FileOrigin::Client,
            params.wait,
            &client_of(peer),
        )
        .await?;
    Ok((
        StatusCode::OK,
        Json(Deployed {
            name: deployed.status.name,
            warnings: deployed.warnings,
        }),
    )
        .into_response())
}

async fn read_multipart(request: Request) -> ApiResult<(String, String)> {
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|err| ApiError::new(err.status(), err.body_text()))?;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|err| ApiError::new(err.status(), err.body_text()))?
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
                .map_err(|err| ApiError::new(err.status(), err.body_text()))?;
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

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SessionParam {
    /// The session to run the task in (a `session_id` in the body wins); a new session when
    /// neither names one.
    session_id: Option<String>,
}

/// Parses a `TaskDefinition`'s input: a JSON string of keyword arguments, or an object. The
/// service runs the workflow as `run(**input)`, so anything but an object is refused here
/// rather than failing in the service.
fn task_input(input: Value) -> ApiResult<Value> {
    let value = match input {
        Value::Null => return Ok(json!({})),
        Value::String(text) if text.trim().is_empty() => return Ok(json!({})),
        Value::String(text) => serde_json::from_str(&text).map_err(|err| {
            ApiError::bad_request(format!(
                "`input` must be a JSON string of keyword arguments: {err}"
            ))
        })?,
        other => other,
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "`input` must be a JSON object of keyword arguments (the workflow runs as \
             `run(**input)`), not {}",
            kind_of(&value)
        )));
    }
    Ok(value)
}

fn definition(task: &TaskInfo, input: Value) -> TaskDefinition {
    TaskDefinition {
        input,
        task_id: Some(task.id.clone()),
        session_id: Some(task.session_id.clone()),
        service_id: Some(task.service.clone()),
    }
}

/// What a task definition asks for.
fn new_task_of(session: SessionParam, body: TaskDefinition) -> ApiResult<NewTask> {
    Ok(NewTask {
        service: body.service_id,
        session_id: body.session_id.or(session.session_id),
        input: task_input(body.input)?,
    })
}

async fn new_task(
    manager: &Manager,
    name: &str,
    session: SessionParam,
    body: TaskDefinition,
) -> ApiResult<(TaskInfo, Value)> {
    let raw_input = body.input.clone();
    let task = manager
        .create_task(name, new_task_of(session, body)?)
        .await?;
    let input = match raw_input {
        Value::Null => Value::String(String::new()),
        other => other,
    };
    Ok((task, input))
}

#[utoipa::path(post, path = "/deployments/{name}/tasks/create", tag = "tasks",
    summary = "Creates a task and answers at once",
    params(("name" = String, Path, description = "The deployment"), SessionParam),
    request_body(content = TaskDefinition, content_type = "application/json"),
    responses((status = 200, description = "The task, with its ids", body = TaskDefinition),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "Its service or queue is not available", body = ErrorBody)))]
async fn create_task(
    State(manager): State<Manager>,
    P(name): P<String>,
    Q(session): Q<SessionParam>,
    JsonObject(body): JsonObject<TaskDefinition>,
) -> ApiResult<Json<TaskDefinition>> {
    let (task, input) = new_task(&manager, &name, session, body).await?;
    Ok(Json(definition(&task, input)))
}

#[utoipa::path(post, path = "/deployments/{name}/tasks/run", tag = "tasks",
    summary = "Runs a task and answers with its result",
    description = "Waits at most `--run-timeout`; the task goes on after a 504.",
    params(("name" = String, Path, description = "The deployment"), SessionParam),
    request_body(content = TaskDefinition, content_type = "application/json"),
    responses((status = 200, description = "The task's result, as the workflow returned it (any JSON)", body = serde_json::Value),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 502, description = "The task failed", body = ErrorBody),
        (status = 503, description = "Its service or queue is not available, or deployd is stopping", body = ErrorBody),
        (status = 504, description = "The task has not ended within the run timeout", body = ErrorBody)))]
/// Runs a task and answers with its result, waiting at most the run timeout.
async fn run_task(
    State(state): State<AppState>,
    P(name): P<String>,
    Q(session): Q<SessionParam>,
    JsonObject(body): JsonObject<TaskDefinition>,
) -> ApiResult<Json<Value>> {
    let manager = &state.manager;
    let created = manager
        .create_followed_task(&name, new_task_of(session, body)?)
        .await?;
    let task = created.task.clone();
    let timeout = state.options.run_timeout;
    let Ok(waited) = tokio::time::timeout(timeout, manager.wait_created(created)).await else {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "task {id} has not finished after {timeout:?}; it still runs, and its result \
                 can be read at /deployments/{name}/tasks/{id}/results",
                id = task.id
            ),
        ));
    };
    match waited {
        Ok(done) if done.status == TaskStatus::Succeeded => {
            Ok(Json(done.result.unwrap_or(Value::Null)))
        }
        Ok(done) if done.status == TaskStatus::Failed => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "task {} failed: {}",
                done.id,
                done.error.as_deref().unwrap_or("unknown error")
            ),
        )),
        Ok(done) if done.status == TaskStatus::Cancelled => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "task {} was {}",
                done.id,
                done.error.as_deref().unwrap_or("cancelled")
            ),
        )),
        // The wait ended before the task did: deployd is stopping, or the deployment was
        // deleted meanwhile.
        ended => {
            if state.shutting_down.load(Ordering::SeqCst) {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "deployd is shutting down; task {} will run after it restarts",
                        task.id
                    ),
                ));
            }
            if let Err(gone @ Error::NotFound { .. }) = manager.status(&name) {
                return Err(gone.into());
            }
            match ended {
                Err(err) => Err(err.into()),
                Ok(_) => Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the wait for task {id} ended before the task did; its result can be \
                         read at /deployments/{name}/tasks/{id}/results",
                        id = task.id
                    ),
                )),
            }
        }
    }
}

fn task_definition_of(task: &TaskInfo) -> TaskDefinition {
    let input = Value::String(task.input.to_string());
    definition(task, input)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageParams {
    /// The most tasks in the page (1 to 1,000; 100 when only `after` is given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The last task of the previous page: the page starts after it.
    after: Option<String>,
}

#[utoipa::path(get, path = "/deployments/{name}/tasks", tag = "tasks",
    summary = "A deployment's tasks, oldest first",
    description = "All of them without `limit` and `after` (llama_deploy's list); with \
either, one page, with a `Link: <…>; rel=\"next\"` header when it is full.",
    params(("name" = String, Path, description = "The deployment"), PageParams),
    responses((status = 200, description = "The tasks", body = Vec<TaskDefinition>,
        headers(("link" = String, description = "The next page, when this one is full")))))]
/// The tasks of a deployment, oldest first: all of them (llama_deploy's clients read a plain
/// list), or with `limit` and/or `after` one page, with a `Link` to the next one when it is
/// full.
async fn list_tasks(
    State(manager): State<Manager>,
    P(name): P<String>,
    Q(page): Q<PageParams>,
    OriginalUri(uri): OriginalUri,
) -> ApiResult<Response> {
    if page.limit.is_none() && page.after.is_none() {
        let tasks = manager.tasks(&name).await?;
        let all: Vec<TaskDefinition> = tasks.iter().map(task_definition_of).collect();
        return Ok(Json(all).into_response());
    }
    let limit = page_limit(page.limit, DEFAULT_PAGE)?;
    let after = page.after.filter(|after| !after.is_empty());
    let tasks = manager.tasks_page(&name, after.as_deref(), limit).await?;
    let definitions: Vec<TaskDefinition> = tasks.iter().map(task_definition_of).collect();
    let mut response = Json(definitions).into_response();
    if tasks.len() == limit
        && let Some(last) = tasks.last()
    {
        let link = format!(
            "<{}?after={}&limit={limit}>; rel=\"next\"",
            uri.path(),
            percent_encode(&last.id)
        );
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}

/// `text` with every byte but URL-safe ones written as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ResultParams {
    /// Wait for a task that runs (the default, as llama_deploy 0.9 does, at most the run
    /// timeout), or answer `null` at once with `wait=false`.
    #[serde(default = "yes")]
    wait: bool,
}

#[utoipa::path(get, path = "/deployments/{name}/tasks/{task_id}/results", tag = "tasks",
    summary = "A task's result, once it has ended",
    params(("name" = String, Path, description = "The deployment"), ("task_id" = String, Path, description = "The task"), ResultParams),
    responses((status = 200, description = "The result, or `null` while the task runs", body = Option<TaskResult>)))]
async fn task_result(
    State(state): State<AppState>,
    P((name, task_id)): P<(String, String)>,
    Q(params): Q<ResultParams>,
) -> ApiResult<Json<Option<TaskResult>>> {
    let manager = &state.manager;
    manager.status(&name)?;
    let mut task = manager.task(&name, &task_id).await?;
    if params.wait && !task.status.is_finished() {
        // A task that has not ended when the run timeout passes answers `null`, as before.
        if let Ok(waited) = tokio::time::timeout(
            state.options.run_timeout,
            manager.wait_task(&name, &task_id),
        )
        .await
        {
            task = waited?;
        }
    }
    let result = match task.status {
        TaskStatus::Succeeded => Some(TaskResult {
            task_id: task.id,
            history: Vec::new(),
            result: task.result.as_ref().map(result_text).unwrap_or_default(),
            data: json!({}),
            status: "succeeded".to_owned(),
            error: None,
        }),
        TaskStatus::Failed | TaskStatus::Cancelled => Some(TaskResult {
            task_id: task.id,
            history: Vec::new(),
            result: String::new(),
            data: json!({}),
            status: task.status.as_str().to_owned(),
            error: task.error,
        }),
        TaskStatus::Queued | TaskStatus::Running => None,
    };
    Ok(Json(result))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventParams {
    /// Sent by llama_deploy's client; accepted and ignored (a task belongs to one session).
    #[serde(default)]
    #[allow(dead_code)]
    session_id: Option<String>,
    /// Each event as the workflow serializer wrote it, instead of its `value` alone.
    #[serde(default)]
    raw_event: bool,
    /// deployd's own lines: `{"seq", "type", "data", "attempt"}` for every entry of the task's
    /// log, its result or error included.
    #[serde(default)]
    envelope: bool,
    /// The last sequence number the client saw; the stream starts after it.
    #[serde(default)]
    after: u64,
}

/// What llama_deploy 0.9 streams for an event: the `value` of the workflow serializer's object
/// (`{"__is_pydantic", "value", "qualified_name"}`); an event that is not such an object (a
/// process service's own JSON) is sent as it is.
fn event_value(data: Value) -> Value {
    match data {
        Value::Object(mut object)
            if object.contains_key("value")
                && (object.contains_key("qualified_name")
                    || object.contains_key("__is_pydantic")) =>
        {
            object.remove("value").unwrap_or(Value::Null)
        }
        other => other,
    }
}

/// `GET …/tasks/{id}/events`: as llama_deploy 0.9 streams it by default (one line per event:
/// its value, or with `raw_event=true` the serializer's whole object; the stream ends with the
/// task and carries no result line), or deployd's envelope with `envelope=true`.
/// deployd's line for an entry of a task's log.
fn event_line(event: TaskEvent) -> Value {
    json!(EventLine {
        seq: event.seq,
        kind: event_kind(event.kind).to_owned(),
        data: event.data,
        attempt: event.attempt,
    })
}

fn event_kind(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Event => "event",
        EventKind::Result => "result",
        EventKind::Error => "error",
        EventKind::Cancelled => "cancelled",
    }
}

/// Who asked, as a revision or a cancel records it: the client's address.
fn client_of(peer: Option<IpAddr>) -> String {
    match peer {
        Some(address) => format!("client {address}"),
        None => "client".to_owned(),
    }
}

/// A page's `limit`: `default` when absent, else from 1 to [`MAX_PAGE`].
fn page_limit(limit: Option<usize>, default: usize) -> ApiResult<usize> {
    let limit = limit.unwrap_or(default);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request(format!(
            "`limit` must be from 1 to {MAX_PAGE}, not {limit}"
        )))
    }
}

fn task_summary(record: TaskRecord) -> TaskSummary {
    let TaskRecord {
        task,
        created_ms,
        updated_ms,
    } = record;
    TaskSummary {
        task_id: task.id,
        service: task.service,
        session_id: task.session_id,
        status: task.status.as_str().to_owned(),
        attempt: task.attempt,
        created_at: created_ms,
        updated_at: updated_ms,
        input: task.input,
        result: task.result,
        error: task.error,
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SearchParams {
    /// Only tasks in this status: `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    status: Option<String>,
    /// Only tasks of this service.
    service: Option<String>,
    /// The most tasks in the page (1 to 1,000; 50 by default).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The last task of the previous page (its `next`): the page holds older tasks.
    before: Option<String>,
}

#[utoipa::path(get, path = "/deployments/{name}/tasks/search", tag = "tasks",
    summary = "A deployment's tasks, newest first, by status and service, a page at a time",
    params(("name" = String, Path, description = "The deployment"), SearchParams),
    responses((status = 200, description = "One page", body = TaskPage),
        (status = 400, description = "An unknown status, a bad limit, or a `before` that names no task of the deployment", body = ErrorBody)))]
async fn search_tasks(
    State(manager): State<Manager>,
    P(name): P<String>,
    Q(params): Q<SearchParams>,
) -> ApiResult<Json<TaskPage>> {
    let status = match params.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => Some(TaskStatus::from_name(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`status` must be one of queued, running, succeeded, failed, cancelled; not \
                 {text:?}"
            ))
        })?),
    };
    let limit = page_limit(params.limit, 50)?;
    let filter = TaskFilter {
        status,
        service: params.service.filter(|s| !s.is_empty()),
    };
    let before = params.before.filter(|b| !b.is_empty());
    let records = manager
        .search_tasks(&name, &filter, before.as_deref(), limit)
        .await?;
    let next = (records.len() == limit)
        .then(|| records.last().map(|r| r.task.id.clone()))
        .flatten();
    Ok(Json(TaskPage {
        tasks: records.into_iter().map(task_summary).collect(),
        next,
    }))
}

#[utoipa::path(get, path = "/deployments/{name}/tasks/{task_id}", tag = "tasks",
    summary = "A task: its service, session, status, times, input and outcome",
    params(("name" = String, Path, description = "The deployment"), ("task_id" = String, Path, description = "The task")),
    responses((status = 200, description = "The task", body = TaskSummary),
        (status = 404, description = "No such task in the deployment", body = ErrorBody)))]
async fn get_task(
    State(manager): State<Manager>,
    P((name, task_id)): P<(String, String)>,
) -> ApiResult<Json<TaskSummary>> {
    manager.status(&name)?;
    Ok(Json(task_summary(
        manager.task_record(&name, &task_id).await?,
    )))
}

#[utoipa::path(post, path = "/deployments/{name}/tasks/{task_id}/cancel", tag = "tasks",
    summary = "Cancels a queued or running task",
    description = "The task ends `cancelled` at once: its log's last entry is a `cancelled` \
entry (the stream ends with it), a queued task never runs, and the service running a running \
one is asked to stop it (`POST /tasks/{id}/cancel` of the service protocol); its call is \
abandoned after a grace of 5 seconds.",
    params(("name" = String, Path, description = "The deployment"), ("task_id" = String, Path, description = "The task")),
    responses((status = 200, description = "The cancelled task", body = TaskSummary),
        (status = 404, description = "No such task in the deployment", body = ErrorBody),
        (status = 409, description = "The task has ended", body = ErrorBody)))]
async fn cancel_task(
    State(manager): State<Manager>,
    Peer(peer): Peer,
    P((name, task_id)): P<(String, String)>,
) -> ApiResult<Json<TaskSummary>> {
    manager.status(&name)?;
    let record = manager
        .cancel_task(&name, &task_id, &client_of(peer))
        .await?;
    Ok(Json(task_summary(record)))
}

fn revision_info(revision: Revision, with_spec: bool) -> RevisionInfo {
    RevisionInfo {
        revision: revision.revision,
        created_at: revision.created_ms,
        by: revision.by,
        kind: revision.kind,
        rollback_of: revision.rollback_of,
        outcome: revision.outcome,
        error: revision.error,
        sources: revision
            .sources
            .into_iter()
            .map(|(id, source)| {
                (
                    id,
                    RevisionSource {
                        digest: source.digest,
                        commit: source.commit,
                    },
                )
            })
            .collect(),
        spec: with_spec.then_some(revision.spec),
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SessionSearchParams {
    /// The most sessions in the page (1 to 1,000; 50 by default).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The last session of the previous page (its `next`): the page holds older sessions.
    before: Option<String>,
}

#[utoipa::path(get, path = "/deployments/{name}/sessions/search", tag = "sessions",
    summary = "A deployment's sessions, newest first, a page at a time",
    params(("name" = String, Path, description = "The deployment"), SessionSearchParams),
    responses((status = 200, description = "One page", body = SessionPage),
        (status = 400, description = "A bad limit, or a `before` that names no session of the deployment", body = ErrorBody)))]
async fn search_sessions(
    State(manager): State<Manager>,
    P(name): P<String>,
    Q(params): Q<SessionSearchParams>,
) -> ApiResult<Json<SessionPage>> {
    let limit = page_limit(params.limit, 50)?;
    let before = params.before.filter(|b| !b.is_empty());
    let sessions = manager
        .search_sessions(&name, before.as_deref(), limit)
        .await?;
    let next = (sessions.len() == limit)
        .then(|| sessions.last().map(|s| s.id.clone()))
        .flatten();
    Ok(Json(SessionPage {
        sessions: sessions.into_iter().map(session_definition).collect(),
        next,
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RevisionsParams {
    /// The most revisions to list, newest first (1 to 1,000; 100 by default).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/deployments/{name}/revisions", tag = "deployments",
    summary = "A deployment's revisions, newest first: every deploy, reload and rollback",
    params(("name" = String, Path, description = "The deployment"), RevisionsParams),
    responses((status = 200, description = "The revisions, without their files", body = Vec<RevisionInfo>)))]
async fn list_revisions(
    State(manager): State<Manager>,
    P(name): P<String>,
    Q(params): Q<RevisionsParams>,
) -> ApiResult<Json<Vec<RevisionInfo>>> {
    let limit = page_limit(params.limit, 100)?;
    let revisions = manager.revisions(&name, limit).await?;
    Ok(Json(
        revisions
            .into_iter()
            .map(|r| revision_info(r, false))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/deployments/{name}/revisions/{revision}", tag = "deployments",
    summary = "One revision of a deployment, with its file",
    params(("name" = String, Path, description = "The deployment"), ("revision" = u64, Path, description = "The revision's number")),
    responses((status = 200, description = "The revision", body = RevisionInfo),
        (status = 404, description = "No such revision", body = ErrorBody)))]
async fn get_revision(
    State(manager): State<Manager>,
    P((name, revision)): P<(String, String)>,
) -> ApiResult<Json<RevisionInfo>> {
    let number = revision_number(&revision)?;
    Ok(Json(revision_info(
        manager.revision(&name, number).await?,
        true,
    )))
}

fn revision_number(text: &str) -> ApiResult<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "a revision is a number from 1 (see GET /deployments/{{name}}/revisions), not \
                 {text:?}"
            ))
        })
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RollbackParams {
    /// The revision to go back to.
    #[param(required = true, value_type = u64, minimum = 1)]
    revision: Option<String>,
}

#[utoipa::path(post, path = "/deployments/{name}/rollback", tag = "deployments",
    summary = "Deploys an earlier revision again, through a draining reload",
    description = "Redeploys the revision's file with its git sources at the commits it ran \
(local sources as their folder is now). Answers once that version serves, or with the error of \
the first service that failed, which keeps serving what it ran. The rollback is recorded as a \
revision of its own.",
    params(("name" = String, Path, description = "The deployment"), RollbackParams),
    responses((status = 200, description = "The deployment, rolled back", body = DeploymentStatus),
        (status = 400, description = "No `revision`, or a service of the revision failed", body = ErrorBody),
        (status = 404, description = "No such deployment or revision", body = ErrorBody)))]
async fn rollback(
    State(manager): State<Manager>,
    Peer(peer): Peer,
    P(name): P<String>,
    Q(params): Q<RollbackParams>,
) -> ApiResult<Json<DeploymentStatus>> {
    let Some(revision) = params.revision.filter(|r| !r.is_empty()) else {
        return Err(ApiError::bad_request(
            "name the revision to go back to: `?revision=N` (see GET /deployments/{name}/revisions)",
        ));
    };
    let number = revision_number(&revision)?;
    let deployed = manager.rollback(&name, number, &client_of(peer)).await?;
    Ok(Json(openapi::deployment_status(deployed.status)))
}

/// Whether a client asks for server-sent events.
fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.to_ascii_lowercase().contains("text/event-stream"))
}

/// How often an idle server-sent event stream gets a comment, so that proxies keep it open.
const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

#[utoipa::path(get, path = "/deployments/{name}/tasks/{task_id}/events", tag = "tasks",
    summary = "Streams a task's events until it ends",
    description = "NDJSON by default, as llama_deploy streams it (each event's value; the \
stream ends with the task). With `envelope=true` each line is an `EventLine`, the result or \
error last (see the `EventLine` schema). With `Accept: text/event-stream`, server-sent events: `id` is the line's `seq`, \
`event` its type, `data` the `EventLine`; `Last-Event-ID` resumes after that event.",
    params(("name" = String, Path, description = "The deployment"), ("task_id" = String, Path, description = "The task"), EventParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "With server-sent events: the last `id` seen")),
    responses((status = 200, description = "The stream", content(
            (serde_json::Value = "application/x-ndjson"),
            (String = "text/event-stream"))),
        (status = 429, description = "Too many event streams are open", body = ErrorBody,
            headers(("retry-after" = String, description = "Seconds to wait")))))]
async fn task_events(
    State(state): State<AppState>,
    P((name, task_id)): P<(String, String)>,
    Q(params): Q<EventParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let manager = &state.manager;
    let sse = wants_sse(&headers);
    let mut after = params.after;
    // An EventSource that reconnects names the last event it got.
    if sse && let Some(last) = headers.get("last-event-id") {
        after = last
            .to_str()
            .ok()
            .and_then(|value| value.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "`Last-Event-ID` must be the `id` of an event of this stream (a whole number)",
                )
            })?;
    }
    manager.status(&name)?;
    let permit = match state.stream_permit() {
        Ok(permit) => permit,
        Err(refused) => return Ok(*refused),
    };
    let events = manager.task_events(&name, &task_id, after).await?;
    // The permit goes with the stream: released when the answer ends or the client leaves.
    let events = ReceiverStream::new(events).map(move |event| {
        let _held = &permit;
        event
    });
    if sse {
        // Every entry of the log, its result or error last: `id` is its sequence number,
        // `event` its type, `data` deployd's line.
        let stream = events.map(|event: TaskEvent| {
            let id = event.seq.to_string();
            let kind = event_kind(event.kind);
            Ok::<_, std::convert::Infallible>(
                Event::default()
                    .id(id)
                    .event(kind)
                    .data(event_line(event).to_string()),
            )
        });
        let mut response = Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
            .into_response();
        // A proxy that buffers answers would hold the events back.
        response
            .headers_mut()
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
        return Ok(response);
    }
    let (raw, envelope) = (params.raw_event, params.envelope);
    let lines = events.filter_map(move |event: TaskEvent| {
        let value = if envelope {
            Some(event_line(event))
        } else if event.kind != EventKind::Event {
            None
        } else if raw {
            Some(event.data)
        } else {
            Some(event_value(event.data))
        };
        std::future::ready(value.map(|value| {
            let mut line = value.to_string();
            line.push('\n');
            Ok::<_, std::convert::Infallible>(line)
        }))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct GraphParams {
    /// A task of the deployment whose run to draw over the graph.
    task_id: Option<String>,
}

#[utoipa::path(get, path = "/deployments/{name}/services/{service}/graph", tag = "deployments",
    summary = "The graph a graph service runs, in Mermaid",
    description = "What the service's `GET /graph` answers (a service made with \
`deployd_graph::service`): its graph as a Mermaid diagram; with `task_id`, the task's run \
drawn over it (the nodes it went through, the one it is at). 404 when the service serves no \
graph, or the task has no run.",
    params(("name" = String, Path, description = "The deployment"), ("service" = String, Path, description = "The service's id"), GraphParams),
    responses((status = 200, description = "The diagram", content_type = "text/plain", body = String),
        (status = 409, description = "The service is not ready", body = ErrorBody)))]
/// The Mermaid diagram of a graph service.
async fn service_graph(
    State(state): State<AppState>,
    P((name, service)): P<(String, String)>,
    Q(params): Q<GraphParams>,
) -> ApiResult<Response> {
    let text = state
        .manager
        .service_graph(&name, &service, params.task_id.as_deref())
        .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct LogParams {
    /// How many lines from the end (100 by default, at most 10,000).
    #[param(maximum = 10000)]
    tail: Option<usize>,
    /// Go on with the lines written after.
    #[serde(default)]
    follow: bool,
    /// Which replica's output, from 0 (the first; a service has several with `replicas`).
    #[serde(default)]
    replica: usize,
}

#[utoipa::path(get, path = "/deployments/{name}/services/{service}/logs", tag = "deployments",
    summary = "A service's output (stdout and stderr)",
    description = "The last `tail` lines, then with `follow=true` every line written after, \
until the deployment is deleted or deployd stops.",
    params(("name" = String, Path, description = "The deployment"), ("service" = String, Path, description = "The service's id"), LogParams),
    responses((status = 200, description = "The lines", content_type = "text/plain", body = String),
        (status = 429, description = "Too many streams are open", body = ErrorBody,
            headers(("retry-after" = String, description = "Seconds to wait")))))]
/// A service's output: see `logs.rs`.
async fn service_logs(
    State(state): State<AppState>,
    P((name, service)): P<(String, String)>,
    Q(params): Q<LogParams>,
) -> ApiResult<Response> {
    let n = params.tail.unwrap_or(logs::DEFAULT_TAIL);
    if n > logs::MAX_TAIL {
        return Err(ApiError::bad_request(format!(
            "`tail` is {n}; it is at most {}",
            logs::MAX_TAIL
        )));
    }
    let path = state.manager.service_log(&name, &service, params.replica)?;
    let read = path.clone();
    let (lines, offset) = tokio::task::spawn_blocking(move || logs::tail(&read, n))
        .await
        .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?
        .map_err(|err| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the log of service `{service}`: {err}"),
            )
        })?;
    let mut head = lines.join("\n");
    if !head.is_empty() {
        head.push('\n');
    }
    let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !params.follow {
        return Ok((content_type, head).into_response());
    }
    let permit = match state.stream_permit() {
        Ok(permit) => permit,
        Err(refused) => return Ok(*refused),
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<String>(256);
    logs::follow(
        state.manager.clone(),
        name,
        service,
        path,
        offset,
        Arc::clone(&state.shutting_down),
        sender,
    );
    let rest = ReceiverStream::new(receiver).map(move |mut line| {
        let _held = &permit;
        line.push('\n');
        line
    });
    let body = futures::stream::once(std::future::ready(head))
        .chain(rest)
        .map(Ok::<_, std::convert::Infallible>);
    let mut response = (content_type, Body::from_stream(body)).into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn session_definition(session: SessionInfo) -> SessionDefinition {
    SessionDefinition {
        session_id: session.id,
        task_ids: session.task_ids,
        state: session.state.unwrap_or_else(|| json!({})),
    }
}

#[derive(Debug, Deserialize)]
struct UiParams {
    name: String,
}

/// `/deployments/{name}/ui[/...]`, every method and WebSockets: the deployment's UI (see
/// `ui_proxy.rs`).
#[utoipa::path(get, path = "/deployments/{name}/ui/{path}", tag = "deployments",
    summary = "The deployment's UI (its file's `ui:` section), proxied",
    description = "Every method, and WebSocket upgrades, are passed to the UI's process as \
they come (bodies streamed both ways, hop-by-hop headers left out, redirects passed back). \
`/deployments/{name}/ui` answers the same.",
    params(("name" = String, Path, description = "The deployment"),
        ("path" = String, Path, description = "The page or file of the UI")),
    responses((status = 200, description = "The UI's answer, whatever it is", content_type = "text/html", body = String),
        (status = 502, description = "The UI does not answer", body = ErrorBody),
        (status = 504, description = "The UI did not begin its answer in time", body = ErrorBody)))]
async fn ui(
    State(state): State<AppState>,
    P(params): P<UiParams>,
    request: Request,
) -> ApiResult<Response> {
    let Some(port) = state.manager.ui_port(&params.name)? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "Deployment has no ui configured",
        ));
    };
    let strip_authorization = state.options.tokens.required();
    crate::ui_proxy::proxy(
        &state.ui_client,
        &params.name,
        port,
        strip_authorization,
        request,
    )
    .await
}

#[utoipa::path(get, path = "/deployments/{name}/sessions", tag = "sessions",
    summary = "A deployment's sessions", description = "`…/sessions/` answers the same.",
    params(("name" = String, Path, description = "The deployment")),
    responses((status = 200, description = "The sessions", body = Vec<SessionDefinition>)))]
async fn list_sessions(
    State(manager): State<Manager>,
    P(name): P<String>,
) -> ApiResult<Json<Vec<SessionDefinition>>> {
    let sessions = manager.sessions(&name).await?;
    Ok(Json(sessions.into_iter().map(session_definition).collect()))
}

#[utoipa::path(get, path = "/deployments/{name}/sessions/{session_id}", tag = "sessions",
    summary = "A session: its tasks and state",
    params(("name" = String, Path, description = "The deployment"), ("session_id" = String, Path, description = "The session")),
    responses((status = 200, description = "The session", body = SessionDefinition)))]
async fn get_session(
    State(manager): State<Manager>,
    P((name, session_id)): P<(String, String)>,
) -> ApiResult<Json<SessionDefinition>> {
    Ok(Json(session_definition(
        manager.session(&name, &session_id).await?,
    )))
}

#[utoipa::path(post, path = "/deployments/{name}/sessions/create", tag = "sessions",
    summary = "Creates a session",
    params(("name" = String, Path, description = "The deployment")),
    responses((status = 200, description = "The new session", body = SessionDefinition)))]
async fn create_session(
    State(manager): State<Manager>,
    P(name): P<String>,
) -> ApiResult<Json<SessionDefinition>> {
    Ok(Json(session_definition(
        manager.create_session(&name).await?,
    )))
}

#[utoipa::path(post, path = "/deployments/{name}/sessions/delete", tag = "sessions",
    summary = "Deletes a session",
    params(("name" = String, Path, description = "The deployment"),
        ("session_id" = String, Query, description = "The session to delete")),
    responses((status = 200, description = "Deleted: `null`", body = Option<Object>)))]
async fn delete_session(
    State(manager): State<Manager>,
    P(name): P<String>,
    Q(session): Q<SessionParam>,
) -> ApiResult<Json<Value>> {
    let Some(id) = session.session_id else {
        return Err(ApiError::bad_request("`session_id` is required"));
    };
    manager.delete_session(&name, &id).await?;
    Ok(Json(Value::Null))
}

#[utoipa::path(post, path = "/deployments/{name}/tasks/{task_id}/events", tag = "tasks",
    summary = "Sends an event into a running task (a human's answer)",
    params(("name" = String, Path, description = "The deployment"), ("task_id" = String, Path, description = "The task")),
    request_body(content = EventDefinition, content_type = "application/json"),
    responses((status = 200, description = "The event as it was sent", body = EventDefinition),
        (status = 409, description = "The task has ended", body = ErrorBody),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "The task's service is not available", body = ErrorBody)))]
async fn send_event(
    State(manager): State<Manager>,
    P((name, task_id)): P<(String, String)>,
    JsonObject(event): JsonObject<EventDefinition>,
) -> ApiResult<Json<EventDefinition>> {
    // A serialized event is usually JSON; anything else is passed on as a string.
    let data = serde_json::from_str(&event.event_obj_str)
        .unwrap_or_else(|_| Value::String(event.event_obj_str.clone()));
    manager.send_event(&name, &task_id, data).await?;
    Ok(Json(event))
}

/// The OpenAPI document of the routes above (see `openapi.rs` for what is added to it).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "deployd",
        description = "deployd's HTTP API: llama_deploy 0.9's routes and payloads, and deployd's own."
    ),
    paths(
        root, openapi_json, docs_page, status, metrics_page, list_deployments, create_deployment, get_deployment,
        delete_deployment, service_logs, service_graph, ui, list_tasks, create_task, run_task, task_result,
        task_events, send_event, list_sessions, get_session, create_session, delete_session,
        search_tasks, get_task, cancel_task, list_revisions, get_revision, rollback, search_sessions
    ),
    components(schemas(ErrorBody, deployd_api::Diagnostic, EventLine, TaskSummary, TaskPage, SessionPage, RevisionInfo, RevisionSource)),
    modifiers(&Additions),
    tags(
        (name = "health", description = "Health, metrics and this description"),
        (name = "deployments", description = "Deploy, reload, inspect and delete deployments; read their services' logs"),
        (name = "tasks", description = "Create and run tasks, stream their events, read their results"),
        (name = "sessions", description = "State carried from one task to the next"),
    )
)]
pub(crate) struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_deploy_streams_the_value_of_a_serialized_event() {
        let serialized = json!({
            "__is_pydantic": true,
            "value": {"step": 1},
            "qualified_name": "workflow.Progress",
        });
        assert_eq!(event_value(serialized), json!({"step": 1}));
        // A process service's own JSON is sent as it is.
        assert_eq!(event_value(json!({"value": 3})), json!({"value": 3}));
        assert_eq!(event_value(json!("text")), json!("text"));
    }
}
