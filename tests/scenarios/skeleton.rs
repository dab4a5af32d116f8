//! The walking skeleton: deploy a local service, run tasks through it, survive crashes.

use std::time::Duration;

use deployd_e2e::{Project, Server, alive, service_processes, sigkill, success, wait_for};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// Done when 1: the quickstart deploys, runs, and streams its events then its result.
#[test]
fn quickstart_deploys_runs_and_streams_events_in_order() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);

    let out = success(&server.cli(&["deploy", "examples/quickstart/deployment.yaml"]));
    assert!(out.contains("deployment `quickstart` created"), "{out}");
    assert!(out.contains("echo ready on port"), "{out}");

    let out = success(&server.cli(&["run", "-d", "quickstart", "--input", r#"{"message":"hi"}"#]));
    assert_eq!(out, "Message received: hi\n");
    let out = success(&server.cli(&["run", "-d", "quickstart", "-a", "message", "yo"]));
    assert_eq!(out, "Message received: yo\n");

    let task = server.create_task("quickstart", "streamed");
    let (status, text) = server.get_text(&format!(
        "/deployments/quickstart/tasks/{task}/events?envelope=true"
    ));
    assert_eq!(status, 200);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            json!({"seq": 1, "type": "event", "data": {"step": "received", "message": "streamed"}, "attempt": 1}),
            json!({"seq": 2, "type": "event", "data": {"step": "echoing", "message": "streamed"}, "attempt": 1}),
            json!({"seq": 3, "type": "result", "data": "Message received: streamed", "attempt": 1}),
        ]
    );
    // A client that saw event 2 resumes after it.
    let (_, rest) = server.get_text(&format!(
        "/deployments/quickstart/tasks/{task}/events?envelope=true&after=2"
    ));
    assert_eq!(rest.lines().count(), 1, "{rest}");
    assert!(rest.contains("\"type\":\"result\""), "{rest}");

    let result = server.wait_result("quickstart", &task, Duration::from_secs(30));
    assert_eq!(result["result"], "Message received: streamed");
    assert_eq!(result["task_id"], task.as_str());

    let (status, body) = server.get("/status/").unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["status"], "Healthy");
    assert_eq!(body["deployments"], json!(["quickstart"]));
    let (_, tasks) = server.get("/deployments/quickstart/tasks").unwrap();
    assert_eq!(tasks.as_array().map(Vec::len), Some(3), "{tasks}");
}

/// Done when 2: a killed service is restarted, the restart is reported, the next task works.
#[test]
fn killed_service_is_restarted_and_serves_again() {
    let project = Project::new();
    let file = project.deployment("restart", &[("svc", &[])]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));

    let (phase, pid, restarts) = server.service("restart", 0);
    assert_eq!((phase.as_str(), restarts), ("ready", 0));
    let pid = pid.expect("a running service has a pid");
    sigkill(pid);

    let new_pid = wait_for(
        "the service to be restarted",
        Duration::from_secs(30),
        || match server.service("restart", 0) {
            (phase, Some(new), 1) if phase == "ready" && new != pid => Some(new),
            _ => None,
        },
    );
    assert!(alive(new_pid));
    let (_, body) = server.get("/deployments/restart").unwrap();
    assert_eq!(
        body["services"][0]["last_exit"], "killed by SIGKILL",
        "{body}"
    );

    let out = success(&server.cli(&["run", "-d", "restart", "-a", "message", "again"]));
    assert_eq!(out, "svc: again\n");
}

/// Done when 3: deployd SIGKILLed and started again on the same data directory brings its
/// deployment back, keeps earlier results, and leaves no process of the first run.
#[test]
fn deployd_killed_comes_back_with_its_state() {
    let project = Project::new();
    let file = project.deployment("durable", &[("svc", &[("SPAWN_CHILD", "1")])]);
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let mut first = Server::start(&data_dir, &[]);
    success(&first.cli(&["deploy", file.to_str().unwrap()]));
    let task = first.create_task("durable", "before the crash");
    let result = first.wait_result("durable", &task, Duration::from_secs(30));
    let old_processes = service_processes(&first.data_dir);
    assert!(
        old_processes.len() >= 2,
        "the service and its child run: {old_processes:?}"
    );

    // The service's own process dies with deployd (its parent-death signal); the child it
    // started in its group survives until the next start stops it.
    first.kill();

    let second = Server::start(&data_dir, &[]);
    let (status, body) = second.get("/deployments/").unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, json!([{ "name": "durable" }]));
    assert_eq!(
        second.wait_result("durable", &task, Duration::from_secs(5)),
        result,
        "the earlier result is still there"
    );
    for pid in &old_processes {
        assert!(!alive(*pid), "process {pid} of the first run still runs");
    }
    second.wait_ready("durable");
    let out = success(&second.cli(&["run", "-d", "durable", "-a", "message", "after"]));
    assert_eq!(out, "svc: after\n");
    // Killing a second time works the same way (the lock died with its holder).
    drop(second);
}

