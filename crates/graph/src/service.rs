//! Graphs served as a deployd service (feature `service`): deployd's service protocol
//! (`docs/service-protocol.md`) over HTTP, each task a durable run.
//!
//! - `POST /tasks`: the task's run has the task's id ([`RunId::for_task`]); a first delivery
//!   starts it at the node the graph's `start` function makes from the task's input, a later
//!   delivery (deployd sends a task again after a crash, with `attempt + 1`) continues it from
//!   its last committed step, so no committed node runs again. Each step's `started` and
//!   `finished` (`interrupted`, `failed`) and what nodes emit go out as `event` lines, in order;
//!   the graph's `End` output is the `result`.
//! - A node that asks (human in the loop) sends an `InputRequiredEvent`-shaped event carrying
//!   the interrupt's id and request, and the task waits, its answer open, for
//!   `POST /tasks/{task_id}/events` (what deployd forwards from a client's
//!   `HumanResponseEvent`): the answer is the event's `value` (or the data itself when it is
//!   not such an envelope), and the run goes on. The question is in the store: a task
//!   delivered again after a restart asks it again, and its answer resumes the run there.
//! - `GET /graph`: the graph in Mermaid; `?task_id=` draws the task's run over it.
//! - `GET /healthz`: 200.
//!
//! Snapshots go where [`Service::from_env`] says: `DEPLOYD_GRAPH_STORE` (`sqlite:///path` or a
//! `postgres://` URL, with `?schema=NAME`), by default `graph.sqlite` in `DEPLOYD_DATA_DIR`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{Error, Graph, Node, RunId, Runner, Store, mermaid};

/// How long a delivery waits for the lease of an earlier delivery's worker (a process that
/// died mid-node) to expire before it gives up with a 503, which deployd retries.
const LEASE_WAIT: Duration = Duration::from_secs(60);

/// The lease the service's runners take: short, so that a run whose process died is taken
/// over soon by the next delivery.
const LEASE: Duration = Duration::from_secs(10);

/// What deployd sends with `POST /tasks`.
/// (Its `attempt` and `state` are not read: the run in the store says where the task is, and
/// the graph's state is the run's.)
#[derive(Debug, Deserialize)]
struct TaskRequest {
    task_id: String,
    #[serde(default)]
    input: Value,
}

/// One line of a task's answer.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Event { data: Value },
    Result { data: Value },
    Error { message: String },
}

/// One graph the service serves, its type erased.
trait Served: Send + Sync {
    fn name(&self) -> &'static str;
    fn diagram(&self) -> String;
    /// The diagram with the run of `task_id` drawn over it.
    fn run_diagram<'a>(
        &'a self,
        task_id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<String, Error>>;
    /// Runs (or continues) the task's run, sending its lines; answers come on `answers`.
    fn run<'a>(
        &'a self,
        task: TaskRequest,
        lines: mpsc::Sender<Line>,
        answers: mpsc::Receiver<Value>,
    ) -> futures::future::BoxFuture<'a, ()>;
}

type Start<G, N> = dyn Fn(Value) -> Result<(N, <G as Graph>::State), String> + Send + Sync;

struct Entry<G: Graph, N> {
    runner: Runner<G>,
    start: Box<Start<G, N>>,
}

impl<G, N> Served for Entry<G, N>
where
    G: Graph,
    G::Output: Serialize,
    G::Event: Serialize,
    N: Node<G>,
{
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn diagram(&self) -> String {
        mermaid::graph::<G>(&mermaid::Options::default())
    }

    fn run_diagram<'a>(
        &'a self,
        task_id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<String, Error>> {
        Box::pin(async move {
            let run_id = run_of(task_id)?;
            let history = self.runner.history(&run_id).await?;
            if history.is_empty() {
                return Err(Error::NotFound {
                    what: "run of task",
                    id: task_id.to_owned(),
                });
            }
            Ok(mermaid::run::<G>(&history))
        })
    }

    fn run<'a>(
        &'a self,
        task: TaskRequest,
        lines: mpsc::Sender<Line>,
        mut answers: mpsc::Receiver<Value>,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            let outcome = run_task(self, &task, &lines, &mut answers).await;
            let line = match outcome {
                Ok(output) => Line::Result { data: output },
                Err(message) => Line::Error { message },
            };
            let _ = lines.send(line).await;
        })
    }
}

fn run_of(task_id: &str) -> Result<RunId, Error> {
    RunId::for_task(task_id).ok_or_else(|| Error::NotFound {
        what: "run of task",
        id: task_id.to_owned(),
    })
}

