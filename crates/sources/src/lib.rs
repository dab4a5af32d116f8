//! Syncing the code of deployd services into a deployment's directory.
//!
//! A [`SourceManager`] brings a service's source into a destination folder that deployd owns:
//! [`LocalSource`] copies a local folder, [`GitSource`] (feature `git`, on by default) checks out
//! a branch, tag or commit of a git repository, fetching into a clone it keeps beside the
//! destination instead of cloning again (see [`git`]).
//!
//! Every sync is atomic: the new tree is written into a temporary sibling of the destination and
//! swapped into place with one `renameat2(RENAME_EXCHANGE)`, so a failed or killed sync leaves
//! the previous tree intact. Beside a destination `<parent>/<name>`, a sync uses:
//! - `.<name>.lock`: an OS lock (released when its holder dies) held for the whole sync, so two
//!   syncs of one destination never interleave;
//! - `.<name>.sync-<uuid>`: the tree being written; `.<name>.old-<uuid>`: the previous tree
//!   being deleted. A sync that finds these when it takes the lock removes them: they were left
//!   by a sync that died;
//! - `.<name>.git` and `.<name>.prev`: the git backend's clone, and the previous tree it keeps to
//!   update instead of writing a whole tree.
//!
//! A [`SyncPolicy`] says what to do with an existing destination: replace it, merge into it, keep
//! it, or fail. Every sync returns the [`Digest`] of the tree it installed (SHA-256 over relative
//! paths, modes and contents, the same on every machine), so a deploy pipeline can skip a
//! rebuild when nothing changed.
//!
//! Sources never reach outside the folder they are declared relative to: a local `location` that
//! is absolute or climbs out, a link that points outside, or a git tree entry named `..` is
//! refused, and nothing outside is read. A destination can be confined to a folder
//! ([`SyncRequest::within`]). Secrets in git URLs never appear in errors or logs
//! ([`redact_url`]).
//!
//! This crate does not parse deployment files, does not build and does not run anything it syncs.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;

mod copy;
mod destination;
pub mod digest;
mod error;
#[cfg(feature = "git")]
pub mod git;
pub mod local;
mod location;

pub use digest::{Digest, digest_tree};
pub use error::Error;
#[cfg(feature = "git")]
pub use git::{Credentials, GitOptions, GitSource};
pub use local::LocalSource;
pub use location::{redact_url, split_url_ref};

/// What a sync does with a destination that already exists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SyncPolicy {
    /// Replace the destination with the source's tree (the default).
    #[default]
    Replace,
    /// Copy the source over the destination: files the source lacks are kept, files it has are
    /// replaced. Still atomic: the merged tree is built aside and swapped in.
    Merge,
    /// Keep an existing destination untouched; sync only when it is absent.
    Skip,
    /// Refuse to sync when the destination exists ([`Error::AlreadyExists`]).
    Fail,
}

impl FromStr for SyncPolicy {
    type Err = String;

    /// `replace`, `merge`, `skip` or `fail`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "replace" => Ok(Self::Replace),
            "merge" => Ok(Self::Merge),
            "skip" => Ok(Self::Skip),
            "fail" => Ok(Self::Fail),
            other => Err(format!(
                "unknown sync policy `{other}` (expected replace, merge, skip or fail)"
            )),
        }
    }
}

/// One sync: bring `location` into `destination`.
///
/// Build it with [`SyncRequest::new`] and the `with_*` methods; the fields are public to read.
#[derive(Debug, Clone, Default)]
pub struct SyncRequest {
    /// Where the source is, as written in the deployment file: a folder relative to `base` for
    /// [`LocalSource`]; a URL, an scp-like address or a path (relative to `base`) of a
    /// repository for [`GitSource`], without `@ref` (see [`split_url_ref`]).
    pub location: String,
    /// The folder `location` is relative to (the deployment file's folder). A local source must
    /// stay inside it.
    pub base: PathBuf,
    /// The folder to fill; its parent must exist. Replaced atomically.
    pub destination: PathBuf,
    /// The branch, tag or commit (full or abbreviated) to check out; `None` is the remote's
    /// default branch. Git only; a local source ignores it.
    pub reference: Option<String>,
    /// What to do with an existing destination.
    pub policy: SyncPolicy,
    /// The folder the destination must be inside (the deployment's directory); `None` checks
    /// only that the destination has no `..`.
    pub within: Option<PathBuf>,
}

impl SyncRequest {
    /// A request to sync `location` (relative to `base`) into `destination`, replacing it, at the
    /// default ref.
    pub fn new(
        location: impl Into<String>,
        base: impl Into<PathBuf>,
        destination: impl Into<PathBuf>,
    ) -> Self {
        Self {
            location: location.into(),
            base: base.into(),
            destination: destination.into(),
            ..Self::default()
        }
    }

    /// Checks out `reference` (git).
    pub fn with_reference(mut self, reference: Option<impl Into<String>>) -> Self {
        self.reference = reference.map(Into::into);
        self
    }

    /// Uses `policy` for an existing destination.
    pub fn with_policy(mut self, policy: SyncPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Refuses a destination outside `root`.
    pub fn within(mut self, root: impl Into<PathBuf>) -> Self {
        self.within = Some(root.into());
        self
    }
}

/// The result of a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    /// The synced tree (the request's destination, its parent canonicalized).
    pub path: PathBuf,
    /// Number of files and links written.
    pub files: u64,
    /// Number of bytes of file content written.
    pub bytes: u64,
    /// The digest of the tree now at `path`.
    pub digest: Digest,
    /// The destination existed and the policy [`SyncPolicy::Skip`] kept it as it was (nothing
    /// written, nothing fetched).
    pub kept: bool,
    /// What the git backend did; `None` for other backends and for a kept destination.
    pub git: Option<GitStats>,
}

impl Synced {
    /// The result of keeping an existing destination.
    fn kept(path: &Path) -> Result<Self, Error> {
        Ok(Self {
            path: path.to_owned(),
            files: 0,
            bytes: 0,
            digest: digest_tree(path)?,
            kept: true,
            git: None,
        })
    }
}

/// What a git sync did: which commit it checked out and how it got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitStats {
    /// The full ref that was resolved (`refs/heads/main`, `refs/tags/v1`), or the commit id
    /// when the request named a commit.
    pub reference: String,
    /// The commit checked out (40 hexadecimal characters).
    pub commit: String,
    /// The clone kept beside the destination was created by this sync (a first sync, a new
    /// remote, or a clone that could not be used).
    pub cloned: bool,
    /// Objects were downloaded; `false` when the clone already had the commit.
    pub fetched: bool,
    /// The download was shallow (only the commit, not its history).
    pub shallow: bool,
    /// Objects received from the remote.
    pub received_objects: usize,
    /// Bytes received from the remote.
    pub received_bytes: usize,
}

/// A backend that syncs one kind of source.
#[async_trait]
pub trait SourceManager: Send + Sync {
    /// Syncs the source of `request` into its destination, atomically.
    async fn sync(&self, request: &SyncRequest) -> Result<Synced, Error>;
}
