//! The content digest of a synced tree.
//!
//! The digest is SHA-256 over a manifest of the tree, so it is the same on every machine for the
//! same tree, wherever the tree lives:
//!
//! ```text
//! "deployd-tree-digest-v1\n"
//! for every entry but the root, in the byte order of its relative path ('/'-separated):
//!     kind          1 byte: 'd' folder, 'f' file, 'l' symbolic link
//!     mode          u32 big-endian: the permission bits (mode & 0o7777); 0 for a link
//!     path          u64 big-endian length, then the bytes of the relative path
//!     folder:       nothing more
//!     file:         u64 big-endian length of the content, then SHA-256 of the content (32 bytes)
//!     link:         u64 big-endian length of the target, then the bytes of the target
//! ```
//!
//! Every permission bit counts (not only the executable bit): a sync writes modes exactly (a
//! local copy keeps the source's, a git checkout writes 0o644 or 0o755 as git records them),
//! regardless of the umask. Owners, times, sockets and devices do not count.

use std::fmt;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};
use walkdir::WalkDir;

use crate::Error;

/// The SHA-256 content digest of a tree (see the [module docs](self) for what it covers).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The 32 bytes of the digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    /// Lowercase hexadecimal, 64 characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A digest that is not 64 hexadecimal characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a digest is 64 hexadecimal characters")]
pub struct ParseDigestError;

impl FromStr for Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.as_bytes();
        if hex.len() != 64 {
            return Err(ParseDigestError);
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            let text = std::str::from_utf8(pair).map_err(|_| ParseDigestError)?;
            *byte = u8::from_str_radix(text, 16).map_err(|_| ParseDigestError)?;
        }
        Ok(Self(bytes))
    }
}

/// One entry of a tree, as the digest sees it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Relative path, components joined with `/`.
    pub(crate) path: Vec<u8>,
    pub(crate) kind: EntryKind,
}

#[derive(Debug, Clone)]
pub(crate) enum EntryKind {
    Dir { mode: u32 },
    File { mode: u32, len: u64, sha: [u8; 32] },
    Link { target: Vec<u8> },
}

/// Collects the entries of a tree in any order and computes its digest.
#[derive(Debug, Default)]
pub(crate) struct Manifest {
    entries: Vec<Entry>,
}

impl Manifest {
    pub(crate) fn push(&mut self, entry: Entry) {
        self.entries.push(entry);
    }

    pub(crate) fn finish(mut self) -> Digest {
        self.entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        let mut hasher = Sha256::new();
        hasher.update(b"deployd-tree-digest-v1\n");
        for entry in &self.entries {
            let (tag, mode) = match entry.kind {
                EntryKind::Dir { mode } => (b'd', mode),
                EntryKind::File { mode, .. } => (b'f', mode),
                EntryKind::Link { .. } => (b'l', 0),
            };
            hasher.update([tag]);
            hasher.update((mode & 0o7777).to_be_bytes());
            hasher.update((entry.path.len() as u64).to_be_bytes());
            hasher.update(&entry.path);
            match &entry.kind {
                EntryKind::Dir { .. } => {}
                EntryKind::File { len, sha, .. } => {
                    hasher.update(len.to_be_bytes());
                    hasher.update(sha);
                }
                EntryKind::Link { target } => {
                    hasher.update((target.len() as u64).to_be_bytes());
                    hasher.update(target);
                }
            }
        }
        Digest(hasher.finalize().into())
    }
}

/// The relative path of `path` under `root`, '/'-joined, as the digest records it.
pub(crate) fn relative_bytes(root: &Path, path: &Path) -> Vec<u8> {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let mut out = Vec::with_capacity(relative.as_os_str().len());
    for (i, component) in relative.components().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(component.as_os_str().as_bytes());
    }
    out
}

/// SHA-256 of a byte string.
#[cfg_attr(not(feature = "git"), allow(dead_code))]
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A running SHA-256 of a file's content.
#[derive(Default)]
pub(crate) struct ContentHasher(Sha256);

