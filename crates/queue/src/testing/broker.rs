//! Stopping and starting a broker under a test: [`BrokerControl`], with a server process the
//! test owns ([`BrokerProcess`]) or a proxy in front of a broker it does not ([`TcpProxy`]).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// How long [`BrokerProcess`] and [`TcpProxy`] wait for a port to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A broker a test can take down and bring back.
#[async_trait]
pub trait BrokerControl: Send + Sync {
    /// Takes the broker down; returns once connections to it fail.
    async fn stop(&self);
    /// Brings it back; returns once it accepts connections.
    async fn start(&self);
}

/// A free TCP port on 127.0.0.1 (free when asked; another process may take it after).
pub fn free_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(err) => panic!("cannot find a free port: {err}"),
    }
}

/// Waits until 127.0.0.1:`port` accepts a connection; panics after `limit`.
pub async fn wait_for_port(port: u16, limit: Duration) {
    let started = Instant::now();
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        if started.elapsed() > limit {
            panic!("nothing accepts connections on 127.0.0.1:{port} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A broker server process that the test starts, kills (SIGKILL, as a crash) and starts
/// again with the same command line; it is killed when dropped.
pub struct BrokerProcess {
    program: String,
    args: Vec<String>,
    port: u16,
    child: tokio::sync::Mutex<Option<tokio::process::Child>>,
}

impl std::fmt::Debug for BrokerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProcess")
            .field("program", &self.program)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl BrokerProcess {
    /// Starts `program args...`, which must listen on 127.0.0.1:`port`, and waits until it
    /// accepts connections. Panics, naming the program, when it cannot be started.
    pub async fn start(program: &str, args: &[&str], port: u16) -> Self {
        let process = Self {
            program: program.to_owned(),
            args: args.iter().map(|&a| a.to_owned()).collect(),
            port,
            child: tokio::sync::Mutex::new(None),
        };
        BrokerControl::start(&process).await;
        process
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

#[async_trait]
impl BrokerControl for BrokerProcess {
    async fn stop(&self) {
        let mut child = self.child.lock().await;
        if let Some(mut running) = child.take()
            && let Err(err) = running.kill().await
        {
            panic!("cannot kill {}: {err}", self.program);
        }
    }

    async fn start(&self) {
        let mut child = self.child.lock().await;
        if child.is_some() {
            return;
        }
        let spawned = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(spawned) => *child = Some(spawned),
            Err(err) => panic!(
                "cannot start `{}` (is it installed and on PATH?): {err}",
                self.program
            ),
        }
        drop(child);
        wait_for_port(self.port, START_TIMEOUT).await;
    }
}

/// A TCP proxy on 127.0.0.1 in front of a broker: [`BrokerControl::stop`] closes every
/// connection through it and refuses new ones, [`BrokerControl::start`] accepts again on the
/// same port. For brokers a test cannot restart itself; the client must reach the broker only
/// through the proxy's address.
pub struct TcpProxy {
    port: u16,
    target: SocketAddr,
    accepting: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("port", &self.port)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl TcpProxy {
    /// A running proxy on a free port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let proxy = Self {
            port: free_port(),
            target,
            accepting: Mutex::new(None),
        };
        BrokerControl::start(&proxy).await;
        proxy
    }

    /// A running proxy in front of `authority` (`host:port`); panics naming it when it does not
    /// resolve.
    pub async fn in_front_of(authority: &str) -> Self {
        let target = tokio::net::lookup_host(authority)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("the broker's address `{authority}` does not resolve"));
        Self::start(target).await
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn listen(&self) -> std::io::Result<TcpListener> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], self.port)))?;
        socket.listen(1024)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        let accepting = self.accepting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = accepting.as_ref() {
            task.abort();
        }
    }
}

#[async_trait]
impl BrokerControl for TcpProxy {
    async fn stop(&self) {
        let task = self
            .accepting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
            // Aborting drops the listener and every connection task with their sockets.
            let _ = task.await;
        }
    }

    async fn start(&self) {
        if self
            .accepting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return;
        }
        let started = Instant::now();
        let listener = loop {
            match self.listen() {
                Ok(listener) => break listener,
                Err(err) if started.elapsed() < START_TIMEOUT => {
                    tracing::debug!(error = %err, port = self.port, "proxy port busy; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("the proxy cannot listen on port {}: {err}", self.port),
            }
        };
        let target = self.target;
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        connections.spawn(async move {
                            let Ok(mut outbound) = TcpStream::connect(target).await else {
                                return;
                            };
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        *self.accepting.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }
}
