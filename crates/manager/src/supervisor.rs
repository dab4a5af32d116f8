//! Supervision of one service process: start, health check, restart with backoff, stop.
//!
//! Invariant: a service process runs in its own process group, and every signal deployd sends
//! goes to the whole group, so nothing a service started outlives it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use deployd_config::{Command, RestartPolicy, ServiceSpec};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Phase, ServiceStatus};

/// Variables of deployd's own environment that a service inherits; everything else (tokens,
/// credentials) stays with deployd.
const INHERITED: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
];
const INHERITED_PREFIXES: &[&str] = &["LC_", "PYENV_"];

/// util-linux's `setpriv`, which starts a service with a parent-death signal.
const SETPRIV: &str = "/usr/bin/setpriv";

/// What to run and how.
#[derive(Debug, Clone)]
pub(crate) struct ProcessSpec {
    pub(crate) service: String,
    pub(crate) command: Command,
    pub(crate) workdir: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) port: u16,
    pub(crate) log: PathBuf,
}

/// How a service is supervised: its health probe and its restart policy.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// The path probed with `GET` until it answers 2xx.
    pub(crate) health_path: String,
    pub(crate) health_timeout: Duration,
    pub(crate) stop_timeout: Duration,
    pub(crate) restart: RestartPolicy,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    /// More failures than this within `window` and the service is marked failed.
    pub(crate) max_failures: usize,
    pub(crate) window: Duration,
    /// Healthy uptime after which the backoff starts again from its minimum.
    pub(crate) reset_after: Duration,
    /// The size at which the instance's log file is rotated (see [`LogFile`]).
    pub(crate) log_max_bytes: u64,
}

impl Policy {
    #[cfg(test)]
    pub(crate) fn new(health_timeout: Duration, stop_timeout: Duration) -> Self {
        Self {
            health_path: "/healthz".to_owned(),
            health_timeout,
            stop_timeout,
            restart: RestartPolicy::Always,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            max_failures: 10,
            window: Duration::from_secs(120),
            reset_after: Duration::from_secs(30),
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
        }
    }

    /// The policy a service's spec asks for.
    pub(crate) fn of(service: &ServiceSpec, stop_timeout: Duration, log_max_bytes: u64) -> Self {
        let restart = &service.restart;
        Self {
            health_path: service.health.path.clone(),
            health_timeout: service.health.timeout,
            stop_timeout,
            restart: restart.policy,
            backoff_initial: restart.backoff_initial,
            backoff_max: restart.backoff_max.max(restart.backoff_initial),
            max_failures: usize::try_from(restart.max_restarts).unwrap_or(usize::MAX),
            window: restart.window,
            reset_after: Duration::from_secs(30),
            log_max_bytes,
        }
    }
}

/// The environment of a service process: the inherited allowlist, then `extra`.
pub(crate) fn process_env(
    extra: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let inherited = std::env::vars().filter(|(key, _)| {
        INHERITED.contains(&key.as_str()) || INHERITED_PREFIXES.iter().any(|p| key.starts_with(p))
    });
    // Later entries win; linear in the number of entries. Each key keeps the position of its
    // first appearance.
    let mut env: Vec<(String, String)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (key, value) in inherited.chain(extra) {
        match index.get(&key) {
            Some(&at) => env[at].1 = value,
            None => {
                index.insert(key.clone(), env.len());
                env.push((key, value));
            }
        }
    }
    env
}

