//! The local backend against real folders.

use std::fs;
use std::path::Path;

use deployd_sources::{Error, LocalSource, SourceManager, SyncRequest};

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn request(base: &Path, location: &str, destination: &Path) -> SyncRequest {
    SyncRequest {
        location: location.to_owned(),
        base: base.to_owned(),
        destination: destination.to_owned(),
    }
}

#[tokio::test]
async fn copies_the_tree_and_skips_caches() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("src/app.py"), "print('hi')");
    write(&base.path().join("src/pkg/mod.py"), "x = 1");
    write(&base.path().join("src/.git/HEAD"), "ref");
    write(&base.path().join("src/__pycache__/app.pyc"), "bytes");
    std::os::unix::fs::symlink("pkg/mod.py", base.path().join("src/link.py")).unwrap();

    let dest = out.path().join("echo");
    let synced = LocalSource::new()
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap();

    assert_eq!(synced.files, 3);
    assert_eq!(fs::read_to_string(dest.join("app.py")).unwrap(), "print('hi')");
    assert_eq!(fs::read_to_string(dest.join("pkg/mod.py")).unwrap(), "x = 1");
    assert_eq!(fs::read_link(dest.join("link.py")).unwrap(), Path::new("pkg/mod.py"));
    assert!(!dest.join(".git").exists());
    assert!(!dest.join("__pycache__").exists());
}

#[tokio::test]
async fn resync_replaces_the_tree_and_leaves_no_temporary_folder() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("src/a.txt"), "one");
    let dest = out.path().join("svc");
    let source = LocalSource::new();
    source.sync(&request(base.path(), "src", &dest)).await.unwrap();

    fs::remove_file(base.path().join("src/a.txt")).unwrap();
    write(&base.path().join("src/b.txt"), "two");
    // A folder left by a sync that was killed halfway.
    fs::create_dir(out.path().join(".svc.sync-deadbeef")).unwrap();
    source.sync(&request(base.path(), "src", &dest)).await.unwrap();

    assert!(!dest.join("a.txt").exists());
    assert_eq!(fs::read_to_string(dest.join("b.txt")).unwrap(), "two");
    let names: Vec<_> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["svc"]);
}

#[tokio::test]
async fn a_failed_sync_keeps_the_previous_tree() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("src/a.txt"), "one");
    let dest = out.path().join("svc");
    let source = LocalSource::new();
    source.sync(&request(base.path(), "src", &dest)).await.unwrap();

    std::os::unix::fs::symlink("/etc/passwd", base.path().join("src/evil")).unwrap();
    let err = source
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Escapes { .. }), "{err}");
    assert_eq!(fs::read_to_string(dest.join("a.txt")).unwrap(), "one");
    assert!(!dest.join("evil").exists());
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);
}

#[tokio::test]
async fn escapes_are_refused() {
    let outer = tempfile::tempdir().unwrap();
    let base = outer.path().join("project");
    write(&base.join("src/a.txt"), "a");
    write(&outer.path().join("secret/key"), "secret");
    std::os::unix::fs::symlink(outer.path().join("secret"), base.join("linked")).unwrap();
    std::os::unix::fs::symlink("../../secret/key", base.join("src/up")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("svc");
    let source = LocalSource::new();

    for location in ["../secret", "/etc", "linked", "src/../../secret"] {
        let err = source
            .sync(&request(&base, location, &dest))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Escapes { .. }), "{location}: {err}");
        assert!(err.to_string().contains("escapes"), "{err}");
    }
    let err = source.sync(&request(&base, "src", &dest)).await.unwrap_err();
    assert!(err.to_string().contains("points to ../../secret/key"), "{err}");
    assert!(!dest.exists(), "nothing was written");
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn missing_source_is_not_found() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = LocalSource::new()
        .sync(&request(base.path(), "nope", &out.path().join("svc")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}
