//! `cargo xtask bench-tasks` (and part of `cargo xtask bench`): the task path, side by side in
//! one run on one machine.
//!
//! - **llama_deploy 0.9.2**: its API server with the echo workflow (its one process);
//! - **deployd, native echo**: deployd with `echo-service` (this crate's binary: the service
//!   protocol over keep-alive HTTP/1.1 in a few microseconds), so that what is measured is
//!   deployd's own cost;
//! - **deployd, Python echo**: deployd with the same workflow in its Python adapter (one worker,
//!   the default).
//!
//! Each at 1 and 32 keep-alive connections on `POST /deployments/bench/tasks/run`, plus the
//! create + stream events + results path at 8 clients; every answer is checked. For each load
//! it prints tasks/s, p50/p99, the CPU per task of the server (deployd, or llama_deploy's one
//! process) and of the service processes, and the peak RSS; then the ratios to llama_deploy.
//! Finally 100,000 tasks in a row through deployd with the native echo service: its RSS after
//! each 10,000, which must stay within 10% of the figure after the first 10,000, and the count of
//! store errors in its log, which must be 0.
//!
//! With `DEPLOYD_BASELINE_BIN` naming another build of deployd (an earlier commit's), that build
//! is measured with the native echo too, in the same run, and this one must answer at least
//! [`BASELINE_RATIO`] of its tasks/s at each load: a change does not slow the task path.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{
    DEPLOYMENT, EXPECTED, IO_TIMEOUT, Measure, Process, WORKFLOW, connect, contains, exchange,
    load, ms, post, process_tree, rss_kib, run_request,
};

/// The loads on `tasks/run`: (connections, tasks); each capped by [`LOAD_CAP`].
const LOADS: [(usize, usize); 2] = [(1, 2_000), (32, 30_000)];

/// The longest one load runs.
const LOAD_CAP: Duration = Duration::from_secs(10);

/// Each load runs this many times; the round with the most tasks/s is kept.
const ROUNDS: usize = 2;

/// Create + stream + results: clients, and rounds of the three requests.
const FLOW_CLIENTS: usize = 8;
const FLOW_TASKS: usize = 4_000;

/// Tasks run in a row to see deployd's memory, and how often its RSS is read.
const SOAK_TASKS: usize = 100_000;
const SOAK_STEP: usize = 10_000;
/// The longest the soak runs.
const SOAK_CAP: Duration = Duration::from_secs(300);

/// Targets.
const NATIVE_RATIO: f64 = 10.0;
const NATIVE_P99: Duration = Duration::from_millis(20);
const DEPLOYD_CPU_PER_TASK: Duration = Duration::from_micros(300);
const FLOW_P50: Duration = Duration::from_millis(5);
const RSS_GROWTH: f64 = 0.10;
/// With a baseline build: this build's tasks/s over the baseline's, at least (a margin for the
/// noise of two runs on a shared machine).
const BASELINE_RATIO: f64 = 0.95;
const BASELINE: &str = "baseline, native echo";

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// The echo deployment with the native service.
fn native_file(binary: &Path) -> String {
    format!(
        "name: {DEPLOYMENT}\ndefault-service: echo\nservices:\n  echo:\n    name: Echo\n    \
         command: {}\n",
        binary.display()
    )
}

/// The echo deployment with the Python workflow (as llama_deploy loads it).
const PYTHON_FILE: &str = "name: bench
default-service: echo_workflow
services:
  echo_workflow:
    name: Echo Workflow
    source:
      type: local
      location: src
    import-path: src/workflow:echo_workflow
";

