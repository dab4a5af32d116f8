//! One deployd per data directory, and no process left behind by a crashed one.
//!
//! Every service process gets `DEPLOYD_NODE=<node id>` in its environment, the node id being
//! stored in the data directory. Whoever holds the data directory's lock supervises every
//! process carrying that mark, so at start a new holder stops every such process it finds: they
//! were left by a predecessor that died without stopping them (SIGKILL, power loss).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Error;

/// The environment variable that marks a service process as this node's.
pub(crate) const NODE_VAR: &str = "DEPLOYD_NODE";

/// Takes the data directory's lock, held for the life of the process (released by the OS
/// when it dies, however it dies).
pub(crate) fn lock_data_dir(data_dir: &Path) -> Result<Flock<File>, Error> {
    let path = data_dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|err| Error::io("cannot open", &path, err))?;
    let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| Error::DataDirLocked(data_dir.to_owned()))?;
    let _ = lock.set_len(0);
    let _ = writeln!(lock, "{}", std::process::id());
    Ok(lock)
}

/// The node id stored in the data directory, created on first use.
pub(crate) fn node_id(data_dir: &Path) -> Result<String, Error> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        Ok(_) => write_node_id(&path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => write_node_id(&path),
        Err(err) => Err(Error::io("cannot read", &path, err)),
    }
}

fn write_node_id(path: &Path) -> Result<String, Error> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    std::fs::write(path, format!("{id}\n")).map_err(|err| Error::io("cannot write", path, err))?;
    Ok(id)
}

/// The processes whose environment carries `DEPLOYD_NODE=<node_id>`.
pub(crate) fn marked_processes(node_id: &str) -> Vec<Pid> {
    let mark = format!("{NODE_VAR}={node_id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| u32::try_from(*pid).is_ok_and(|pid| pid != me))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|environ| environ.split(|b| *b == 0).any(|var| var == mark.as_bytes()))
        })
        .map(Pid::from_raw)
        .collect()
}

/// Stops every process a predecessor on this data directory left running: SIGTERM, then
/// SIGKILL after `grace`.
pub(crate) async fn stop_leftovers(node_id: &str, grace: Duration) {
    let leftovers = marked_processes(node_id);
    if leftovers.is_empty() {
        return;
    }
    tracing::warn!(
        count = leftovers.len(),
        "stopping service processes left by a previous run"
    );
    for pid in &leftovers {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline && !marked_processes(node_id).is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in marked_processes(node_id) {
        let _ = kill(pid, Signal::SIGKILL);
    }
}
