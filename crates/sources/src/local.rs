//! Local folders: a recursive copy confined to the source root.

use std::ffi::OsStr;
use std::fs;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use walkdir::WalkDir;

use crate::{Error, SourceManager, SyncRequest, Synced};

/// Folders that are never copied: version control, build outputs, caches, environments, and
/// deployd's own data directory.
pub const SKIPPED: &[&str] = &[
    ".git",
    "target",
    "node_modules",
    "__pycache__",
    ".venv",
    ".deployd",
];

/// Copies a local folder. Links are copied as links, and a link that points outside the
/// source folder is refused.
#[derive(Debug, Clone, Default)]
pub struct LocalSource {
    _private: (),
}

impl LocalSource {
    /// A local source backend.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl SourceManager for LocalSource {
    async fn sync(&self, request: &SyncRequest) -> Result<Synced, Error> {
        let request = request.clone();
        tokio::task::spawn_blocking(move || sync_blocking(&request))
            .await
            .map_err(|err| Error::Interrupted(err.to_string()))?
    }
}

fn sync_blocking(request: &SyncRequest) -> Result<Synced, Error> {
    let source = resolve(&request.base, &request.location)?;
    let destination = &request.destination;
    let (parent, name) = match (destination.parent(), destination.file_name()) {
        (Some(parent), Some(name)) if parent.is_dir() => (parent, name),
        _ => {
            return Err(Error::InvalidDestination {
                path: destination.clone(),
                reason: "its parent folder does not exist".to_owned(),
            });
        }
    };
    if destination.starts_with(&source) || source.starts_with(destination) {
        return Err(Error::InvalidDestination {
            path: destination.clone(),
            reason: format!("it overlaps the source {}", source.display()),
        });
    }
    remove_leftovers(parent, name);

    let staging = parent.join(format!(
        ".{}.sync-{}",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ));
    let copied = copy_tree(&request.location, &source, &staging);
    let totals = match copied {
        Ok(totals) => totals,
        Err(err) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    swap_into_place(&staging, destination)?;
    Ok(Synced {
        path: destination.clone(),
        files: totals.0,
        bytes: totals.1,
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
                path: joined,
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

/// Removes the staging and retired folders a killed sync may have left beside `name`.
fn remove_leftovers(parent: &Path, name: &OsStr) {
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if let Some(rest) = file_name.strip_prefix(&prefix) {
            if rest.starts_with("sync-") || rest.starts_with("old-") {
                tracing::debug!(path = %entry.path().display(), "removing an interrupted sync");
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Copies `source` into the new folder `staging`; returns (files, bytes).
fn copy_tree(location: &str, source: &Path, staging: &Path) -> Result<(u64, u64), Error> {
    let (mut files, mut bytes) = (0u64, 0u64);
    let walker = WalkDir::new(source)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|entry| {
            entry.depth() == 0
                || !(entry.file_type().is_dir()
                    && SKIPPED.iter().any(|s| entry.file_name() == OsStr::new(s)))
        });
    for entry in walker {
        let entry = entry.map_err(|err| {
            let path = err.path().unwrap_or(source).to_owned();
            Error::io("cannot read", &path, err.into())
        })?;
        let relative = entry.path().strip_prefix(source).map_err(|_| Error::Escapes {
            location: location.to_owned(),
            root: source.to_owned(),
            detail: format!("{} is outside the source", entry.path().display()),
        })?;
        let target = staging.join(relative);
        let kind = entry.file_type();
        if kind.is_dir() {
            fs::create_dir(&target).map_err(|err| Error::io("cannot create", &target, err))?;
            let mode = entry
                .metadata()
                .map_err(|err| Error::io("cannot read", entry.path(), err.into()))?
                .permissions();
            fs::set_permissions(&target, mode)
                .map_err(|err| Error::io("cannot set permissions of", &target, err))?;
        } else if kind.is_symlink() {
            let link = fs::read_link(entry.path())
                .map_err(|err| Error::io("cannot read link", entry.path(), err))?;
            check_link(location, source, entry.path(), &link)?;
            std::os::unix::fs::symlink(&link, &target)
                .map_err(|err| Error::io("cannot create link", &target, err))?;
            files += 1;
        } else if kind.is_file() {
            bytes += fs::copy(entry.path(), &target)
                .map_err(|err| Error::io("cannot copy", entry.path(), err))?;
            files += 1;
        }
        // Sockets, fifos and devices are not source code: skipped.
    }
    Ok((files, bytes))
}

/// A link inside the source may only point inside the source.
fn check_link(location: &str, source: &Path, path: &Path, link: &Path) -> Result<(), Error> {
    let escapes = || Error::Escapes {
        location: location.to_owned(),
        root: source.to_owned(),
        detail: format!(
            "the link {} points to {}",
            path.display(),
            link.display()
        ),
    };
    if link.is_absolute() {
        return Err(escapes());
    }
    // Lexically: the link's folder, relative to the source, then the link's components.
    let folder = path
        .parent()
        .and_then(|p| p.strip_prefix(source).ok())
        .ok_or_else(escapes)?;
    let mut depth = folder.components().count();
    for component in link.components() {
        match component {
            Component::ParentDir => depth = depth.checked_sub(1).ok_or_else(escapes)?,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(escapes()),
        }
    }
    Ok(())
}

/// Puts `staging` where `destination` is, atomically when `destination` exists.
fn swap_into_place(staging: &Path, destination: &Path) -> Result<(), Error> {
    if destination.symlink_metadata().is_err() {
        return fs::rename(staging, destination)
            .map_err(|err| Error::io("cannot move the synced tree to", destination, err));
    }
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        staging,
        nix::fcntl::AT_FDCWD,
        destination,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .map_err(|errno| {
        Error::io(
            "cannot swap the synced tree into",
            destination,
            std::io::Error::from(errno),
        )
    })?;
    // `staging` now holds the previous tree.
    let retired = staging.with_file_name(
        staging
            .file_name()
            .map(|n| n.to_string_lossy().replacen(".sync-", ".old-", 1))
            .unwrap_or_default(),
    );
    if fs::rename(staging, &retired).is_ok() {
        let _ = fs::remove_dir_all(&retired);
    } else {
        let _ = fs::remove_dir_all(staging);
    }
    Ok(())
}
