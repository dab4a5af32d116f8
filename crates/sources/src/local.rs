//! Local folders: a recursive copy confined to the source root.

use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;

use crate::copy::{CopyOptions, Links, copy_tree};
use crate::destination::{Destination, discard};
use crate::digest::{Manifest, digest_tree};
use crate::{Error, SourceManager, SyncPolicy, SyncRequest, Synced};

/// Folders that are not copied unless told otherwise: version control, build outputs, caches,
/// environments, and deployd's own data directory.
pub const SKIPPED: &[&str] = &[
    ".git",
    "target",
    "node_modules",
    "__pycache__",
    ".venv",
    ".deployd",
];

/// Copies a local folder, resolved against the request's `base` and confined to it.
///
/// Folders named in the skip list ([`SKIPPED`] by default) are left out at any depth. Links are
/// copied as links, and a link that points outside the source folder is refused, as is a
/// `location` that is absolute or leads outside `base` (through `..` or a link). Files keep their
/// permission bits exactly. Nothing outside the source is read: links are never followed.
#[derive(Debug, Clone)]
pub struct LocalSource {
    skipped: Vec<String>,
}

impl Default for LocalSource {
    fn default() -> Self {
        Self {
            skipped: SKIPPED.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

impl LocalSource {
    /// A local source backend that skips the folders of [`SKIPPED`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Skips the folders named `skipped` instead of [`SKIPPED`] (an empty list copies everything).
    pub fn with_skipped<I, S>(skipped: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            skipped: skipped.into_iter().map(Into::into).collect(),
        }
    }
}

#[async_trait]
impl SourceManager for LocalSource {
    async fn sync(&self, request: &SyncRequest) -> Result<Synced, Error> {
        let request = request.clone();
        let skipped = self.skipped.clone();
        tokio::task::spawn_blocking(move || sync_blocking(&request, &skipped))
            .await
            .map_err(|err| Error::Interrupted(err.to_string()))?
    }
}

fn sync_blocking(request: &SyncRequest, skipped: &[String]) -> Result<Synced, Error> {
    let source = resolve(&request.base, &request.location)?;
    let destination = Destination::lock(
        &request.destination,
        request.within.as_deref(),
        None,
        &request.location,
    )?;
    let path = destination.path();
    if path.starts_with(&source) || source.starts_with(path) {
        return Err(Error::InvalidDestination {
            path: request.destination.clone(),
            reason: format!("it overlaps the source {}", source.display()),
        });
    }
    let exists = destination.exists();
    match request.policy {
        SyncPolicy::Skip if exists => return Synced::kept(path),
        SyncPolicy::Fail if exists => {
            return Err(Error::AlreadyExists {
                path: request.destination.clone(),
            });
        }
        _ => {}
    }
    let merge = request.policy == SyncPolicy::Merge && exists;

    let staging = destination.staging();
    let written = (|| {
        if merge {
            // The previous tree as it is, then the source over it.
            copy_tree(
                path,
                &staging,
                CopyOptions {
                    skipped: &[],
                    links: Links::AsTheyAre,
                    overwrite: false,
                },
                None,
            )?;
            let totals = copy_tree(
                &source,
                &staging,
                CopyOptions {
                    skipped,
                    links: Links::Confined {
                        location: &request.location,
                    },
                    overwrite: true,
                },
                None,
            )?;
            Ok((totals, digest_tree(&staging)?))
        } else {
            let mut manifest = Manifest::default();
            let totals = copy_tree(
                &source,
                &staging,
                CopyOptions {
                    skipped,
                    links: Links::Confined {
                        location: &request.location,
                    },
                    overwrite: false,
                },
                Some(&mut manifest),
            )?;
            Ok((totals, manifest.finish()))
        }
    })();
    let (totals, digest) = match written {
        Ok(written) => written,
        Err(err) => {
            discard(&staging);
            return Err(err);
        }
    };
    if let Err(err) = destination.install(&staging, false) {
        discard(&staging);
        return Err(err);
    }
    Ok(Synced {
        path: path.to_owned(),
        files: totals.files,
        bytes: totals.bytes,
        digest,
        kept: false,
        git: None,
    })
}

/// Resolves `location` against `base` and checks that the result stays inside `base`, links
/// included.
fn resolve(base: &Path, location: &str) -> Result<PathBuf, Error> {
    let escapes = |detail: &str| Error::Escapes {
        location: location.to_owned(),
        root: base.to_owned(),
        detail: detail.to_owned(),
    };
    let relative = Path::new(location);
    if relative
        .components()
        .any(|c| matches!(c, Component::RootDir | Component::Prefix(_)))
    {
        return Err(escapes("the path is absolute"));
    }
    let root = base
        .canonicalize()
        .map_err(|err| Error::io("cannot open the base folder", base, err))?;
    let joined = root.join(relative);
    let resolved = match joined.canonicalize() {
        Ok(path) => path,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound {
                location: location.to_owned(),
                detail: format!("there is nothing at {}", joined.display()),
            });
        }
        Err(err) => return Err(Error::io("cannot open", &joined, err)),
    };
    if !resolved.starts_with(&root) {
        return Err(escapes(&format!("it resolves to {}", resolved.display())));
    }
    if !resolved.is_dir() {
        return Err(Error::NotADirectory {
            location: location.to_owned(),
            path: resolved,
        });
    }
    Ok(resolved)
}