/// Done when 4: a task created while its service is down runs once the service is back.
#[test]
fn task_created_while_service_is_down_is_delivered_later() {
    let project = Project::new();
    let hold = project.path().join("hold");
    let task_log = project.path().join("tasks.log");
    let file = project.deployment(
        "later",
        &[(
            "svc",
            &[
                ("HOLD_FILE", hold.to_str().unwrap()),
                ("TASK_LOG", task_log.to_str().unwrap()),
            ],
        )],
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));

    std::fs::write(&hold, "").unwrap();
    let (_, pid, _) = server.service("later", 0);
    sigkill(pid.unwrap());
    wait_for("the service to be down", Duration::from_secs(10), || {
        let (phase, _, restarts) = server.service("later", 0);
        (phase != "ready" && restarts >= 1).then_some(())
    });

    let task = server.create_task("later", "patience");
    std::thread::sleep(Duration::from_millis(700));
    let (_, result) = server
        .get(&format!(
            "/deployments/later/tasks/{task}/results?wait=false"
        ))
        .unwrap();
    assert!(
        result.is_null(),
        "no result while the service is down: {result}"
    );
    assert_ne!(
        server.service("later", 0).0,
        "ready",
        "the service is still held down"
    );

    std::fs::remove_file(&hold).unwrap();
    let result = server.wait_result("later", &task, Duration::from_secs(60));
    assert_eq!(result["result"], "svc: patience");
    let handled = std::fs::read_to_string(&task_log).unwrap();
    assert_eq!(
        handled.lines().collect::<Vec<_>>(),
        [task.as_str()],
        "delivered once"
    );
}

