//! Copying and hashing trees: a walk, then the files on a few threads.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use walkdir::WalkDir;

use crate::Error;
use crate::digest::{ContentHasher, Entry, EntryKind, Manifest, relative_bytes};

/// Size of each thread's copy buffer.
const BUFFER: usize = 256 * 1024;
/// Items per thread below which a job runs on the calling thread alone.
const ITEMS_PER_THREAD: usize = 64;

/// Runs `work` over `items` on up to `available_parallelism` threads (each with its own buffer)
/// and returns the results in the order of `items`. The first error stops the others.
pub(crate) fn parallel<T, R, F>(items: &[T], work: F) -> Result<Vec<R>, Error>
where
    T: Sync,
    R: Send,
    F: Fn(&T, &mut Vec<u8>) -> Result<R, Error> + Sync,
{
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(items.len().div_ceil(ITEMS_PER_THREAD))
        .max(1);
    if threads == 1 {
        let mut buffer = Vec::new();
        return items.iter().map(|item| work(item, &mut buffer)).collect();
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    let mut done: Vec<Vec<(usize, R)>> = Vec::with_capacity(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut buffer = Vec::new();
                    let mut results = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(index) else { break };
                        match work(item, &mut buffer) {
                            Ok(result) => results.push((index, result)),
                            Err(err) => {
                                failed.store(true, Ordering::Relaxed);
                                if let Ok(mut slot) = first_error.lock() {
                                    slot.get_or_insert(err);
                                }
                                break;
                            }
                        }
                    }
                    results
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(results) => done.push(results),
                Err(_) => {
                    failed.store(true, Ordering::Relaxed);
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(Error::Interrupted("a copy thread panicked".into()));
                    }
                }
            }
        }
    });
    if let Some(err) = first_error.into_inner().ok().flatten() {
        return Err(err);
    }
    let mut ordered: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    for (index, result) in done.into_iter().flatten() {
        ordered[index] = Some(result);
    }
    ordered
        .into_iter()
        .map(|result| result.ok_or_else(|| Error::Interrupted("a copy was lost".into())))
        .collect()
}

fn buffer(buffer: &mut Vec<u8>) -> &mut [u8] {
    if buffer.len() < BUFFER {
        buffer.resize(BUFFER, 0);
    }
    buffer
}

/// Reads a file and returns its permission bits, length and SHA-256.
pub(crate) fn hash_file(path: &Path, scratch: &mut Vec<u8>) -> Result<(u32, u64, [u8; 32]), Error> {
    let mut file = File::open(path).map_err(|err| Error::io("cannot open", path, err))?;
    let meta = file
        .metadata()
        .map_err(|err| Error::io("cannot read", path, err))?;
    let buf = buffer(scratch);
    let mut hasher = ContentHasher::default();
    let mut len = 0u64;
    loop {
        let n = file
            .read(buf)
            .map_err(|err| Error::io("cannot read", path, err))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((meta.permissions().mode() & 0o7777, len, hasher.finish()))
}

/// Copies one file to the new file `to` with the same permission bits; returns them, the length
/// and the SHA-256 of what was copied.
fn copy_file(
    from: &Path,
    to: &Path,
    overwrite: bool,
    scratch: &mut Vec<u8>,
) -> Result<(u32, u64, [u8; 32]), Error> {
    let mut input = File::open(from).map_err(|err| Error::io("cannot open", from, err))?;
    let meta = input
        .metadata()
        .map_err(|err| Error::io("cannot read", from, err))?;
    let mode = meta.permissions().mode() & 0o7777;
    if overwrite {
        remove_existing(to)?;
    }
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|err| Error::io("cannot create", to, err))?;
    let buf = buffer(scratch);
    let mut hasher = ContentHasher::default();
    let expected = meta.len();
    let mut len = 0u64;
    // Stops at the length the file had when opened: one read for a small file.
    while len < expected {
        let n = input
            .read(buf)
            .map_err(|err| Error::io("cannot read", from, err))?;
        if n == 0 {
            break;
        }
        let n = n.min(usize::try_from(expected - len).unwrap_or(usize::MAX));
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(|err| Error::io("cannot write", to, err))?;
        len += n as u64;
    }
    // Exactly the source's bits, whatever the umask.
    output
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|err| Error::io("cannot set permissions of", to, err))?;
    Ok((mode, len, hasher.finish()))
}

