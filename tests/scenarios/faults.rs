//! Faults and load found by probing deployd as an unlucky operator would (issue 13): nothing
//! runs twice, no task waits forever, SIGTERM and reload drain.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use deployd_e2e::{Project, Server, alive, service_processes, success, wait_for};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// How many times the service ran each task, from its `TASK_LOG`.
fn executions(task_log: &Path) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for line in std::fs::read_to_string(task_log)
        .unwrap_or_default()
        .lines()
    {
        *seen.entry(line.to_owned()).or_insert(0) += 1;
    }
    seen
}

/// Creates a task whose service sleeps `sleep` seconds before it answers; returns its id.
fn slow_task(server: &Server, deployment: &str, message: &str, sleep: f64) -> String {
    let input = json!({ "message": message, "sleep": sleep }).to_string();
    let (status, body) = server.post(
        &format!("/deployments/{deployment}/tasks/create"),
        &json!({ "input": input }),
    );
    assert_eq!(status, 200, "{body}");
    body["task_id"].as_str().expect("a task id").to_owned()
}

fn result_of(server: &Server, deployment: &str, task: &str) -> Value {
    server.wait_result(deployment, task, Duration::from_secs(120))
}

/// 20,000 tasks from 32 concurrent clients: every task runs on its service exactly once, and
/// the store never fails a write (the probe saw 16,375 `database is locked` errors over 18,000
/// tasks, and 35% of the tasks run 2 to 6 times).
#[test]
fn twenty_thousand_tasks_from_32_clients_each_run_exactly_once() {
    const CLIENTS: usize = 32;
    const PER_CLIENT: usize = 625;
    let project = Project::new();
    let task_log = project.path().join("tasks.log");
    let file = project.deployment(
        "load",
        &[("svc", &[("TASK_LOG", task_log.to_str().unwrap())])],
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    server.wait_ready("load");

    let url = server.url.clone();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let url = url.clone();
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(120))
                    .build()
                    .unwrap();
                let mut answers = Vec::with_capacity(PER_CLIENT);
                for n in 0..PER_CLIENT {
                    let message = format!("{client}-{n}");
                    let input = json!({ "message": message }).to_string();
                    let response = http
                        .post(format!("{url}/deployments/load/tasks/run"))
                        .json(&json!({ "input": input }))
                        .send()
                        .expect("tasks/run failed");
                    let status = response.status().as_u16();
                    let body: Value = response.json().unwrap_or(Value::Null);
                    answers.push((message, status, body));
                }
                answers
            })
        })
        .collect();
    let mut answered = 0;
    for client in clients {
        for (message, status, body) in client.join().expect("a client panicked") {
            assert_eq!(status, 200, "{message}: {body}");
            assert_eq!(body, json!(format!("svc: {message}")));
            answered += 1;
        }
    }
    assert_eq!(answered, CLIENTS * PER_CLIENT);

    let runs = executions(&task_log);
    assert_eq!(runs.len(), CLIENTS * PER_CLIENT, "every task ran");
    let repeated: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "{} tasks ran more than once, e.g. {:?}",
        repeated.len(),
        repeated.iter().take(5).collect::<Vec<_>>()
    );
    let log = server.log();
    assert!(!log.contains("database is locked"), "lock errors:\n{log}");
    assert!(
        !log.contains("will retry"),
        "a task attempt was retried:\n{log}"
    );
}

