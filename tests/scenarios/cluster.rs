//! Three deployd nodes of one cluster on loopback: they share the machine's PostgreSQL (a
//! schema of the scenario's own, in the database at `DEPLOYD_TEST_POSTGRES`) and its Redis
//! (`DEPLOYD_TEST_REDIS_URL`); `cargo xtask e2e` makes sure both run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use deployd_e2e::{Project, Server, TcpTap, binary, success, url_address, wait_for};
use serde_json::{Value, json};

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn postgres_url() -> String {
    env_or(
        "DEPLOYD_TEST_POSTGRES",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

fn redis_url() -> String {
    env_or("DEPLOYD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// The nodes of one cluster, with its own schema and cluster name (its own topics).
struct Cluster {
    nodes: Vec<Server>,
    schema: String,
    store: String,
    name: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `count` nodes; `store` overrides the store URL of each (a tap in front of
    /// PostgreSQL).
    fn start(count: usize, store: Option<&str>) -> Self {
        let n = CLUSTERS.fetch_add(1, Ordering::SeqCst);
        let name = format!("e2e{}n{n}", std::process::id());
        let schema = format!("cluster_e2e_{}_{n}", std::process::id());
        let base = store.map_or_else(postgres_url, str::to_owned);
        let store = format!("{base}?schema={schema}");
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Self {
            nodes: Vec::new(),
            schema,
            store,
            name,
            dir,
        };
        for i in 0..count {
            cluster.add_node(i);
        }
        cluster
    }

    fn add_node(&mut self, i: usize) {
        let server = Server::start(
            &self.dir.path().join(format!("node{i}")),
            &[
                "--store",
                &self.store,
                "--cluster",
                &self.name,
                "--queue",
                &redis_url(),
                "--lease",
                "2",
            ],
        );
        self.nodes.push(server);
    }

    fn node_id(&self, i: usize) -> String {
        let (_, status) = self.nodes[i].get("/status/").unwrap();
        status["cluster"]["node"]
            .as_str()
            .unwrap_or_else(|| panic!("a node of a cluster names itself: {status}"))
            .to_owned()
    }

    /// Waits until deployment `name` serves on every node.
    fn wait_everywhere(&self, name: &str) {
        for node in &self.nodes {
            wait_for(
                "the deployment to serve on every node",
                Duration::from_secs(60),
                || {
                    let (code, status) = node.get(&format!("/deployments/{name}")).ok()?;
                    (code == 200 && status["services"][0]["phase"] == "ready").then_some(())
                },
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The nodes first: they hold connections to the schema.
        self.nodes.clear();
        let _ = Command::new("psql")
            .args([
                &postgres_url(),
                "-qc",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema),
            ])
            .output();
    }
}

/// A deployment of the test service with one task at a time per node, logging every task it
/// runs (with the node) to `log`.
fn deployment(project: &Project, name: &str, log: &Path, greeting: &str) -> PathBuf {
    project.write(
        &format!("{name}.yaml"),
        &format!(
            "name: {name}\nservices:\n  svc:\n    source:\n      type: local\n      location: src\n    \
             command: python3 echo.py\n    max-concurrency: 1\n    env:\n      TASK_LOG: \"{}\"\n      \
             TASK_LOG_NODE: \"1\"\n      GREETING: \"{greeting}\"\n",
            log.display()
        ),
    )
}

/// The task log: task id -> the nodes that ran it, in order.
fn runs(log: &Path) -> BTreeMap<String, Vec<String>> {
    let mut runs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let (task, node) = line.split_once(' ').unwrap_or((line, ""));
        runs.entry(task.to_owned())
            .or_default()
            .push(node.to_owned());
    }
    runs
}

fn create(node: &Server, deployment: &str, input: &Value) -> String {
    let (code, body) = node.post(
        &format!("/deployments/{deployment}/tasks/create"),
        &json!({ "input": input.to_string() }),
    );
    assert_eq!(code, 200, "{body}");
    body["task_id"].as_str().unwrap().to_owned()
}

/// The task's outcome, read from `node` (waits up to `limit`).
fn result(node: &Server, deployment: &str, task: &str, limit: Duration) -> Value {
    wait_for("the task's result", limit, || {
        let (code, body) = node
            .get(&format!("/deployments/{deployment}/tasks/{task}/results"))
            .ok()?;
        assert_eq!(code, 200, "{body}");
        (!body.is_null()).then_some(body)
    })
}

/// A deployment created on node A runs on all three; 300 tasks sent round-robin to A, B and C
/// complete exactly once, on every node; a task created on B streams its events from C; a
/// human-in-the-loop event posted to A reaches the task running on C; a reload on B drains (no
/// task fails or runs twice); node C killed with SIGKILL in the middle of its tasks loses none.
#[test]
fn three_nodes_share_deployments_tasks_events_and_outlive_a_reload_and_a_kill() {
    let mut cluster = Cluster::start(3, None);
    let project = Project::new();
    let log = project.path().join("tasks.log");
    let file = deployment(&project, "shared", &log, "");
    let ids: Vec<String> = (0..3).map(|i| cluster.node_id(i)).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3, "{ids:?}");
    let (_, status) = cluster.nodes[1].get("/status/").unwrap();
    let nodes = status["cluster"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{status}");
    assert!(nodes.iter().all(|n| n["live"] == true), "{status}");
    assert_eq!(status["cluster"]["name"], cluster.name.as_str());

    // Created on A, running on all three.
    success(&cluster.nodes[0].cli(&["deploy", file.to_str().unwrap()]));
    cluster.wait_everywhere("shared");

    // 300 tasks round-robin to A, B, C, 12 clients at once: each completes exactly once.
    let tasks: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|client| {
                let cluster = &cluster;
                scope.spawn(move || {
                    (0..25)
                        .map(|k| {
                            let n = client * 25 + k;
                            let node = &cluster.nodes[n % 3];
                            let task = create(node, "shared", &json!({"message": format!("m{n}")}));
                            (n, task)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, String)> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        all.into_iter().map(|(_, task)| task).collect()
    });
    for (n, task) in tasks.iter().enumerate() {
        let node = &cluster.nodes[(n + 1) % 3];
        let outcome = result(node, "shared", task, Duration::from_secs(120));
        assert_eq!(outcome["status"], "succeeded", "{outcome}");
        assert_eq!(outcome["result"], format!("svc: m{n}"), "{outcome}");
    }
    let ran = runs(&log);
    assert_eq!(ran.len(), 300, "every task ran");
    assert!(
        ran.values().all(|nodes| nodes.len() == 1),
        "a task ran twice: {:?}",
        ran.iter().filter(|(_, n)| n.len() > 1).collect::<Vec<_>>()
    );
    let per_node: BTreeSet<&String> = ran.values().flatten().collect();
    assert_eq!(per_node.len(), 3, "every node ran tasks: {per_node:?}");

    // Created on B, followed from C: live entries cross nodes.
    let task = create(
        &cluster.nodes[1],
        "shared",
        &json!({"message": "followed", "sleep": 0.5}),
    );
    let lines = cluster.nodes[2].read_lines_until(
        &format!("/deployments/shared/tasks/{task}/events?envelope=true"),
        |line| line["type"] != "event",
    );
    let steps: Vec<Value> = lines.iter().map(|l| l["data"]["step"].clone()).collect();
    assert_eq!(
        steps[..2],
        [json!("received"), json!("echoing")],
        "{lines:?}"
    );
    assert_eq!(lines.last().unwrap()["data"], "svc: followed", "{lines:?}");

    // Three tasks waiting for a person: one per node (one task at a time per node). Each
    // event goes to node A, whichever node runs the task.
    let waiting: Vec<String> = (0..3)
        .map(|_| {
            create(
                &cluster.nodes[1],
                "shared",
                &json!({"wait_for_event": true, "report_process": true}),
            )
        })
        .collect();
    let mut runs_on = BTreeMap::new();
    for task in &waiting {
        let lines = cluster.nodes[0].read_lines_until(
            &format!("/deployments/shared/tasks/{task}/events?envelope=true"),
            |line| line["data"]["step"] == "waiting",
        );
        let process = lines
            .iter()
            .find(|l| l["data"]["step"] == "process")
            .unwrap_or_else(|| panic!("{lines:?}"));
        runs_on.insert(
            process["data"]["node"].as_str().unwrap().to_owned(),
            task.clone(),
        );
    }
    assert_eq!(runs_on.len(), 3, "one waiting task per node: {runs_on:?}");
    for (node, task) in &runs_on {
        let event = json!({"__is_pydantic": true, "value": {"answer": node},
                           "qualified_name": "workflow.HumanResponseEvent"});
        let (code, body) = cluster.nodes[0].post(
            &format!("/deployments/shared/tasks/{task}/events"),
            &json!({"event_obj_str": event.to_string(), "agent_id": "svc"}),
        );
        assert_eq!(code, 200, "{body}");
    }
    for (node, task) in &runs_on {
        let outcome = result(&cluster.nodes[0], "shared", task, Duration::from_secs(30));
        assert_eq!(outcome["status"], "succeeded", "{outcome}");
        let text = outcome["result"].as_str().unwrap();
        assert!(
            text.contains(node.as_str()),
            "the event reached {node}: {text}"
        );
    }
    assert!(
        runs_on.contains_key(&ids[2]),
        "one waited on C: {runs_on:?}"
    );

    // Three long tasks, one per node, all cancelled through node A: each ends at once, and the
    // node that runs it (told through the store) stops it and frees its place.
    let long: Vec<String> = (0..3)
        .map(|_| {
            create(
                &cluster.nodes[2],
                "shared",
                &json!({"sleep": 600, "report_process": true}),
            )
        })
        .collect();
    let mut long_on = BTreeMap::new();
    for task in &long {
        let lines = cluster.nodes[0].read_lines_until(
            &format!("/deployments/shared/tasks/{task}/events?envelope=true"),
            |line| line["data"]["step"] == "process",
        );
        let node = lines.last().unwrap()["data"]["node"]
            .as_str()
            .unwrap()
            .to_owned();
        long_on.insert(node, task.clone());
    }
    assert_eq!(long_on.len(), 3, "one long task per node: {long_on:?}");
    for task in &long {
        let (code, body) = cluster.nodes[0].post(
            &format!("/deployments/shared/tasks/{task}/cancel"),
            &json!({}),
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "cancelled", "{body}");
        let lines = cluster.nodes[1].read_lines_until(
            &format!("/deployments/shared/tasks/{task}/events?envelope=true"),
            |line| line["type"] != "event",
        );
        assert_eq!(lines.last().unwrap()["type"], "cancelled", "{lines:?}");
    }
    // Every node's one place is free again long before 600 s: three quick tasks succeed.
    let quick: Vec<String> = (0..3)
        .map(|i| create(&cluster.nodes[i], "shared", &json!({"message": "after"})))
        .collect();
    for task in &quick {
        let outcome = result(&cluster.nodes[0], "shared", task, Duration::from_secs(60));
        assert_eq!(outcome["status"], "succeeded", "{outcome}");
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        assert!(
            node.log()
                .contains("abandoned the call of a cancelled task"),
            "node {i} ({}) stopped its cancelled task ({long_on:?}):\n{}",
            ids[i],
            node.log()
                .lines()
                .filter(|l| l.contains("cancel"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    // A reload on B while tasks flow to all three: every task succeeds, once.
    let before_reload = runs(&log).len();
    let v2 = deployment(&project, "shared", &log, "v2 ");
    let flowing: Vec<String> = std::thread::scope(|scope| {
        let feeder = scope.spawn(|| {
            let started = Instant::now();
            let mut created = Vec::new();
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(4) {
                let node = &cluster.nodes[n % 3];
                created.push(create(
                    node,
                    "shared",
                    &json!({"message": format!("r{n}"), "sleep": 0.2}),
                ));
                n += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
            created
        });
        std::thread::sleep(Duration::from_secs(1));
        let (code, body) = {
            let output = cluster.nodes[1].cli(&["deploy", "--reload", v2.to_str().unwrap()]);
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            )
        };
        assert!(code, "the reload on B: {body}");
        feeder.join().unwrap()
    });
    let mut versions = BTreeSet::new();
    for task in &flowing {
        let outcome = result(&cluster.nodes[0], "shared", task, Duration::from_secs(120));
        assert_eq!(
            outcome["status"], "succeeded",
            "a reload failed a task: {outcome}"
        );
        versions.insert(outcome["result"].as_str().unwrap().starts_with("v2 "));
    }
    let ran = runs(&log);
    assert_eq!(ran.len(), before_reload + flowing.len());
    assert!(
        flowing.iter().all(|task| ran[task].len() == 1),
        "a reload ran a task twice"
    );
    assert!(
        versions.contains(&true),
        "tasks after the reload run the new version"
    );
    // Every node takes the new version.
    wait_for(
        "every node to run the reloaded version",
        Duration::from_secs(60),
        || {
            let tasks: Vec<String> = (0..6)
                .map(|n| {
                    create(
                        &cluster.nodes[n % 3],
                        "shared",
                        &json!({"message": "after"}),
                    )
                })
                .collect();
            let all_new = tasks.iter().all(|task| {
                let outcome = result(&cluster.nodes[0], "shared", task, Duration::from_secs(30));
                outcome["result"] == "v2 svc: after"
            });
            all_new.then_some(())
        },
    );

    // C dies (SIGKILL) while it runs tasks: every task completes all the same.
    let c = ids[2].clone();
    let started = runs(&log).len();
    let doomed: Vec<String> = (0..24)
        .map(|n| {
            create(
                &cluster.nodes[n % 2],
                "shared",
                &json!({"message": format!("k{n}"), "sleep": 0.4}),
            )
        })
        .collect();
    wait_for("C to run one of them", Duration::from_secs(30), || {
        let ran = runs(&log);
        doomed
            .iter()
            .any(|task| ran.get(task).is_some_and(|nodes| nodes.contains(&c)))
            .then_some(())
    });
    cluster.nodes[2].kill();
    for task in &doomed {
        let outcome = result(&cluster.nodes[0], "shared", task, Duration::from_secs(120));
        assert_eq!(outcome["status"], "succeeded", "{outcome}");
    }
    let ran = runs(&log);
    assert!(ran.len() >= started + doomed.len());
    let rerun: Vec<&String> = doomed.iter().filter(|task| ran[*task].len() > 1).collect();
    // C was running one when it died: that one ran again elsewhere.
    assert!(!rerun.is_empty(), "{ran:?}");
    for task in &rerun {
        assert_eq!(
            ran[*task][0], c,
            "only C's tasks run again: {:?}",
            ran[*task]
        );
        assert_ne!(ran[*task][1], c);
    }
    // C's lease has expired: A shows it dead.
    let (_, status) = cluster.nodes[0].get("/status/").unwrap();
    let dead: Vec<&Value> = status["cluster"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["live"] == false)
        .collect();
    assert_eq!(dead.len(), 1, "{status}");
    assert_eq!(dead[0]["id"], c.as_str());
}

/// Two nodes creating one deployment at once: one wins, the other answers 409. A node that
/// cannot reach PostgreSQL at start exits, naming the URL without its password; one that loses
/// it later reports unhealthy, keeps its tasks, and is healthy again once it is back.
#[test]
fn a_cluster_decides_races_and_rides_out_a_lost_store() {
    // Unreachable at start.
    let closed = deployd_e2e::free_port();
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .args([
            "--store",
            &format!("postgres://deployd:s3cretpassw0rd@127.0.0.1:{closed}/cluster"),
            "--cluster",
            "nowhere",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "postgres://deployd:***@127.0.0.1:{closed}/cluster"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cretpassw0rd"), "{stderr}");

    // PostgreSQL behind a tap the scenario can cut.
    let tap = TcpTap::start(&url_address(&postgres_url()));
    let through_tap = postgres_url().replacen(
        &url_address(&postgres_url()),
        &format!("127.0.0.1:{}", tap.port),
        1,
    );
    let cluster = Cluster::start(2, Some(&through_tap));
    let project = Project::new();
    let log = project.path().join("tasks.log");
    let file = deployment(&project, "raced", &log, "");
    let text = std::fs::read_to_string(&file).unwrap();
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = cluster
            .nodes
            .iter()
            .map(|node| {
                let text = text.clone();
                let base = project.path().to_owned();
                scope.spawn(move || {
                    let form = reqwest::blocking::multipart::Form::new().part(
                        "config_file",
                        reqwest::blocking::multipart::Part::text(text).file_name("raced.yaml"),
                    );
                    reqwest::blocking::Client::new()
                        .post(format!(
                            "{}/deployments/create?base_path={}",
                            node.url,
                            base.display()
                        ))
                        .multipart(form)
                        .send()
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = answers.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 409], "{answers:?}");
    cluster.wait_everywhere("raced");

    // Tasks in flight when the store goes away.
    let tasks: Vec<String> = (0..6)
        .map(|n| {
            create(
                &cluster.nodes[n % 2],
                "raced",
                &json!({"message": format!("t{n}"), "sleep": 1.0}),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    tap.cut();
    let unhealthy = wait_for(
        "a node to report the lost store",
        Duration::from_secs(20),
        || {
            let (code, status) = cluster.nodes[0].get("/status/").ok()?;
            (code == 503).then_some(status)
        },
    );
    assert_eq!(unhealthy["status"], "Unhealthy", "{unhealthy}");
    assert!(
        unhealthy["status_message"]
            .as_str()
            .unwrap()
            .contains("lease"),
        "{unhealthy}"
    );
    // A request that needs the store meanwhile is refused with 503, not a 500.
    let (code, body) = cluster.nodes[1]
        .get(&format!("/deployments/raced/tasks/{}/results", tasks[0]))
        .unwrap();
    assert_eq!(code, 503, "{body}");
    std::thread::sleep(Duration::from_secs(2));
    tap.set_open(true);
    wait_for(
        "the nodes to be healthy again",
        Duration::from_secs(30),
        || {
            cluster
                .nodes
                .iter()
                .all(|node| node.get("/status/").is_ok_and(|(code, _)| code == 200))
                .then_some(())
        },
    );
    for task in &tasks {
        let outcome = result(&cluster.nodes[0], "raced", task, Duration::from_secs(120));
        assert_eq!(outcome["status"], "succeeded", "{outcome}");
    }
}
