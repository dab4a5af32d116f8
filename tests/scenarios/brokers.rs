//! The walking-skeleton deployment on a real broker, named by `message-queue:` in its file.
//!
//! Each scenario puts a [`TcpTap`] between deployd and the broker: a task id seen on the wire
//! proves the task went through the broker, not through the embedded queue. The brokers are
//! the ones `cargo xtask e2e` makes sure are running (`DEPLOYD_TEST_REDIS_URL`,
//! `DEPLOYD_TEST_RABBITMQ_URL`, defaults on 127.0.0.1).

use std::time::Duration;

use deployd_e2e::{Project, Server, TcpTap, sigkill, success, url_address, wait_for};
use serde_json::{Value, json};

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Deploys the skeleton with `queue` (the `message-queue:` block, indented) pointing at the
/// tap, and runs it through the same steps as the embedded-queue skeleton: a task with its
/// events and result, a task created while the service is down, a deployd crash.
fn skeleton_on(kind: &str, queue: &str, tap: &TcpTap, described: &str) {
    let project = Project::new();
    let hold = project.path().join("hold");
    let task_log = project.path().join("tasks.log");
    let name = format!("{kind}-skeleton");
    let file = project.write(
        "deployment.yaml",
        &format!(
            "name: {name}\nmessage-queue:\n{queue}\nservices:\n  svc:\n    source:\n      type: local\n      location: src\n    command: python3 echo.py\n    env:\n      HOLD_FILE: \"{}\"\n      TASK_LOG: \"{}\"\n",
            hold.display(),
            task_log.display()
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let mut server = Server::start(&data_dir, &[]);
    let out = success(&server.cli(&["deploy", file.to_str().unwrap()]));
    assert!(
        out.contains(&format!("deployment `{name}` created")),
        "{out}"
    );
    let (_, status) = server.get(&format!("/deployments/{name}")).unwrap();
    assert_eq!(status["message_queue"], described, "{status}");

    // A task through the CLI, then one whose events are streamed.
    let out = success(&server.cli(&["run", "-d", &name, "-a", "message", "hi"]));
    assert_eq!(out, "svc: hi\n");
    let task = server.create_task(&name, "streamed");
    let (status, text) = server.get_text(&format!(
        "/deployments/{name}/tasks/{task}/events?envelope=true"
    ));
    assert_eq!(status, 200);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0]["data"]["step"], "received", "{text}");
    assert_eq!(lines[1]["data"]["step"], "echoing", "{text}");
    assert_eq!(
        lines[2],
        json!({"seq": 3, "type": "result", "data": "svc: streamed", "attempt": 1})
    );
    assert!(
        tap.saw(&task),
        "task {task} never crossed the wire to the broker"
    );

    // A task created while the service is held down waits in the broker, and deployd is
    // killed meanwhile: the next deployd on the same data directory runs it, once.
    std::fs::write(&hold, "").unwrap();
    let (_, pid, _) = server.service(&name, 0);
    sigkill(pid.unwrap());
    wait_for("the service to be down", Duration::from_secs(10), || {
        let (phase, _, restarts) = server.service(&name, 0);
        (phase != "ready" && restarts >= 1).then_some(())
    });
    let waiting = server.create_task(&name, "patience");
    assert!(
        tap.saw(&waiting),
        "task {waiting} was not published to the broker"
    );
    std::thread::sleep(Duration::from_millis(500));
    server.kill();

    let second = Server::start(&data_dir, &[]);
    std::fs::remove_file(&hold).unwrap();
    let result = second.wait_result(&name, &waiting, Duration::from_secs(60));
    assert_eq!(result["result"], "svc: patience");
    let out = success(&second.cli(&["run", "-d", &name, "-a", "message", "after"]));
    assert_eq!(out, "svc: after\n");
    let handled = std::fs::read_to_string(&task_log).unwrap();
    assert_eq!(
        handled.lines().filter(|id| *id == waiting).count(),
        1,
        "the waiting task ran once: {handled}"
    );
    success(&second.cli(&["delete", &name]));
}

/// Done when 3 of the queue issue: the skeleton deployment on Redis Streams.
#[test]
fn skeleton_runs_on_redis() {
    let url = env_or("DEPLOYD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0");
    let tap = TcpTap::start(&url_address(&url));
    let db = url
        .rsplit('/')
        .next()
        .filter(|d| !d.is_empty() && !d.contains(':'));
    let tapped = format!("redis://127.0.0.1:{}/{}", tap.port, db.unwrap_or("0"));
    skeleton_on(
        "redis",
        &format!("  type: redis\n  url: {tapped}"),
        &tap,
        &format!("Redis at {tapped}"),
    );
}