/// SIGTERM with 20 tasks in flight: deployd stops taking tasks, lets the 20 finish, then exits;
/// after a restart each has its result and none ran twice.
#[test]
fn sigterm_finishes_the_tasks_in_flight_and_runs_none_twice() {
    let project = Project::new();
    let task_log = project.path().join("tasks.log");
    let file = project.deployment(
        "drain",
        &[("svc", &[("TASK_LOG", task_log.to_str().unwrap())])],
    );
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    server.wait_ready("drain");

    let tasks: Vec<String> = (0..20)
        .map(|n| slow_task(&server, "drain", &format!("t{n}"), 3.0))
        .collect();
    wait_for("20 tasks in flight", Duration::from_secs(30), || {
        (executions(&task_log).len() == 20).then_some(())
    });
    let services = service_processes(&server.data_dir);
    server.signal(Signal::SIGTERM);
    let took = server.wait_exit(Duration::from_secs(60));
    assert!(took.is_some(), "deployd did not exit:\n{}", server.log());
    for pid in services {
        assert!(!alive(pid), "service process {pid} survived deployd");
    }

    // Every task finished before deployd exited: a restart has each result, runs nothing.
    let server = Server::start(&data.path().join("data"), &[]);
    for (n, task) in tasks.iter().enumerate() {
        let (status, body) = server
            .get(&format!("/deployments/drain/tasks/{task}/results"))
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"], format!("svc: t{n}"), "{body}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let runs = executions(&task_log);
    assert_eq!(runs.len(), 20);
    assert!(runs.values().all(|n| *n == 1), "a task ran twice: {runs:?}");
}

/// A reload with tasks in flight: the old instance finishes them (they answer with the old
/// code), new tasks go to the new instance, and none runs twice (the probe saw 10 of 10 run
/// again).
#[test]
fn a_reload_with_tasks_in_flight_runs_none_twice() {
    let project = Project::new();
    let task_log = project.path().join("tasks.log");
    let log = task_log.to_str().unwrap();
    let file = project.deployment(
        "swap",
        &[("svc", &[("TASK_LOG", log), ("GREETING", "old ")])],
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    server.wait_ready("swap");

    let tasks: Vec<String> = (0..10)
        .map(|n| slow_task(&server, "swap", &format!("t{n}"), 3.0))
        .collect();
    wait_for("10 tasks in flight", Duration::from_secs(30), || {
        (executions(&task_log).len() == 10).then_some(())
    });
    let file = project.deployment(
        "swap",
        &[("svc", &[("TASK_LOG", log), ("GREETING", "new ")])],
    );
    success(&server.cli(&["deploy", "--reload", file.to_str().unwrap()]));
    for (n, task) in tasks.iter().enumerate() {
        let result = result_of(&server, "swap", task);
        assert_eq!(result["result"], format!("old svc: t{n}"), "{result}");
    }
    let after = server.create_task("swap", "later");
    let result = result_of(&server, "swap", &after);
    assert_eq!(result["result"], "new svc: later", "{result}");
    let runs = executions(&task_log);
    assert_eq!(runs.len(), 11);
    assert!(runs.values().all(|n| *n == 1), "a task ran twice: {runs:?}");
}

/// A service that crash-loops: its tasks fail with a clear error once the bound passes, and
/// `tasks/run` answers instead of waiting forever; its status shows it restarting with the
/// exit reason, not `pending`.
#[test]
fn tasks_of_a_crash_looping_service_fail_within_the_bound() {
    let project = Project::new();
    let hold = project.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let task_log = project.path().join("tasks.log");
    let file = project.deployment(
        "looping",
        &[(
            "svc",
            &[
                ("HOLD_FILE", hold.to_str().unwrap()),
                ("TASK_LOG", task_log.to_str().unwrap()),
            ],
        )],
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &["--unready-timeout", "2"]);
    success(&server.cli(&["deploy", "--no-wait", file.to_str().unwrap()]));
    wait_for("the restarts to show", Duration::from_secs(30), || {
        let (_, body) = server.get("/deployments/looping").ok()?;
        let service = &body["services"][0];
        (service["phase"] != "pending"
            && service["last_exit"]
                .as_str()
                .is_some_and(|e| e.contains("status 1")))
        .then_some(())
    });

    let created = server.create_task("looping", "never");
    let (status, body) = server.post(
        "/deployments/looping/tasks/run",
        &json!({ "input": json!({"message": "run"}).to_string() }),
    );
    assert!((400..600).contains(&status), "{status} {body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("svc"), "{detail}");
    assert!(detail.contains("not run"), "{detail}");
    let result = result_of(&server, "looping", &created);
    assert_eq!(result["status"], "failed", "{result}");
    assert!(executions(&task_log).is_empty(), "nothing ran");
}

/// Deleting a deployment answers whoever waits for one of its tasks: `tasks/run` gets a 404
/// and an open event stream ends.
#[test]
fn a_delete_ends_waiting_callers_and_streams() {
    let project = Project::new();
    let hold = project.path().join("hold");
    let file = project.deployment(
        "doomed",
        &[("svc", &[("HOLD_FILE", hold.to_str().unwrap())])],
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    server.wait_ready("doomed");
    // The service goes down and stays down: tasks wait.
    std::fs::write(&hold, "").unwrap();
    let (_, pid, _) = server.service("doomed", 0);
    deployd_e2e::sigkill(pid.unwrap());
    let task = server.create_task("doomed", "waits");

    let url = server.url.clone();
    let runner = std::thread::spawn(move || {
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let response = http
            .post(format!("{url}/deployments/doomed/tasks/run"))
            .json(&json!({ "input": "{}" }))
            .send()
            .expect("tasks/run failed");
        response.status().as_u16()
    });
    let url = server.url.clone();
    let streamer = std::thread::spawn(move || {
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let response = http
            .get(format!("{url}/deployments/doomed/tasks/{task}/events"))
            .send()
            .expect("events failed");
        let status = response.status().as_u16();
        let _ = response.text();
        status
    });
    std::thread::sleep(Duration::from_millis(500));
    success(&server.cli(&["delete", "doomed"]));
    assert_eq!(runner.join().unwrap(), 404);
    assert_eq!(
        streamer.join().unwrap(),
        200,
        "the stream was open, then ended"
    );
}

/// `kill -9` of deployd: its service processes die with it (they get a parent-death signal);
/// the data directory and what it holds are readable by deployd's user only.
#[test]
fn services_die_with_deployd_and_the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let project = Project::new();
    let file = project.deployment("orphans", &[("svc", &[])]);
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    server.wait_ready("orphans");
    let task = server.create_task("orphans", "hi");
    result_of(&server, "orphans", &task);

    let mode = |path: &Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&server.data_dir), 0o700);
    assert_eq!(mode(&server.data_dir.join("deployd.db")), 0o600);
    let logs = server.data_dir.join("deployments/orphans/logs/svc.log");
    assert_eq!(mode(&logs), 0o600);

    let (_, pid, _) = server.service("orphans", 0);
    let pid = pid.expect("the service runs");
    server.kill();
    wait_for(
        "the service to die with deployd",
        Duration::from_secs(10),
        || (!alive(pid)).then_some(()),
    );
}

/// `${HOME}` in a file sent over HTTP stays as written (deployd's environment never reaches a
/// file a client sent, nor its diagnostics); the same file given to `serve` on the command line
/// by the operator reads deployd's environment.
#[test]
fn variables_of_a_file_sent_over_http_are_not_expanded() {
    let project = Project::new();
    let file = project.deployment("vars", &[("svc", &[("GREETING", "${HOME}|")])]);
    let data = tempfile::tempdir().unwrap();
    let home = std::env::var("HOME").expect("HOME is set");
    {
        let server = Server::start(&data.path().join("client"), &[]);
        success(&server.cli(&["deploy", file.to_str().unwrap()]));
        server.wait_ready("vars");
        let task = server.create_task("vars", "hi");
        let result = result_of(&server, "vars", &task);
        assert_eq!(result["result"], "${HOME}|svc: hi", "{result}");

        // A diagnostic about a value never shows what a variable holds.
        let (status, body) = server.post_raw(
            "application/yaml",
            &format!("/deployments/create?base_path={}", project.path().display()),
            "name: bad\nservices:\n  svc:\n    command: x\n    restart:\n      policy: ${HOME}\n",
        );
        assert_eq!(status, 400, "{body}");
        assert!(!body.to_string().contains(&home), "{body}");
    }
    let server = Server::start(&data.path().join("operator"), &[file.to_str().unwrap()]);
    server.wait_ready("vars");
    let task = server.create_task("vars", "hi");
    let result = result_of(&server, "vars", &task);
    assert_eq!(result["result"], format!("{home}|svc: hi"), "{result}");
}
