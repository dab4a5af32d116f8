//! Attempts to read or write outside the roots are refused, and nothing outside is touched.
//!
//! The proof that nothing outside is *read*: what lies outside is a FIFO with no writer, so
//! opening it for reading would block the sync forever, and the test bounds every sync in time.
//! The proof that nothing outside is *written*: the outside folder's digest, before and after.

mod support;

use std::fs;
use std::path::Path;
use std::time::Duration;

use deployd_sources::{
    Credentials, Error, GitOptions, GitSource, LocalSource, SourceManager, SyncRequest, Synced,
    digest_tree,
};
use support::{Repo, leftovers, write};

/// `<dir>/outside` with a secret file and a FIFO no one writes to.
fn outside(dir: &Path) -> std::path::PathBuf {
    let outside = dir.join("outside");
    write(&outside.join("secret"), "secret");
    nix::unistd::mkfifo(
        &outside.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    outside
}

async fn bounded(sync: impl Future<Output = Result<Synced, Error>>) -> Result<Synced, Error> {
    tokio::time::timeout(Duration::from_secs(60), sync)
        .await
        .expect("the sync blocked: it opened something outside the root")
}

#[tokio::test]
async fn local_escapes_are_refused_and_nothing_outside_is_read_or_written() {
    let dir = tempfile::tempdir().unwrap();
    let outside = outside(dir.path());
    let before = digest_tree(&outside).unwrap();
    let base = dir.path().join("project");
    write(&base.join("src/app.py"), "app");
    std::os::unix::fs::symlink(&outside, base.join("linked")).unwrap();
    let out = dir.path().join("deployment");
    fs::create_dir(&out).unwrap();
    let dest = out.join("svc");
    let source = LocalSource::new();

    // Locations that lead out.
    for location in [
        "../outside",
        "src/../../outside",
        "/etc",
        &outside.display().to_string(),
        "linked",
        "linked/",
    ] {
        let err = bounded(source.sync(&SyncRequest::new(location, &base, &dest)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Escapes { .. }), "{location}: {err}");
        assert!(err.to_string().contains("escapes"), "{err}");
    }

    // Links inside the source that lead out.
    for (name, target) in [
        ("etc", "/etc"),
        ("passwd", "/etc/passwd"),
        ("up", "../../outside/fifo"),
        ("upper", "../outside"),
        ("sneaky", "pkg/../../outside/fifo"),
    ] {
        let src = dir.path().join(format!("project-{name}"));
        write(&src.join("src/app.py"), "app");
        write(&src.join("src/pkg/mod.py"), "mod");
        std::os::unix::fs::symlink(target, src.join("src").join(name)).unwrap();
        let err = bounded(source.sync(&SyncRequest::new("src", &src, &dest)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Escapes { .. }), "{name}: {err}");
        assert!(
            err.to_string().contains(&format!("points to {target}")),
            "{err}"
        );
    }

    // Destinations that lead out of the deployment's folder.
    write(&base.join("src/app.py"), "app");
    for destination in [
        dir.path().join("outside/svc"),
        out.join("../outside/svc"),
        out.clone(),
    ] {
        let err = bounded(source.sync(&SyncRequest::new("src", &base, &destination).within(&out)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidDestination { .. }),
            "{}: {err}",
            destination.display()
        );
    }
    std::os::unix::fs::symlink(&outside, out.join("link")).unwrap();
    let err = bounded(source.sync(&SyncRequest::new("src", &base, out.join("link")).within(&out)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidDestination { .. }), "{err}");
    let err =
        bounded(source.sync(&SyncRequest::new("src", &base, out.join("link/svc")).within(&out)))
            .await
            .unwrap_err();
    assert!(matches!(err, Error::InvalidDestination { .. }), "{err}");

    assert!(!dest.exists(), "nothing was synced");
    assert_eq!(leftovers(&out, "svc"), ["link"]);
    assert_eq!(
        digest_tree(&outside).unwrap(),
        before,
        "nothing outside changed"
    );
    assert_eq!(support::names(&outside), ["fifo", "secret"]);
}

/// A repository whose last commit has the tree `entries` (`mode name object` lines), made with
/// `git hash-object --literally`, which writes trees git itself would refuse.
fn repo_with_tree(dir: &Path, name: &str, entries: &[(&str, &str, &str)]) -> Repo {
    let repo = Repo::init(&dir.join(name));
    repo.write("app.py", "app");
    repo.commit("initial");
    let mut tree = Vec::new();
    for (mode, name, content) in entries {
        let path = dir.join(format!("{name}-blob").replace('/', "_"));
        fs::write(&path, content).unwrap();
        let oid = repo.git(&["hash-object", "-w", path.to_str().unwrap()]);
        tree.extend_from_slice(format!("{mode} {name}\0").as_bytes());
        tree.extend(
            (0..20).map(|i| u8::from_str_radix(&oid.trim()[i * 2..i * 2 + 2], 16).unwrap()),
        );
    }
    let tree_file = dir.join(format!("{name}-tree"));
    fs::write(&tree_file, &tree).unwrap();
    let tree = repo.git(&[
        "hash-object",
        "-w",
        "-t",
        "tree",
        "--literally",
        tree_file.to_str().unwrap(),
    ]);
    let commit = repo.git(&["commit-tree", tree.trim(), "-p", "HEAD", "-m", "evil"]);
    repo.git(&["update-ref", "refs/heads/main", commit.trim()]);
    repo
}

#[tokio::test]
async fn git_trees_that_escape_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = outside(dir.path());
    let before = digest_tree(&outside).unwrap();
    let out = dir.path().join("deployment");
    fs::create_dir(&out).unwrap();
    let dest = out.join("svc");
    let mut options = GitOptions::default();
    options.credentials = Credentials::none();
    let source = GitSource::with_options(options);

    for (case, entries, expected) in [
        (
            "dotdot",
            vec![("100644", "..", "climbs")],
            "an entry named `..`",
        ),
        ("dot", vec![("100644", ".", "here")], "an entry named `.`"),
        (
            "dotgit",
            vec![("100644", ".GIT", "hooks")],
            "an entry named `.GIT`",
        ),
        (
            "slash",
            vec![("100644", "../../outside/pwned", "x")],
            "an entry named `../../outside/pwned`",
        ),
        (
            "link-etc",
            vec![("120000", "etc", "/etc")],
            "points to /etc",
        ),
        (
            "link-up",
            vec![("120000", "up", "../outside/fifo")],
            "points to ../outside/fifo",
        ),
    ] {
        let repo = repo_with_tree(dir.path(), case, &entries);
        let err = bounded(source.sync(&SyncRequest::new(repo.url(), "/", &dest)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Escapes { .. }), "{case}: {err}");
        assert!(err.to_string().contains(expected), "{case}: {err}");
        assert!(!dest.exists(), "{case}");
    }
    assert_eq!(leftovers(&out, "svc"), Vec::<String>::new());
    assert_eq!(
        digest_tree(&outside).unwrap(),
        before,
        "nothing outside changed"
    );
    assert!(!dir.path().join("pwned").exists());
}