/// Removes whatever is at `path` (a file, a link or a folder), if anything.
pub(crate) fn remove_existing(path: &Path) -> Result<(), Error> {
    match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => crate::destination::remove_tree(path)
            .map_err(|err| Error::io("cannot remove", path, err)),
        Ok(_) => fs::remove_file(path).map_err(|err| Error::io("cannot remove", path, err)),
        Err(_) => Ok(()),
    }
}

/// Whether a link at `relative` (a path under the root, the link itself included) whose target is
/// `target` stays inside the root.
///
/// A target must be relative, and its `..` components must all come first, no more of them than
/// the link is deep: `..` after a name could climb out through a link that name stands for.
pub(crate) fn link_stays_inside(relative: &Path, target: &Path) -> bool {
    let depth = relative.components().count().saturating_sub(1);
    let mut climbing = true;
    let mut ups = 0usize;
    for component in target.components() {
        match component {
            Component::ParentDir if climbing => ups += 1,
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
            Component::CurDir => {}
            Component::Normal(_) => climbing = false,
        }
    }
    ups <= depth
}

/// How a copy treats links.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Links<'a> {
    /// Every link must stay inside the source; `location` names the source in errors.
    Confined { location: &'a str },
    /// Links are copied as they are (a destination's own previous tree).
    AsTheyAre,
}

/// What a copy does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyOptions<'a> {
    /// Folder names that are not copied (at any depth).
    pub(crate) skipped: &'a [String],
    pub(crate) links: Links<'a>,
    /// Copy over an existing tree, replacing what is in the way (`merge`); otherwise `target`
    /// must not exist yet.
    pub(crate) overwrite: bool,
}

/// What a copy wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Files and links.
    pub(crate) files: u64,
    /// Bytes of file content.
    pub(crate) bytes: u64,
}

