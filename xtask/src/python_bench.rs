//! The Python workflow benchmark of `cargo xtask bench` (and `cargo xtask bench-python`): one
//! echo workflow served three ways in one run, each measured at 1 and 32 keep-alive connections.
//!
//! - **deployd**: the release binary serves the deployment (`POST /deployments/bench/tasks/run`),
//!   its service running in deployd's Python adapter in a virtualenv deployd makes;
//! - **adapter alone**: `python -m deployd_adapter` (from `sdk/python`), started here in
//!   llama-deploy 0.9.2's virtualenv, driven over the service protocol (`POST /tasks`);
//! - **llama_deploy 0.9.2**: its own API server (`python -m llama_deploy.apiserver`) with the same
//!   deployment in its rc folder (`POST /deployments/bench/tasks/run`).
//!
//! The adapter runs one worker process per core (`DEPLOYD_ADAPTER_WORKERS`, alone and in
//! deployd's deployment file); llama_deploy runs its one process.
//!
//! Each load runs [`ROUNDS`] times and the best round is kept. It prints tasks/s, p50 and p99
//! latency and the peak RSS of the serving processes (deployd and its service processes; the
//! adapter; the apiserver), side by side, with the ratios to
//! llama_deploy at 32 connections; then the time deployd takes to answer a reload whose
//! dependencies are unchanged. It fails when the adapter alone serves less than
//! [`ADAPTER_TARGET`] times llama_deploy's tasks/s at 32 connections, when the median reload
//! takes [`RELOAD_TARGET`] or longer, or when any task fails.
//!
//! The load generator is Rust (one thread and one keep-alive connection per connection), and its
//! ceiling is measured first against a stub server in this process; it must drive more than
//! the fastest system measured. Traffic goes to loopback only, every load is bounded in tasks and
//! time, and every process started here is stopped at the end (on error too): SIGTERM, then
//! SIGKILL for its process group and for descendants that outlived it. Work files live in
//! `target/python-bench` (the logs stay there; the data folders are removed).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub(crate) mod cluster;
pub(crate) mod console;
pub(crate) mod graph;
pub(crate) mod tasks;

/// The deployment's name.
const DEPLOYMENT: &str = "bench";

/// The workflow, as llama_deploy's users write it.
const WORKFLOW: &str = r#""""The benchmark's echo workflow."""

from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step


class EchoWorkflow(Workflow):
    @step()
    async def run_step(self, ev: StartEvent) -> StopEvent:
        message = str(ev.get("message", ""))
        return StopEvent(result=f"Message received: {message}")


echo_workflow = EchoWorkflow()
"#;

/// The adapter's worker processes: one per core.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The deployment file, as llama_deploy 0.9 loads it (deployd's adapter gets [`workers`]
/// processes through the service's `env`; llama_deploy sets that variable in its own
/// environment, where nothing reads it).
fn deployment_file() -> String {
    format!(
        "{DEPLOYMENT_FILE}    env:\n      DEPLOYD_ADAPTER_WORKERS: \"{}\"\n",
        workers()
    )
}

/// The deployment file without the adapter's settings.
const DEPLOYMENT_FILE: &str = "name: bench

default-service: echo_workflow

services:
  echo_workflow:
    name: Echo Workflow
    source:
      type: local
      location: src
    import-path: src/workflow:echo_workflow
";

/// The import path of the workflow, for the adapter started alone.
const IMPORT_PATH: &str = "src/workflow:echo_workflow";

/// What every answer must hold.
const EXPECTED: &str = "Message received: hi";

/// The loads: (connections, tasks).
const LOADS: [(usize, usize); 2] = [(1, 200), (32, 2000)];

/// Each load runs this many times; the round with the most tasks/s is reported (the machines
/// are noisy, and every system gets the same rounds). Failures of every round count.
const ROUNDS: usize = 3;

/// The longest one load runs.
const LOAD_CAP: Duration = Duration::from_secs(60);

/// Tasks run before each measured system, not measured.
const WARM_UP: usize = 50;

/// The adapter alone must serve at least this many times llama_deploy's tasks/s at 32
/// connections.
const ADAPTER_TARGET: f64 = 2.0;

/// A reload with unchanged dependencies must be answered sooner (median of [`RELOADS`]).
const RELOAD_TARGET: Duration = Duration::from_secs(2);

