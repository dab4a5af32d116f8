//! Writing a commit's tree into a folder: files with git's modes, links checked, names checked.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Error;
use crate::copy::{Totals, link_stays_inside, remove_existing};
use crate::digest::{Entry, EntryKind, Manifest, relative_bytes, sha256};

const TREE: i32 = 0o040000;
const BLOB: i32 = 0o100644;
const BLOB_GROUP_WRITABLE: i32 = 0o100664;
const BLOB_EXECUTABLE: i32 = 0o100755;
const LINK: i32 = 0o120000;
const COMMIT: i32 = 0o160000;

/// How a checkout treats what is already in its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// The target does not exist: everything is written.
    Fresh,
    /// The target holds another tree: the commit's entries are written over it, and what the
    /// commit lacks stays (the `merge` policy).
    Overlay,
    /// The target holds some earlier tree (or anything): it is made equal to the commit's tree,
    /// writing only the entries that differ and removing what the commit lacks.
    Reconcile,
}

/// Writes a commit's tree into `target`. Files get mode 0o644 or 0o755, folders 0o755, whatever
/// the umask; submodules become empty folders.
pub(crate) struct Checkout<'a> {
    pub(crate) repo: &'a git2::Repository,
    pub(crate) target: &'a Path,
    pub(crate) fill: Fill,
    /// Names the source in errors.
    pub(crate) location: &'a str,
    pub(crate) cancel: &'a AtomicBool,
    /// Every entry of the commit's tree (written or already there).
    pub(crate) manifest: Manifest,
    /// What was written.
    pub(crate) totals: Totals,
    /// A buffer to compare files with.
    scratch: Vec<u8>,
}

impl<'a> Checkout<'a> {
    pub(crate) fn new(
        repo: &'a git2::Repository,
        target: &'a Path,
        fill: Fill,
        location: &'a str,
        cancel: &'a AtomicBool,
    ) -> Self {
        Self {
            repo,
            target,
            fill,
            location,
            cancel,
            manifest: Manifest::default(),
            totals: Totals::default(),
            scratch: Vec::new(),
        }
    }

    pub(crate) fn run(&mut self, tree: &git2::Tree<'_>) -> Result<(), Error> {
        if self.fill == Fill::Fresh || !self.target.is_dir() {
            fs::create_dir(self.target)
                .map_err(|err| Error::io("cannot create", self.target, err))?;
        }
        set_mode(self.target, 0o755)?;
        self.write_tree(tree, &mut PathBuf::new())
    }

