//! llama_deploy deployments of Python workflows: each service in a virtualenv of its own, made
//! with its `python-dependencies`, served by deployd's Python adapter.

use std::time::Duration;

use deployd_e2e::{Project, Server, copy_python_fixtures, success, wait_for};
use serde_json::{Value, json};

/// A project with the fixture workflows in `src/` and a llama_deploy deployment file whose
/// services are `services` (id, attribute of `src/workflow.py`).
fn project(name: &str, services: &[(&str, &str)]) -> (Project, std::path::PathBuf) {
    let project = Project::new();
    copy_python_fixtures(&project.path().join("src"));
    let mut text = format!("name: {name}\ncontrol-plane: {{}}\nservices:\n");
    for (id, attribute) in services {
        text.push_str(&format!(
            "  {id}:\n    name: {id}\n    source:\n      type: local\n      location: src\n    \
             import-path: src/workflow:{attribute}\n    python-dependencies:\n      \
             - src/requirements.txt\n"
        ));
    }
    let file = project.write(&format!("{name}.yml"), &text);
    (project, file)
}

fn run(server: &Server, deployment: &str, body: &Value) -> (u16, Value) {
    server.post(&format!("/deployments/{deployment}/tasks/run"), body)
}

/// llama_deploy's quickstart shape, unchanged: `import-path` and no `command`. Results, three
/// streamed events in order, a session counter and a human in the loop.
#[test]
fn a_llama_deploy_workflow_deployment_runs_unchanged() {
    let (project, file) = project(
        "flows",
        &[
            ("echo_workflow", "echo_workflow"),
            ("counter_workflow", "counter_workflow"),
            ("approval_workflow", "approval_workflow"),
            ("failing_workflow", "failing_workflow"),
        ],
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    drop(project);

    // The first service is the default one; `tasks/run` answers the StopEvent's result.
    let (status, body) = run(
        &server,
        "flows",
        &json!({ "input": json!({"message": "hi"}).to_string() }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "Message received: hi (six 1.16.0)");

    // Three events, in order, then the result.
    let task = server.create_task("flows", "streamed");
    let lines = server.read_lines_until(
        &format!("/deployments/flows/tasks/{task}/events?envelope=true"),
        |line| line["type"] == "result",
    );
    let progress: Vec<&Value> = lines
        .iter()
        .filter(|l| l["data"]["qualified_name"] == "workflow.Progress")
        .map(|l| &l["data"]["value"])
        .collect();
    assert_eq!(
        progress,
        [
            &json!({"step": 1, "message": "streamed"}),
            &json!({"step": 2, "message": "streamed"}),
            &json!({"step": 3, "message": "streamed"}),
        ],
        "{lines:?}"
    );

    // llama_deploy's own stream: each event's value alone, no result line; `raw_event=true`
    // gives the serializer's whole object.
    let (status, text) = server.get_text(&format!("/deployments/flows/tasks/{task}/events"));
    assert_eq!(status, 200);
    let values: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        values[..3],
        [
            json!({"step": 1, "message": "streamed"}),
            json!({"step": 2, "message": "streamed"}),
            json!({"step": 3, "message": "streamed"}),
        ],
        "{text}"
    );
    assert!(
        !text.contains("Message received"),
        "no result line on llama_deploy's stream: {text}"
    );
    let (_, raw) = server.get_text(&format!(
        "/deployments/flows/tasks/{task}/events?raw_event=true"
    ));
    let first: Value = serde_json::from_str(raw.lines().next().unwrap_or("null")).unwrap();
    assert_eq!(first["qualified_name"], "workflow.Progress", "{raw}");
    assert_eq!(
        first["value"],
        json!({"step": 1, "message": "streamed"}),
        "{raw}"
    );

    // A session carries the workflow's Context: 1, then 2; a new session starts at 1.
    let (_, session) = server.post("/deployments/flows/sessions/create", &json!({}));
    let session = session["session_id"]
        .as_str()
        .expect("a session")
        .to_owned();
    let counter = json!({ "input": "{}", "service_id": "counter_workflow" });
    for expected in ["1", "2"] {
        let (status, body) = server.post(
            &format!("/deployments/flows/tasks/run?session_id={session}"),
            &counter,
        );
        assert_eq!((status, body), (200, json!(expected)));
    }
    assert_eq!(run(&server, "flows", &counter), (200, json!("1")));

    // A human in the loop: the workflow asks, the answer is sent as an event, it resumes.
    let (status, created) = server.post(
        "/deployments/flows/tasks/create",
        &json!({ "input": json!({"item": "the plan"}).to_string(), "service_id": "approval_workflow" }),
    );
    assert_eq!(status, 200, "{created}");
    let task = created["task_id"].as_str().expect("a task id").to_owned();
    let asked = server.read_lines_until(
        &format!("/deployments/flows/tasks/{task}/events?envelope=true"),
        |line| {
            line["data"]["qualified_name"]
                .as_str()
                .is_some_and(|name| name.ends_with("InputRequiredEvent"))
        },
    );
    let question = asked.last().expect("the question");
    assert!(
        question.to_string().contains("approve the plan? "),
        "{question}"
    );
    let answer = json!({
        "__is_pydantic": true,
        "value": {"response": "yes"},
        "qualified_name": "llama_index.core.workflow.events.HumanResponseEvent",
    });
    let (status, body) = server.post(
        &format!("/deployments/flows/tasks/{task}/events?envelope=true"),
        &json!({ "service_id": "approval_workflow", "event_obj_str": answer.to_string() }),
    );
    assert_eq!(status, 200, "{body}");
    let result = server.wait_result("flows", &task, Duration::from_secs(60));
    assert_eq!(result["result"], "human said: yes", "{result}");

    // A workflow that raises fails its task with the exception's type and message.
    let (status, body) = run(
        &server,
        "flows",
        &json!({ "input": "{}", "service_id": "failing_workflow" }),
    );
    assert_eq!(status, 502, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("ValueError"), "{detail}");
    assert!(detail.contains("the input was wrong"), "{detail}");
}

/// An `import-path` whose attribute does not exist: the deploy fails naming the service, the
/// attribute and what Python said.
#[test]
fn a_missing_workflow_fails_the_deploy_with_what_python_said() {
    let (_project, file) = project("broken", &[("svc", "no_such_workflow")]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    let out = server.cli(&["deploy", file.to_str().unwrap()]);
    assert!(!out.status.success(), "the deploy succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`svc`"), "{stderr}");
    assert!(stderr.contains("no_such_workflow"), "{stderr}");
    assert!(stderr.contains("workflow"), "{stderr}");
    wait_for("the service to be failed", Duration::from_secs(10), || {
        let (_, body) = server.get("/deployments/broken").ok()?;
        (body["services"][0]["phase"] == "failed").then_some(())
    });
}

/// A reload with changed workflow code answers once the new code serves: a task sent right
/// after the answer runs the new code, and deployd was not restarted. The environment, whose
/// dependencies did not change, is reused.
#[test]
fn a_reload_answers_once_the_new_code_serves() {
    let (project, file) = project("reloaded", &[("echo_workflow", "echo_workflow")]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let pid = server.pid();
    let input = json!({ "input": json!({"message": "hi"}).to_string() });
    assert_eq!(
        run(&server, "reloaded", &input),
        (200, json!("Message received: hi (six 1.16.0)"))
    );

    let code = project.path().join("src/workflow.py");
    let text = std::fs::read_to_string(&code).unwrap();
    std::fs::write(&code, text.replace("Message received", "Message taken")).unwrap();
    let envs = || {
        std::fs::read_dir(server.data_dir.join("deployments/reloaded/envs"))
            .map(|dir| dir.count())
            .unwrap_or(0)
    };
    assert_eq!(envs(), 1);
    let base = project.path().display().to_string();
    let (status, body) = server.post_raw(
        "application/yaml",
        &format!("/deployments/create?reload=true&base_path={base}"),
        &std::fs::read_to_string(&file).unwrap(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        run(&server, "reloaded", &input),
        (200, json!("Message taken: hi (six 1.16.0)")),
        "the first task after the reload's answer runs the new code"
    );
    assert_eq!(server.pid(), pid, "deployd was not restarted");
    assert_eq!(envs(), 1, "the environment was reused");
}

/// A dependency that cannot be installed fails the deploy with the installer's last lines; a
/// dependency path or an env file that leaves the service's source is refused, naming it; a
/// module that does not exist fails the deploy with what Python said.
#[test]
fn bad_python_services_fail_their_deploy_with_a_clear_error() {
    let project = Project::new();
    copy_python_fixtures(&project.path().join("src"));
    std::fs::write(project.path().join("outside-requirements.txt"), "six\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    let deploy = |name: &str, service: &str| {
        let file = project.write(
            &format!("{name}.yml"),
            &format!(
                "name: {name}\nservices:\n  svc:\n    source:\n      type: local\n      \
                 location: src\n{service}"
            ),
        );
        let out = server.cli(&["deploy", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{name} deployed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let stderr = deploy(
        "uninstallable",
        "    import-path: src/workflow:echo_workflow\n    python-dependencies:\n      \
         - deployd-no-such-package-for-tests==9.9.9\n",
    );
    assert!(stderr.contains("`svc`"), "{stderr}");
    assert!(
        stderr.contains("deployd-no-such-package-for-tests"),
        "the installer's own words: {stderr}"
    );

    let link = project.path().join("src/linked-requirements.txt");
    std::os::unix::fs::symlink(project.path().join("outside-requirements.txt"), &link).unwrap();
    let stderr = deploy(
        "escaping",
        "    import-path: src/workflow:echo_workflow\n    python-dependencies:\n      \
         - src/linked-requirements.txt\n",
    );
    assert!(stderr.contains("linked-requirements.txt"), "{stderr}");
    assert!(stderr.contains("outside-requirements.txt"), "{stderr}");
    std::fs::remove_file(&link).unwrap();

    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("secret.env"), "TOKEN=hunter2\n").unwrap();
    std::os::unix::fs::symlink(
        elsewhere.path().join("secret.env"),
        project.path().join("linked.env"),
    )
    .unwrap();
    let stderr = deploy(
        "env-escaping",
        "    import-path: src/workflow:echo_workflow\n    env-files:\n      - linked.env\n",
    );
    assert!(stderr.contains("`linked.env`"), "{stderr}");
    assert!(stderr.contains("outside"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "no content of the file: {stderr}"
    );

    let stderr = deploy(
        "moduleless",
        "    import-path: src/no_such_module:echo_workflow\n",
    );
    assert!(stderr.contains("no_such_module"), "{stderr}");
    assert!(stderr.contains("ModuleNotFoundError"), "{stderr}");
}

/// A session's Context survives a restart of deployd and of the workflow's process (llama_deploy
/// 0.9 loses it): the counter goes on at 3 after 1 and 2.
#[test]
fn a_session_goes_on_after_deployd_restarts() {
    let (_project, file) = project("durable", &[("counter_workflow", "counter_workflow")]);
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let mut server = Server::start(&data_dir, &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let (_, session) = server.post("/deployments/durable/sessions/create", &json!({}));
    let session = session["session_id"]
        .as_str()
        .expect("a session")
        .to_owned();
    let count = |server: &Server| {
        server.post(
            &format!("/deployments/durable/tasks/run?session_id={session}"),
            &json!({ "input": "{}" }),
        )
    };
    assert_eq!(count(&server), (200, json!("1")));
    assert_eq!(count(&server), (200, json!("2")));
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(60)).is_some());

    let server = Server::start(&data_dir, &[]);
    server.wait_ready("durable");
    assert_eq!(count(&server), (200, json!("3")));
}

/// A workflow whose module never finishes loading (it hangs at import) fails its health deadline:
/// a first deploy fails with the deadline and the process's last log lines; a reload to it fails
/// the same way while the old version keeps serving.
#[test]
fn a_workflow_that_never_gets_healthy_fails_its_deploy_and_the_old_version_serves() {
    let (project, file) = project("stuck", &[("svc", "echo_workflow")]);
    std::fs::write(
        project.path().join("src/hang.py"),
        "import time\n\nprint('loading the model, this takes a while', flush=True)\n\
         time.sleep(3600)\nworkflow = None\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let input = json!({ "input": json!({"message": "hi"}).to_string() });
    assert_eq!(
        run(&server, "stuck", &input),
        (200, json!("Message received: hi (six 1.16.0)"))
    );

    let hanging = |text: &str| {
        text.replace("src/workflow:echo_workflow", "src/hang:workflow")
            + "    health:\n      timeout: 2s\n"
    };
    let check = |what: &str, detail: &str| {
        assert!(detail.contains("`svc`"), "{what}: {detail}");
        assert!(
            detail.contains("did not answer GET /healthz within 2s"),
            "{what}: {detail}"
        );
        assert!(
            detail.contains("loading the model, this takes a while"),
            "{what}: the process's last lines: {detail}"
        );
    };

    // A reload to the hanging version fails; the old version serves on.
    let original = std::fs::read_to_string(&file).unwrap();
    let base = project.path().display().to_string();
    let (status, body) = server.post_raw(
        "application/yaml",
        &format!("/deployments/create?reload=true&base_path={base}"),
        &hanging(&original),
    );
    assert_eq!(status, 503, "{body}");
    check("reload", body["detail"].as_str().unwrap_or_default());
    assert_eq!(
        run(&server, "stuck", &input),
        (200, json!("Message received: hi (six 1.16.0)")),
        "the old version serves after the failed reload"
    );

    // A first deploy of it fails.
    let fresh = project.write(
        "stuck-new.yml",
        &hanging(&original.replace("name: stuck", "name: stuck-new")),
    );
    let out = server.cli(&["deploy", fresh.to_str().unwrap()]);
    assert!(!out.status.success(), "the hanging workflow deployed");
    check("deploy", &String::from_utf8_lossy(&out.stderr));
}

/// A service whose `env` asks for several adapter workers: tasks on every worker, and each
/// human-in-the-loop answer reaches the worker running its task, whichever worker deployd's
/// event request lands on.
#[test]
fn adapter_workers_serve_one_service_and_events_find_their_task() {
    let (project, file) = project("workers", &[("approval_workflow", "approval_workflow")]);
    let text = std::fs::read_to_string(&file).unwrap()
        + "    env:\n      DEPLOYD_ADAPTER_WORKERS: \"3\"\n";
    std::fs::write(&file, text).unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    drop(project);
    let log = std::fs::read_to_string(
        server
            .data_dir
            .join("deployments/workers/logs/approval_workflow.log"),
    )
    .unwrap_or_default();
    assert!(log.contains("in 3 worker processes"), "{log}");

    let tasks: Vec<String> = (0..8)
        .map(|n| {
            let (status, created) = server.post(
                "/deployments/workers/tasks/create",
                &json!({ "input": json!({"item": format!("plan {n}")}).to_string() }),
            );
            assert_eq!(status, 200, "{created}");
            created["task_id"].as_str().expect("a task id").to_owned()
        })
        .collect();
    for (n, task) in tasks.iter().enumerate() {
        server.read_lines_until(
            &format!("/deployments/workers/tasks/{task}/events?envelope=true"),
            |line| {
                line["data"]["qualified_name"]
                    .as_str()
                    .is_some_and(|name| name.ends_with("InputRequiredEvent"))
            },
        );
        let answer = json!({
            "__is_pydantic": true,
            "value": {"response": format!("yes {n}")},
            "qualified_name": "llama_index.core.workflow.events.HumanResponseEvent",
        });
        let (status, body) = server.post(
            &format!("/deployments/workers/tasks/{task}/events"),
            &json!({ "service_id": "approval_workflow", "event_obj_str": answer.to_string() }),
        );
        assert_eq!(status, 200, "task {n}: {body}");
    }
    for (n, task) in tasks.iter().enumerate() {
        let result = server.wait_result("workers", task, Duration::from_secs(60));
        assert_eq!(result["result"], format!("human said: yes {n}"), "{result}");
    }
}