/// How many reloads are timed.
const RELOADS: usize = 3;

/// A socket read or write that takes longer fails the task.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a server may take to serve its first task (deployd makes a virtualenv first).
const START_LIMIT: Duration = Duration::from_secs(600);

/// Runs the benchmark; fails when a target is missed. With `with_deployd` false (`cargo xtask
/// bench-python --without-deployd`) only the adapter and llama_deploy are measured, deployd is not
/// built, and the reload target is not checked: for working on the adapter.
pub(crate) fn run(with_deployd: bool) -> anyhow::Result<()> {
    if with_deployd {
        crate::run(
            "build deployd (release)",
            crate::cargo().args(["build", "--release", "-p", "deployd", "--bin", "deployd"]),
        )?;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::root().join("target"), PathBuf::from);
    let target = std::path::absolute(&target)?;
    let deployd = target.join("release").join("deployd");
    let python = crate::python_tools::llama_deploy_python(&target)?;

    let work = target.join("python-bench");
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot remove {}", work.display()))?;
    }
    let app = work.join("app");
    std::fs::create_dir_all(app.join("src"))
        .with_context(|| format!("cannot create {}", app.display()))?;
    std::fs::write(app.join("src").join("workflow.py"), WORKFLOW)?;
    std::fs::write(app.join("deployment.yml"), deployment_file())?;
    let env = Env {
        target,
        work: work.clone(),
        app,
        python,
        deployd,
    };

    let mut report = Report {
        generator: 0.0,
        systems: Vec::new(),
        reloads: Vec::new(),
        with_deployd,
    };
    let outcome = measure_all(&env, &mut report);
    // The data folders hold virtualenvs; the logs stay.
    for folder in ["deployd-data", "llama-deployments"] {
        let _ = std::fs::remove_dir_all(work.join(folder));
    }
    if let Err(err) = outcome {
        if !report.systems.is_empty() {
            eprintln!("xtask: measured before the error:");
            report.print();
        }
        return Err(err);
    }
    report.print();
    report.verdict()
}

/// Where things are.
struct Env {
    target: PathBuf,
    work: PathBuf,
    app: PathBuf,
    python: PathBuf,
    deployd: PathBuf,
}

/// Everything measured.
struct Report {
    generator: f64,
    systems: Vec<System>,
    reloads: Vec<Duration>,
    with_deployd: bool,
}

/// One way of serving the workflow.
struct System {
    name: &'static str,
    loads: Vec<Measure>,
    rss_kib: u64,
}

