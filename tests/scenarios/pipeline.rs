//! The deploy pipeline: sync → prepare → launch → ready → switch, one item per service.

use std::collections::BTreeSet;
use std::time::Duration;

use deployd_e2e::{Project, Server, success, wait_for};

fn service(build: &str) -> String {
    format!(
        "    source:\n      type: local\n      location: src\n    command: python3 echo.py\n    build:\n      - \"{build}\"\n"
    )
}

/// Done when 2 of issue 7: each service is seen moving through the stages while a slow build
/// runs; a failing build fails its service with the build's output, and the others deploy.
#[test]
fn services_move_through_the_stages_and_a_failing_build_fails_only_its_service() {
    let project = Project::new();
    let release = project.path().join("release-slow-build");
    let file = project.write(
        "three.yaml",
        &format!(
            "name: three\nservices:\n  slow:\n{}  quick:\n{}  broken:\n{}",
            service(&format!(
                "while [ ! -e {} ]; do sleep 0.05; done; echo slow build done",
                release.display()
            )),
            service("echo quick build done"),
            service("echo 'fatal: cannot compile' >&2; exit 7"),
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);

    let cli = {
        let url = server.url.clone();
        let file = file.clone();
        std::thread::spawn(move || {
            std::process::Command::new(deployd_e2e::binary())
                .args(["deploy", file.to_str().unwrap()])
                .env("DEPLOYD_SERVER", url)
                .output()
                .unwrap()
        })
    };

    // While the slow build runs, watch every service's stage.
    let mut seen: BTreeSet<(String, String, String)> = BTreeSet::new();
    let observe = |seen: &mut BTreeSet<(String, String, String)>| {
        let (status, body) = server.get("/deployments/three").ok()?;
        (status == 200).then_some(())?;
        for service in body["services"].as_array()? {
            let stage = &service["stage"];
            seen.insert((
                service["id"].as_str()?.to_owned(),
                stage["stage"].as_str()?.to_owned(),
                stage["state"].as_str()?.to_owned(),
            ));
        }
        Some(body)
    };
    wait_for(
        "the quick service to be deployed while the slow one builds",
        Duration::from_secs(60),
        || {
            let body = observe(&mut seen)?;
            let quick = body["services"]
                .as_array()?
                .iter()
                .find(|s| s["id"] == "quick")?;
            (quick["phase"] == "ready" && quick["stage"]["state"] == "done").then_some(())
        },
    );
    let body = observe(&mut seen).unwrap();
    let slow = body["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "slow")
        .unwrap()
        .clone();
    assert_eq!(slow["stage"]["stage"], "prepare", "{body}");
    assert_eq!(slow["stage"]["state"], "running", "{body}");
    assert_eq!(slow["phase"], "pending", "{body}");
    assert_eq!(body["deploying"], true);

    std::fs::write(&release, "").unwrap();
    let body = wait_for("the deploy to end", Duration::from_secs(60), || {
        let body = observe(&mut seen)?;
        (body["deploying"] == false).then_some(body)
    });
    let by_id = |id: &str| {
        body["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(
        (
            by_id("slow")["phase"].as_str(),
            by_id("slow")["stage"]["stage"].as_str()
        ),
        (Some("ready"), Some("switch"))
    );
    assert_eq!(by_id("quick")["phase"], "ready");
    let broken = by_id("broken");
    assert_eq!(broken["phase"], "failed", "{body}");
    assert_eq!(broken["stage"]["stage"], "prepare");
    assert_eq!(broken["stage"]["state"], "failed");
    let error = broken["stage"]["error"].as_str().unwrap();
    assert!(error.contains("fatal: cannot compile"), "{error}");
    assert!(error.contains("exit status: 7"), "{error}");

    assert!(
        seen.contains(&("slow".into(), "prepare".into(), "running".into())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("quick".into(), "switch".into(), "done".into())),
        "{seen:?}"
    );

    // The CLI followed the deploy and named the failing stage with the build's output.
    let out = cli.join().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("service `broken` failed in stage prepare"),
        "{stderr}"
    );
    assert!(stderr.contains("fatal: cannot compile"), "{stderr}");

    // The services that deployed take tasks.
    let out = success(&server.cli(&["run", "-d", "three", "-s", "slow", "-a", "message", "hi"]));
    assert_eq!(out, "slow: hi\n");
    let out = success(&server.cli(&["run", "-d", "three", "-s", "quick", "-a", "message", "hi"]));
    assert_eq!(out, "quick: hi\n");
}

/// A reload whose new build fails keeps the previous instance serving.
#[test]
fn a_reload_whose_build_fails_keeps_the_previous_instance() {
    let project = Project::new();
    let file = project.write(
        "keep.yaml",
        &format!("name: keep\nservices:\n  svc:\n{}", service("true")),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let (_, pid, _) = server.service("keep", 0);

    project.write(
        "keep.yaml",
        &format!("name: keep\nservices:\n  svc:\n{}", service("exit 1")),
    );
    let out = server.cli(&["deploy", "--reload", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let (phase, new_pid, _) = server.service("keep", 0);
    assert_eq!(
        (phase.as_str(), new_pid),
        ("ready", pid),
        "the old instance still runs"
    );
    let out = success(&server.cli(&["run", "-d", "keep", "-a", "message", "still"]));
    assert_eq!(out, "svc: still\n");
}

/// `replicas: 3` runs three supervised processes on their own ports; tasks are spread across
/// them (one at a time each, with `max-concurrency: 1`); each replica's output is its own log;
/// a replica that dies is restarted on its own while the others go on.
#[test]
fn replicas_run_as_separate_processes_and_share_the_tasks() {
    let project = Project::new();
    let file = project.write(
        "replicated.yaml",
        "name: replicated\nservices:\n  svc:\n    source:\n      type: local\n      location: src\n    \
         command: python3 echo.py\n    replicas: 3\n    max-concurrency: 1\n",
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    let out = success(&server.cli(&["deploy", file.to_str().unwrap()]));
    assert!(!out.contains("not supported"), "{out}");
    let (_, status) = server.get("/deployments/replicated").unwrap();
    let service = &status["services"][0];
    assert_eq!(service["phase"], "ready", "{status}");
    let replicas = service["replicas"].as_array().expect("replicas").clone();
    assert_eq!(replicas.len(), 3, "{status}");
    let pids: BTreeSet<u64> = replicas
        .iter()
        .map(|r| r["pid"].as_u64().unwrap())
        .collect();
    let ports: BTreeSet<u64> = replicas
        .iter()
        .map(|r| r["port"].as_u64().unwrap())
        .collect();
    assert_eq!((pids.len(), ports.len()), (3, 3), "{status}");
    assert!(replicas.iter().all(|r| r["phase"] == "ready"), "{status}");

    // Nine tasks of 0.3 s at once: with one task per replica, all three take some.
    let tasks: Vec<String> = (0..9)
        .map(|n| {
            let (code, task) = server.post(
                "/deployments/replicated/tasks/create",
                &serde_json::json!({"input": serde_json::json!({
                    "message": format!("m{n}"), "sleep": 0.3, "report_process": true
                }).to_string()}),
            );
            assert_eq!(code, 200, "{task}");
            task["task_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut used = BTreeSet::new();
    for task in &tasks {
        let lines = server.read_lines_until(
            &format!("/deployments/replicated/tasks/{task}/events?envelope=true"),
            |line| line["type"] != "event",
        );
        assert_eq!(lines.last().unwrap()["type"], "result", "{lines:?}");
        let process = lines
            .iter()
            .find(|line| line["data"]["step"] == "process")
            .expect("the process event");
        used.insert(process["data"]["port"].as_u64().unwrap());
    }
    assert_eq!(used, ports, "every replica ran tasks");

    // Each replica writes its own log.
    for replica in ["0", "1", "2"] {
        let (code, text) = server.get_text(&format!(
            "/deployments/replicated/services/svc/logs?replica={replica}"
        ));
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("--- deployd:"), "replica {replica}: {text}");
    }
    let (code, _) = server.get_text("/deployments/replicated/services/svc/logs?replica=3");
    assert_eq!(code, 400);

    // One replica killed: it comes back on its own; the others kept running.
    let victim = *pids.iter().next().unwrap();
    deployd_e2e::sigkill(u32::try_from(victim).unwrap());
    let status = wait_for(
        "the killed replica to restart",
        Duration::from_secs(60),
        || {
            let (_, status) = server.get("/deployments/replicated").ok()?;
            let replicas = status["services"][0]["replicas"].as_array()?.clone();
            let now: BTreeSet<u64> = replicas.iter().filter_map(|r| r["pid"].as_u64()).collect();
            (replicas.iter().all(|r| r["phase"] == "ready")
                && now.len() == 3
                && !now.contains(&victim))
            .then_some(status)
        },
    );
    assert_eq!(status["services"][0]["restarts"], 1, "{status}");
    let out = success(&server.cli(&["run", "-d", "replicated", "-a", "message", "after"]));
    assert_eq!(out, "svc: after\n");
}

/// A reload is a diff: a service whose settings, code and environment are unchanged keeps its
/// running processes (its tasks go on undisturbed), a changed one gets new ones; a reload that
/// changes nothing restarts nothing.
#[test]
fn a_reload_replaces_only_the_services_that_changed() {
    let project = Project::new();
    let file = |greeting: &str| {
        project.deployment(
            "diffed",
            &[
                ("steady", &[("GREETING", "same ")]),
                ("changing", &[("GREETING", greeting)]),
            ],
        )
    };
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file("one ").to_str().unwrap()]));
    server.wait_ready("diffed");
    let pid = |index| server.service("diffed", index).1.expect("a pid");
    let (steady, changing) = (pid(0), pid(1));

    success(&server.cli(&["deploy", "--reload", file("one ").to_str().unwrap()]));
    assert_eq!((pid(0), pid(1)), (steady, changing), "nothing changed");

    success(&server.cli(&["deploy", "--reload", file("two ").to_str().unwrap()]));
    assert_eq!(pid(0), steady, "the unchanged service keeps its process");
    assert_ne!(pid(1), changing, "the changed service runs anew");
    let out = success(&server.cli(&[
        "run", "-d", "diffed", "-s", "changing", "-a", "message", "hi",
    ]));
    assert!(out.contains("two changing: hi"), "{out}");
}

/// A service with a `build` and no `source` (its command names a program elsewhere, as the
/// graph example's does): the build runs in its empty folder, and the service starts.
#[test]
fn a_service_without_a_source_builds_and_runs() {
    let project = Project::new();
    let echo = project.path().join("src/echo.py");
    let built = project.path().join("built");
    let file = project.write(
        "sourceless.yaml",
        &format!(
            "name: sourceless\nservices:\n  svc:\n    build:\n      - touch {}\n    command: python3 {}\n",
            built.display(),
            echo.display()
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    server.wait_ready("sourceless");
    assert!(built.is_file(), "the build ran");
    let out = success(&server.cli(&["run", "-d", "sourceless", "-a", "message", "hi"]));
    assert!(out.contains("svc: hi"), "{out}");
}
