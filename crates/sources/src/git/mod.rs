//! Git repositories: a branch, tag or commit checked out from a clone that is fetched into, not
//! cloned again.
//!
//! For a destination `<parent>/<name>`, the backend keeps a bare clone of the remote at
//! `<parent>/.<name>.git` (inside the deployment's folder, like the destination). A sync:
//!
//! 1. takes the destination's lock (see the [crate docs](crate)) and opens the clone; when it
//!    is missing, belongs to another remote (the URL without its secret is recorded in the
//!    clone's config, never the secret), or cannot be opened, it is created anew (a *clone*);
//! 2. connects to the remote, lists its refs and resolves the requested ref as git does (a full
//!    ref, then a tag, then a branch, then a commit id, full or abbreviated); a ref that does not
//!    exist fails with [`Error::RefNotFound`] and the nearest branch and tag names;
//! 3. fetches only that ref, shallow (depth 1) where the transport allows it (not the local
//!    transport of paths and `file://` URLs; a server that refuses gets a full fetch), and
//!    nothing at all when the clone already has the object; a commit id that no ref points to
//!    fetches every branch and tag in full (so does the local transport, which sends what every
//!    ref reaches whatever is asked, and then only what is new);
//! 4. writes the commit's tree into a temporary sibling of the destination (files 0o644 or
//!    0o755, links checked like a local source's, tree entries named `..`, `.git` or containing
//!    `/` refused, submodules left as empty folders, no `.git` in the result) and swaps it into
//!    place: the destination is never a half-written tree, and a killed sync leaves the previous
//!    tree and a clone that the next sync fetches into;
//! 5. keeps the tree it replaced as `<parent>/.<name>.prev`; the next sync renames that into its
//!    temporary sibling and makes it equal to the new commit's tree, writing only the files that
//!    differ (compared by content and mode; a file linked elsewhere is rewritten) and removing
//!    what the commit lacks, so an update costs what changed, not the whole tree. The price is a
//!    second copy of the tree on disk.
//!
//! Credentials come from the environment ([`Credentials`]). Every message from libgit2 or the
//! server is redacted before it becomes an error. The sync runs on tokio's blocking pool; it
//! fails with [`Error::Timeout`] after [`GitOptions::timeout`], measured from its start (a
//! transfer that stalls inside libgit2 without progress is abandoned, and ends when libgit2
//! returns).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

mod checkout;
mod credentials;
mod remote;

pub use credentials::Credentials;

use crate::copy::{CopyOptions, Links, Totals, copy_tree};
use crate::destination::{Destination, discard};
use crate::digest::digest_tree;
use crate::location::{Transport, identity, redact_url, transport};
use crate::{Error, GitStats, SourceManager, SyncPolicy, SyncRequest, Synced};
use checkout::{Checkout, Fill};

/// How the git backend works.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GitOptions {
    /// The longest a sync may take, network included (default: 5 minutes).
    pub timeout: Duration,
    /// Fetch only the wanted commit, not its history, where the server allows it (default:
    /// `true`).
    pub shallow: bool,
    /// Where credentials come from (default: [`Credentials::from_env`]).
    pub credentials: Credentials,
}

impl Default for GitOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            shallow: true,
            credentials: Credentials::from_env(),
        }
    }
}

/// Checks out a git repository at a branch, tag or commit ([module docs](self)).
///
/// The request's `location` is the repository without `@ref` (an `https://`, `ssh://`,
/// `git://` or `file://` URL, an scp-like `user@host:path`, or a path, relative to the request's
/// `base`), and its `reference` the branch, tag or commit.
#[derive(Debug, Clone, Default)]
pub struct GitSource {
    options: GitOptions,
}

impl GitSource {
    /// A git backend with the default options (credentials from the environment).
    pub fn new() -> Self {
        Self::default()
    }

    /// A git backend with `options`.
    pub fn with_options(options: GitOptions) -> Self {
        Self { options }
    }
}

/// Sets the flag when dropped: a sync whose caller stopped waiting stops at its next step.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl SourceManager for GitSource {
    async fn sync(&self, request: &SyncRequest) -> Result<Synced, Error> {
        let cancel = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(cancel.clone());
        let job = {
            let request = request.clone();
            let options = self.options.clone();
            let cancel = cancel.clone();
            tokio::task::spawn_blocking(move || sync_blocking(&request, &options, &cancel))
        };
        match tokio::time::timeout(self.options.timeout, job).await {
            Ok(joined) => joined.map_err(|err| Error::Interrupted(err.to_string()))?,
            Err(_) => Err(Error::Timeout {
                location: redact_url(&request.location),
                after: self.options.timeout,
            }),
        }
    }
}