/// One load.
struct Measure {
    connections: usize,
    tasks: usize,
    done: usize,
    failures: usize,
    first_failure: Option<String>,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Measure {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl System {
    fn at(&self, connections: usize) -> Option<&Measure> {
        self.loads.iter().find(|m| m.connections == connections)
    }
}

/// Measures into `report`, which keeps what was measured before an error.
fn measure_all(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("xtask: measuring the load generator against a stub server");
    report.generator = generator_ceiling()?;
    eprintln!(
        "xtask: load generator ceiling: {:.0} tasks/s at 32 connections",
        report.generator
    );
    if report.with_deployd {
        let (deployd, reloads) = bench_deployd(env)?;
        report.systems.push(deployd);
        report.reloads = reloads;
    }
    report.systems.push(bench_adapter(env)?);
    report.systems.push(bench_llama_deploy(env)?);
    Ok(())
}

/// Builds deployd and the binary `bin` of package `package` in release; returns the target
/// folder (absolute), whose `release/` holds them.
fn build_release_with(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    crate::run(
        &format!("build deployd and {bin} (release)"),
        crate::cargo().args([
            "build",
            "--release",
            "-p",
            "deployd",
            "--bin",
            "deployd",
            "-p",
            package,
            "--bin",
            bin,
        ]),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::root().join("target"), PathBuf::from);
    Ok(std::path::absolute(&target)?)
}

/// `POST /deployments/bench/tasks/run` with the input `{"message": "hi"}`.
fn run_request(port: u16) -> Vec<u8> {
    post(
        port,
        &format!("/deployments/{DEPLOYMENT}/tasks/run"),
        "application/json",
        br#"{"input": "{\"message\": \"hi\"}"}"#,
    )
}

fn bench_deployd(env: &Env) -> anyhow::Result<(System, Vec<Duration>)> {
    eprintln!("xtask: deployd: deploying (its virtualenv is made on first use)");
    let started = Instant::now();
    let (mut server, port) = start_deployd(
        &env.deployd,
        &env.work,
        &env.app.join("deployment.yml"),
        &env.target,
        "deployd.log",
    )?;
    let request = run_request(port);
    eprintln!(
        "xtask: deployd serves after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let system = measure("deployd", &mut server, port, &|_, _| request.clone())?;

    let mut reloads = Vec::new();
    let file = std::fs::read(env.app.join("deployment.yml"))?;
    let path = format!(
        "/deployments/create?reload=true&base_path={}",
        percent_encode(&env.app.to_string_lossy())
    );
    for n in 1..=RELOADS {
        let reload = post(port, &path, "application/yaml", &file);
        let started = Instant::now();
        let (status, body, _) = one_shot(port, &reload, Duration::from_secs(120))
            .with_context(|| format!("reload {n} of deployd"))?;
        let took = started.elapsed();
        if status != 200 {
            bail!(
                "deployd answered reload {n} with {status}: {}\n{}",
                String::from_utf8_lossy(&body),
                server.log_tail()
            );
        }
        eprintln!("xtask: deployd: reload {n} answered in {took:?}");
        reloads.push(took);
        // The new version serves.
        let (status, body, _) = one_shot(port, &request, IO_TIMEOUT)
            .with_context(|| format!("a task after reload {n}"))?;
        if status != 200 || !contains(&body, EXPECTED) {
            bail!(
                "after reload {n}, deployd answered a task with {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    server.stop();
    Ok((system, reloads))
}

fn bench_adapter(env: &Env) -> anyhow::Result<System> {
    let port = free_port()?;
    let mut command = Command::new(&env.python);
    command
        .args(["-m", "deployd_adapter"])
        .current_dir(&env.app)
        .env("PYTHONPATH", crate::root().join("sdk").join("python"))
        .env("PORT", port.to_string())
        .env("HOST", "127.0.0.1")
        .env("DEPLOYD_IMPORT_PATH", IMPORT_PATH)
        .env("DEPLOYD_ADAPTER_WORKERS", workers().to_string())
        .env("DEPLOYD_SERVICE", "echo_workflow")
        .env("DEPLOYD_DEPLOYMENT", DEPLOYMENT)
        .env("DEPLOYD_DATA_DIR", &env.work);
    let mut adapter = Process::spawn("adapter", &mut command, &env.work.join("adapter.log"))?;
    let task = |i: usize, connection: usize| {
        let body = format!(
            r#"{{"task_id": "bench-{i}", "session_id": "bench-{connection}", "attempt": 1, "input": {{"message": "hi"}}, "state": null}}"#
        );
        post(port, "/tasks", "application/json", body.as_bytes())
    };
    adapter.wait_serving(port, &task(0, 0), Duration::from_secs(120))?;
    let system = measure("adapter alone", &mut adapter, port, &task)?;
    adapter.stop();
    Ok(system)
}

fn bench_llama_deploy(env: &Env) -> anyhow::Result<System> {
    let (mut server, port) = start_llama_deploy(&env.python, &env.work, &env.app)?;
    let request = run_request(port);
    let system = measure("llama_deploy 0.9.2", &mut server, port, &|_, _| {
        request.clone()
    })?;
    server.stop();
    Ok(system)
}

/// Starts deployd serving `file` on a free port, with a fresh data folder under `work` and the
/// installer caches shared with e2e; returns once it answers the echo task.
fn start_deployd(
    deployd: &Path,
    work: &Path,
    file: &Path,
    target: &Path,
    log: &str,
) -> anyhow::Result<(Process, u16)> {
    let port = free_port()?;
    let data = work.join("deployd-data");
    let _ = std::fs::remove_dir_all(&data);
    let mut command = Command::new(deployd);
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&data)
        .arg(file)
        .current_dir(work)
        .env("UV_CACHE_DIR", cache(target, "UV_CACHE_DIR", "uv"))
        .env("PIP_CACHE_DIR", cache(target, "PIP_CACHE_DIR", "pip"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LLAMA_DEPLOY_") {
            command.env_remove(key);
        }
    }
    let mut server = Process::spawn("deployd", &mut command, &work.join(log))?;
    server.wait_serving(port, &run_request(port), START_LIMIT)?;
    Ok((server, port))
}

/// Starts llama_deploy 0.9.2's API server with `app` as its rc folder on a free port; returns
/// once it answers the echo task.
fn start_llama_deploy(python: &Path, work: &Path, app: &Path) -> anyhow::Result<(Process, u16)> {
    let port = free_port()?;
    let mut command = Command::new(python);
    command
        .args(["-m", "llama_deploy.apiserver"])
        .current_dir(work)
        .env("LLAMA_DEPLOY_APISERVER_HOST", "127.0.0.1")
        .env("LLAMA_DEPLOY_APISERVER_PORT", port.to_string())
        .env("LLAMA_DEPLOY_APISERVER_RC_PATH", app)
        .env(
            "LLAMA_DEPLOY_APISERVER_DEPLOYMENTS_PATH",
            work.join("llama-deployments"),
        )
        .env("LLAMA_DEPLOY_APISERVER_PROMETHEUS_ENABLED", "false")
        .env_remove("LLAMA_DEPLOY_APISERVER_DEPLOYMENT_FILE_PATH");
    let mut server = Process::spawn(
        "llama_deploy apiserver",
        &mut command,
        &work.join("llama-deploy.log"),
    )?;
    server.wait_serving(port, &run_request(port), Duration::from_secs(120))?;
    Ok((server, port))
}

/// Warms a server up, then runs every load against it while its RSS is sampled.
fn measure(
    name: &'static str,
    server: &mut Process,
    port: u16,
    request: &(dyn Fn(usize, usize) -> Vec<u8> + Sync),
) -> anyhow::Result<System> {
    load(port, 1, WARM_UP, LOAD_CAP, request);
    let sampler = RssSampler::start(server.pid());
    let mut loads = Vec::new();
    for (connections, tasks) in LOADS {
        let mut best: Option<Measure> = None;
        let mut failures = 0;
        let mut first_failure = None;
        for round in 1..=ROUNDS {
            let measured = load(port, connections, tasks, LOAD_CAP, request);
            eprintln!(
                "xtask: {name}: {connections} connection(s), round {round}: {}/{tasks} tasks, \
                 {:.1} tasks/s, p50 {:.2} ms, p99 {:.2} ms, {} failed",
                measured.done,
                measured.rate(),
                ms(measured.p50),
                ms(measured.p99),
                measured.failures
            );
            server.check_running()?;
            failures += measured.failures;
            first_failure = first_failure.or(measured.first_failure.clone());
            if best.as_ref().is_none_or(|b| measured.rate() > b.rate()) {
                best = Some(measured);
            }
        }
        if let Some(mut best) = best {
            best.failures = failures;
            best.first_failure = first_failure;
            loads.push(best);
        }
    }
    Ok(System {
        name,
        loads,
        rss_kib: sampler.stop(),
    })
}

/// Runs `tasks` requests (or fewer, when `cap` passes) over `connections` keep-alive
/// connections, one thread each.
fn load(
    port: u16,
    connections: usize,
    tasks: usize,
    cap: Duration,
    request: &(dyn Fn(usize, usize) -> Vec<u8> + Sync),
) -> Measure {
    load_on(&[port], connections, tasks, cap, request)
}

/// [`load`] over several servers: connection `c` goes to `ports[c % ports.len()]`.
fn load_on(
    ports: &[u16],
    connections: usize,
    tasks: usize,
    cap: Duration,
    request: &(dyn Fn(usize, usize) -> Vec<u8> + Sync),
) -> Measure {
    load_expecting(ports, connections, tasks, cap, request, EXPECTED)
}

/// [`load_on`] where an answer is right when its body contains `expected`.
fn load_expecting(
    ports: &[u16],
    connections: usize,
    tasks: usize,
    cap: Duration,
    request: &(dyn Fn(usize, usize) -> Vec<u8> + Sync),
    expected: &str,
) -> Measure {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let deadline = started + cap;
    let per_connection: Vec<(Vec<Duration>, usize, Option<String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..connections)
            .map(|connection| {
                let next = &next;
                let port = ports[connection % ports.len()];
                scope.spawn(move || {
                    let mut latencies = Vec::new();
                    let mut failures = 0;
                    let mut first_failure = None;
                    let mut stream: Option<BufReader<TcpStream>> = None;
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= tasks {
                            break;
                        }
                        let bytes = request(i, connection);
                        let sent = Instant::now();
                        let answer = match stream.as_mut() {
                            Some(open) => exchange(open, &bytes),
                            None => connect(port, IO_TIMEOUT)
                                .and_then(|open| exchange(stream.insert(open), &bytes)),
                        };
                        match answer {
                            Ok((200, body, keep_alive)) if contains(&body, expected) => {
                                latencies.push(sent.elapsed());
                                if !keep_alive {
                                    stream = None;
                                }
                            }
                            Ok((status, body, keep_alive)) => {
                                failures += 1;
                                first_failure.get_or_insert_with(|| {
                                    let text = String::from_utf8_lossy(&body);
                                    format!(
                                        "{status}: {}",
                                        text.chars().take(300).collect::<String>()
                                    )
                                });
                                if !keep_alive {
                                    stream = None;
                                }
                            }
                            Err(err) => {
                                failures += 1;
                                first_failure.get_or_insert_with(|| err.to_string());
                                stream = None;
                            }
                        }
                    }
                    (latencies, failures, first_failure)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| (Vec::new(), 1, Some("a load thread panicked".into())))
            })
            .collect()
    });
    summarize(connections, tasks, started.elapsed(), per_connection)
}

/// What the threads of a load measured — each its latencies, failures and first failure — as
/// one [`Measure`].
fn summarize(
    connections: usize,
    tasks: usize,
    elapsed: Duration,
    per_connection: Vec<(Vec<Duration>, usize, Option<String>)>,
) -> Measure {
    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut first_failure = None;
    for (mut some, failed, first) in per_connection {
        latencies.append(&mut some);
        failures += failed;
        first_failure = first_failure.or(first);
    }
    latencies.sort_unstable();
    let percentile = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Measure {
        connections,
        tasks,
        done: latencies.len(),
        failures,
        first_failure,
        elapsed,
        p50: percentile(50),
        p99: percentile(99),
    }
}

/// The generator's rate against a stub server of this process that answers at once, at 32
/// connections (a lower bound: the stub shares the machine's cores).
fn generator_ceiling() -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the stub server")?;
    let port = listener.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream {
                    std::thread::spawn(move || stub_connection(stream));
                }
            }
        })
    };
    let request = run_request(port);
    let measured = load(port, 32, 20_000, Duration::from_secs(10), &|_, _| {
        request.clone()
    });
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(("127.0.0.1", port));
    let _ = acceptor.join();
    if measured.failures > 0 {
        bail!(
            "the load generator failed against the stub server: {}",
            measured.first_failure.unwrap_or_default()
        );
    }
    Ok(measured.rate())
}