/// Done when 5: bad input gets a 4xx with a JSON detail that says what is wrong.
#[test]
fn bad_requests_get_clear_errors() {
    let project = Project::new();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &["--max-deployments", "1"]);
    let base = project.path().to_str().unwrap().to_owned();
    let create = format!("/deployments/create?base_path={base}");

    // A type error: 400 with line and column.
    let (status, body) = server.post_raw(
        "application/yaml",
        &create,
        "name: typo\nservices:\n  svc:\n    command: python3 echo.py\n    port: eighty\n",
    );
    assert_eq!(status, 400, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("deployment.yaml:5:11"), "{detail}");
    assert!(detail.contains("`services.svc.port`"), "{detail}");
    assert!(detail.contains("`eighty`"), "{detail}");
    assert_eq!(body["diagnostics"][0]["line"], 5);
    assert_eq!(body["diagnostics"][0]["column"], 11);

    // The CLI shows the same diagnostic for a file.
    let bad = project.write(
        "bad.yaml",
        "name: typo\nservices:\n  svc:\n    command: python3 echo.py\n    port: eighty\n",
    );
    let out = server.cli(&["deploy", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml:5:11"), "{stderr}");
    assert!(stderr.contains("HTTP 400"), "{stderr}");

    // A source escaping the deployment's folder.
    let (status, body) = server.post_raw(
        "application/yaml",
        &create,
        "name: escape\nservices:\n  svc:\n    command: cat /etc/passwd\n    source:\n      type: local\n      location: ../../etc\n",
    );
    assert_eq!(status, 400, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("local source `../../etc` escapes the deployment's folder"),
        "{detail}"
    );

    // Unknown deployment, service, task.
    let (status, body) = server.get("/deployments/nope").unwrap();
    assert_eq!(
        (status, body),
        (404, json!({ "detail": "Deployment not found" }))
    );
    let (status, _) = server.post("/deployments/nope/tasks/create", &json!({ "input": "{}" }));
    assert_eq!(status, 404);

    let file = project.deployment("dup", &[("svc", &[])]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let (status, body) = server.post(
        "/deployments/dup/tasks/create",
        &json!({ "input": "{}", "service_id": "ghost" }),
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["detail"], "service `ghost` not found");
    let (status, body) = server.post(
        "/deployments/dup/tasks/create",
        &json!({ "input": "{not json" }),
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = server
        .get("/deployments/dup/tasks/no-such-task/results")
        .unwrap();
    assert_eq!(status, 404);

    // A duplicate deploy: 409, and the running deployment is untouched.
    let (_, pid, _) = server.service("dup", 0);
    let out = server.cli(&["deploy", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("deployment `dup` already exists (HTTP 409)"),
        "{stderr}"
    );
    assert_eq!(server.service("dup", 0).1, pid);

    // Past the deployment limit: 409, with the limit named.
    let other = project.deployment("other", &[("svc", &[])]);
    let out = server.cli(&["deploy", other.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("at most 1 deployments can run at once"),
        "{stderr}"
    );
    assert!(stderr.contains("HTTP 409"), "{stderr}");
    let (_, status) = server.get("/status/").unwrap();
    assert_eq!(status["max_deployments"], 1);
    assert_eq!(status["deployments"], json!(["dup"]));

    // Not JSON where JSON is expected: a 4xx with a JSON detail, never a 500.
    let (status, body) = server.post_raw("application/json", "/deployments/dup/tasks/create", "{");
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(body["detail"].is_string(), "{body}");
}

/// Done when 6: SIGTERM stops deployd within 10 s and no child survives, even one that
/// ignores SIGTERM or started children of its own.
#[test]
fn sigterm_stops_everything_within_ten_seconds() {
    let project = Project::new();
    let file = project.deployment(
        "stubborn",
        &[
            ("polite", &[("SPAWN_CHILD", "1")]),
            ("deaf", &[("IGNORE_SIGTERM", "1"), ("SPAWN_CHILD", "1")]),
        ],
    );
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let processes = service_processes(&server.data_dir);
    assert!(
        processes.len() >= 4,
        "two services and their children: {processes:?}"
    );

    server.signal(Signal::SIGTERM);
    let took = server.wait_exit(Duration::from_secs(10));
    assert!(
        took.is_some(),
        "deployd still runs 10 s after SIGTERM:\n{}",
        server.log()
    );
    for pid in processes {
        assert!(!alive(pid), "process {pid} survived deployd");
    }
    assert!(service_processes(&server.data_dir).is_empty());
}

/// Sessions carry state from one task to the next, as llama_deploy's session routes show it.
#[test]
fn sessions_carry_state_between_tasks() {
    let project = Project::new();
    let file = project.deployment("sessions", &[("svc", &[])]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));

    let (status, session) = server.post("/deployments/sessions/sessions/create", &json!({}));
    assert_eq!(status, 200, "{session}");
    let id = session["session_id"].as_str().unwrap().to_owned();
    assert_eq!(
        session,
        json!({ "session_id": id, "task_ids": [], "state": {} })
    );

    let mut tasks = Vec::new();
    for message in ["one", "two"] {
        let (status, result) = server.post(
            &format!("/deployments/sessions/tasks/run?session_id={id}"),
            &json!({ "input": json!({ "message": message }).to_string() }),
        );
        assert_eq!((status, result), (200, json!(format!("svc: {message}"))));
    }
    let (_, listed) = server.get("/deployments/sessions/tasks").unwrap();
    for task in listed.as_array().unwrap() {
        assert_eq!(task["session_id"], id.as_str());
        tasks.push(task["task_id"].as_str().unwrap().to_owned());
    }
    let (status, session) = server
        .get(&format!("/deployments/sessions/sessions/{id}"))
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        session,
        json!({ "session_id": id, "task_ids": tasks, "state": { "count": 2 } })
    );
    // A task without a session gets a fresh one.
    let other = server.create_task("sessions", "alone");
    server.wait_result("sessions", &other, Duration::from_secs(30));
    let (_, sessions) = server.get("/deployments/sessions/sessions").unwrap();
    assert_eq!(sessions.as_array().map(Vec::len), Some(2), "{sessions}");

    let (status, body) = server.post(
        &format!("/deployments/sessions/sessions/delete?session_id={id}"),
        &json!({}),
    );
    assert_eq!((status, body), (200, Value::Null));
    let (status, _) = server
        .get(&format!("/deployments/sessions/sessions/{id}"))
        .unwrap();
    assert_eq!(status, 404);
    let (status, body) = server.post(
        &format!("/deployments/sessions/tasks/create?session_id={id}"),
        &json!({ "input": "{}" }),
    );
    assert_eq!(status, 404, "a deleted session takes no task: {body}");
}

/// A running task takes a human-in-the-loop event, as llama_deploy's `POST .../events` sends it.
#[test]
fn a_running_task_takes_an_event() {
    let project = Project::new();
    let file = project.deployment("hitl", &[("svc", &[])]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));

    let (status, body) = server.post(
        "/deployments/hitl/tasks/create",
        &json!({ "input": json!({ "wait_for_event": true }).to_string() }),
    );
    assert_eq!(status, 200, "{body}");
    let task = body["task_id"].as_str().unwrap().to_owned();
    // Follow the task's events, live, until it says it is waiting.
    let seen = server.read_lines_until(
        &format!("/deployments/hitl/tasks/{task}/events?envelope=true"),
        |line| line["data"]["step"] == "waiting",
    );
    assert_eq!(seen.len(), 3, "{seen:?}");
    let event = json!({ "service_id": "svc", "event_obj_str": "\"approved\"" });
    let (status, body) = server.post(
        &format!("/deployments/hitl/tasks/{task}/events?envelope=true"),
        &event,
    );
    assert_eq!((status, body), (200, event));
    let result = server.wait_result("hitl", &task, Duration::from_secs(30));
    assert_eq!(result["result"], "svc: approved");

    // Once the task has ended, an event is a conflict, not a server error.
    let (status, body) = server.post(
        &format!("/deployments/hitl/tasks/{task}/events?envelope=true"),
        &json!({ "event_obj_str": "{}" }),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("not running"),
        "{body}"
    );
}
