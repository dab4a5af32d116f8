//! The harness of deployd's end-to-end scenarios: it runs the real `deployd` binary on a free
//! port with a temporary data directory, and talks to it through HTTP and the CLI.
//!
//! The binary is taken from `DEPLOYD_BIN` when set (as `cargo xtask e2e` does), and otherwise
//! built with `cargo build -p deployd` first, so a plain `cargo test` never runs a stale one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// The `deployd` binary under test.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("DEPLOYD_BIN") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "deployd", "--bin", "deployd"])
            .current_dir(workspace())
            .status()
            .expect("cannot run cargo to build deployd");
        assert!(status.success(), "building deployd failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace().join("target"), PathBuf::from);
        target.join("debug").join("deployd")
    })
}

/// The example graph service (`examples/graph-service`): `DEPLOYD_GRAPH_SERVICE_BIN`, else
/// built next to deployd's binary.
pub fn graph_service_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("DEPLOYD_GRAPH_SERVICE_BIN") {
            return PathBuf::from(path);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "graph-service",
                "--bin",
                "graph-service",
            ])
            .current_dir(workspace())
            .status()
            .expect("cannot run cargo to build graph-service");
        assert!(status.success(), "building graph-service failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace().join("target"), PathBuf::from);
        target.join("debug").join("graph-service")
    })
}

/// Where the scenarios' Python installers keep their caches: `target/python-cache`.
pub fn python_cache() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from)
        .join("python-cache")
}

/// Polls `check` every 50 ms until it gives a value or `limit` passes; panics with `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The processes whose environment has `DEPLOYD_DATA_DIR` inside `data_dir`: the service
/// processes (and their children) of the deployd using that data directory.
pub fn service_processes(data_dir: &Path) -> Vec<u32> {
    let prefix = format!("DEPLOYD_DATA_DIR={}", data_dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|var| var.starts_with(prefix.as_bytes()))
            })
        })
        .collect()
}

/// A running `deployd serve`.
pub struct Server {
    child: Option<Child>,
    /// Its base URL.
    pub url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: PathBuf,
    http: reqwest::blocking::Client,
}

impl Server {
    /// Starts `deployd serve` on a free port with `data_dir`, and waits until it answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(data_dir).expect("cannot create the data directory");
        let port = free_port();
        let log = data_dir.with_extension(format!("{port}.log"));
        let log_file = std::fs::File::create(&log).expect("cannot create the server log");
        let child = Command::new(binary())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            // Python environments share one installer cache across scenarios and runs.
            .env(
                "UV_CACHE_DIR",
                std::env::var_os("UV_CACHE_DIR")
                    .unwrap_or_else(|| python_cache().join("uv").into_os_string()),
            )
            .env(
                "PIP_CACHE_DIR",
                std::env::var_os("PIP_CACHE_DIR")
                    .unwrap_or_else(|| python_cache().join("pip").into_os_string()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("cannot start deployd");
        let server = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.canonicalize().expect("data dir"),
            log,
            http: reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
        };
        wait_for(
            "deployd to answer /status/",
            Duration::from_secs(30),
            || {
                server
                    .get("/status/")
                    .ok()
                    .filter(|(status, _)| *status == 200)
            },
        );
        server
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `GET path`: (status, JSON body or Null).
    pub fn get(&self, path: &str) -> reqwest::Result<(u16, Value)> {
        let response = self.http.get(format!("{}{path}", self.url)).send()?;
        let status = response.status().as_u16();
        Ok((status, response.json().unwrap_or(Value::Null)))
    }

    /// `POST path` with a JSON body: (status, JSON body or Null).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .expect("POST failed");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// `POST path` with a raw body of type `content_type`: (status, JSON body or Null).
    pub fn post_raw(&self, content_type: &str, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .expect("POST failed");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// `GET path` and the body as text.
    pub fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .expect("GET failed");
        let status = response.status().as_u16();
        (status, response.text().unwrap_or_default())
    }

    /// Opens `GET path` as a stream and returns its lines, as they come, until `until` accepts
    /// one (returned last) or the stream ends.
    pub fn read_lines_until(&self, path: &str, until: impl Fn(&Value) -> bool) -> Vec<Value> {
        use std::io::BufRead;
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .expect("GET failed");
        assert_eq!(response.status().as_u16(), 200, "GET {path}");
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(response).lines() {
            let line = line.expect("the stream broke");
            let value: Value = serde_json::from_str(&line).expect("a line is not JSON");
            let done = until(&value);
            lines.push(value);
            if done {
                break;
            }
        }
        lines
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .args(args)
            .env("DEPLOYD_SERVER", &self.url)
            .current_dir(workspace())
            .output()
            .expect("cannot run the deployd CLI")
    }

    /// The status of a deployment's first service: (phase, pid, restarts).
    pub fn service(&self, deployment: &str, index: usize) -> (String, Option<u32>, u64) {
        let (status, body) = self
            .get(&format!("/deployments/{deployment}"))
            .expect("GET deployment");
        assert_eq!(status, 200, "{body}");
        let service = &body["services"][index];
        (
            service["phase"].as_str().unwrap_or_default().to_owned(),
            service["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            service["restarts"].as_u64().unwrap_or(0),
        )
    }

    /// Waits until every service of a deployment is ready.
    pub fn wait_ready(&self, deployment: &str) {
        wait_for("the services to be ready", Duration::from_secs(60), || {
            let (_, body) = self.get(&format!("/deployments/{deployment}")).ok()?;
            let services = body["services"].as_array()?;
            services.iter().all(|s| s["phase"] == "ready").then_some(())
        });
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.pid()).expect("pid");
        kill(Pid::from_raw(pid), signal).expect("cannot signal deployd");
    }

    /// Waits for the server to exit, at most `limit`; returns how long it took, or `None`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let child = self.child.as_mut()?;
        while started.elapsed() < limit {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILLs the server and reaps it; its service processes are left as they are.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever a failed scenario left behind.
        for pid in service_processes(&self.data_dir) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// A folder with deployment files and a copy of the test service.
pub struct Project {
    /// The temporary folder everything lives in.
    pub dir: tempfile::TempDir,
}

/// Copies the folder `from` (and everything in it, hidden files included) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).expect("copy");
        }
    }
}