/// Runs the benchmark; fails when a target is missed.
pub(crate) fn run() -> anyhow::Result<()> {
    let target = super::build_release_with("xtask", "echo-service")?;
    let deployd = target.join("release").join("deployd");
    let echo = target.join("release").join("echo-service");
    let python = crate::python_tools::llama_deploy_python(&target)?;

    let work = target.join("tasks-bench");
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot remove {}", work.display()))?;
    }
    let app = work.join("app");
    std::fs::create_dir_all(app.join("src"))?;
    std::fs::write(app.join("src").join("workflow.py"), WORKFLOW)?;
    std::fs::write(app.join("deployment.yml"), PYTHON_FILE)?;
    let native = work.join("native");
    std::fs::create_dir_all(&native)?;
    std::fs::write(native.join("deployment.yml"), native_file(&echo))?;

    let mut report = Report::default();
    let only = std::env::var("DEPLOYD_BENCH_ONLY").unwrap_or_default();
    let wanted = |what: &str| only.is_empty() || only.split(',').any(|w| w == what);
    let outcome = (|| -> anyhow::Result<()> {
        if wanted("llama") {
            report
                .systems
                .push(bench_llama_deploy(&work, &app, &python)?);
        }
        if wanted("native") {
            report.systems.push(bench_deployd(
                &work,
                &deployd,
                &native,
                "deployd, native echo",
                &target,
            )?);
        }
        if let Some(baseline) = std::env::var_os("DEPLOYD_BASELINE_BIN")
            && wanted("native")
        {
            report.systems.push(bench_deployd(
                &work,
                Path::new(&baseline),
                &native,
                BASELINE,
                &target,
            )?);
        }
        if wanted("python") {
            report.systems.push(bench_deployd(
                &work,
                &deployd,
                &app,
                "deployd, Python echo",
                &target,
            )?);
        }
        if wanted("soak") {
            report.soak = Some(soak(&work, &deployd, &native, &target)?);
        }
        Ok(())
    })();
    for folder in ["deployd-data", "llama-deployments"] {
        let _ = std::fs::remove_dir_all(work.join(folder));
    }
    report.print();
    outcome?;
    if !only.is_empty() {
        eprintln!("xtask: DEPLOYD_BENCH_ONLY={only}: a partial run; the targets are not checked");
        return Ok(());
    }
    report.verdict()
}

#[derive(Default)]
struct Report {
    systems: Vec<System>,
    soak: Option<Soak>,
}

struct System {
    name: &'static str,
    loads: Vec<Load>,
    flow: Option<Load>,
    rss_kib: u64,
}

/// One load, with the CPU the server and the services spent on it.
struct Load {
    measure: Measure,
    server_cpu: Duration,
    service_cpu: Duration,
}

impl Load {
    fn per_task(&self, cpu: Duration) -> Duration {
        cpu / u32::try_from(self.measure.done.max(1)).unwrap_or(u32::MAX)
    }
}

struct Soak {
    rss_mib: Vec<(usize, f64)>,
    failures: usize,
    store_errors: usize,
}

/// CPU time (user + system) of `pid` so far; zero once it is gone.
fn cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After `pid (comm)`: utime and stime are fields 14 and 15 (1-based), 11 and 12 here.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_secs_f64(ticks as f64 / TICKS)
}

/// CPU of the server itself and of the rest of its process tree.
fn cpu_split(server: u32) -> (Duration, Duration) {
    let own = cpu(server);
    let rest = process_tree(server)
        .into_iter()
        .filter(|&p| p != server)
        .map(cpu)
        .sum();
    (own, rest)
}

fn measured(
    name: &str,
    server: &mut Process,
    what: &str,
    run: &dyn Fn() -> Measure,
) -> anyhow::Result<Load> {
    let mut best: Option<Load> = None;
    let mut failures = 0;
    let mut first_failure = None;
    for round in 1..=ROUNDS {
        let (own_before, rest_before) = cpu_split(server.pid());
        let measure = run();
        let (own_after, rest_after) = cpu_split(server.pid());
        server.check_running()?;
        eprintln!(
            "xtask: {name}: {what}, round {round}: {}/{} tasks, {:.1} tasks/s, p50 {:.2} ms, \
             p99 {:.2} ms, {} failed",
            measure.done,
            measure.tasks,
            measure.rate(),
            ms(measure.p50),
            ms(measure.p99),
            measure.failures
        );
        failures += measure.failures;
        first_failure = first_failure.or(measure.first_failure.clone());
        let load = Load {
            server_cpu: own_after.saturating_sub(own_before),
            service_cpu: rest_after.saturating_sub(rest_before),
            measure,
        };
        if best
            .as_ref()
            .is_none_or(|b| load.measure.rate() > b.measure.rate())
        {
            best = Some(load);
        }
    }
    let mut best = best.context("no round ran")?;
    best.measure.failures = failures;
    best.measure.first_failure = first_failure;
    Ok(best)
}

fn measure_system(
    name: &'static str,
    server: &mut Process,
    port: u16,
    flow_events: bool,
) -> anyhow::Result<System> {
    let request = run_request(port);
    let run = |_: usize, _: usize| request.clone();
    load(port, 1, 100, LOAD_CAP, &run);
    let sampler = super::RssSampler::start(server.pid());
    let mut loads = Vec::new();
    for (connections, tasks) in LOADS {
        loads.push(measured(
            name,
            server,
            &format!("{connections} connection(s)"),
            &|| load(port, connections, tasks, LOAD_CAP, &run),
        )?);
    }
    let flow = measured(
        name,
        server,
        &format!("create + stream + results, {FLOW_CLIENTS} clients"),
        &|| flow(port, FLOW_CLIENTS, FLOW_TASKS, LOAD_CAP, flow_events),
    )?;
    Ok(System {
        name,
        loads,
        flow: Some(flow),
        rss_kib: sampler.stop(),
    })
}

