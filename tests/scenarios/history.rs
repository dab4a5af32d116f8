//! Cancelling tasks, and a deployment's revisions with rollbacks (the CLI's `history`,
//! `rollback` and `cancel`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use deployd_e2e::{Project, Server, git, success, wait_for, workspace};
use serde_json::{Value, json};

/// Commits a `RESULT_PREFIX` of `version` on the repository's `main`; returns the commit.
fn commit(dir: &Path, version: &str) -> String {
    std::fs::write(dir.join("RESULT_PREFIX"), format!("{version} ")).unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", version]);
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn run(server: &Server, deployment: &str) -> String {
    success(&server.cli(&["run", "-d", deployment, "-a", "message", "hello"]))
}

/// Every deploy and reload is a revision; a broken reload is one that failed, and a rollback
/// deploys an earlier revision's file with its git source at the commit it ran, even after
/// the branch moved on.
#[test]
fn a_broken_reload_is_rolled_back_to_an_earlier_revision_and_its_commit() {
    let project = Project::new();
    let repo = project.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::copy(
        workspace().join("tests/fixtures/services/echo.py"),
        repo.join("echo.py"),
    )
    .unwrap();
    let first = commit(&repo, "v1");
    let file = |command: &str| {
        format!(
            "name: hist\nservices:\n  svc:\n    source:\n      type: git\n      location: file://{}@main\n    command: {command}\n",
            repo.display()
        )
    };
    let path = project.write("hist.yaml", &file("python3 echo.py"));
    let path = path.to_str().unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);

    success(&server.cli(&["deploy", path]));
    assert_eq!(run(&server, "hist"), "v1 svc: hello\n");
    let second = commit(&repo, "v2");
    success(&server.cli(&["deploy", "--reload", path]));
    assert_eq!(run(&server, "hist"), "v2 svc: hello\n");

    // A reload whose service cannot start: it fails, and v2 keeps serving.
    project.write("hist.yaml", &file("python3 missing.py"));
    let out = server.cli(&["deploy", "--reload", path]);
    assert!(!out.status.success(), "a broken reload fails");
    assert_eq!(run(&server, "hist"), "v2 svc: hello\n");

    let (status, revisions) = server.get("/deployments/hist/revisions").unwrap();
    assert_eq!(status, 200, "{revisions}");
    let summary: Vec<(u64, &str, &str)> = revisions
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["revision"].as_u64().unwrap(),
                r["kind"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (3, "reload", "failed"),
            (2, "reload", "deployed"),
            (1, "deploy", "deployed")
        ]
    );
    assert_eq!(revisions[2]["sources"]["svc"]["commit"], json!(first));
    assert_eq!(revisions[1]["sources"]["svc"]["commit"], json!(second));
    assert!(
        revisions[0]["error"].as_str().unwrap().contains("svc"),
        "{revisions}"
    );
    assert_eq!(revisions[0]["by"], json!("client 127.0.0.1"));
    assert!(revisions[0].get("spec").is_none(), "lists leave files out");
    let (status, one) = server.get("/deployments/hist/revisions/3").unwrap();
    assert_eq!(status, 200);
    assert!(
        one["spec"].as_str().unwrap().contains("missing.py"),
        "{one}"
    );

    // The CLI lists them.
    let history = success(&server.cli(&["history", "hist"]));
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "a header, three revisions and one error line:\n{history}"
    );
    assert!(
        lines[1].trim_start().starts_with("3 ") && lines[1].contains("failed"),
        "{history}"
    );
    assert!(
        lines[3].contains("reload") && lines[3].contains(&second[..10]),
        "{history}"
    );
    assert!(
        lines[4].contains("deploy") && lines[4].contains(&first[..10]),
        "{history}"
    );

    // Back to revision 1: its commit, though `main` is at v2.
    let out = success(&server.cli(&["rollback", "hist", "1"]));
    assert!(out.contains("rolled back to revision 1"), "{out}");
    assert_eq!(run(&server, "hist"), "v1 svc: hello\n");
    // Without a number: the newest that deployed before the newest (revision 2).
    success(&server.cli(&["rollback", "hist"]));
    assert_eq!(run(&server, "hist"), "v2 svc: hello\n");
    let (_, revisions) = server.get("/deployments/hist/revisions").unwrap();
    assert_eq!(revisions[0]["kind"], json!("rollback"));
    assert_eq!(revisions[0]["rollback_of"], json!(2));
    assert_eq!(revisions[0]["outcome"], json!("deployed"));
    assert_eq!(revisions[1]["rollback_of"], json!(1));
    assert_eq!(revisions[1]["sources"]["svc"]["commit"], json!(first));

    // Bad input is a clear 4xx.
    let (status, body) = server.post("/deployments/hist/rollback?revision=99", &json!({}));
    assert_eq!(status, 404, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("99"), "{body}");
    let (status, body) = server.post("/deployments/hist/rollback?revision=x", &json!({}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.post("/deployments/hist/rollback", &json!({}));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("revision"),
        "{body}"
    );
    let (status, _) = server.get("/deployments/nope/revisions").unwrap();
    assert_eq!(status, 404);
}

