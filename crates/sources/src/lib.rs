//! Syncing the code of deployd services into a deployment's directory.
//!
//! A [`SourceManager`] brings a service's source (a local folder today, a git repository later)
//! into a destination folder that deployd owns, atomically: the new tree is written into a
//! temporary sibling and swapped into place, so a failed or interrupted sync leaves the previous
//! tree intact. Sources never reach outside the folder they are declared relative to.
//!
//! This crate does not parse deployment files and does not run anything it syncs.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub mod local;

pub use local::LocalSource;

/// What can go wrong syncing a source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The source does not exist.
    #[error("source `{location}` not found (looked for {path})")]
    NotFound { location: String, path: PathBuf },
    /// The source, or a link inside it, points outside the folder it must stay in.
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

impl Error {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// One sync: bring `location`, resolved against `base`, into `destination`.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    /// Where the source is, as written in the deployment file.
    pub location: String,
    /// The folder `location` is relative to and must stay inside (the deployment file's folder).
    pub base: PathBuf,
    /// The folder to fill; its parent must exist. Replaced atomically.
    pub destination: PathBuf,
}

/// The result of a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    /// The synced tree (the request's destination).
    pub path: PathBuf,
    /// Number of files and links written.
    pub files: u64,
    /// Number of bytes of file content written.
    pub bytes: u64,
}

/// A backend that syncs one kind of source.
#[async_trait]
pub trait SourceManager: Send + Sync {
    /// Syncs the source of `request` into its destination, atomically.
    async fn sync(&self, request: &SyncRequest) -> Result<Synced, Error>;
}
