//! Crash tests: a child process (this test binary, re-executed) runs a graph and is SIGKILLed
//! at a named point; the run is then resumed and must complete with the state of an
//! uninterrupted run, and no node whose completion had been committed may run again.
//!
//! Points: inside a node; between a node's end and its commit; in the middle of a write to the
//! file store's log; while holding the file store's lock. Then human in the loop across a
//! restart: a child runs until the graph asks a question and is killed; a second child answers
//! and finishes the run. Each runs against the file, SQLite and Postgres backends.

mod common;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use deployd_graph::store::{FileStore, MemoryStore, PostgresStore, SqliteStore};
use deployd_graph::{
    Ctx, Durability, End, Error, ManualClock, Node, NodeError, Outcome, RunId, Runner, SnapshotId,
    Status, Store, Timestamp, fault, graph,
};
use serde::{Deserialize, Serialize};

const STEPS: u32 = 8;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Trail {
    visited: Vec<u32>,
    sum: u64,
}

struct Deps {
    /// Every node execution appends its index here (fsync'd) before doing anything else.
    exec_log: PathBuf,
    /// Block inside node `i`, after logging it.
    block_inside: Option<u32>,
    /// Ask for approval before node `i`.
    approve_before: Option<u32>,
    dir: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct Step {
    i: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Approve {
    i: u32,
}

graph! {
    Chain {
        state: Trail,
        deps: Deps,
        output: u64,
        nodes {
            Step => StepNext [Step, Approve, End],
            Approve => ApproveNext [Step] asks u32 => u64,
        }
    }
}

impl Node<Chain> for Step {
    async fn run(self, ctx: Ctx<'_, Chain>) -> Result<StepNext, NodeError> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ctx.deps.exec_log)?;
        log.write_all(format!("{}\n", self.i).as_bytes())?;
        log.sync_data()?;
        if ctx.deps.block_inside == Some(self.i) {
            reached(&ctx.deps.dir, &format!("inside {}", self.i));
        }
        ctx.state.visited.push(self.i);
        ctx.state.sum += u64::from(self.i) * 10;
        let next = self.i + 1;
        Ok(if next == STEPS {
            End(ctx.state.sum).into()
        } else if ctx.deps.approve_before == Some(next) {
            Approve { i: next }.into()
        } else {
            Step { i: next }.into()
        })
    }
}

impl Node<Chain> for Approve {
    async fn run(self, ctx: Ctx<'_, Chain>) -> Result<ApproveNext, NodeError> {
        match ctx.answer::<Self>()? {
            None => Ok(ApproveNext::Interrupt(self.i)),
            Some(bonus) => {
                ctx.state.sum += bonus;
                Ok(Step { i: self.i }.into())
            }
        }
    }
}

/// Tells the parent the child reached `point`, then waits to be killed.
fn reached(dir: &Path, point: &str) -> ! {
    let tmp = dir.join("reached.tmp");
    std::fs::write(&tmp, point).expect("write marker");
    std::fs::rename(&tmp, dir.join("reached")).expect("publish marker");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    File,
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    fn parse(name: &str) -> Self {
        match name {
            "file" => Backend::File,
            "sqlite" => Backend::Sqlite,
            _ => Backend::Postgres,
        }
    }
}

async fn open_store(backend: Backend, location: &str) -> Result<Arc<dyn Store>, Error> {
    Ok(match backend {
        Backend::File => Arc::new(FileStore::open(location, Durability::Immediate).await?),
        Backend::Sqlite => Arc::new(SqliteStore::open(location, Durability::Immediate).await?),
        Backend::Postgres => Arc::new(
            PostgresStore::connect_in_schema(
                &common::postgres_url(),
                location,
                Durability::Immediate,
            )
            .await?,
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// The child.

fn child_main() {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let dir = PathBuf::from(env("CRASH_DIR"));
    let backend = Backend::parse(&env("CRASH_BACKEND"));
    let location = env("CRASH_STORE");
    let point = env("CRASH_POINT");
    let (name, n) = point.split_once(':').unwrap_or((point.as_str(), "0"));
    let n: u32 = n.parse().unwrap_or(0);
    let hook_dir = dir.clone();
    let (hook_name, hook_n) = (name.to_owned(), n);
    let calls = AtomicU32::new(0);
    fault::set_hook(move |at| {
        let wanted = match hook_name.as_str() {
            "after_node" => fault::AFTER_NODE,
            "mid_write" => fault::MID_WRITE,
            "locked" => fault::LOCKED,
            _ => return,
        };
        if at == wanted && calls.fetch_add(1, Ordering::SeqCst) + 1 == hook_n.max(1) {
            reached(&hook_dir, at);
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = open_store(backend, &location).await.expect("open store");
        let deps = Deps {
            exec_log: dir.join("exec.log"),
            block_inside: (name == "inside").then_some(n),
            approve_before: (name == "hitl").then_some(n),
            dir: dir.clone(),
        };
        let runner =
            Runner::<Chain>::with_store(store, deps).owner(format!("child-{}", std::process::id()));
        match env("CRASH_ACTION").as_str() {
            "answer" => {
                let run_id = RunId::from(env("CRASH_RUN"));
                let interrupt = SnapshotId::from(env("CRASH_INTERRUPT"));
                let done = runner
                    .resume_with(&run_id, &interrupt, 5u64)
                    .await
                    .expect("answer");
                let Outcome::End(sum) = done.outcome else {
                    panic!("not finished")
                };
                std::fs::write(
                    dir.join("result.json"),
                    serde_json::to_string(&(sum, &done.state)).expect("json"),
                )
                .expect("write result");
            }
            _ => {
                let run = runner
                    .start(Step { i: 0 }, Trail::default())
                    .await
                    .expect("start");
                std::fs::write(dir.join("run_id"), run.id().as_str()).expect("write run id");
                let done = run.finish().await.expect("run");
                if let Outcome::Interrupted(interrupt) = done.outcome {
                    std::fs::write(dir.join("interrupt_id"), interrupt.id.as_str())
                        .expect("write interrupt id");
                    reached(&dir, "interrupted");
                }
                panic!("the child was meant to be killed before the run ended");
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The parent.

struct Scenario {
    backend: Backend,
    dir: tempfile::TempDir,
    location: String,
}

impl Scenario {
    async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = match backend {
            Backend::File => dir.path().join("runs.log").display().to_string(),
            Backend::Sqlite => dir.path().join("runs.db").display().to_string(),
            Backend::Postgres => common::postgres_schema().await,
        };
        Scenario {
            backend,
            dir,
            location,
        }
    }

    fn spawn(&self, point: &str, action: &str, extra: &[(&str, String)]) -> Child {
        let _ = std::fs::remove_file(self.dir.path().join("reached"));
        let mut command = Command::new(std::env::current_exe().expect("current exe"));
        command
            .env("GRAPH_CRASH_CHILD", "1")
            .env("CRASH_DIR", self.dir.path())
            .env("CRASH_BACKEND", self.backend.name())
            .env("CRASH_STORE", &self.location)
            .env("CRASH_POINT", point)
            .env("CRASH_ACTION", action);
        for (k, v) in extra {
            command.env(k, v);
        }
        command.spawn().expect("spawn child")
    }

    /// Waits until the child reports `reached`, then SIGKILLs it.
    fn kill_when_reached(&self, mut child: Child) -> Result<String, String> {
        let point = self.wait_reached(&mut child)?;
        kill(&mut child);
        Ok(point)
    }

    /// Waits until the child reports `reached`.
    fn wait_reached(&self, child: &mut Child) -> Result<String, String> {
        let marker = self.dir.path().join("reached");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(point) = std::fs::read_to_string(&marker) {
                return Ok(point);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the child exited ({status}) before its crash point"
                ));
            }
            if Instant::now() > deadline {
                kill(child);
                return Err("the child never reached its crash point".to_owned());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn read(&self, name: &str) -> Result<String, String> {
        std::fs::read_to_string(self.dir.path().join(name)).map_err(|e| format!("{name}: {e}"))
    }

    fn executions(&self) -> HashMap<u32, u32> {
        let mut counts = HashMap::new();
        for line in self.read("exec.log").unwrap_or_default().lines() {
            if let Ok(i) = line.parse() {
                *counts.entry(i).or_insert(0) += 1;
            }
        }
        counts
    }

    /// A runner in this process, with a clock an hour ahead so the dead child's leases have
    /// expired.
    async fn runner(&self) -> Result<Runner<Chain>, String> {
        let store = open_store(self.backend, &self.location)
            .await
            .map_err(|e| format!("reopen: {e}"))?;
        let later = Timestamp::now().plus(Duration::from_secs(3600));
        Ok(Runner::<Chain>::with_store(store, self.deps(None))
            .owner("parent")
            .clock(Arc::new(ManualClock::new(later))))
    }

    fn deps(&self, approve_before: Option<u32>) -> Deps {
        Deps {
            exec_log: self.dir.path().join("exec.log"),
            block_inside: None,
            approve_before,
            dir: self.dir.path().to_owned(),
        }
    }
}

fn kill(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// The output and state of a run nothing interrupted (answering 5 if asked).
async fn uninterrupted(approve_before: Option<u32>) -> (u64, Trail) {
    let dir = tempfile::tempdir().expect("tempdir");
    let deps = Deps {
        exec_log: dir.path().join("exec.log"),
        block_inside: None,
        approve_before,
        dir: dir.path().to_owned(),
    };
    let runner = Runner::<Chain>::new(MemoryStore::full_history(), deps);
    let mut done = runner
        .run(Step { i: 0 }, Trail::default())
        .await
        .expect("run");
    if let Outcome::Interrupted(interrupt) = &done.outcome {
        done = runner
            .resume_with(&done.run_id, &interrupt.id, 5u64)
            .await
            .expect("answer");
    }
    match done.outcome {
        Outcome::End(sum) => (sum, done.state),
        Outcome::Interrupted(_) => panic!("interrupted twice"),
    }
}

/// Kill at `point`, resume in this process, check the outcome. With `lock_holder`, a second
/// child then opens the file store and is killed while it holds the lock.
async fn crash_and_resume(backend: Backend, point: &str, lock_holder: bool) -> Result<(), String> {
    let scenario = Scenario::new(backend).await;
    let child = scenario.spawn(point, "run", &[]);
    let at = scenario.kill_when_reached(child)?;
    let run_id = RunId::from(scenario.read("run_id")?);

    if lock_holder {
        let mut holder = scenario.spawn("locked:1", "run", &[]);
        scenario.wait_reached(&mut holder)?;
        let third = FileStore::open_with_timeout(
            &scenario.location,
            Durability::Immediate,
            Duration::from_millis(100),
        )
        .await;
        kill(&mut holder);
        if !matches!(third, Err(Error::Locked { .. })) {
            return Err(format!(
                "the store opened while another process held its lock: {third:?}"
            ));
        }
    } else if backend == Backend::File {
        // The dead child's lock died with it: another process gets it at once.
        let store = FileStore::open_with_timeout(
            &scenario.location,
            Durability::Immediate,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| format!("the lock outlived its holder: {e}"))?;
        drop(store);
    }

    let runner = scenario.runner().await?;
    let before = runner
        .history(&run_id)
        .await
        .map_err(|e| format!("history: {e}"))?;
    if before.is_empty() {
        return Err(format!("nothing committed before the crash at {at}"));
    }
    let committed: Vec<u32> = before
        .iter()
        .filter(|s| s.status == Status::Success && s.node_id == "Step")
        .filter_map(|s| serde_json::from_str::<Step>(s.node.get()).ok())
        .map(|s| s.i)
        .collect();
    let done = resume_until_free(&runner, &run_id).await?;
    let Outcome::End(sum) = done.outcome else {
        return Err("the resumed run did not end".to_owned());
    };
    let (expected_sum, expected_state) = uninterrupted(None).await;
    if (sum, &done.state) != (expected_sum, &expected_state) {
        return Err(format!(
            "resumed run ended with {sum} {:?}, an uninterrupted one with {expected_sum} {:?}",
            done.state, expected_state
        ));
    }
    let executions = scenario.executions();
    for i in &committed {
        if executions.get(i) != Some(&1) {
            return Err(format!(
                "node {i} had committed before the crash but ran {:?} times",
                executions.get(i)
            ));
        }
    }
    for i in 0..STEPS {
        if !executions.contains_key(&i) {
            return Err(format!("node {i} never ran"));
        }
    }
    let history = runner.history(&run_id).await.map_err(|e| e.to_string())?;
    let retried = history.iter().any(|s| s.attempt > 1);
    let interrupted_in_node = point.starts_with("inside") || point.starts_with("after_node");
    if interrupted_in_node && !retried {
        return Err("the node running at the crash was not retried with attempt + 1".to_owned());
    }
    Ok(())
}

/// Resumes `run_id`; the parent's clock is ahead, so leases of the dead are expired.
async fn resume_until_free(
    runner: &Runner<Chain>,
    run_id: &RunId,
) -> Result<deployd_graph::Finished<Chain>, String> {
    runner
        .resume(run_id)
        .await
        .map_err(|e| format!("resume: {e}"))
}

/// Interrupt in one process, kill it, answer from another.
async fn hitl_across_restart(backend: Backend) -> Result<(), String> {
    let scenario = Scenario::new(backend).await;
    let child = scenario.spawn("hitl:3", "run", &[]);
    let at = scenario.kill_when_reached(child)?;
    if at != "interrupted" {
        return Err(format!("expected the interrupt, the child reached {at}"));
    }
    let run_id = scenario.read("run_id")?;
    let interrupt_id = scenario.read("interrupt_id")?;
    {
        let runner = scenario.runner().await?;
        let latest = runner
            .store()
            .latest(&RunId::from(run_id.as_str()))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no snapshot")?;
        if latest.status != Status::Waiting || latest.id.as_str() != interrupt_id {
            return Err(format!("the run is not waiting: {latest:?}"));
        }
        // A wrong id is rejected.
        let wrong = runner
            .resume_with(&RunId::from(run_id.as_str()), &"Approve:0".into(), 5u64)
            .await;
        if !matches!(wrong, Err(Error::UnknownInterrupt { .. })) {
            return Err(format!("a wrong interrupt id was not rejected: {wrong:?}"));
        }
    }
    // A new process answers and finishes.
    let mut child = scenario.spawn(
        "hitl:3",
        "answer",
        &[
            ("CRASH_RUN", run_id.clone()),
            ("CRASH_INTERRUPT", interrupt_id.clone()),
        ],
    );
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("the answering child failed: {status}"));
    }
    let (sum, state): (u64, Trail) =
        serde_json::from_str(&scenario.read("result.json")?).map_err(|e| e.to_string())?;
    let expected = uninterrupted(Some(3)).await;
    if (sum, &state) != (expected.0, &expected.1) {
        return Err(format!(
            "finished with {sum} {state:?}, expected {expected:?}"
        ));
    }
    // A second answer is rejected.
    let runner = scenario.runner().await?;
    let again = runner
        .resume_with(
            &RunId::from(run_id.as_str()),
            &interrupt_id.as_str().into(),
            5u64,
        )
        .await;
    if !matches!(again, Err(Error::AlreadyAnswered { .. })) {
        return Err(format!("a second answer was not rejected: {again:?}"));
    }
    Ok(())
}

fn main() {
    if std::env::var_os("GRAPH_CRASH_CHILD").is_some() {
        child_main();
        return;
    }
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut cases: Vec<(String, Backend, &str)> = Vec::new();
    for backend in [Backend::File, Backend::Sqlite, Backend::Postgres] {
        cases.push((
            format!("{}::inside_a_node", backend.name()),
            backend,
            "inside:3",
        ));
        cases.push((
            format!("{}::between_node_end_and_commit", backend.name()),
            backend,
            "after_node:4",
        ));
    }
    cases.push((
        "file::mid_write_of_a_commit".into(),
        Backend::File,
        "mid_write:10",
    ));
    cases.push((
        "file::mid_write_of_a_start".into(),
        Backend::File,
        "mid_write:3",
    ));
    cases.push((
        "file::holding_the_lock".into(),
        Backend::File,
        "lock_holder",
    ));
    for backend in [Backend::File, Backend::Sqlite, Backend::Postgres] {
        cases.push((
            format!("{}::hitl_across_restart", backend.name()),
            backend,
            "hitl",
        ));
    }
    // The list protocol of libtest, which cargo-nextest uses: `--list --format terse` names
    // every case (none are ignored), then each case runs as `<name> --exact`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            for (name, _, _) in &cases {
                println!("{name}: test");
            }
        }
        return;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let (mut passed, mut failed) = (0, 0);
    for (name, backend, point) in cases {
        let skip = filter.as_ref().is_some_and(|f| {
            if exact {
                name != *f
            } else {
                !name.contains(f.as_str())
            }
        });
        if skip {
            continue;
        }
        let result = runtime.block_on(async {
            match point {
                "hitl" => hitl_across_restart(backend).await,
                // A crash inside a node, then a second process dies holding the lock.
                "lock_holder" => crash_and_resume(backend, "inside:3", true).await,
                point => crash_and_resume(backend, point, false).await,
            }
        });
        match result {
            Ok(()) => {
                passed += 1;
                println!("test crash::{name} ... ok");
            }
            Err(err) => {
                failed += 1;
                println!("test crash::{name} ... FAILED: {err}");
            }
        }
    }
    println!("\ncrash: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
