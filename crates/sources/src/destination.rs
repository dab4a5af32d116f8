//! The destination of a sync: checked, locked, and replaced atomically.
//!
//! Beside a destination `<parent>/<name>` a sync keeps, in `<parent>`:
//! - `.<name>.lock`: held (an OS lock, released when its holder dies) for the whole sync, so
//!   two syncs of one destination never interleave;
//! - `.<name>.sync-<uuid>`: the tree being written, renamed into place when complete;
//! - `.<name>.old-<uuid>`: the previous tree while it is being deleted;
//! - `.<name>.prev`: the previous tree, kept (by the git backend) instead of deleted, so that the
//!   next sync updates it in place of writing a whole tree;
//! - `.<name>.git`: the git backend's clone of the remote.
//!
//! `sync-` and `old-` folders found when the lock is taken were left by a sync that died, and are
//! removed.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::Error;

/// A destination, locked for one sync.
#[derive(Debug)]
pub(crate) struct Destination {
    /// `<canonical parent>/<name>`.
    path: PathBuf,
    parent: PathBuf,
    name: OsString,
    /// Holds the lock until dropped.
    _lock: File,
}

impl Destination {
    /// Checks `path` (no `..`, a real folder for parent, inside `within` when given, not a link
    /// or a file), takes its lock (waiting until `deadline` at most), and removes what a sync
    /// that died left beside it.
    pub(crate) fn lock(
        path: &Path,
        within: Option<&Path>,
        deadline: Option<Instant>,
        location: &str,
    ) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidDestination {
            path: path.to_owned(),
            reason,
        };
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(invalid("it contains `.` or `..`".to_owned()));
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(invalid("it has no folder name".to_owned()));
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let parent = match parent.canonicalize() {
            Ok(parent) if parent.is_dir() => parent,
            _ => return Err(invalid("its parent folder does not exist".to_owned())),
        };
        if let Some(within) = within {
            let within = within
                .canonicalize()
                .map_err(|err| Error::io("cannot open", within, err))?;
            if !parent.starts_with(&within) {
                return Err(invalid(format!(
                    "it is outside the deployment's folder {}",
                    within.display()
                )));
            }
        }
        let resolved = parent.join(name);
        if let Ok(meta) = resolved.symlink_metadata() {
            if meta.file_type().is_symlink() {
                return Err(invalid("it is a link".to_owned()));
            }
            if !meta.is_dir() {
                return Err(invalid("it is not a folder".to_owned()));
            }
        }

        let lock_path = parent.join(hidden(name, "lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|err| Error::io("cannot open", &lock_path, err))?;
        match deadline {
            None => file
                .lock()
                .map_err(|err| Error::io("cannot lock", &lock_path, err))?,
            Some(deadline) => loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(TryLockError::WouldBlock) => {
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(Error::Timeout {
                                location: location.to_owned(),
                                after: Duration::ZERO,
                            });
                        }
                        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
                    }
                    Err(TryLockError::Error(err)) => {
                        return Err(Error::io("cannot lock", &lock_path, err));
                    }
                }
            },
        }
        let destination = Self {
            path: resolved,
            parent,
            name: name.to_owned(),
            _lock: file,
        };
        destination.remove_leftovers();
        Ok(destination)
    }

    /// The destination folder.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the destination exists (a previous sync, or the user's folder).
    pub(crate) fn exists(&self) -> bool {
        self.path.symlink_metadata().is_ok()
    }

    /// `<parent>/.<name>.<suffix>`.
    pub(crate) fn sibling(&self, suffix: &str) -> PathBuf {
        self.parent.join(hidden(&self.name, suffix))
    }

    /// A fresh path for the tree of this sync; nothing exists there yet.
    pub(crate) fn staging(&self) -> PathBuf {
        self.sibling(&format!("sync-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Puts the complete tree `staging` in place of the destination, atomically. The previous
    /// tree is deleted, or, with `keep_previous`, kept as `.<name>.prev`.
    pub(crate) fn install(&self, staging: &Path, keep_previous: bool) -> Result<(), Error> {
        if !self.exists() {
            return fs::rename(staging, &self.path)
                .map_err(|err| Error::io("cannot move the synced tree to", &self.path, err));
        }
        let retired = if keep_previous {
            let previous = self.sibling("prev");
            discard(&previous);
            previous
        } else {
            self.sibling(&format!("old-{}", uuid::Uuid::new_v4().simple()))
        };
        match nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            staging,
            nix::fcntl::AT_FDCWD,
            &self.path,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        ) {
            // `staging` now holds the previous tree.
            Ok(()) => {
                if fs::rename(staging, &retired).is_err() {
                    discard(staging);
                    return Ok(());
                }
            }
            // A filesystem without exchange: two renames; the destination is briefly absent,
            // never half-written.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
                fs::rename(&self.path, &retired)
                    .map_err(|err| Error::io("cannot move aside", &self.path, err))?;
                fs::rename(staging, &self.path).map_err(|err| {
                    let _ = fs::rename(&retired, &self.path);
                    Error::io("cannot move the synced tree to", &self.path, err)
                })?;
            }
            Err(errno) => {
                return Err(Error::io(
                    "cannot swap the synced tree into",
                    &self.path,
                    std::io::Error::from(errno),
                ));
            }
        }
        if !keep_previous {
            discard(&retired);
        }
        Ok(())
    }

    /// Removes the staging and retired folders a killed sync may have left.
    fn remove_leftovers(&self) {
        let prefix = hidden(&self.name, "");
        let prefix = prefix.to_string_lossy();
        let Ok(entries) = fs::read_dir(&self.parent) else {
            return;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            if let Some(rest) = file_name.strip_prefix(prefix.as_ref())
                && (rest.starts_with("sync-") || rest.starts_with("old-"))
            {
                tracing::debug!(path = %entry.path().display(), "removing an interrupted sync");
                discard(&entry.path());
            }
        }
    }
}

/// `.<name>.<suffix>`.
fn hidden(name: &std::ffi::OsStr, suffix: &str) -> OsString {
    let mut hidden = OsString::from(".");
    hidden.push(name);
    hidden.push(".");
    hidden.push(suffix);
    hidden
}

/// Removes a tree deployd wrote (a staging tree, a retired tree), logging (not returning) a
/// failure.
pub(crate) fn discard(tree: &Path) {
    if tree.symlink_metadata().is_ok()
        && let Err(err) = remove_tree(tree)
    {
        tracing::warn!(path = %tree.display(), error = %err, "cannot remove a folder deployd wrote");
    }
}

/// `remove_dir_all`, which also removes folders whose mode forbids writing into them (a copy
/// keeps the source's modes, read-only folders included).
pub(crate) fn remove_tree(tree: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(tree) {
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
            for entry in walkdir::WalkDir::new(tree)
                .follow_links(false)
                .into_iter()
                .flatten()
            {
                if entry.file_type().is_dir()
                    && let Ok(meta) = entry.metadata()
                {
                    let mode = meta.permissions().mode() | 0o700;
                    let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode));
                }
            }
            fs::remove_dir_all(tree)
        }
        other => other,
    }
}