fn bench_llama_deploy(work: &Path, app: &Path, python: &Path) -> anyhow::Result<System> {
    let (mut server, port) = super::start_llama_deploy(python, work, app)?;
    let system = measure_system("llama_deploy 0.9.2", &mut server, port, false)?;
    server.stop();
    Ok(system)
}

/// deployd serving `folder`'s `deployment.yml`.
fn start_deployd(
    work: &Path,
    deployd: &Path,
    folder: &Path,
    target: &Path,
    log: &str,
) -> anyhow::Result<(Process, u16)> {
    super::start_deployd(deployd, work, &folder.join("deployment.yml"), target, log)
}

fn bench_deployd(
    work: &Path,
    deployd: &Path,
    folder: &Path,
    name: &'static str,
    target: &Path,
) -> anyhow::Result<System> {
    let log = format!("{}.log", name.replace([',', ' '], "-"));
    let (mut server, port) = start_deployd(work, deployd, folder, target, &log)?;
    // The native echo streams an event; the Python echo workflow streams none of its own.
    let events = name.contains("native");
    let system = measure_system(name, &mut server, port, events)?;
    server.stop();
    Ok(system)
}

/// 100,000 tasks in a row (32 connections) through deployd with the native echo service.
fn soak(work: &Path, deployd: &Path, native: &Path, target: &Path) -> anyhow::Result<Soak> {
    let (mut server, port) = start_deployd(work, deployd, native, target, "deployd-soak.log")?;
    let request = run_request(port);
    let run = |_: usize, _: usize| request.clone();
    let started = Instant::now();
    let mut rss_mib = Vec::new();
    let mut failures = 0;
    let mut done = 0;
    while done < SOAK_TASKS && started.elapsed() < SOAK_CAP {
        let left = SOAK_CAP.saturating_sub(started.elapsed());
        let measure = load(port, 32, SOAK_STEP, left, &run);
        failures += measure.failures;
        done += measure.done + measure.failures;
        server.check_running()?;
        rss_mib.push((done, rss_kib(server.pid()) as f64 / 1024.0));
        eprintln!(
            "xtask: soak: {done} tasks, deployd RSS {:.1} MiB",
            rss_mib.last().map_or(0.0, |(_, r)| *r)
        );
    }
    server.stop();
    let text = std::fs::read_to_string(work.join("deployd-soak.log")).unwrap_or_default();
    let store_errors = text
        .lines()
        .filter(|line| {
            line.contains("database is locked")
                || line.contains("cannot commit")
                || line.contains("store error")
        })
        .count();
    Ok(Soak {
        rss_mib,
        failures,
        store_errors,
    })
}

/// `POST tasks/create`, then `GET .../events` to its end, then `GET .../results`, in a loop on
/// each of `clients` keep-alive connections. With `events`, the stream must hold the echo's event.
fn flow(port: u16, clients: usize, tasks: usize, cap: Duration, events: bool) -> Measure {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let deadline = started + cap;
    let create = post(
        port,
        &format!("/deployments/{DEPLOYMENT}/tasks/create"),
        "application/json",
        br#"{"input": "{\"message\": \"hi\"}"}"#,
    );
    let per_client: Vec<(Vec<Duration>, usize, Option<String>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let next = &next;
                let create = &create;
                scope.spawn(move || {
                    let mut latencies = Vec::new();
                    let mut failures = 0;
                    let mut first = None;
                    let mut stream = None;
                    while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < tasks
                    {
                        let sent = Instant::now();
                        match flow_once(port, &mut stream, create, events) {
                            Ok(()) => latencies.push(sent.elapsed()),
                            Err(err) => {
                                failures += 1;
                                first.get_or_insert(err);
                                stream = None;
                            }
                        }
                    }
                    (latencies, failures, first)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| (Vec::new(), 1, Some("a client thread panicked".into())))
            })
            .collect()
    });
    super::summarize(clients, tasks, started.elapsed(), per_client)
}