/// Runs the task's run to its end, step by step, asking for answers as its nodes need them:
/// each step's `started` and `finished` (or `interrupted`, `failed`) and what the node emitted
/// go out as event lines, in order. The output as JSON, or the error's message.
async fn run_task<G, N>(
    entry: &Entry<G, N>,
    task: &TaskRequest,
    lines: &mpsc::Sender<Line>,
    answers: &mut mpsc::Receiver<Value>,
) -> Result<Value, String>
where
    G: Graph,
    G::Output: Serialize,
    G::Event: Serialize,
    N: Node<G>,
{
    let run_id = run_of(&task.task_id).map_err(|err| err.to_string())?;
    let (events, mut emitted) = mpsc::unbounded_channel();
    let runner = entry.runner.clone().events(events);
    let send = |data: Value| lines.send(Line::Event { data });
    let closed = || "the task's answer was closed".to_owned();
    let mut run = open_run(entry, &runner, &run_id, task)
        .await
        .map_err(|err| err.to_string())?;
    loop {
        if let Some(output) = run.output() {
            return serde_json::to_value(output).map_err(|err| err.to_string());
        }
        if let Some(interrupt) = run.interrupt().cloned() {
            let request: Value =
                serde_json::from_str(interrupt.request.get()).unwrap_or(Value::Null);
            let asked = json!({
                "__is_pydantic": true,
                "qualified_name": "llama_index.core.workflow.events.InputRequiredEvent",
                "value": {
                    "prefix": "",
                    "interrupt_id": interrupt.id.to_string(),
                    "node": interrupt.node_id,
                    "request": request,
                },
            });
            send(asked).await.map_err(|_| closed())?;
            let Some(answer) = answers.recv().await else {
                return Err("the task stopped waiting for an answer".to_owned());
            };
            runner
                .answer(&run_id, &interrupt.id, answer_of(answer))
                .await
                .map_err(|err| err.to_string())?;
            run = runner.open(&run_id).await.map_err(|err| err.to_string())?;
            continue;
        }
        let node = run.next_node().map_or("?", |node| node.node_id());
        send(json!({"node": node, "step": "started"}))
            .await
            .map_err(|_| closed())?;
        let stepped = run.advance().await;
        // What the node emitted is in the channel once its step is done.
        while let Ok(emitted) = emitted.try_recv() {
            let data = json!({
                "node": emitted.node_id,
                "event": serde_json::to_value(&emitted.event).unwrap_or(Value::Null),
            });
            send(data).await.map_err(|_| closed())?;
        }
        let step = match &stepped {
            Ok(_) if run.interrupt().is_some() => "interrupted",
            Ok(_) => "finished",
            Err(_) => "failed",
        };
        send(json!({"node": node, "step": step}))
            .await
            .map_err(|_| closed())?;
        stepped.map_err(|err| err.to_string())?;
    }
}