/// Done when 3 of the queue issue: the skeleton deployment on RabbitMQ.
#[test]
fn skeleton_runs_on_rabbitmq() {
    let url = env_or(
        "DEPLOYD_TEST_RABBITMQ_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let tap = TcpTap::start(&url_address(&url));
    let tapped = format!("amqp://guest:guest@127.0.0.1:{}/%2f", tap.port);
    skeleton_on(
        "rabbitmq",
        &format!("  type: rabbitmq\n  url: {tapped}\n  exchange_name: deployd-e2e"),
        &tap,
        &format!("RabbitMQ at amqp://guest:***@127.0.0.1:{}/%2f", tap.port),
    );
}

/// The same on NATS JetStream (a deployd extension of llama_deploy's file format).
#[test]
fn skeleton_runs_on_nats() {
    let url = env_or("DEPLOYD_TEST_NATS_URL", "nats://127.0.0.1:4222");
    let tap = TcpTap::start(&url_address(&url));
    let tapped = format!("nats://127.0.0.1:{}", tap.port);
    skeleton_on(
        "nats",
        &format!("  type: nats\n  url: {tapped}"),
        &tap,
        &format!("NATS at {tapped}"),
    );
}

/// deployd restarted while its deployment's broker is down: the deployment comes back once the
/// broker answers, without another deploy.
#[test]
fn a_deployment_comes_back_when_its_broker_answers_again() {
    let url = env_or("DEPLOYD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0");
    let tap = TcpTap::start(&url_address(&url));
    let project = Project::new();
    let file = project.write(
        "deployment.yaml",
        &format!(
            "name: patient\nmessage-queue:\n  type: redis\n  url: redis://127.0.0.1:{}/0\nservices:\n  svc:\n    source:\n      type: local\n      location: src\n    command: python3 echo.py\n",
            tap.port
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let mut first = Server::start(&data_dir, &[]);
    success(&first.cli(&["deploy", file.to_str().unwrap()]));
    first.kill();

    tap.set_open(false);
    let second = Server::start(&data_dir, &[]);
    let (_, body) = second.get("/deployments/").unwrap();
    assert_eq!(body, json!([]), "not back while its broker is down");
    tap.set_open(true);
    wait_for(
        "the deployment to come back",
        Duration::from_secs(60),
        || {
            let (_, body) = second.get("/deployments/").ok()?;
            (body == json!([{ "name": "patient" }])).then_some(())
        },
    );
    second.wait_ready("patient");
    let out = success(&second.cli(&["run", "-d", "patient", "-a", "message", "back"]));
    assert_eq!(out, "svc: back\n");
}

/// A broker that does not answer: the deploy is refused with a clear error naming it, and
/// nothing is created.
#[test]
fn unreachable_broker_is_refused_at_deploy() {
    let project = Project::new();
    let file = project.write(
        "deployment.yaml",
        "name: nobroker\nmessage-queue:\n  type: redis\n  url: redis://127.0.0.1:1/0\nservices:\n  svc:\n    source:\n      type: local\n      location: src\n    command: python3 echo.py\n",
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    let out = server.cli(&["deploy", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to Redis at redis://127.0.0.1:1/0"),
        "{stderr}"
    );
    assert!(stderr.contains("HTTP 503"), "{stderr}");
    let (_, body) = server.get("/deployments/").unwrap();
    assert_eq!(body, json!([]));
}

/// The keys on Redis that name `needle` (redis-cli's `--scan`).
fn redis_keys(url: &str, needle: &str) -> Vec<String> {
    let output = std::process::Command::new("redis-cli")
        .args(["-u", url, "--scan", "--pattern", &format!("*{needle}*")])
        .output()
        .expect("cannot run redis-cli");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Deleting a deployment removes its topics from the broker, and a reload that drops a service
/// removes that service's topic: nothing is left behind on Redis.
#[test]
fn deleting_a_deployment_removes_its_topics_from_the_broker() {
    let url = env_or("DEPLOYD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0");
    let project = Project::new();
    let name = format!("cleanup-{}", std::process::id());
    let file = |services: &[&str]| {
        let mut text =
            format!("name: {name}\nmessage-queue:\n  type: redis\n  url: {url}\nservices:\n");
        for service in services {
            text.push_str(&format!(
                "  {service}:\n    source:\n      type: local\n      location: src\n    command: python3 echo.py\n"
            ));
        }
        project.write("deployment.yaml", &text)
    };
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    let path = file(&["one", "two"]);
    success(&server.cli(&["deploy", path.to_str().unwrap()]));
    for service in ["one", "two"] {
        let out = success(&server.cli(&["run", "-d", &name, "-s", service, "-a", "message", "hi"]));
        assert_eq!(out, format!("{service}: hi\n"));
    }
    let keys = redis_keys(&url, &format!(".{name}."));
    assert!(
        keys.iter().any(|k| k.contains(&format!(".{name}.one")))
            && keys.iter().any(|k| k.contains(&format!(".{name}.two"))),
        "the topics are on Redis while the deployment runs: {keys:?}"
    );

    // A reload without `two` removes its topic and keeps `one`'s.
    let path = file(&["one"]);
    success(&server.cli(&["deploy", "--reload", path.to_str().unwrap()]));
    let keys = wait_for("service two's topic to go", Duration::from_secs(30), || {
        let keys = redis_keys(&url, &format!(".{name}."));
        (!keys.iter().any(|k| k.contains(&format!(".{name}.two")))).then_some(keys)
    });
    assert!(
        keys.iter().any(|k| k.contains(&format!(".{name}.one"))),
        "{keys:?}"
    );

    success(&server.cli(&["delete", &name]));
    let keys = redis_keys(&url, &format!(".{name}."));
    assert!(keys.is_empty(), "left on Redis after the delete: {keys:?}");
}