fn stream_sse(server: &Server, path: &str) -> Vec<(String, Value)> {
    use std::io::BufRead;
    let response = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .get(format!("{}{path}", server.url))
        .header("accept", "text/event-stream")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut events = Vec::new();
    let mut kind = String::new();
    for line in std::io::BufReader::new(response).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("event:") {
            kind = rest.trim().to_owned();
        } else if let Some(rest) = line.strip_prefix("data:") {
            events.push((kind.clone(), serde_json::from_str(rest.trim()).unwrap()));
        }
    }
    events
}

/// A queued task that is cancelled never runs; a running one ends `cancelled` at once, its
/// stream ends with it, and its worker's place is free again after the grace even though the
/// service (which has no cancel) goes on.
#[test]
fn cancelled_tasks_end_at_once_and_a_queued_one_never_runs() {
    let project = Project::new();
    let log = project.path().join("tasks.log");
    let file = project.write(
        "cancel.yaml",
        &format!(
            "name: cancel\nservices:\n  svc:\n    source:\n      type: local\n      location: src\n    command: python3 echo.py\n    max-concurrency: 1\n    env:\n      TASK_LOG: {}\n",
            log.display()
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));

    let create = |input: Value| {
        let (status, body) = server.post(
            "/deployments/cancel/tasks/create",
            &json!({ "input": input.to_string() }),
        );
        assert_eq!(status, 200, "{body}");
        body["task_id"].as_str().unwrap().to_owned()
    };
    let long = create(json!({"message": "long", "sleep": 600}));
    wait_for("the long task to run", Duration::from_secs(30), || {
        let (_, task) = server
            .get(&format!("/deployments/cancel/tasks/{long}"))
            .unwrap();
        (task["status"] == "running").then_some(())
    });
    let queued = create(json!({"message": "queued"}));
    let (_, task) = server
        .get(&format!("/deployments/cancel/tasks/{queued}"))
        .unwrap();
    assert_eq!(task["status"], json!("queued"), "{task}");

    // The queued one, with the CLI.
    let out = success(&server.cli(&["cancel", "-d", "cancel", &queued]));
    assert_eq!(out, format!("task {queued} cancelled\n"));
    // The running one, through the API: it ends at once, and its stream with it.
    let (status, task) = server.post(
        &format!("/deployments/cancel/tasks/{long}/cancel"),
        &json!({}),
    );
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["status"], json!("cancelled"));
    assert_eq!(task["error"], json!("cancelled by client 127.0.0.1"));
    let events = stream_sse(&server, &format!("/deployments/cancel/tasks/{long}/events"));
    let (kind, last) = events.last().unwrap();
    assert_eq!(kind, "cancelled", "{events:?}");
    assert_eq!(last["data"], json!("cancelled by client 127.0.0.1"));
    assert_eq!(
        events.iter().filter(|(kind, _)| kind != "event").count(),
        1,
        "one entry ends the log: {events:?}"
    );
    let (_, result) = server
        .get(&format!("/deployments/cancel/tasks/{long}/results"))
        .unwrap();
    assert_eq!(result["status"], json!("cancelled"), "{result}");
    // Twice is a conflict; an unknown task is not found.
    let (status, body) = server.post(
        &format!("/deployments/cancel/tasks/{long}/cancel"),
        &json!({}),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("cancelled"),
        "{body}"
    );
    let (status, _) = server.post("/deployments/cancel/tasks/nope/cancel", &json!({}));
    assert_eq!(status, 404);

    // The only place (max-concurrency 1) is free again once the grace is over, long before
    // the 600 s task would have ended.
    let next = create(json!({"message": "next"}));
    let result = server.wait_result("cancel", &next, Duration::from_secs(60));
    assert_eq!(result["result"], json!("svc: next"), "{result}");
    let ran = std::fs::read_to_string(&log).unwrap();
    assert!(
        !ran.contains(&queued),
        "the cancelled queued task never ran: {ran}"
    );
    assert_eq!(ran.lines().filter(|l| *l == long).count(), 1, "{ran}");
    let (_, page) = server
        .get("/deployments/cancel/tasks/search?status=cancelled")
        .unwrap();
    let ids: Vec<&str> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [queued.as_str(), long.as_str()],
        "newest first: {page}"
    );
    assert!(
        server
            .log()
            .contains("abandoned the call of a cancelled task")
    );

    // A run that waits for a task that is cancelled answers 409, naming who cancelled it.
    std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            server.post(
                "/deployments/cancel/tasks/run",
                &json!({ "input": json!({"message": "waited", "sleep": 600}).to_string() }),
            )
        });
        let waited = wait_for("the waited task to run", Duration::from_secs(30), || {
            let (_, page) = server
                .get("/deployments/cancel/tasks/search?status=running")
                .ok()?;
            page["tasks"][0]["task_id"].as_str().map(str::to_owned)
        });
        let (status, _) = server.post(
            &format!("/deployments/cancel/tasks/{waited}/cancel"),
            &json!({}),
        );
        assert_eq!(status, 200);
        let (status, body) = run.join().unwrap();
        assert_eq!(status, 409, "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("cancelled by client"),
            "{body}"
        );
    });
}