/// Answers every request of a connection with the expected result.
fn stub_connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n\"{EXPECTED}\"",
        EXPECTED.len() + 2
    );
    let mut line = String::new();
    loop {
        let mut length = 0;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() || writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A `POST` request with a body.
fn post(port: u16, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

fn connect(port: u16, timeout: Duration) -> std::io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(BufReader::with_capacity(64 * 1024, stream))
}

/// One request on a new connection.
fn one_shot(port: u16, request: &[u8], timeout: Duration) -> std::io::Result<(u16, Vec<u8>, bool)> {
    exchange(&mut connect(port, timeout)?, request)
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads a line; the end of the stream is an error.
fn read_line(stream: &mut BufReader<TcpStream>, line: &mut String) -> std::io::Result<()> {
    line.clear();
    if stream.read_line(line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Sends a request and reads its answer: (status, body, whether the connection stays open).
fn exchange(
    stream: &mut BufReader<TcpStream>,
    request: &[u8],
) -> std::io::Result<(u16, Vec<u8>, bool)> {
    stream.get_mut().write_all(request)?;
    let mut line = String::new();
    read_line(stream, &mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid("malformed status line"))?;
    let mut keep_alive = line.starts_with("HTTP/1.1");
    let mut length = None;
    let mut chunked = false;
    loop {
        read_line(stream, &mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(invalid("malformed header"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| invalid("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            read_line(stream, &mut line)?;
            let size = line.trim().split(';').next().unwrap_or_default();
            let size =
                usize::from_str_radix(size.trim(), 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    read_line(stream, &mut line)?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size + 2, 0);
            stream.read_exact(&mut body[start..])?;
            body.truncate(start + size);
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        stream.read_exact(&mut body)?;
    } else if !((100..200).contains(&status) || status == 204 || status == 304) {
        stream.read_to_end(&mut body)?;
        keep_alive = false;
    }
    Ok((status, body, keep_alive))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// Percent-encodes a query value (everything but unreserved characters and `/`).
fn percent_encode(value: &str) -> String {
    let mut encoded = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// An installer cache shared with the e2e runs: the variable when set, else under `target`.
fn cache(target: &Path, var: &str, folder: &str) -> std::ffi::OsString {
    std::env::var_os(var)
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| target.join("python-cache").join(folder).into_os_string())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A process started here, in a process group of its own, stopped when dropped.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Process {
    fn spawn(name: &'static str, command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}: {command:?}"))?;
        eprintln!(
            "xtask: started {name} (pid {}, log {})",
            child.id(),
            log.display()
        );
        Ok(Self {
            name,
            child,
            log: log.to_owned(),
            stopped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("last lines of {}:\n{tail}", self.log.display())
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status})\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// Waits until `request` is answered with the expected result.
    fn wait_serving(&mut self, port: u16, request: &[u8], limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_running()?;
            match one_shot(port, request, IO_TIMEOUT) {
                Ok((200, body, _)) if contains(&body, EXPECTED) => return Ok(()),
                Ok((status, body, _)) => {
                    last = format!("{status}: {}", String::from_utf8_lossy(&body));
                }
                Err(err) => last = err.to_string(),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "{} did not serve the workflow within {limit:?} (last answer: {last})\n{}",
            self.name,
            self.log_tail()
        )
    }

    /// SIGTERM, up to 20 s to exit, then SIGKILL for its group; then its descendants that
    /// outlived it (seen before the signal, still running the same command line) get SIGKILL.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pid = self.pid();
        let descendants: Vec<(u32, Vec<u8>)> = process_tree(pid)
            .into_iter()
            .filter(|&p| p != pid)
            .map(|p| (p, cmdline(p)))
            .collect();
        if matches!(self.child.try_wait(), Ok(None)) {
            signal("TERM", &pid.to_string());
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!("xtask: {} did not stop on SIGTERM; killing it", self.name);
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // Whatever is left of its group.
        signal("KILL", &format!("-{pid}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<u32> = descendants
                .iter()
                .filter(|(p, line)| !line.is_empty() && cmdline(*p) == *line)
                .map(|(p, _)| *p)
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for p in left {
                    eprintln!("xtask: killing process {p} left by {}", self.name);
                    signal("KILL", &p.to_string());
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("xtask: stopped {}", self.name);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `kill -s <name> -- <target>`, quietly.
fn signal(name: &str, target: &str) {
    let _ = Command::new("kill")
        .args(["-s", name, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn cmdline(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// `root` and every process descending from it.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|field| field.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while let Some(&parent) = tree.get(i) {
        tree.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    tree
}

/// VmRSS of a process in KiB (0 once it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples the summed RSS of a process and its descendants every 100 ms; keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(root: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                loop {
                    let sum: u64 = process_tree(root).into_iter().map(rss_kib).sum();
                    peak = peak.max(sum);
                    if stop.load(Ordering::Relaxed) {
                        return peak;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self { stop, thread }
    }

    /// The peak, in KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

impl Report {
    fn print(&self) {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nPython echo workflow, served three ways ({} tasks at 1 connection, {} at 32; \
             at most {}s each; keep-alive; best of {ROUNDS} rounds)",
            LOADS[0].1,
            LOADS[1].1,
            LOAD_CAP.as_secs()
        );
        let _ = writeln!(
            out,
            "{:<20} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>9} | {:>10}",
            "", "1 conn", "", "", "32 conns", "", "", "peak RSS", "tasks done"
        );
        let _ = writeln!(
            out,
            "{:<20} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>9} | {:>10}",
            "system", "tasks/s", "p50 ms", "p99 ms", "tasks/s", "p50 ms", "p99 ms", "MiB", "failed"
        );
        let _ = writeln!(out, "{}", "-".repeat(112));
        for system in &self.systems {
            let _ = write!(out, "{:<20} |", system.name);
            for (connections, _) in LOADS {
                match system.at(connections) {
                    Some(m) => {
                        let _ = write!(
                            out,
                            " {:>9.1} {:>9.2} {:>9.2} |",
                            m.rate(),
                            ms(m.p50),
                            ms(m.p99)
                        );
                    }
                    None => {
                        let _ = write!(out, " {:>9} {:>9} {:>9} |", "-", "-", "-");
                    }
                }
            }
            let done: Vec<String> = system
                .loads
                .iter()
                .map(|m| format!("{}/{}", m.done, m.tasks))
                .collect();
            let failed: usize = system.loads.iter().map(|m| m.failures).sum();
            let _ = writeln!(
                out,
                " {:>9.1} | {} {failed}",
                system.rss_kib as f64 / 1024.0,
                done.join(" ")
            );
        }
        let llama = self.rate_32("llama_deploy 0.9.2");
        if let (Some(adapter), Some(deployd), Some(llama)) = (
            self.rate_32("adapter alone"),
            self.rate_32("deployd"),
            llama,
        ) {
            let _ = writeln!(
                out,
                "at 32 connections: adapter/llama_deploy {:.2}x (target >= {ADAPTER_TARGET}x), \
                 deployd/llama_deploy {:.2}x",
                adapter / llama,
                deployd / llama
            );
        }
        let _ = writeln!(
            out,
            "the adapter (alone and in deployd) runs {} worker processes \
             (DEPLOYD_ADAPTER_WORKERS, one per core); llama_deploy runs one process",
            workers()
        );
        if self.with_deployd {
            let reloads: Vec<String> = self
                .reloads
                .iter()
                .map(|d| format!("{:.3}s", d.as_secs_f64()))
                .collect();
            let _ = writeln!(
                out,
                "deployd reload, dependencies unchanged: {} (median {:.3}s, target < {}s)",
                reloads.join(", "),
                self.median_reload().as_secs_f64(),
                RELOAD_TARGET.as_secs()
            );
        }
        let _ = writeln!(
            out,
            "load generator ceiling (stub server, 32 connections): {:.0} tasks/s",
            self.generator
        );
        for system in &self.systems {
            for m in &system.loads {
                if let Some(first) = &m.first_failure {
                    let _ = writeln!(
                        out,
                        "{} at {} connection(s): {} failed, first: {first}",
                        system.name, m.connections, m.failures
                    );
                }
            }
        }
        println!("{out}");
    }

    fn rate_32(&self, name: &str) -> Option<f64> {
        self.systems
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.at(32))
            .map(Measure::rate)
    }

    fn median_reload(&self) -> Duration {
        let mut sorted = self.reloads.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }

    fn verdict(&self) -> anyhow::Result<()> {
        let mut missed = Vec::new();
        let failed: usize = self
            .systems
            .iter()
            .flat_map(|s| &s.loads)
            .map(|m| m.failures)
            .sum();
        if failed > 0 {
            missed.push(format!("{failed} tasks failed"));
        }
        match (
            self.rate_32("adapter alone"),
            self.rate_32("llama_deploy 0.9.2"),
        ) {
            (Some(adapter), Some(llama)) if adapter >= ADAPTER_TARGET * llama => {}
            (Some(adapter), Some(llama)) => missed.push(format!(
                "the adapter alone serves {:.2}x llama_deploy's tasks/s at 32 connections \
                 (target >= {ADAPTER_TARGET}x)",
                adapter / llama
            )),
            _ => missed.push("no measurement at 32 connections".into()),
        }
        let fastest = self
            .systems
            .iter()
            .flat_map(|s| &s.loads)
            .map(Measure::rate)
            .fold(0.0, f64::max);
        if self.generator <= fastest {
            missed.push(format!(
                "the load generator ({:.0} tasks/s) may be the bottleneck (fastest measured \
                 {fastest:.0} tasks/s)",
                self.generator
            ));
        }
        let median = self.median_reload();
        if self.with_deployd && (self.reloads.is_empty() || median >= RELOAD_TARGET) {
            missed.push(format!(
                "deployd's reload takes {:.3}s (target < {}s)",
                median.as_secs_f64(),
                RELOAD_TARGET.as_secs()
            ));
        }
        if missed.is_empty() {
            eprintln!("xtask: the Python workflow benchmark met its targets");
            Ok(())
        } else {
            bail!("{}", missed.join("; "))
        }
    }
}
