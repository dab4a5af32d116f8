//! Which folder a deploy's local sources are copied from.
//!
//! `POST /deployments/create?base_path=DIR` names a folder of the server's machine; the
//! deployment's local sources are copied from it into the data directory. A client on the same
//! machine (llamactl, the deployd CLI) may name any folder it could read anyway; a client on
//! another machine may only name folders the operator allow-listed, so that it cannot have
//! `/etc` or a home folder copied into a deployment and served back.

use std::io;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

/// Resolves the folder of a deploy requested by a client at `peer` (`None` when unknown: it is
/// then treated as a client on another machine). `requested` is the `base_path` parameter;
/// without one the server's working directory `cwd` is used. `allowed` are the folders
/// clients on other machines may use, with the folders below them.
///
/// Returns the canonical folder, or the reason it is refused, naming the path.
pub(crate) fn resolve(
    peer: Option<IpAddr>,
    requested: Option<&Path>,
    allowed: &[PathBuf],
    cwd: io::Result<PathBuf>,
) -> Result<PathBuf, String> {
    let local = peer.is_some_and(|ip| ip.to_canonical().is_loopback());
    let (path, what) = match requested {
        Some(path) => (path.to_owned(), format!("base_path `{}`", path.display())),
        None => match cwd {
            Ok(dir) => {
                let what = format!(
                    "the server's working directory `{}` (used as no base_path was given)",
                    dir.display()
                );
                (dir, what)
            }
            Err(err) => {
                return Err(format!(
                    "no base_path was given, and the server's working directory cannot be read \
                     ({err}); give base_path"
                ));
            }
        },
    };
    if local {
        return directory(&path, &what);
    }
    // A client on another machine: inside an allowed folder, judged on the path as written
    // first (so that nothing about other folders is revealed), then on the real path (so that
    // a symlink does not lead out).
    let refused = || {
        format!(
            "{what} is not inside a folder this server lets clients on other machines deploy \
             from ({}); the operator can allow one with `--allow-base-path DIR`, or deploy from \
             the server's machine",
            if allowed.is_empty() {
                "there are none".to_owned()
            } else {
                allowed
                    .iter()
                    .map(|dir| format!("`{}`", dir.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    };
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "{what} must be an absolute path without `..` when the client is not on the \
             server's machine"
        ));
    }
    let roots: Vec<PathBuf> = allowed
        .iter()
        .filter_map(|dir| dir.canonicalize().ok())
        .collect();
    let written_inside = allowed
        .iter()
        .chain(&roots)
        .any(|dir| dir.is_absolute() && path.starts_with(dir));
    if !written_inside {
        return Err(refused());
    }
    let folder = directory(&path, &what)?;
    if !roots.iter().any(|root| folder.starts_with(root)) {
        return Err(refused());
    }
    Ok(folder)
}

/// `path` made canonical, when it is an existing folder.
fn directory(path: &Path, what: &str) -> Result<PathBuf, String> {
    let canonical = path.canonicalize().map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => format!("{what} does not exist"),
        io::ErrorKind::NotADirectory => format!("{what} is not a directory"),
        _ => format!("cannot open {what}: {err}"),
    })?;
    if !canonical.is_dir() {
        return Err(format!("{what} is not a directory"));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    const REMOTE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)));

    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        /// `allowed/project`, `allowed/file`, `other/secret`, and `allowed/escape` a symlink
        /// to `other`.
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            std::fs::create_dir_all(root.join("allowed/project")).unwrap();
            std::fs::create_dir_all(root.join("other/secret")).unwrap();
            std::fs::write(root.join("allowed/file"), "x").unwrap();
            std::os::unix::fs::symlink(root.join("other"), root.join("allowed/escape")).unwrap();
            Self { dir }
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.dir.path().join(relative)
        }

        fn real(&self, relative: &str) -> PathBuf {
            self.path(relative).canonicalize().unwrap()
        }
    }

    fn check(
        tree: &Tree,
        peer: Option<IpAddr>,
        requested: Option<&str>,
        cwd: &str,
        expected: Result<&str, &str>,
    ) {
        let requested = requested.map(|r| {
            if r.starts_with('/') || r.starts_with('.') {
                PathBuf::from(r)
            } else {
                tree.path(r)
            }
        });
        let allowed = [tree.path("allowed")];
        let got = resolve(peer, requested.as_deref(), &allowed, Ok(tree.path(cwd)));
        match (got, expected) {
            (Ok(got), Ok(expected)) => assert_eq!(got, tree.real(expected), "{requested:?}"),
            (Err(got), Err(expected)) => {
                assert!(got.contains(expected), "{requested:?}: {got}")
            }
            (got, expected) => panic!("{peer:?} {requested:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn clients_on_this_machine_may_name_any_existing_folder() {
        let tree = Tree::new();
        check(
            &tree,
            LOOPBACK,
            Some("other/secret"),
            "other",
            Ok("other/secret"),
        );
        check(&tree, LOOPBACK, Some("/etc"), "other", Ok("/etc"));
        check(&tree, LOOPBACK, None, "other", Ok("other"));
        let ipv4_mapped = Some("::ffff:127.0.0.1".parse().unwrap());
        check(&tree, ipv4_mapped, Some("other"), "other", Ok("other"));
        check(
            &tree,
            LOOPBACK,
            Some("missing"),
            "other",
            Err("does not exist"),
        );
        check(
            &tree,
            LOOPBACK,
            Some("allowed/file"),
            "other",
            Err("is not a directory"),
        );
    }

    #[test]
    fn clients_on_other_machines_stay_inside_the_allowed_folders() {
        let tree = Tree::new();
        check(&tree, REMOTE, Some("allowed"), "other", Ok("allowed"));
        check(
            &tree,
            REMOTE,
            Some("allowed/project"),
            "other",
            Ok("allowed/project"),
        );
        for outside in [
            "/etc",
            "other/secret",
            "allowed/escape",
            "allowed/escape/secret",
        ] {
            check(
                &tree,
                REMOTE,
                Some(outside),
                "other",
                Err("is not inside a folder this server lets clients on other machines"),
            );
        }
        check(
            &tree,
            REMOTE,
            Some("allowed/../other"),
            "other",
            Err("must be an absolute path without `..`"),
        );
        check(
            &tree,
            REMOTE,
            Some("./allowed"),
            "other",
            Err("must be an absolute path"),
        );
        // Existence is revealed inside the allowed folders only.
        check(
            &tree,
            REMOTE,
            Some("allowed/missing"),
            "other",
            Err("does not exist"),
        );
        check(
            &tree,
            REMOTE,
            Some("/nonexistent"),
            "other",
            Err("is not inside a folder"),
        );
        // An unknown peer is not trusted.
        check(
            &tree,
            None,
            Some("other"),
            "other",
            Err("is not inside a folder"),
        );
    }

    #[test]
    fn without_base_path_the_working_directory_must_be_allowed_for_other_machines() {
        let tree = Tree::new();
        check(
            &tree,
            REMOTE,
            None,
            "allowed/project",
            Ok("allowed/project"),
        );
        check(
            &tree,
            REMOTE,
            None,
            "other",
            Err("the server's working directory"),
        );
        let unreadable = resolve(LOOPBACK, None, &[], Err(io::Error::other("gone")));
        assert!(unreadable.unwrap_err().contains("give base_path"));
    }

    #[test]
    fn the_refusal_names_the_path_and_how_to_allow_it() {
        let detail =
            resolve(REMOTE, Some(Path::new("/etc")), &[], Ok(PathBuf::from("/"))).unwrap_err();
        assert_eq!(
            detail,
            "base_path `/etc` is not inside a folder this server lets clients on other machines \
             deploy from (there are none); the operator can allow one with `--allow-base-path \
             DIR`, or deploy from the server's machine"
        );
    }
}