/// A reload whose old instance still runs a task at the drain deadline cuts it off and queues it
/// again: the new instance runs it (attempt 2), and the log names one task cut.
#[test]
fn a_task_cut_off_at_the_drain_deadline_runs_again_on_the_new_instance() {
    let project = Project::new();
    let log = project.path().join("tasks.log");
    let file = |greeting: &str| {
        format!(
            "name: drain\nservices:\n  svc:\n    source:\n      type: local\n      location: src\n    command: python3 echo.py\n    env:\n      TASK_LOG: {}\n      GREETING: \"{greeting}\"\n",
            log.display()
        )
    };
    let path = project.write("drain.yaml", &file("one "));
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &["--drain-timeout", "2"]);
    success(&server.cli(&["deploy", path.to_str().unwrap()]));
    let (status, body) = server.post(
        "/deployments/drain/tasks/create",
        &json!({ "input": json!({"message": "long", "sleep": 4}).to_string() }),
    );
    assert_eq!(status, 200, "{body}");
    let task = body["task_id"].as_str().unwrap().to_owned();
    wait_for("the task to run", Duration::from_secs(30), || {
        let (_, t) = server
            .get(&format!("/deployments/drain/tasks/{task}"))
            .ok()?;
        (t["status"] == "running").then_some(())
    });
    // The new version, while the old instance runs the 4 s task: it is cut off after 2 s.
    project.write("drain.yaml", &file("two "));
    success(&server.cli(&["deploy", "--reload", path.to_str().unwrap()]));
    let result = server.wait_result("drain", &task, Duration::from_secs(60));
    assert_eq!(result["result"], json!("two svc: long"), "{result}");
    let (_, t) = server
        .get(&format!("/deployments/drain/tasks/{task}"))
        .unwrap();
    assert_eq!(t["attempt"], json!(2), "{t}");
    let ran = std::fs::read_to_string(&log).unwrap();
    assert_eq!(ran.lines().filter(|l| *l == task).count(), 2, "{ran}");
    // The log's fields may be styled (ANSI escapes between a field's name and its value).
    let log = strip_ansi(&server.log());
    assert!(
        log.lines()
            .any(|l| l.contains("cut off") && l.contains("tasks=1")),
        "{log}"
    );
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte (a letter).
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Cancels racing one another over many tasks, and bad input to the new routes: every answer is
/// a 200, a 4xx naming the problem, never a 5xx; every task ends cancelled or succeeded, once.
#[test]
fn concurrent_cancels_and_bad_input_get_clear_answers() {
    let project = Project::new();
    let log = project.path().join("tasks.log");
    let file = project.write(
        "race.yaml",
        &format!(
            "name: race\nservices:\n  svc:\n    source:\n      type: local\n      location: src\n    command: python3 echo.py\n    max-concurrency: 2\n    env:\n      TASK_LOG: {}\n",
            log.display()
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let tasks: Vec<String> = (0..40)
        .map(|i| {
            let (status, body) = server.post(
                "/deployments/race/tasks/create",
                &json!({ "input": json!({"message": format!("m{i}"), "sleep": 0.2}).to_string() }),
            );
            assert_eq!(status, 200, "{body}");
            body["task_id"].as_str().unwrap().to_owned()
        })
        .collect();
    // Four clients cancel every task at once, in different orders.
    let answers: Vec<(String, u16, Value)> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let (server, tasks) = (&server, &tasks);
                scope.spawn(move || {
                    let mut order: Vec<&String> = tasks.iter().collect();
                    order.rotate_left(c * 10);
                    order
                        .into_iter()
                        .map(|task| {
                            let (status, body) = server.post(
                                &format!("/deployments/race/tasks/{task}/cancel"),
                                &json!({}),
                            );
                            (task.clone(), status, body)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    for (task, status, body) in &answers {
        assert!(
            *status == 200 || *status == 409,
            "cancel {task}: {status} {body}"
        );
        if *status == 409 {
            assert!(
                body["detail"].as_str().unwrap().contains("has ended"),
                "{body}"
            );
        }
    }
    let mut cancelled = 0;
    for task in &tasks {
        let result = server.wait_result("race", task, Duration::from_secs(60));
        let status = result["status"].as_str().unwrap().to_owned();
        assert!(status == "cancelled" || status == "succeeded", "{result}");
        let won = answers.iter().any(|(t, s, _)| t == task && *s == 200);
        assert_eq!(won, status == "cancelled", "{task}: {result}");
        if status == "cancelled" {
            cancelled += 1;
        }
    }
    assert!(
        cancelled > 30,
        "most of the 40 tasks were cancelled before they ran: {cancelled}"
    );
    let ran = std::fs::read_to_string(&log).unwrap_or_default();
    for task in &tasks {
        assert!(
            ran.lines().filter(|l| l == task).count() <= 1,
            "{task} ran twice"
        );
    }

    // Bad input.
    for (path, status, names) in [
        ("/deployments/race/tasks/search?status=bogus", 400, "bogus"),
        ("/deployments/race/tasks/search?limit=0", 400, "limit"),
        ("/deployments/race/tasks/search?limit=100000", 400, "limit"),
        ("/deployments/race/tasks/search?before=nope", 400, "nope"),
        ("/deployments/race/sessions/search?before=nope", 400, "nope"),
        ("/deployments/race/revisions?limit=0", 400, "limit"),
        ("/deployments/race/revisions/0", 400, "revision"),
        ("/deployments/race/revisions/-1", 400, "revision"),
        ("/deployments/race/revisions/99", 404, "99"),
        (
            "/deployments/race/tasks/a%20b%22",
            404,
            "task `a b\"` not found",
        ),
        (
            "/deployments/nope/tasks/search",
            404,
            "Deployment not found",
        ),
    ] {
        let (got, body) = server.get(path).unwrap();
        assert_eq!(got, status, "{path}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(names),
            "{path}: {body}"
        );
    }
    let (got, body) = server.post(
        "/deployments/race/rollback?revision=18446744073709551616",
        &json!({}),
    );
    assert_eq!(got, 400, "{body}");
    let (got, body) = server.post("/deployments/nope/tasks/x/cancel", &json!({}));
    assert_eq!(got, 404, "{body}");
    // The server is fine: a task still runs.
    let (got, body) = server.post(
        "/deployments/race/tasks/run",
        &json!({ "input": json!({"message": "after"}).to_string() }),
    );
    assert_eq!(got, 200, "{body}");
}