/// A running supervisor; stops its process when told to.
pub(crate) struct Supervisor {
    state: watch::Receiver<ServiceStatus>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Supervisor {
    pub(crate) fn start(spec: ProcessSpec, policy: Policy) -> Self {
        let (state_tx, state) = watch::channel(ServiceStatus {
            id: spec.service.clone(),
            phase: Phase::Starting,
            pid: None,
            port: spec.port,
            restarts: 0,
            last_exit: None,
            stage: None,
            replicas: Vec::new(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(spec, policy, state_tx, stop_rx));
        Self {
            state,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    pub(crate) fn status(&self) -> ServiceStatus {
        self.state.borrow().clone()
    }

    pub(crate) fn watch(&self) -> watch::Receiver<ServiceStatus> {
        self.state.clone()
    }

    /// Stops the process (SIGTERM to its group, SIGKILL after the stop timeout) and waits.
    pub(crate) async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(task) = task else { return };
        if let Err(err) = task.await {
            tracing::error!(error = %err, "supervisor task failed");
        }
    }
}

impl Drop for Supervisor {
    /// A supervisor dropped without [`Supervisor::stop`] (its deploy was cancelled) still stops
    /// its process, in the background.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

enum Ended {
    Stopped,
    Exited { reason: String, success: bool },
    Unhealthy,
}

async fn supervise(
    spec: ProcessSpec,
    policy: Policy,
    state: watch::Sender<ServiceStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = new_backoff(&policy);
    let mut failures: VecDeque<Instant> = VecDeque::new();
    let log = Arc::new(std::sync::Mutex::new(LogFile::new(
        spec.log.clone(),
        policy.log_max_bytes,
    )));
    loop {
        let ended = match spawn(&spec, &log) {
            Ok(child) => run_once(&spec, &policy, &state, &mut stop, child, &mut backoff).await,
            Err(err) => Ended::Exited {
                reason: format!("cannot start: {err}"),
                success: false,
            },
        };
        let (reason, success) = match ended {
            Ended::Stopped => {
                state.send_modify(|s| {
                    s.phase = Phase::Stopped;
                    s.pid = None;
                });
                return;
            }
            Ended::Exited { reason, success } => (reason, success),
            Ended::Unhealthy => (
                format!(
                    "did not answer GET {} within {:?}",
                    policy.health_path, policy.health_timeout
                ),
                false,
            ),
        };
        tracing::warn!(service = %spec.service, reason = %reason, "service process ended");
        let restart = match policy.restart {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !success,
            _ => true,
        };
        if !restart {
            state.send_modify(|s| {
                s.phase = if success {
                    Phase::Exited
                } else {
                    Phase::Failed
                };
                s.pid = None;
                s.last_exit = Some(reason);
            });
            stopped(&mut stop).await;
            state.send_modify(|s| s.phase = Phase::Stopped);
            return;
        }
        let now = Instant::now();
        failures.push_back(now);
        while failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            failures.pop_front();
        }
        if failures.len() > policy.max_failures {
            tracing::error!(service = %spec.service, "service restarted too often; giving up");
            state.send_modify(|s| {
                s.phase = Phase::Failed;
                s.pid = None;
                s.last_exit = Some(reason);
            });
            stopped(&mut stop).await;
            state.send_modify(|s| s.phase = Phase::Stopped);
            return;
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        state.send_modify(|s| {
            s.phase = Phase::Restarting;
            s.pid = None;
            s.restarts += 1;
            s.last_exit = Some(reason);
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => {
                state.send_modify(|s| s.phase = Phase::Stopped);
                return;
            }
        }
    }
}

fn new_backoff(policy: &Policy) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(policy.backoff_initial)
        .with_max_delay(policy.backoff_max)
        .with_jitter()
        .without_max_times()
        .build()
}

async fn run_once(
    spec: &ProcessSpec,
    policy: &Policy,
    state: &watch::Sender<ServiceStatus>,
    stop: &mut watch::Receiver<bool>,
    mut child: Child,
    backoff: &mut ExponentialBackoff,
) -> Ended {
    let pid = child.id();
    state.send_modify(|s| {
        s.phase = Phase::Starting;
        s.pid = pid;
    });
    tracing::info!(service = %spec.service, pid = ?pid, port = spec.port, "service process started");

    let probe = wait_healthy(spec.port, &policy.health_path, policy.health_timeout);
    let healthy = tokio::select! {
        status = child.wait() => return exited(status, pid),
        healthy = probe => healthy,
        () = stopped(stop) => {
            terminate(&mut child, pid, policy.stop_timeout).await;
            return Ended::Stopped;
        }
    };
    if !healthy {
        terminate(&mut child, pid, policy.stop_timeout).await;
        return Ended::Unhealthy;
    }
    state.send_modify(|s| s.phase = Phase::Ready);
    tracing::info!(service = %spec.service, "service ready");
    let ready_at = Instant::now();
    let status = tokio::select! {
        status = child.wait() => status,
        () = stopped(stop) => {
            terminate(&mut child, pid, policy.stop_timeout).await;
            return Ended::Stopped;
        }
    };
    if ready_at.elapsed() >= policy.reset_after {
        *backoff = new_backoff(policy);
    }
    exited(status, pid)
}

fn exited(status: std::io::Result<std::process::ExitStatus>, pid: Option<u32>) -> Ended {
    // Whatever the leader left in its group goes with it.
    signal_group(pid, Signal::SIGKILL);
    match status {
        Ok(status) => Ended::Exited {
            reason: describe(status),
            success: status.success(),
        },
        Err(err) => Ended::Exited {
            reason: format!("cannot wait for the process: {err}"),
            success: false,
        },
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => "ended".to_owned(),
    }
}

fn signal_group(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// SIGTERM to the group; SIGKILL to the group if any of it is still there after `timeout`.
///
/// The wait is for the whole group, not the leader: with `sh -c`, the shell may end at once
/// while the service it started is still shutting down gracefully.
async fn terminate(child: &mut Child, pid: Option<u32>, timeout: Duration) {
    signal_group(pid, Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    loop {
        // Reap the leader as soon as it ends, so that it does not count as alive.
        let _ = child.try_wait();
        if !group_alive(pid) {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(pid = ?pid, "service did not stop after SIGTERM; sending SIGKILL");
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    signal_group(pid, Signal::SIGKILL);
    let _ = child.wait().await;
    // SIGKILL is delivered asynchronously: return once the group is gone (a member that is
    // only a zombie still counts, so the wait is bounded).
    let deadline = Instant::now() + Duration::from_secs(2);
    while group_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether any process of the group led by `pid` still runs; zombies (dead, waiting for a
/// parent to reap them) do not count.
fn group_alive(pid: Option<u32>) -> bool {
    let Some(group) = pid.and_then(|pid| i32::try_from(pid).ok()) else {
        return false;
    };
    if killpg(Pid::from_raw(group), None).is_err() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // After the command name: state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
        pgrp == Some(group) && !matches!(state, "Z" | "X")
    })
}

/// The size at which a service's log file is rotated by default.
pub(crate) const DEFAULT_LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// The longest line of a service's output kept whole; a longer one is cut into pieces.
const LOG_LINE_MAX: usize = 64 * 1024;

/// A service's log file, `<service>.log`, written by deployd from the instance's stdout and
/// stderr: when a write would take it past `max` bytes it becomes `<service>.log.1` (replacing
/// the one before) and a new file is begun, so a service's output never takes more than about
/// twice `max` on disk.
#[derive(Debug)]
pub(crate) struct LogFile {
    path: PathBuf,
    max: u64,
    file: Option<std::fs::File>,
    size: u64,
}

impl LogFile {
    pub(crate) fn new(path: PathBuf, max: u64) -> Self {
        Self {
            path,
            max: max.max(1024),
            file: None,
            size: 0,
        }
    }

    fn open(&mut self) -> std::io::Result<&mut std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        if self.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            self.size = file.metadata().map_or(0, |m| m.len());
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Appends `bytes`, rotating first when they would not fit.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.open()?;
        if self.size > 0 && self.size + bytes.len() as u64 > self.max {
            self.file = None;
            std::fs::rename(&self.path, crate::rotated_log(&self.path))?;
            self.open()?;
        }
        let file = self.open()?;
        file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

type SharedLog = Arc<std::sync::Mutex<LogFile>>;

fn write_log(log: &SharedLog, bytes: &[u8]) {
    let mut log = log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(err) = log.write(bytes) {
        tracing::warn!(path = %log.path.display(), error = %err, "cannot write a service's log");
    }
}

/// Copies an instance's output into its log, line by line, until the pipe closes.
fn copy_output(output: impl tokio::io::AsyncRead + Unpin + Send + 'static, log: SharedLog) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(output);
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = (&mut reader)
                .take(LOG_LINE_MAX as u64)
                .read_until(b'\n', &mut line)
                .await;
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if line.last() != Some(&b'\n') && line.len() >= LOG_LINE_MAX {
                        line.push(b'\n');
                    }
                    write_log(&log, &line);
                }
            }
        }
    });
}

fn spawn(spec: &ProcessSpec, log: &SharedLog) -> std::io::Result<Child> {
    let argv: Vec<&str> = match &spec.command {
        Command::Shell(line) => vec!["/bin/sh", "-c", line],
        Command::Argv(argv) => argv.iter().map(String::as_str).collect(),
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::other("the command is empty"));
    };
    let mut command = match Path::new(SETPRIV).is_file() {
        // The process gets SIGKILL when deployd dies, even by `kill -9`, where no stop of
        // deployd's can run (`setpriv` sets PR_SET_PDEATHSIG, then execs the service). What
        // it left in its group is killed when the next deployd starts on the data directory.
        true => {
            let mut command = tokio::process::Command::new(SETPRIV);
            command.args(["--pdeathsig", "KILL", "--"]).args(&argv);
            command
        }
        false => {
            let mut command = tokio::process::Command::new(program);
            command.args(args);
            command
        }
    };
    write_log(
        log,
        format!("--- deployd: starting {:?} ---\n", spec.command).as_bytes(),
    );
    let mut child = command
        .current_dir(&spec.workdir)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()?;
    if let Some(stdout) = child.stdout.take() {
        copy_output(stdout, Arc::clone(log));
    }
    if let Some(stderr) = child.stderr.take() {
        copy_output(stderr, Arc::clone(log));
    }
    Ok(child)
}

/// Polls `GET path` until it answers 2xx or `timeout` passes.
/// The longest pause between two health probes of a starting instance.
const HEALTH_POLL_MAX: Duration = Duration::from_millis(50);

async fn wait_healthy(port: u16, path: &str, timeout: Duration) -> bool {
    let url = format!("http://127.0.0.1:{port}{path}");
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
    {
        Ok(client) => client,
        Err(_) => return false,
    };
    let deadline = Instant::now() + timeout;
    // A refused connection costs next to nothing; a short pause lets a reload switch as soon as
    // the new instance answers (a Python workflow is ready about a second after its start, and
    // a pause that grew to 500 ms added up to half a second to every reload).
    let mut pause = Duration::from_millis(10);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(&url).send().await
            && response.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(HEALTH_POLL_MAX);
    }
    false
}

#[cfg(test)]
mod tests {

    /// A log file past its size becomes `.log.1` (the one before is replaced) and a new one is
    /// begun: the two together stay within about twice the size.
    #[test]
    fn a_log_file_rotates_at_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut log = LogFile::new(path.clone(), 1024);
        let line = [b'x'; 99];
        for n in 0..100u8 {
            let mut bytes = line.to_vec();
            bytes[0] = b'0' + n % 10;
            bytes.push(b'\n');
            log.write(&bytes).unwrap();
        }
        let current = std::fs::read(&path).unwrap();
        let rotated = std::fs::read(dir.path().join("svc.log.1")).unwrap();
        assert!(current.len() <= 1024 && rotated.len() <= 1024);
        assert!(rotated.len() > 900, "{}", rotated.len());
        // The newest lines are in the current file, whole.
        assert!(current.ends_with(b"9xxxx\n") || current.ends_with(b"x\n"));
        assert_eq!(current.len() % 100, 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    use super::*;

    fn spec(dir: &std::path::Path, line: &str, port: u16) -> ProcessSpec {
        ProcessSpec {
            service: "svc".into(),
            command: Command::Shell(line.into()),
            workdir: dir.to_owned(),
            env: process_env([("PORT".to_owned(), port.to_string())]),
            port,
            log: dir.join("svc.log"),
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn wait(
        supervisor: &Supervisor,
        check: impl Fn(&ServiceStatus) -> bool,
    ) -> ServiceStatus {
        let mut state = supervisor.watch();
        let seen = tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| check(s)))
            .await
            .expect("timed out")
            .expect("supervisor gone");
        let status = seen.clone();
        drop(seen);
        status
    }

    #[tokio::test]
    async fn a_crashing_service_is_restarted_then_marked_failed() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = Policy::new(Duration::from_secs(5), Duration::from_secs(1));
        policy.max_failures = 2;
        let supervisor = Supervisor::start(
            spec(dir.path(), "echo crashing; exit 3", free_port()),
            policy,
        );
        let status = wait(&supervisor, |s| s.phase == Phase::Failed).await;
        assert_eq!(status.restarts, 2);
        assert_eq!(status.last_exit.as_deref(), Some("exited with status 3"));
        let log = std::fs::read_to_string(dir.path().join("svc.log")).unwrap();
        assert_eq!(log.lines().filter(|l| *l == "crashing").count(), 3, "{log}");
        supervisor.stop().await;
        assert_eq!(supervisor.status().phase, Phase::Stopped);
    }

    #[tokio::test]
    async fn a_service_that_never_gets_healthy_is_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::new(Duration::from_millis(300), Duration::from_secs(1));
        let supervisor = Supervisor::start(spec(dir.path(), "exec sleep 30", free_port()), policy);
        let status = wait(&supervisor, |s| s.restarts >= 1).await;
        assert!(
            status
                .last_exit
                .as_deref()
                .is_some_and(|e| e.contains("/healthz")),
            "{status:?}"
        );
        supervisor.stop().await;
    }

    #[tokio::test]
    async fn environment_is_the_allowlist_plus_the_service_env() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::new(Duration::from_millis(200), Duration::from_secs(1));
        let supervisor = Supervisor::start(spec(dir.path(), "env; sleep 30", free_port()), policy);
        wait(&supervisor, |s| s.restarts >= 1).await;
        supervisor.stop().await;
        let log = std::fs::read_to_string(dir.path().join("svc.log")).unwrap();
        assert!(log.lines().any(|l| l.starts_with("PORT=")), "{log}");
        assert!(log.lines().any(|l| l.starts_with("PATH=")), "{log}");
        assert!(
            !log.lines().any(|l| l.starts_with("CARGO")),
            "deployd's own env leaked: {log}"
        );
    }

    #[tokio::test]
    async fn stop_kills_the_whole_group_even_when_sigterm_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // A shell that ignores SIGTERM, serving /healthz through python, with a child of its own.
        let line = format!(
            "trap '' TERM; sleep 300 & echo $! > child.pid; \
             exec python3 -c \"import http.server,signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); \
             http.server.HTTPServer(('127.0.0.1', {port}), http.server.SimpleHTTPRequestHandler).serve_forever()\""
        );
        std::fs::write(dir.path().join("healthz"), "ok").unwrap();
        let policy = Policy::new(Duration::from_secs(20), Duration::from_millis(500));
        let supervisor = Supervisor::start(spec(dir.path(), &line, port), policy);
        let status = wait(&supervisor, |s| s.phase == Phase::Ready).await;
        let leader = status.pid.unwrap();
        let child: i32 = std::fs::read_to_string(dir.path().join("child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        supervisor.stop().await;
        assert_eq!(supervisor.status().phase, Phase::Stopped);
        for pid in [i32::try_from(leader).unwrap(), child] {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let alive = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
            assert!(!alive, "process {pid} survived the stop");
        }
    }
}