fn sync_blocking(
    request: &SyncRequest,
    options: &GitOptions,
    cancel: &AtomicBool,
) -> Result<Synced, Error> {
    let deadline = Instant::now() + options.timeout;
    let shown = redact_url(&request.location);
    let url = resolve_url(request, &shown)?;
    let destination = Destination::lock(
        &request.destination,
        request.within.as_deref(),
        Some(deadline),
        &shown,
    )
    .map_err(|err| match err {
        Error::Timeout { location, .. } => Error::Timeout {
            location,
            after: options.timeout,
        },
        other => other,
    })?;
    let exists = destination.exists();
    match request.policy {
        SyncPolicy::Skip if exists => return Synced::kept(destination.path()),
        SyncPolicy::Fail if exists => {
            return Err(Error::AlreadyExists {
                path: request.destination.clone(),
            });
        }
        _ => {}
    }

    let cache = destination.sibling("git");
    let (repo, cloned) = remote::open_cache(&cache, &identity(&url))?;
    let fetcher = remote::Fetcher::new(&repo, &url, &shown, options, deadline, cancel);
    let resolved = fetcher.fetch(request.reference.as_deref())?;
    let tree = repo
        .find_commit(resolved.commit)
        .and_then(|commit| commit.tree())
        .map_err(|err| fetcher.error(err))?;
    tracing::debug!(
        location = %shown,
        reference = %resolved.reference,
        commit = %resolved.commit,
        cloned,
        fetched = resolved.fetched,
        received_objects = resolved.received_objects,
        "git ref resolved"
    );

    let merge = request.policy == SyncPolicy::Merge && exists;
    let mut staging = destination.staging();
    // The tree before the current one, when the last sync kept it: updated in place of writing
    // a whole tree (it may hold anything; the checkout makes it equal to the commit's tree).
    let fill = if merge {
        Fill::Overlay
    } else if fs::rename(destination.sibling("prev"), &staging).is_ok() {
        Fill::Reconcile
    } else {
        Fill::Fresh
    };
    let write = |staging: &Path, fill: Fill| -> Result<(Totals, crate::Digest), Error> {
        if merge {
            copy_tree(
                destination.path(),
                staging,
                CopyOptions {
                    skipped: &[],
                    links: Links::AsTheyAre,
                    overwrite: false,
                },
                None,
            )?;
        }
        let mut checkout = Checkout::new(&repo, staging, fill, &shown, cancel);
        checkout.run(&tree)?;
        let digest = if merge {
            digest_tree(staging)?
        } else {
            std::mem::take(&mut checkout.manifest).finish()
        };
        Ok((checkout.totals, digest))
    };
    let mut written = write(&staging, fill);
    if fill == Fill::Reconcile && matches!(written, Err(Error::Io { .. })) {
        // Something in the previous tree is in the way (a folder another user owns, ...): the
        // whole tree, then.
        discard(&staging);
        staging = destination.staging();
        written = write(&staging, Fill::Fresh);
    }
    let (totals, digest) = match written {
        Ok(written) => written,
        Err(err) => {
            discard(&staging);
            return Err(if cancel.load(Ordering::Relaxed) {
                Error::Timeout {
                    location: shown,
                    after: options.timeout,
                }
            } else {
                err
            });
        }
    };
    if cancel.load(Ordering::Relaxed) {
        // The caller gave up: it must not find a tree it was told did not come.
        discard(&staging);
        return Err(Error::Timeout {
            location: shown,
            after: options.timeout,
        });
    }
    if let Err(err) = destination.install(&staging, true) {
        discard(&staging);
        return Err(err);
    }
    Ok(Synced {
        path: destination.path().to_owned(),
        files: totals.files,
        bytes: totals.bytes,
        digest,
        kept: false,
        git: Some(GitStats {
            reference: resolved.reference,
            commit: resolved.commit.to_string(),
            cloned,
            fetched: resolved.fetched,
            shallow: resolved.shallow,
            received_objects: resolved.received_objects,
            received_bytes: resolved.received_bytes,
        }),
    })
}

/// The URL to hand libgit2: a relative path is taken relative to the request's base.
fn resolve_url(request: &SyncRequest, shown: &str) -> Result<String, Error> {
    let location = request.location.trim();
    if location.is_empty() {
        return Err(Error::InvalidLocation {
            location: shown.to_owned(),
            reason: "it is empty".to_owned(),
        });
    }
    if location.contains(char::is_whitespace) || location.contains('\0') {
        return Err(Error::InvalidLocation {
            location: shown.to_owned(),
            reason: "it contains blanks".to_owned(),
        });
    }
    if transport(location) != Transport::Local || location.starts_with("file://") {
        return Ok(location.to_owned());
    }
    let path = Path::new(location);
    let path: PathBuf = if path.is_absolute() {
        path.to_owned()
    } else {
        request.base.join(path)
    };
    if !path.exists() {
        return Err(Error::NotFound {
            location: shown.to_owned(),
            detail: format!("there is no repository at {}", path.display()),
        });
    }
    path.into_os_string()
        .into_string()
        .map_err(|_| Error::InvalidLocation {
            location: shown.to_owned(),
            reason: "the path is not UTF-8".to_owned(),
        })
}
