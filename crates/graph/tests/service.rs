//! Graphs served over deployd's service protocol (`deployd_graph::service`), each task a
//! durable run in a SQLite store: a task's lines, a question answered through
//! `POST /tasks/{id}/events`, a task delivered again to a new process after the first died
//! waiting (the question comes again, nothing before it runs again), and the diagrams.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use deployd_graph::service::{Service, store_at};
use deployd_graph::{Ctx, End, Node, NodeError, graph};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Trip {
    city: String,
    nights: u32,
}

#[derive(Default)]
struct Counts {
    plans: AtomicU32,
}

/// Plans a trip.
#[derive(Serialize, Deserialize)]
struct Plan {
    city: String,
}

/// Asks how many nights.
#[derive(Serialize, Deserialize)]
struct Ask;

/// Books it.
#[derive(Serialize, Deserialize)]
struct Book;

#[derive(Serialize, Deserialize)]
struct Question {
    city: String,
}

#[derive(Serialize, Deserialize)]
struct Nights {
    nights: u32,
}

graph! {
    /// A trip with a question.
    Travel {
        state: Trip,
        deps: Arc<Counts>,
        output: String,
        event: Value,
        nodes {
            Plan => PlanNext [Ask],
            Ask => AskNext [Book] asks Question => Nights,
            Book => BookNext [End "booked"],
        }
    }
}

impl Node<Travel> for Plan {
    async fn run(self, ctx: Ctx<'_, Travel>) -> Result<PlanNext, NodeError> {
        ctx.deps.plans.fetch_add(1, Ordering::SeqCst);
        ctx.state.city = self.city;
        ctx.emit(json!({"planned": ctx.state.city}));
        Ok(Ask.into())
    }
}

impl Node<Travel> for Ask {
    async fn run(self, ctx: Ctx<'_, Travel>) -> Result<AskNext, NodeError> {
        match ctx.answer::<Self>()? {
            None => Ok(AskNext::Interrupt(Question {
                city: ctx.state.city.clone(),
            })),
            Some(Nights { nights }) => {
                ctx.state.nights = nights;
                Ok(Book.into())
            }
        }
    }
}

impl Node<Travel> for Book {
    async fn run(self, ctx: Ctx<'_, Travel>) -> Result<BookNext, NodeError> {
        Ok(End(format!("{} nights in {}", ctx.state.nights, ctx.state.city)).into())
    }
}

/// A service process: its base URL, and the task serving it (abort it to kill the process).
struct Process {
    url: String,
    server: tokio::task::JoinHandle<()>,
}

async fn start(store: &str, counts: &Arc<Counts>) -> Process {
    let service = Service::with_store(store_at(store).await.unwrap()).graph::<Travel, _>(
        |input: Value| {
            let city = input["city"]
                .as_str()
                .ok_or("the input names no `city`")?
                .to_owned();
            Ok((Plan { city }, Trip::default()))
        },
        Arc::clone(counts),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        service.serve(listener).await.unwrap();
    });
    Process { url, server }
}

fn task(id: &str, attempt: u32, input: Value) -> Value {
    json!({"task_id": id, "session_id": "s", "attempt": attempt, "input": input, "state": null})
}