/// Copies the Python scenarios' workflows and their requirements (`tests/fixtures/python`) into
/// `dir`.
pub fn copy_python_fixtures(dir: &Path) {
    std::fs::create_dir_all(dir).expect("cannot create the fixtures' folder");
    for file in ["workflow.py", "requirements.txt"] {
        std::fs::copy(
            workspace().join("tests/fixtures/python").join(file),
            dir.join(file),
        )
        .expect("cannot copy the fixture workflow");
    }
}

impl Project {
    /// A new project with the test service in `src/`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("src")).expect("src");
        std::fs::copy(
            workspace().join("tests/fixtures/services/echo.py"),
            dir.path().join("src/echo.py"),
        )
        .expect("cannot copy the test service");
        Self { dir }
    }

    /// The project's folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file into the project; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).expect("cannot write");
        path
    }

    /// A deployment of `services` copies of the test service, each with `env` lines
    /// (`KEY: value`, already indented for YAML) added.
    pub fn deployment(&self, name: &str, services: &[(&str, &[(&str, &str)])]) -> PathBuf {
        let mut text = format!("name: {name}\nservices:\n");
        for (id, env) in services {
            text.push_str(&format!(
                "  {id}:\n    source:\n      type: local\n      location: src\n    command: python3 echo.py\n"
            ));
            if !env.is_empty() {
                text.push_str("    env:\n");
                for (key, value) in *env {
                    text.push_str(&format!("      {key}: \"{value}\"\n"));
                }
            }
        }
        self.write(&format!("{name}.yaml"), &text)
    }
}

impl Default for Project {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `git args` in `dir` as a test user (branch `main` by default); panics when it fails.
pub fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGKILLs process `pid`.
pub fn sigkill(pid: u32) {
    let pid = i32::try_from(pid).expect("a pid fits in i32");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("cannot SIGKILL");
}

impl Server {
    /// Creates a task with input `{"message": message}` (checking that its definition comes
    /// back with its input and a session) and returns its id.
    pub fn create_task(&self, deployment: &str, message: &str) -> String {
        let input = serde_json::json!({ "message": message }).to_string();
        let (status, body) = self.post(
            &format!("/deployments/{deployment}/tasks/create"),
            &serde_json::json!({ "input": input }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["input"], input,
            "the definition comes back with its input"
        );
        assert!(body["session_id"].is_string(), "{body}");
        body["task_id"].as_str().expect("a task id").to_owned()
    }

    /// Waits up to `limit` for a task's result and returns it.
    pub fn wait_result(&self, deployment: &str, task_id: &str, limit: Duration) -> Value {
        wait_for("the task's result", limit, || {
            let (status, body) = self
                .get(&format!(
                    "/deployments/{deployment}/tasks/{task_id}/results"
                ))
                .ok()?;
            assert_eq!(status, 200, "{body}");
            (!body.is_null()).then_some(body)
        })
    }
}

/// The stdout of a CLI run that must have succeeded.
pub fn success(output: &Output) -> String {
    assert!(
        output.status.success(),
        "the CLI failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A TCP relay in front of a broker that keeps a copy of what clients send, so a scenario can
/// prove that deployd's traffic went through the broker (a task's id crossed the wire).
pub struct TcpTap {
    /// The port to connect to instead of the broker's.
    pub port: u16,
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The relayed connections, so that closing the tap cuts them too.
    live: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl TcpTap {
    /// Relays 127.0.0.1:`port` to `target` (`host:port`) until the test process exits.
    pub fn start(target: &str) -> Self {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        std::net::TcpStream::connect(target)
            .unwrap_or_else(|err| panic!("the broker at {target} does not answer: {err}"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind the tap");
        let port = listener.local_addr().expect("tap address").port();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let target = target.to_owned();
        let seen = std::sync::Arc::clone(&sent);
        let is_open = std::sync::Arc::clone(&open);
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let relayed = std::sync::Arc::clone(&live);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !is_open.load(std::sync::atomic::Ordering::SeqCst) {
                    // A broker that is down: the connection closes at once.
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (Ok(mut client_rx), Ok(mut server_tx)) =
                    (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                    relayed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend([a, b]);
                }
                let seen = std::sync::Arc::clone(&seen);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = client_rx.read(&mut buf) {
                        if n == 0 || server_tx.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend_from_slice(&buf[..n]);
                    }
                    let _ = server_tx.shutdown(std::net::Shutdown::Write);
                });
                let (mut server_rx, mut client_tx) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_rx, &mut client_tx);
                    let _ = client_tx.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self {
            port,
            sent,
            open,
            live,
        }
    }

    /// Plays a broker that is down (new connections are closed at once), or up again.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }

    /// Plays a server that went away: cuts every relayed connection and closes the tap
    /// (until [`TcpTap::set_open`]).
    pub fn cut(&self) {
        self.set_open(false);
        for stream in self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether a client sent `needle` to the broker.
    pub fn saw(&self, needle: &str) -> bool {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        sent.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

/// `host:port` of a broker URL such as `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn url_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split('/').next().unwrap_or(rest);
    rest.rsplit_once('@')
        .map_or(rest, |(_, host)| host)
        .to_owned()
}
