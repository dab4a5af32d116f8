//! A durable Rust graph served by deployd: `examples/graph-service` (a trip planner whose review
//! asks a human), each task a run in the SQLite file deployd gives the service. Its steps are
//! counted from the side file the example writes (`GRAPH_NODE_LOG`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use deployd_e2e::{Project, Server, graph_service_binary, sigkill, success, wait_for};
use serde_json::{Value, json};

/// How many times each step of `run` started.
fn steps(log: &Path, run: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Some((of, node)) = line.split_once(' ')
            && of == run
        {
            *counts.entry(node.to_owned()).or_default() += 1;
        }
    }
    counts
}

/// The run of a task: its id without dashes.
fn run_of(task: &str) -> String {
    task.replace('-', "")
}

fn create(server: &Server, input: &Value) -> String {
    let (code, body) = server.post(
        "/deployments/trips/tasks/create",
        &json!({"input": input.to_string()}),
    );
    assert_eq!(code, 200, "{body}");
    body["task_id"].as_str().unwrap().to_owned()
}

/// Follows the task's events after entry `after` until its next question; returns the
/// question's line.
fn question(server: &Server, task: &str, after: u64) -> Value {
    let lines = server.read_lines_until(
        &format!("/deployments/trips/tasks/{task}/events?envelope=true&after={after}"),
        |line| line["data"]["value"]["interrupt_id"].is_string() || line["type"] != "event",
    );
    let last = lines.last().unwrap().clone();
    // The whole event, as llama_deploy's client reads it: an `InputRequiredEvent`.
    assert_eq!(
        last["data"]["qualified_name"], "llama_index.core.workflow.events.InputRequiredEvent",
        "{lines:?}"
    );
    last
}

/// Answers the task's question as llama_deploy's client sends a `HumanResponseEvent`.
fn answer(server: &Server, task: &str, decision: &Value) {
    let event = json!({"__is_pydantic": true, "value": decision,
                       "qualified_name": "llama_index.core.workflow.events.HumanResponseEvent"});
    let (code, body) = server.post(
        &format!("/deployments/trips/tasks/{task}/events"),
        &json!({"event_obj_str": event.to_string(), "agent_id": "planner"}),
    );
    assert_eq!(code, 200, "{body}");
}

fn result(server: &Server, task: &str) -> Value {
    wait_for("the task's result", Duration::from_secs(90), || {
        let (_, body) = server
            .get(&format!("/deployments/trips/tasks/{task}/results"))
            .ok()?;
        (!body.is_null()).then_some(body)
    })
}

/// The example deploys and runs a task with a question; the Mermaid route draws the graph and
/// a task's run; a SIGKILL of the service in the middle of a step resumes the run with that
/// step (the steps before it ran once); a question answered after deployd and the service
/// restarted resumes and finishes the run.
#[test]
fn a_graph_service_resumes_after_a_kill_and_asks_a_human_across_restarts() {
    let project = Project::new();
    let log = project.path().join("steps.log");
    let file = project.write(
        "trips.yaml",
        &format!(
            "name: trips\nservices:\n  planner:\n    command: \"{}\"\n    env:\n      \
             GRAPH_NODE_LOG: \"{}\"\n",
            graph_service_binary().display(),
            log.display()
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    // The runs go where the operator says: deployd hands the services `--graph-store`.
    let graphs = data.path().join("graphs.sqlite");
    let graph_store = format!("sqlite://{}", graphs.display());
    let flags = [
        "--drain-timeout",
        "1",
        "--graph-store",
        graph_store.as_str(),
    ];
    let mut server = Server::start(&data_dir, &flags);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    server.wait_ready("trips");

    // A task with a question, answered through deployd.
    let task = create(&server, &json!({"city": "Lisbon", "nights": 2}));
    let asked = question(&server, &task, 0);
    assert_eq!(asked["data"]["value"]["node"], "Review", "{asked}");
    assert_eq!(
        asked["data"]["value"]["request"]["draft"][1], "day 1 in Lisbon",
        "{asked}"
    );
    answer(&server, &task, &json!({"approve": true}));
    let done = result(&server, &task);
    assert_eq!(done["result"], "booked 2 nights in Lisbon", "{done}");
    assert!(
        graphs.is_file(),
        "the service keeps its runs in --graph-store"
    );
    let counts = steps(&log, &run_of(&task));
    assert_eq!(counts["Research"], 1);
    assert_eq!(counts["Draft"], 1);
    assert_eq!(counts["Book"], 1);

    // The graph, and the task's run over it.
    let (code, diagram) = server.get_text("/deployments/trips/services/planner/graph");
    assert_eq!(code, 200, "{diagram}");
    assert!(
        diagram.contains("Research") && diagram.contains("Review"),
        "{diagram}"
    );
    let (code, run) = server.get_text(&format!(
        "/deployments/trips/services/planner/graph?task_id={task}"
    ));
    assert_eq!(code, 200, "{run}");
    assert!(run.contains("visited"), "{run}");

    // SIGKILL of the service in the middle of `Draft`: the task goes on from `Draft`.
    let task = create(&server, &json!({"city": "Porto", "nights": 1, "slow": 3}));
    let run = run_of(&task);
    wait_for("Draft to start", Duration::from_secs(30), || {
        steps(&log, &run).contains_key("Draft").then_some(())
    });
    let (_, pid, _) = server.service("trips", 0);
    sigkill(pid.expect("the service's pid"));
    let asked = question(&server, &task, 0);
    assert_eq!(asked["data"]["value"]["node"], "Review", "{asked}");
    answer(&server, &task, &json!({"approve": true}));
    assert_eq!(result(&server, &task)["result"], "booked 1 nights in Porto");
    let counts = steps(&log, &run);
    assert_eq!(
        counts["Research"], 1,
        "the step before the killed one ran once: {counts:?}"
    );
    assert_eq!(counts["Draft"], 2, "the killed step ran again: {counts:?}");
    assert_eq!(counts["Book"], 1, "{counts:?}");

    // A question still open when deployd (and with it the service) stops: after the restart,
    // the task asks the same question, and its answer finishes the run.
    let task = create(&server, &json!({"city": "Rome", "nights": 3}));
    let first = question(&server, &task, 0);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        server.wait_exit(Duration::from_secs(30)).is_some(),
        "deployd stops"
    );
    drop(server);
    let server = Server::start(&data_dir, &flags);
    server.wait_ready("trips");
    let seq = |line: &Value| line["seq"].as_u64().expect("a seq");
    let again = question(&server, &task, seq(&first));
    assert_eq!(
        again["data"]["value"]["interrupt_id"], first["data"]["value"]["interrupt_id"],
        "the same question, asked again after the restart"
    );
    answer(&server, &task, &json!({"approve": false, "nights": 4}));
    let asked = question(&server, &task, seq(&again));
    assert_eq!(
        asked["data"]["value"]["request"]["draft"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    answer(&server, &task, &json!({"approve": true}));
    assert_eq!(result(&server, &task)["result"], "booked 4 nights in Rome");
    let counts = steps(&log, &run_of(&task));
    assert_eq!(counts["Research"], 1, "{counts:?}");
    assert_eq!(
        counts["Draft"], 2,
        "drafted, then redrafted for 4 nights: {counts:?}"
    );
}