impl ContentHasher {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// The digest of the tree at `root`: everything under it, nothing skipped, links not followed.
///
/// A sync returns the digest of what it wrote, which equals `digest_tree(destination)` right
/// after the sync.
pub fn digest_tree(root: &Path) -> Result<Digest, Error> {
    let mut manifest = Manifest::default();
    let mut files = Vec::new();
    for entry in WalkDir::new(root).follow_links(false) {
        let entry = entry.map_err(|err| {
            let path = err.path().unwrap_or(root).to_owned();
            Error::io("cannot read", &path, err.into())
        })?;
        if entry.depth() == 0 {
            continue;
        }
        let path = relative_bytes(root, entry.path());
        let kind = entry.file_type();
        if kind.is_dir() {
            let meta = entry
                .metadata()
                .map_err(|err| Error::io("cannot read", entry.path(), err.into()))?;
            manifest.push(Entry {
                path,
                kind: EntryKind::Dir {
                    mode: meta.permissions().mode(),
                },
            });
        } else if kind.is_symlink() {
            let target = fs::read_link(entry.path())
                .map_err(|err| Error::io("cannot read link", entry.path(), err))?;
            manifest.push(Entry {
                path,
                kind: EntryKind::Link {
                    target: target.as_os_str().as_bytes().to_vec(),
                },
            });
        } else if kind.is_file() {
            files.push((entry.into_path(), path));
        }
    }
    let hashed = crate::copy::parallel(&files, |(file, _), buffer| {
        crate::copy::hash_file(file, buffer)
    })?;
    for ((_, path), (mode, len, sha)) in files.into_iter().zip(hashed) {
        manifest.push(Entry {
            path,
            kind: EntryKind::File { mode, len, sha },
        });
    }
    Ok(manifest.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_print_and_parse_as_hex() {
        let digest = Manifest::default().finish();
        let text = digest.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Digest>(), Ok(digest));
        assert_eq!("xyz".parse::<Digest>(), Err(ParseDigestError));
        assert_eq!("g".repeat(64).parse::<Digest>(), Err(ParseDigestError));
    }

    #[test]
    fn the_order_of_entries_does_not_matter() {
        let entries = [
            Entry {
                path: b"a".to_vec(),
                kind: EntryKind::Dir { mode: 0o755 },
            },
            Entry {
                path: b"a/b".to_vec(),
                kind: EntryKind::File {
                    mode: 0o644,
                    len: 1,
                    sha: sha256(b"x"),
                },
            },
            Entry {
                path: b"a.txt".to_vec(),
                kind: EntryKind::Link {
                    target: b"a/b".to_vec(),
                },
            },
        ];
        let mut forward = Manifest::default();
        let mut backward = Manifest::default();
        for entry in &entries {
            forward.push(entry.clone());
        }
        for entry in entries.iter().rev() {
            backward.push(entry.clone());
        }
        assert_eq!(forward.finish(), backward.finish());
    }

    #[test]
    fn the_format_is_the_documented_one() {
        let mut manifest = Manifest::default();
        manifest.push(Entry {
            path: b"app.py".to_vec(),
            kind: EntryKind::File {
                mode: 0o100644,
                len: 5,
                sha: sha256(b"hello"),
            },
        });
        manifest.push(Entry {
            path: b"bin".to_vec(),
            kind: EntryKind::Dir { mode: 0o40755 },
        });
        manifest.push(Entry {
            path: b"bin/run".to_vec(),
            kind: EntryKind::Link {
                target: b"../app.py".to_vec(),
            },
        });
        let mut expected = b"deployd-tree-digest-v1\n".to_vec();
        expected.push(b'f');
        expected.extend(0o644u32.to_be_bytes());
        expected.extend(6u64.to_be_bytes());
        expected.extend(b"app.py");
        expected.extend(5u64.to_be_bytes());
        expected.extend(sha256(b"hello"));
        expected.push(b'd');
        expected.extend(0o755u32.to_be_bytes());
        expected.extend(3u64.to_be_bytes());
        expected.extend(b"bin");
        expected.push(b'l');
        expected.extend(0u32.to_be_bytes());
        expected.extend(7u64.to_be_bytes());
        expected.extend(b"bin/run");
        expected.extend(9u64.to_be_bytes());
        expected.extend(b"../app.py");
        assert_eq!(manifest.finish(), Digest(sha256(&expected)));
    }
}