/// Copies the tree `source` to `target`, recording every entry it writes in `manifest`.
pub(crate) fn copy_tree(
    source: &Path,
    target: &Path,
    options: CopyOptions<'_>,
    manifest: Option<&mut Manifest>,
) -> Result<Totals, Error> {
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let root_mode;
    {
        let skipped = options.skipped;
        let walker = WalkDir::new(source)
            .follow_links(false)
            .into_iter()
            .filter_entry(|entry| {
                entry.depth() == 0
                    || !(entry.file_type().is_dir()
                        && skipped.iter().any(|s| entry.file_name() == OsStr::new(s)))
            });
        let mut root = 0o755;
        for entry in walker {
            let entry = entry.map_err(|err| {
                let path = err.path().unwrap_or(source).to_owned();
                Error::io("cannot read", &path, err.into())
            })?;
            let kind = entry.file_type();
            if entry.depth() == 0 {
                root = entry
                    .metadata()
                    .map_err(|err| Error::io("cannot read", entry.path(), err.into()))?
                    .permissions()
                    .mode();
                continue;
            }
            let relative = entry
                .path()
                .strip_prefix(source)
                .map_err(|_| Error::Interrupted(format!("{} left the walk", source.display())))?
                .to_owned();
            if kind.is_dir() {
                let mode = entry
                    .metadata()
                    .map_err(|err| Error::io("cannot read", entry.path(), err.into()))?
                    .permissions()
                    .mode();
                dirs.push((relative, mode & 0o7777));
            } else if kind.is_symlink() {
                let link = fs::read_link(entry.path())
                    .map_err(|err| Error::io("cannot read link", entry.path(), err))?;
                if let Links::Confined { location } = options.links
                    && !link_stays_inside(&relative, &link)
                {
                    return Err(Error::Escapes {
                        location: location.to_owned(),
                        root: source.to_owned(),
                        detail: format!(
                            "the link {} points to {}",
                            relative.display(),
                            link.display()
                        ),
                    });
                }
                links.push((relative, link));
            } else if kind.is_file() {
                files.push(relative);
            }
            // Sockets, fifos and devices are not source code: skipped.
        }
        root_mode = root & 0o7777;
    }

    if !(options.overwrite && target.is_dir()) {
        fs::create_dir(target).map_err(|err| Error::io("cannot create", target, err))?;
    }
    for (relative, _) in &dirs {
        let path = target.join(relative);
        if options.overwrite {
            match path.symlink_metadata() {
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => remove_existing(&path)?,
                Err(_) => {}
            }
        }
        fs::create_dir(&path).map_err(|err| Error::io("cannot create", &path, err))?;
    }
    let mut totals = Totals::default();
    for (relative, link) in &links {
        let path = target.join(relative);
        if options.overwrite {
            remove_existing(&path)?;
        }
        std::os::unix::fs::symlink(link, &path)
            .map_err(|err| Error::io("cannot create link", &path, err))?;
        totals.files += 1;
    }
    let copied = parallel(&files, |relative, scratch| {
        copy_file(
            &source.join(relative),
            &target.join(relative),
            options.overwrite,
            scratch,
        )
    })?;
    // Folder modes last, deepest first, so that a read-only folder is filled before it closes.
    for (relative, mode) in dirs.iter().rev() {
        let path = target.join(relative);
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
            .map_err(|err| Error::io("cannot set permissions of", &path, err))?;
    }
    fs::set_permissions(target, fs::Permissions::from_mode(root_mode))
        .map_err(|err| Error::io("cannot set permissions of", target, err))?;

    for (_, (_, len, _)) in files.iter().zip(&copied) {
        totals.files += 1;
        totals.bytes += len;
    }
    if let Some(manifest) = manifest {
        for (relative, mode) in dirs {
            manifest.push(Entry {
                path: relative_bytes(Path::new(""), &relative),
                kind: EntryKind::Dir { mode },
            });
        }
        for (relative, link) in links {
            manifest.push(Entry {
                path: relative_bytes(Path::new(""), &relative),
                kind: EntryKind::Link {
                    target: link.as_os_str().as_bytes().to_vec(),
                },
            });
        }
        for (relative, (mode, len, sha)) in files.into_iter().zip(copied) {
            manifest.push(Entry {
                path: relative_bytes(Path::new(""), &relative),
                kind: EntryKind::File { mode, len, sha },
            });
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_must_stay_inside() {
        for (link, target, inside) in [
            ("a", "b", true),
            ("a", "./b", true),
            ("a", "..", false),
            ("a", "../a", false),
            ("d/a", "../b", true),
            ("d/a", "..", true),
            ("d/a", "../..", false),
            ("d/e/a", "../../x/y", true),
            ("a", "/etc/passwd", false),
            ("a", "/", false),
            ("a", "sub/up/../..", false),
            ("d/a", "x/../y", false),
        ] {
            assert_eq!(
                link_stays_inside(Path::new(link), Path::new(target)),
                inside,
                "{link} -> {target}"
            );
        }
    }

    #[test]
    fn parallel_keeps_the_order_and_stops_at_an_error() {
        let items: Vec<u32> = (0..1000).collect();
        let doubled = parallel(&items, |n, _| Ok(n * 2)).unwrap();
        assert_eq!(doubled, items.iter().map(|n| n * 2).collect::<Vec<_>>());
        let failed = parallel(&items, |n, _| {
            if *n == 500 {
                Err(Error::Interrupted("500".into()))
            } else {
                Ok(*n)
            }
        });
        assert!(matches!(failed, Err(Error::Interrupted(m)) if m == "500"));
    }
}
