//! `GET /deployments/{name}/services/{service}/logs?tail=N&follow=true`: a service's output.
//!
//! The log is the file deployd writes from the instances' stdout and stderr
//! (`logs/<service>.log`, rotated to `<service>.log.1` at its size limit; see the Manager's
//! `log_max_bytes`). `tail` lines from its end come first (the rotated file's end too when the
//! current one has fewer); with `follow=true` the answer then goes on with every line written
//! after, across rotations, until the client goes away, the deployment is deleted or deployd
//! stops. Plain text, one line per line.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deployd_manager::{Manager, rotated_log};
use tokio::sync::mpsc;

/// Lines answered when `tail` is not given.
pub(crate) const DEFAULT_TAIL: usize = 100;
/// The most lines `tail` may ask for.
pub(crate) const MAX_TAIL: usize = 10_000;
/// How often a followed log is looked at for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);
/// How much is read at a time from the end of a file.
const CHUNK: u64 = 64 * 1024;

/// The last `n` whole lines of the file at `path` (none when it does not exist), and its size.
fn last_lines(path: &Path, n: usize) -> std::io::Result<(Vec<String>, u64)> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(err) => return Err(err),
    };
    let len = file.metadata()?.len();
    let mut start = len;
    let mut bytes: Vec<u8> = Vec::new();
    while start > 0 && bytes.iter().filter(|b| **b == b'\n').count() <= n {
        let step = CHUNK.min(start);
        start -= step;
        file.seek(SeekFrom::Start(start))?;
        let mut chunk = vec![0; usize::try_from(step).unwrap_or(usize::MAX)];
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&bytes);
        bytes = chunk;
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut by the chunk: not whole
    }
    let keep = lines.len().saturating_sub(n);
    Ok((lines[keep..].iter().map(|l| (*l).to_owned()).collect(), len))
}

/// The last `n` lines of a service's log, the rotated file's included when needed, and the size
/// of the current file (where following starts).
pub(crate) fn tail(path: &Path, n: usize) -> std::io::Result<(Vec<String>, u64)> {
    let (mut lines, len) = last_lines(path, n)?;
    if lines.len() < n {
        let (mut before, _) = last_lines(&rotated_log(path), n - lines.len())?;
        before.append(&mut lines);
        lines = before;
    }
    Ok((lines, len))
}

/// Sends the lines written to the log after `offset`, as they come, until `lines` is closed,
/// the service's deployment is gone or `stopping` is set.
pub(crate) fn follow(
    manager: Manager,
    deployment: String,
    service: String,
    path: PathBuf,
    offset: u64,
    stopping: Arc<AtomicBool>,
    lines: mpsc::Sender<String>,
) {
    tokio::spawn(async move {
        let mut offset = offset;
        let mut inode = std::fs::metadata(&path).map_or(0, |m| m.ino());
        let mut pending: Vec<u8> = Vec::new();
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            if lines.is_closed()
                || stopping.load(Ordering::SeqCst)
                || manager.service_log(&deployment, &service, 0).is_err()
            {
                return;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let mut fresh = Vec::new();
            if meta.ino() != inode {
                // Rotated: the rest of the old file (now `.1`), then the new one from its start.
                let old = rotated_log(&path);
                if std::fs::metadata(&old).is_ok_and(|m| m.ino() == inode) {
                    fresh.extend(read_from(&old, offset));
                }
                inode = meta.ino();
                offset = 0;
            } else if meta.len() < offset {
                offset = 0;
            }
            let more = read_from(&path, offset);
            offset += more.len() as u64;
            fresh.extend(more);
            if fresh.is_empty() {
                continue;
            }
            pending.extend(fresh);
            let Some(end) = pending.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            let whole: Vec<u8> = pending.drain(..=end).collect();
            for line in String::from_utf8_lossy(&whole).lines() {
                if lines.send(line.to_owned()).await.is_err() {
                    return;
                }
            }
        }
    });
}

/// What the file at `path` holds after `offset` (nothing when it cannot be read).
fn read_from(path: &Path, offset: u64) -> Vec<u8> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_ok() {
        let _ = file.read_to_end(&mut bytes);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_takes_whole_lines_from_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        assert_eq!(tail(&path, 5).unwrap(), (Vec::<String>::new(), 0));
        let old: String = (0..200_000).map(|i| format!("old {i}\n")).collect();
        std::fs::write(rotated_log(&path), old).unwrap();
        std::fs::write(&path, "new 0\nnew 1\n").unwrap();
        let (lines, len) = tail(&path, 4).unwrap();
        assert_eq!(lines, ["old 199998", "old 199999", "new 0", "new 1"]);
        assert_eq!(len, 12);
        let (lines, _) = tail(&path, 2).unwrap();
        assert_eq!(lines, ["new 0", "new 1"]);
        // Far back in a large file: chunks are joined, the cut line left out.
        let (lines, _) = tail(&path, 30_000).unwrap();
        assert_eq!(lines.len(), 30_000);
        assert_eq!(lines[0], "old 170002");
    }
}