/// Opens the task's run: starts it from the input when the store has none, else continues it
/// (a task delivered again), waiting out the lease of a delivery whose process died.
async fn open_run<G, N>(
    entry: &Entry<G, N>,
    runner: &Runner<G>,
    run_id: &RunId,
    task: &TaskRequest,
) -> Result<crate::GraphRun<G>, Error>
where
    G: Graph,
    N: Node<G>,
{
    let deadline = tokio::time::Instant::now() + LEASE_WAIT;
    loop {
        let opened = if runner.store().latest(run_id).await?.is_some() {
            runner.open(run_id).await
        } else {
            let (node, state) = (entry.start)(task.input.clone()).map_err(|message| {
                Error::Storage(format!(
                    "the task's input does not start the graph: {message}"
                ))
            })?;
            runner.start_as(run_id, node, state).await
        };
        match opened {
            // Leased by the worker of a delivery whose process died: wait for the lease.
            Err(Error::Conflict { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// The answer in what a client posted: the `value` of a pydantic event envelope (a
/// `HumanResponseEvent`), or the data itself.
fn answer_of(data: Value) -> Value {
    match data {
        Value::Object(mut map) if map.get("__is_pydantic") == Some(&Value::Bool(true)) => {
            map.remove("value").unwrap_or(Value::Null)
        }
        Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        other => other,
    }
}

/// The graphs of one service process, and the store their runs live in.
pub struct Service {
    store: Arc<dyn Store>,
    graphs: Vec<Arc<dyn Served>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field(
                "graphs",
                &self.graphs.iter().map(|g| g.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Where runs are kept, from `DEPLOYD_GRAPH_STORE` (and `DEPLOYD_DATA_DIR` for the default).
pub async fn store_from_env() -> Result<Arc<dyn Store>, Error> {
    let configured = std::env::var("DEPLOYD_GRAPH_STORE")
        .ok()
        .filter(|v| !v.is_empty());
    match configured {
        Some(url) => store_at(&url).await,
        None => {
            let dir = std::env::var_os("DEPLOYD_DATA_DIR")
                .map_or_else(|| std::path::PathBuf::from("."), std::path::PathBuf::from);
            open_sqlite(&dir.join("graph.sqlite")).await
        }
    }
}

/// The store a `DEPLOYD_GRAPH_STORE` value names.
pub async fn store_at(url: &str) -> Result<Arc<dyn Store>, Error> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        return open_sqlite(std::path::Path::new(path)).await;
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return open_postgres(url).await;
    }
    Err(Error::Storage(format!(
        "DEPLOYD_GRAPH_STORE: expected sqlite:///path or a postgres:// URL, got {:?}",
        url.split_once("://").map_or(url, |(scheme, _)| scheme)
    )))
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(path: &std::path::Path) -> Result<Arc<dyn Store>, Error> {
    Ok(Arc::new(
        crate::store::SqliteStore::open(path, crate::Durability::Immediate).await?,
    ))
}

#[cfg(not(feature = "sqlite"))]
async fn open_sqlite(_: &std::path::Path) -> Result<Arc<dyn Store>, Error> {
    Err(Error::Storage(
        "this build has no SQLite store (feature `sqlite`)".to_owned(),
    ))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Arc<dyn Store>, Error> {
    let (base, schema) = split_schema(url);
    Ok(Arc::new(
        crate::store::PostgresStore::connect_in_schema(
            &base,
            schema.as_deref().unwrap_or("public"),
            crate::Durability::Immediate,
        )
        .await?,
    ))
}

/// A URL without its `schema=` query parameter, and that parameter's value.
fn split_schema(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("schema=") {
            Some(name) => {
                schema = Some(name.to_owned());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    let base = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (base, schema)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_store_url_s_schema_is_taken_out_of_its_query() {
        assert_eq!(
            super::split_schema("postgres://u@h/db?sslmode=disable&schema=s_graphs"),
            (
                "postgres://u@h/db?sslmode=disable".to_owned(),
                Some("s_graphs".to_owned())
            )
        );
        assert_eq!(
            super::split_schema("postgres://u@h/db?schema=x"),
            ("postgres://u@h/db".to_owned(), Some("x".to_owned()))
        );
        assert_eq!(
            super::split_schema("postgres://u@h/db"),
            ("postgres://u@h/db".to_owned(), None)
        );
    }
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_: &str) -> Result<Arc<dyn Store>, Error> {
    Err(Error::Storage(
        "this build has no PostgreSQL store (feature `postgres`)".to_owned(),
    ))
}

impl Service {
    /// A service keeping its runs in `store`.
    pub fn with_store(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            graphs: Vec::new(),
        }
    }

    /// A service keeping its runs where deployd says (see the module's documentation).
    pub async fn from_env() -> Result<Self, Error> {
        Ok(Self::with_store(store_from_env().await?))
    }

    /// Serves graph `G`: a task's input becomes its first node and state through `start`
    /// (an `Err` fails the task with that message), and its nodes get `deps`. With several
    /// graphs, a task names its graph in its input's `graph` (`GET /graph` in `?graph=`); one
    /// that names none goes to the first served.
    pub fn graph<G, N>(
        mut self,
        start: impl Fn(Value) -> Result<(N, G::State), String> + Send + Sync + 'static,
        deps: G::Deps,
    ) -> Self
    where
        G: Graph,
        G::Output: Serialize,
        G::Event: Serialize,
        N: Node<G>,
    {
        let runner = Runner::<G>::with_store(Arc::clone(&self.store), deps).lease(LEASE);
        self.graphs.push(Arc::new(Entry {
            runner,
            start: Box::new(start),
        }));
        self
    }

    /// Serves on `127.0.0.1:$PORT` (as deployd starts a service) until the process ends.
    pub async fn run(self) -> std::io::Result<()> {
        let port: u16 = std::env::var("PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "set PORT to the port to listen on (deployd does)",
                )
            })?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        self.serve(listener).await
    }

    /// Serves on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// The service's routes, to serve on a listener of one's own.
    pub fn router(self) -> Router {
        let state = Shared {
            graphs: Arc::new(self.graphs),
            waiting: Arc::default(),
        };
        Router::new()
            .route(
                "/healthz",
                get(|| async { axum::Json(json!({"status": "ok"})) }),
            )
            .route("/graph", get(graph_page))
            .route("/tasks", post(task))
            .route("/tasks/{task_id}/events", post(answer))
            .with_state(state)
    }
}

#[derive(Clone)]
struct Shared {
    graphs: Arc<Vec<Arc<dyn Served>>>,
    /// The tasks of this process that wait for an answer.
    waiting: Arc<Mutex<HashMap<String, mpsc::Sender<Value>>>>,
}

impl Shared {
    fn pick(&self, name: Option<&str>) -> Result<Arc<dyn Served>, String> {
        match (name, self.graphs.as_slice()) {
            (_, []) => Err("the service serves no graph".to_owned()),
            (None, [first, ..]) => Ok(Arc::clone(first)),
            (Some(name), graphs) => graphs
                .iter()
                .find(|g| g.name() == name)
                .cloned()
                .ok_or_else(|| format!("no graph `{name}`; the service serves {}", self.names())),
        }
    }

    fn names(&self) -> String {
        self.graphs
            .iter()
            .map(|g| g.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Value>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Deserialize)]
struct GraphQuery {
    graph: Option<String>,
    task_id: Option<String>,
}

async fn graph_page(State(shared): State<Shared>, Query(query): Query<GraphQuery>) -> Response {
    let served = match shared.pick(query.graph.as_deref()) {
        Ok(served) => served,
        Err(message) => return (StatusCode::NOT_FOUND, message).into_response(),
    };
    let text = match &query.task_id {
        None => served.diagram(),
        Some(task) => match served.run_diagram(task).await {
            Ok(text) => text,
            Err(err @ Error::NotFound { .. }) => {
                return (StatusCode::NOT_FOUND, err.to_string()).into_response();
            }
            Err(err) => return (StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response(),
        },
    };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// Removes a task from the waiting ones when its answer ends.
struct Unwait {
    shared: Shared,
    task: String,
}

impl Drop for Unwait {
    fn drop(&mut self) {
        self.shared.waiting().remove(&self.task);
    }
}

async fn task(State(shared): State<Shared>, body: Bytes) -> Response {
    let task: TaskRequest = match serde_json::from_slice(&body) {
        Ok(task) => task,
        Err(err) => {
            return (StatusCode::BAD_REQUEST, format!("not a task: {err}")).into_response();
        }
    };
    let served = match shared.pick(task.input.get("graph").and_then(Value::as_str)) {
        Ok(served) => served,
        Err(message) => return ndjson_once(&Line::Error { message }),
    };
    let (lines_tx, lines) = mpsc::channel::<Line>(64);
    let (answers_tx, answers) = mpsc::channel::<Value>(4);
    let unwait = Unwait {
        shared: shared.clone(),
        task: task.task_id.clone(),
    };
    shared.waiting().insert(task.task_id.clone(), answers_tx);
    tokio::spawn(async move {
        served.run(task, lines_tx, answers).await;
        drop(unwait);
    });
    // The lines as they come, one NDJSON chunk each; the answer ends with the runner's last.
    let stream = futures::stream::unfold(lines, |mut lines| async move {
        let line = lines.recv().await?;
        let mut text = serde_json::to_vec(&line).unwrap_or_default();
        text.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(text)), lines))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn ndjson_once(line: &Line) -> Response {
    let mut text = serde_json::to_vec(line).unwrap_or_default();
    text.push(b'\n');
    ([(header::CONTENT_TYPE, "application/x-ndjson")], text).into_response()
}

#[derive(Deserialize)]
struct Answer {
    data: Value,
}

async fn answer(
    State(shared): State<Shared>,
    Path(task_id): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(answer) = serde_json::from_slice::<Answer>(&body) else {
        return (StatusCode::BAD_REQUEST, "expected {\"data\": ...}").into_response();
    };
    let waiting = shared.waiting().get(&task_id).cloned();
    match waiting {
        Some(sender) if sender.send(answer.data).await.is_ok() => {
            axum::Json(json!({"status": "delivered"})).into_response()
        }
        _ => (
            StatusCode::NOT_FOUND,
            format!("task `{task_id}` does not run here"),
        )
            .into_response(),
    }
}
