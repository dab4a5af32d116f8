//! What can go wrong syncing a source.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What can go wrong syncing a source.
///
/// Locations and URLs in these errors are redacted: a password or token in a URL shows as
/// `***`, so an error can be logged or returned to a client as it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The source (a folder, or a git repository) does not exist.
    #[error("source `{location}` not found: {detail}")]
    NotFound { location: String, detail: String },
    /// The git server refused the credentials, or asked for credentials that are not set.
    #[error("authentication failed for `{location}`: {detail}")]
    AuthFailed { location: String, detail: String },
    /// The git server cannot be reached (no such host, connection refused, no route).
    #[error("cannot reach `{location}`: {detail}")]
    Unreachable { location: String, detail: String },
    /// The repository has no branch, tag or commit of that name.
    #[error("ref `{wanted}` not found in `{location}`{}", nearest_list(nearest))]
    RefNotFound {
        location: String,
        wanted: String,
        /// The existing branch and tag names closest to `wanted`, closest first.
        nearest: Vec<String>,
    },
    /// The sync did not finish within its deadline (a network transfer that stalled, or the
    /// destination held by another sync for that long).
    #[error("syncing `{location}` timed out after {}s", after.as_secs_f32())]
    Timeout { location: String, after: Duration },
    /// The disk (or the quota) is full.
    #[error("no space left on the device writing {path}")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The source, a path inside it or a link inside it points outside the folder it must stay
    /// in.
    #[error("source `{location}` escapes {root}: {detail}")]
    Escapes {
        location: String,
        root: PathBuf,
        detail: String,
    },
    /// The source is not a folder.
    #[error("source `{location}` is not a folder ({path})")]
    NotADirectory { location: String, path: PathBuf },
    /// The destination is not a place deployd may write.
    #[error("invalid destination {path}: {reason}")]
    InvalidDestination { path: PathBuf, reason: String },
    /// The destination exists and the sync policy is `fail`.
    #[error("destination {path} already exists and the sync policy is `fail`")]
    AlreadyExists { path: PathBuf },
    /// The location cannot be used as written.
    #[error("invalid source location `{location}`: {reason}")]
    InvalidLocation { location: String, reason: String },
    /// Any other git failure (the message of libgit2, redacted).
    #[error("git failed for `{location}`: {detail}")]
    Git { location: String, detail: String },
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The sync task itself failed (panicked or was cancelled).
    #[error("sync interrupted: {0}")]
    Interrupted(String),
}

fn nearest_list(nearest: &[String]) -> String {
    if nearest.is_empty() {
        String::new()
    } else {
        format!(" (nearest: {})", nearest.join(", "))
    }
}

impl Error {
    /// A filesystem error; a full disk or quota becomes [`Error::DiskFull`].
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        if is_disk_full(&source) {
            return Self::DiskFull {
                path: path.to_owned(),
                source,
            };
        }
        Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Whether an IO error means the disk or the quota is full.
pub(crate) fn is_disk_full(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(code) if code == nix::errno::Errno::ENOSPC as i32 || code == nix::errno::Errno::EDQUOT as i32
    ) || matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_its_own_error() {
        let err = Error::io(
            "cannot write",
            Path::new("/x"),
            std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
        );
        assert!(matches!(err, Error::DiskFull { .. }), "{err}");
        assert_eq!(err.to_string(), "no space left on the device writing /x");
        let err = Error::io(
            "cannot write",
            Path::new("/x"),
            std::io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32),
        );
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn ref_not_found_lists_the_nearest_refs() {
        let err = Error::RefNotFound {
            location: "git@host:org/repo.git".into(),
            wanted: "v1.3".into(),
            nearest: vec!["v1.2".into(), "v1.0".into()],
        };
        assert_eq!(
            err.to_string(),
            "ref `v1.3` not found in `git@host:org/repo.git` (nearest: v1.2, v1.0)"
        );
    }
}