    fn write_tree(&mut self, tree: &git2::Tree<'_>, relative: &mut PathBuf) -> Result<(), Error> {
        let mut names = HashSet::new();
        for entry in tree.iter() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted("the sync was cancelled".to_owned()));
            }
            let name = entry.name_bytes();
            self.check_name(name, relative)?;
            if self.fill == Fill::Reconcile {
                names.insert(OsStr::from_bytes(name).to_owned());
            }
            relative.push(OsStr::from_bytes(name));
            let written = self.write_entry(&entry, relative);
            relative.pop();
            written?;
        }
        if self.fill == Fill::Reconcile {
            self.remove_extras(relative, &names)?;
        }
        Ok(())
    }

    /// Removes what a folder holds beyond `names`.
    fn remove_extras(&self, relative: &Path, names: &HashSet<OsString>) -> Result<(), Error> {
        let dir = self.target.join(relative);
        let entries = fs::read_dir(&dir).map_err(|err| Error::io("cannot read", &dir, err))?;
        for entry in entries {
            let entry = entry.map_err(|err| Error::io("cannot read", &dir, err))?;
            if !names.contains(&entry.file_name()) {
                remove_existing(&entry.path())?;
            }
        }
        Ok(())
    }

    fn write_entry(
        &mut self,
        entry: &git2::TreeEntry<'_>,
        relative: &mut PathBuf,
    ) -> Result<(), Error> {
        let path = self.target.join(&*relative);
        let git = |err: git2::Error| Error::Git {
            location: self.location.to_owned(),
            detail: format!("cannot read {}: {}", relative.display(), err.message()),
        };
        match entry.filemode() {
            TREE => {
                self.make_dir(&path, relative)?;
                let subtree = self.repo.find_tree(entry.id()).map_err(git)?;
                self.write_tree(&subtree, relative)?;
            }
            // A submodule: git leaves an empty folder where it goes.
            COMMIT => {
                self.make_dir(&path, relative)?;
                if self.fill == Fill::Reconcile {
                    self.remove_extras(relative, &HashSet::new())?;
                }
            }
            mode @ (BLOB | BLOB_GROUP_WRITABLE | BLOB_EXECUTABLE) => {
                let blob = self.repo.find_blob(entry.id()).map_err(git)?;
                let content = blob.content();
                let mode = if mode == BLOB_EXECUTABLE {
                    0o755
                } else {
                    0o644
                };
                if !(self.fill == Fill::Reconcile && self.holds_file(&path, mode, content)) {
                    if self.fill != Fill::Fresh {
                        remove_existing(&path)?;
                    }
                    write_file(&path, mode, content)?;
                    self.totals.files += 1;
                    self.totals.bytes += content.len() as u64;
                }
                self.manifest.push(Entry {
                    path: relative_bytes(Path::new(""), relative),
                    kind: EntryKind::File {
                        mode,
                        len: content.len() as u64,
                        sha: sha256(content),
                    },
                });
            }
            LINK => {
                let blob = self.repo.find_blob(entry.id()).map_err(git)?;
                let target = Path::new(OsStr::from_bytes(blob.content()));
                if !link_stays_inside(relative, target) {
                    return Err(Error::Escapes {
                        location: self.location.to_owned(),
                        root: PathBuf::from("the repository"),
                        detail: format!(
                            "the link {} points to {}",
                            relative.display(),
                            target.display()
                        ),
                    });
                }
                let current = (self.fill == Fill::Reconcile)
                    .then(|| fs::read_link(&path).ok())
                    .flatten();
                if current.as_deref() != Some(target) {
                    if self.fill != Fill::Fresh {
                        remove_existing(&path)?;
                    }
                    std::os::unix::fs::symlink(target, &path)
                        .map_err(|err| Error::io("cannot create link", &path, err))?;
                    self.totals.files += 1;
                }
                self.manifest.push(Entry {
                    path: relative_bytes(Path::new(""), relative),
                    kind: EntryKind::Link {
                        target: blob.content().to_vec(),
                    },
                });
            }
            other => {
                return Err(Error::Git {
                    location: self.location.to_owned(),
                    detail: format!(
                        "{} has the unknown mode {other:o} in the repository",
                        relative.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether `path` is already a regular file with this mode and content.
    fn holds_file(&mut self, path: &Path, mode: u32, content: &[u8]) -> bool {
        let Ok(meta) = path.symlink_metadata() else {
            return false;
        };
        // A file linked elsewhere too is rewritten: the tree must not share what it holds.
        if !meta.is_file()
            || meta.nlink() != 1
            || meta.permissions().mode() & 0o7777 != mode
            || meta.len() != content.len() as u64
        {
            return false;
        }
        let Ok(file) = File::open(path) else {
            return false;
        };
        self.scratch.clear();
        self.scratch.reserve(content.len() + 1);
        // One byte more than expected, to see a file that grew meanwhile.
        match file
            .take(content.len() as u64 + 1)
            .read_to_end(&mut self.scratch)
        {
            Ok(_) => self.scratch == content,
            Err(_) => false,
        }
    }

    fn make_dir(&mut self, path: &Path, relative: &Path) -> Result<(), Error> {
        let exists = match path.symlink_metadata() {
            Ok(meta) if self.fill != Fill::Fresh && meta.is_dir() => true,
            Ok(_) if self.fill != Fill::Fresh => {
                remove_existing(path)?;
                false
            }
            _ => false,
        };
        if !exists {
            fs::create_dir(path).map_err(|err| Error::io("cannot create", path, err))?;
        }
        set_mode(path, 0o755)?;
        self.manifest.push(Entry {
            path: relative_bytes(Path::new(""), relative),
            kind: EntryKind::Dir { mode: 0o755 },
        });
        Ok(())
    }

    /// A tree entry's name must be one plain name: not empty, `.`, `..` or `.git` (in any case),
    /// and without `/` or NUL.
    fn check_name(&self, name: &[u8], parent: &Path) -> Result<(), Error> {
        let bad = name.is_empty()
            || name == b"."
            || name == b".."
            || name.eq_ignore_ascii_case(b".git")
            || name.contains(&b'/')
            || name.contains(&0);
        if bad {
            return Err(Error::Escapes {
                location: self.location.to_owned(),
                root: PathBuf::from("the repository"),
                detail: format!(
                    "the tree {} has an entry named `{}`",
                    if parent.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        parent
                    }
                    .display(),
                    String::from_utf8_lossy(name).escape_debug()
                ),
            });
        }
        Ok(())
    }
}

fn write_file(path: &Path, mode: u32, content: &[u8]) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| Error::io("cannot create", path, err))?;
    file.write_all(content)
        .map_err(|err| Error::io("cannot write", path, err))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|err| Error::io("cannot set permissions of", path, err))
}

/// Sets the mode of a folder, unless it has it already.
fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    if fs::symlink_metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o7777 == mode) {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|err| Error::io("cannot set permissions of", path, err))
}