/// Sends a task and reads its answer's lines until `until` accepts one; returns them and the
/// rest of the stream.
async fn lines_until(
    response: reqwest::Response,
    until: impl Fn(&Value) -> bool,
) -> (
    Vec<Value>,
    impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>>,
) {
    let mut stream = Box::pin(response.bytes_stream());
    let mut buffer = Vec::new();
    let mut lines = Vec::new();
    loop {
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let value: Value = serde_json::from_slice(&line).unwrap();
            let done = until(&value);
            lines.push(value);
            if done {
                return (lines, stream);
            }
        }
        match stream.next().await {
            Some(chunk) => buffer.extend_from_slice(&chunk.unwrap()),
            None => panic!("the answer ended before the line looked for: {lines:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_s_question_outlives_its_process_and_its_answer_finishes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("graph.sqlite").display());
    let counts = Arc::new(Counts::default());
    let http = reqwest::Client::new();
    let id = "01938a8e-7b3c-7f00-8a1b-0123456789ab";

    let first = start(&store, &counts).await;
    let health = http
        .get(format!("{}/healthz", first.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let response = http
        .post(format!("{}/tasks", first.url))
        .json(&task(id, 1, json!({"city": "Lisbon"})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let (lines, _rest) = lines_until(response, |l| l["data"]["__is_pydantic"] == true).await;
    assert!(lines.iter().all(|l| l["type"] == "event"), "{lines:?}");
    // Each step's start and end, and what it emitted in between, in order.
    let data: Vec<&Value> = lines.iter().map(|l| &l["data"]).collect();
    assert_eq!(
        data[..5],
        [
            &json!({"node": "Plan", "step": "started"}),
            &json!({"node": "Plan", "event": {"planned": "Lisbon"}}),
            &json!({"node": "Plan", "step": "finished"}),
            &json!({"node": "Ask", "step": "started"}),
            &json!({"node": "Ask", "step": "interrupted"}),
        ]
    );
    let asked = &lines.last().unwrap()["data"];
    assert_eq!(
        asked["qualified_name"],
        "llama_index.core.workflow.events.InputRequiredEvent"
    );
    assert_eq!(asked["value"]["request"], json!({"city": "Lisbon"}));
    let interrupt = asked["value"]["interrupt_id"].as_str().unwrap().to_owned();

    // The process dies while the task waits; deployd delivers the task again to a new one.
    first.server.abort();
    let _ = first.server.await;
    let second = start(&store, &counts).await;
    let response = http
        .post(format!("{}/tasks", second.url))
        .json(&task(id, 2, json!({"city": "Lisbon"})))
        .send()
        .await
        .unwrap();
    let (lines, rest) = lines_until(response, |l| l["data"]["__is_pydantic"] == true).await;
    assert_eq!(lines.len(), 1, "nothing ran again: {lines:?}");
    assert_eq!(
        lines[0]["data"]["value"]["interrupt_id"],
        interrupt.as_str()
    );
    assert_eq!(counts.plans.load(Ordering::SeqCst), 1, "Plan ran once");

    // A wrong task id is not waiting here; the right one takes a HumanResponseEvent.
    let missing = http
        .post(format!("{}/tasks/{}/events", second.url, "nope"))
        .json(&json!({"data": {"nights": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let answer = json!({"__is_pydantic": true, "value": {"nights": 3},
                        "qualified_name": "workflow.HumanResponseEvent"});
    let delivered = http
        .post(format!("{}/tasks/{id}/events", second.url))
        .json(&json!({"data": answer}))
        .send()
        .await
        .unwrap();
    assert_eq!(delivered.status(), 200);
    let mut text = Vec::new();
    let mut rest = Box::pin(rest);
    while let Some(chunk) = rest.next().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    let lines: Vec<Value> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let steps: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            let data = &l["data"];
            Some(format!(
                "{} {}",
                data["node"].as_str()?,
                data["step"].as_str()?
            ))
        })
        .collect();
    assert_eq!(
        steps,
        [
            "Ask started",
            "Ask finished",
            "Book started",
            "Book finished"
        ],
        "the answered step runs again with its answer, then the rest"
    );
    assert_eq!(
        lines.last().unwrap(),
        &json!({"type": "result", "data": "3 nights in Lisbon"})
    );

    // Its diagram, and the run drawn over it.
    let diagram = http
        .get(format!("{}/graph", second.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        diagram.contains("Plan") && diagram.contains("Book"),
        "{diagram}"
    );
    let run = http
        .get(format!("{}/graph?task_id={id}", second.url))
        .send()
        .await
        .unwrap();
    assert_eq!(run.status(), 200);
    assert!(run.text().await.unwrap().contains("visited"));
    let unknown = http
        .get(format!(
            "{}/graph?task_id=01938a8e-7b3c-7f00-8a1b-000000000000",
            second.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_input_or_task_id_fails_the_task_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("graph.sqlite").display());
    let counts = Arc::new(Counts::default());
    let process = start(&store, &counts).await;
    let http = reqwest::Client::new();
    for (id, input, reason) in [
        (
            "01938a8e-7b3c-7f00-8a1b-0123456789ab",
            json!({"town": "x"}),
            "the input names no `city`",
        ),
        ("not-a-uuid", json!({"city": "x"}), "not-a-uuid"),
    ] {
        let text = http
            .post(format!("{}/tasks", process.url))
            .json(&task(id, 1, input))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["type"], "error", "{line}");
        assert!(line["message"].as_str().unwrap().contains(reason), "{line}");
    }
    assert!(matches!(
        store_at("mysql://x").await,
        Err(deployd_graph::Error::Storage(message)) if message.contains("sqlite:///path")
    ));
}