/// One create, stream, results round on a keep-alive connection.
fn flow_once(
    port: u16,
    stream: &mut Option<std::io::BufReader<std::net::TcpStream>>,
    create: &[u8],
    events: bool,
) -> Result<(), String> {
    let open = match stream {
        Some(open) => open,
        None => stream.insert(connect(port, IO_TIMEOUT).map_err(|e| e.to_string())?),
    };
    let (status, body, _) = exchange(open, create).map_err(|e| e.to_string())?;
    let task: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let (Some(id), Some(session)) = (task["task_id"].as_str(), task["session_id"].as_str()) else {
        return Err(format!(
            "create answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    };
    let get = |path: String| {
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").into_bytes()
    };
    let base = format!("/deployments/{DEPLOYMENT}/tasks/{id}");
    let (status, body, _) = exchange(open, &get(format!("{base}/events?session_id={session}")))
        .map_err(|e| e.to_string())?;
    if status != 200 || (events && !contains(&body, "received")) {
        return Err(format!(
            "events answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let (status, body, _) = exchange(open, &get(format!("{base}/results?session_id={session}")))
        .map_err(|e| e.to_string())?;
    if status != 200 || !contains(&body, EXPECTED) {
        return Err(format!(
            "results answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}

impl Report {
    fn system(&self, name: &str) -> Option<&System> {
        self.systems.iter().find(|s| s.name == name)
    }

    fn rate(&self, name: &str, connections: usize) -> Option<f64> {
        self.system(name)?
            .loads
            .iter()
            .find(|l| l.measure.connections == connections)
            .map(|l| l.measure.rate())
    }

    fn print(&self) {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nThe task path: POST /deployments/bench/tasks/run at 1 and 32 keep-alive connections \
             (at most {}s each, best of {ROUNDS} rounds), and create + stream + results at \
             {FLOW_CLIENTS} clients; CPU per task of the server and of its service processes",
            LOAD_CAP.as_secs()
        );
        let _ = writeln!(
            out,
            "{:<22} | {:<26} | {:>9} {:>8} {:>8} | {:>10} {:>11} | {:>7}",
            "system", "load", "tasks/s", "p50 ms", "p99 ms", "server ms", "services ms", "failed"
        );
        let _ = writeln!(out, "{}", "-".repeat(118));
        for system in &self.systems {
            let rows = system
                .loads
                .iter()
                .map(|l| (format!("run, {} connection(s)", l.measure.connections), l))
                .chain(
                    system
                        .flow
                        .iter()
                        .map(|l| (format!("create+stream+results x{FLOW_CLIENTS}"), l)),
                );
            for (what, load) in rows {
                let m = &load.measure;
                let _ = writeln!(
                    out,
                    "{:<22} | {:<26} | {:>9.1} {:>8.2} {:>8.2} | {:>10.3} {:>11.3} | {:>7}",
                    system.name,
                    what,
                    m.rate(),
                    ms(m.p50),
                    ms(m.p99),
                    ms(load.per_task(load.server_cpu)),
                    ms(load.per_task(load.service_cpu)),
                    m.failures
                );
            }
            let _ = writeln!(
                out,
                "{:<22} | peak RSS with its services: {:.1} MiB",
                system.name,
                system.rss_kib as f64 / 1024.0
            );
        }
        let llama = "llama_deploy 0.9.2";
        for name in ["deployd, native echo", "deployd, Python echo"] {
            let ratios: Vec<String> = LOADS
                .iter()
                .filter_map(|&(c, _)| {
                    Some(format!(
                        "{:.2}x at {c}",
                        self.rate(name, c)? / self.rate(llama, c)?
                    ))
                })
                .collect();
            let flow = self
                .system(name)
                .and_then(|s| s.flow.as_ref())
                .zip(self.system(llama).and_then(|s| s.flow.as_ref()))
                .map(|(d, l)| d.measure.rate() / l.measure.rate());
            if ratios.is_empty() && flow.is_none() {
                continue;
            }
            let _ = writeln!(
                out,
                "{name} / llama_deploy: {}; create+stream+results {}",
                ratios.join(", "),
                flow.map_or("-".to_owned(), |r| format!("{r:.2}x"))
            );
        }
        let baseline: Vec<String> = LOADS
            .iter()
            .filter_map(|&(c, _)| {
                Some(format!(
                    "{:.2}x at {c}",
                    self.rate("deployd, native echo", c)? / self.rate(BASELINE, c)?
                ))
            })
            .collect();
        if !baseline.is_empty() {
            let _ = writeln!(
                out,
                "deployd, native echo / the baseline build (DEPLOYD_BASELINE_BIN): {} (target \
                 {BASELINE_RATIO}x)",
                baseline.join(", ")
            );
        }
        if let Some(soak) = &self.soak {
            let rss: Vec<String> = soak
                .rss_mib
                .iter()
                .map(|(n, r)| format!("{}k: {r:.1}", n / 1000))
                .collect();
            let _ = writeln!(
                out,
                "deployd RSS (MiB) over {} tasks in a row: {}; {} failed; {} store errors in its log",
                soak.rss_mib.last().map_or(0, |(n, _)| *n),
                rss.join(", "),
                soak.failures,
                soak.store_errors
            );
        }
        println!("{out}");
    }

    fn verdict(&self) -> anyhow::Result<()> {
        let mut missed = Vec::new();
        let llama = "llama_deploy 0.9.2";
        let native = "deployd, native echo";
        let python = "deployd, Python echo";
        for system in &self.systems {
            let failed: usize = system
                .loads
                .iter()
                .chain(&system.flow)
                .map(|l| l.measure.failures)
                .sum();
            if failed > 0 {
                let first = system
                    .loads
                    .iter()
                    .chain(&system.flow)
                    .find_map(|l| l.measure.first_failure.clone())
                    .unwrap_or_default();
                missed.push(format!(
                    "{}: {failed} tasks failed (first: {first})",
                    system.name
                ));
            }
        }
        for (connections, _) in LOADS {
            if let (Some(n), Some(b)) = (
                self.rate(native, connections),
                self.rate(BASELINE, connections),
            ) && n < BASELINE_RATIO * b
            {
                missed.push(format!(
                    "native echo at {connections} connection(s): {:.2}x the baseline build \
                     (target {BASELINE_RATIO}x)",
                    n / b
                ));
            }
        }
        if let (Some(n), Some(l)) = (self.rate(native, 32), self.rate(llama, 32))
            && n < NATIVE_RATIO * l
        {
            missed.push(format!(
                "native echo at 32 connections: {:.2}x llama_deploy (target {NATIVE_RATIO}x)",
                n / l
            ));
        }
        if let Some(system) = self.system(native) {
            for load in &system.loads {
                if load.measure.connections == 32 && load.measure.p99 > NATIVE_P99 {
                    missed.push(format!(
                        "native echo p99 at 32 connections: {:.2} ms (target {} ms)",
                        ms(load.measure.p99),
                        NATIVE_P99.as_millis()
                    ));
                }
                let per_task = load.per_task(load.server_cpu);
                if per_task > DEPLOYD_CPU_PER_TASK {
                    missed.push(format!(
                        "deployd's CPU per task at {} connection(s): {:.3} ms (target {:.1} ms)",
                        load.measure.connections,
                        ms(per_task),
                        ms(DEPLOYD_CPU_PER_TASK)
                    ));
                }
            }
        }
        for (connections, _) in LOADS {
            if let (Some(p), Some(l)) = (
                self.rate(python, connections),
                self.rate(llama, connections),
            ) && p < l
            {
                missed.push(format!(
                    "Python echo at {connections} connection(s): {:.2}x llama_deploy (target 1x)",
                    p / l
                ));
            }
        }
        for name in [native, python] {
            let (Some(d), Some(l)) = (
                self.system(name).and_then(|s| s.flow.as_ref()),
                self.system(llama).and_then(|s| s.flow.as_ref()),
            ) else {
                continue;
            };
            if d.measure.rate() < l.measure.rate() {
                missed.push(format!(
                    "{name}: create+stream+results at {:.2}x llama_deploy (target 1x)",
                    d.measure.rate() / l.measure.rate()
                ));
            }
            if name == native && d.measure.p50 > FLOW_P50 {
                missed.push(format!(
                    "{name}: create+stream+results p50 {:.2} ms (target {} ms)",
                    ms(d.measure.p50),
                    FLOW_P50.as_millis()
                ));
            }
        }
        match &self.soak {
            Some(soak) => {
                if soak.failures > 0 || soak.store_errors > 0 {
                    missed.push(format!(
                        "soak: {} failed tasks, {} store errors",
                        soak.failures, soak.store_errors
                    ));
                }
                if let Some(&(_, base)) = soak.rss_mib.first() {
                    let top = soak.rss_mib.iter().map(|(_, r)| *r).fold(base, f64::max);
                    if top > base * (1.0 + RSS_GROWTH) {
                        missed.push(format!(
                            "soak: deployd's RSS grew from {base:.1} MiB to {top:.1} MiB (target \
                             within {:.0}%)",
                            RSS_GROWTH * 100.0
                        ));
                    }
                }
                if soak.rss_mib.last().map_or(0, |(n, _)| *n) < SOAK_TASKS {
                    missed.push(format!(
                        "soak: fewer than {SOAK_TASKS} tasks within {SOAK_CAP:?}"
                    ));
                }
            }
            None => missed.push("no soak".into()),
        }
        if missed.is_empty() {
            eprintln!("xtask: the task path benchmark met its targets");
            Ok(())
        } else {
            bail!("{}", missed.join("; "))
        }
    }
}
