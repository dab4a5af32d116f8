//! The local backend against real folders.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use deployd_sources::{Error, LocalSource, SourceManager, SyncPolicy, SyncRequest, digest_tree};
use support::{chmod, leftovers, listing, write};

fn request(base: &Path, location: &str, destination: &Path) -> SyncRequest {
    SyncRequest::new(location, base, destination)
}

#[tokio::test]
async fn copies_the_tree_and_skips_caches() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("src/app.py"), "print('hi')");
    write(&base.path().join("src/pkg/mod.py"), "x = 1");
    for skipped in [
        ".git",
        "target",
        "node_modules",
        "__pycache__",
        ".venv",
        ".deployd",
    ] {
        write(&base.path().join(format!("src/{skipped}/file")), "skipped");
        write(
            &base.path().join(format!("src/pkg/{skipped}/file")),
            "skipped",
        );
    }
    write(
        &base.path().join("src/target.txt"),
        "a file, not the folder",
    );
    std::os::unix::fs::symlink("pkg/mod.py", base.path().join("src/link.py")).unwrap();

    let dest = out.path().join("echo");
    let synced = LocalSource::new()
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap();

    assert_eq!(synced.files, 4);
    assert_eq!(synced.bytes, 11 + 5 + 22);
    assert!(!synced.kept && synced.git.is_none());
    assert_eq!(
        listing(&dest),
        [
            ("app.py".to_owned(), "f:print('hi')".to_owned()),
            ("link.py".to_owned(), "l:pkg/mod.py".to_owned()),
            ("pkg".to_owned(), "d".to_owned()),
            ("pkg/mod.py".to_owned(), "f:x = 1".to_owned()),
            (
                "target.txt".to_owned(),
                "f:a file, not the folder".to_owned()
            ),
        ]
    );
    assert_eq!(synced.digest, digest_tree(&dest).unwrap());
    assert_eq!(synced.path, out.path().canonicalize().unwrap().join("echo"));
}

#[tokio::test]
async fn the_skip_list_can_be_changed() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("src/.git/HEAD"), "ref");
    write(&base.path().join("src/build/out.o"), "obj");
    let dest = out.path().join("svc");
    LocalSource::with_skipped(["build"])
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap();
    assert!(dest.join(".git/HEAD").exists());
    assert!(!dest.join("build").exists());
    let everything = out.path().join("all");
    LocalSource::with_skipped(Vec::<String>::new())
        .sync(&request(base.path(), "src", &everything))
        .await
        .unwrap();
    assert!(everything.join("build/out.o").exists());
}

#[tokio::test]
async fn modes_are_copied_exactly() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("src/run.sh"), "#!/bin/sh");
    write(&base.path().join("src/secret.txt"), "s");
    write(&base.path().join("src/shared.txt"), "s");
    write(&base.path().join("src/locked/inside.txt"), "i");
    chmod(&base.path().join("src/run.sh"), 0o755);
    chmod(&base.path().join("src/secret.txt"), 0o600);
    chmod(&base.path().join("src/shared.txt"), 0o666);
    chmod(&base.path().join("src/locked"), 0o555);
    let dest = out.path().join("svc");
    let source = LocalSource::new();
    source
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap();
    let mode = |p: &str| {
        fs::symlink_metadata(dest.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("run.sh"), 0o755);
    assert_eq!(mode("secret.txt"), 0o600);
    assert_eq!(mode("shared.txt"), 0o666, "whatever the umask");
    assert_eq!(mode("locked"), 0o555);
    // A tree with a read-only folder is replaced, and removed, like any other.
    source
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap();
    assert_eq!(leftovers(out.path(), "svc"), Vec::<String>::new());
    chmod(&base.path().join("src/locked"), 0o755);
}

#[tokio::test]
async fn resync_replaces_the_tree_and_leaves_no_temporary_folder() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("src/a.txt"), "one");
    let dest = out.path().join("svc");
    let source = LocalSource::new();
    source
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap();

    fs::remove_file(base.path().join("src/a.txt")).unwrap();
    write(&base.path().join("src/b.txt"), "two");
    // Folders left by syncs that were killed halfway.
    fs::create_dir(out.path().join(".svc.sync-deadbeef")).unwrap();
    write(&out.path().join(".svc.old-deadbeef/x"), "old");
    // Another destination's are not this sync's business.
    fs::create_dir(out.path().join(".other.sync-deadbeef")).unwrap();
    source
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap();

    assert!(!dest.join("a.txt").exists());
    assert_eq!(fs::read_to_string(dest.join("b.txt")).unwrap(), "two");
    assert_eq!(leftovers(out.path(), "svc"), [".other.sync-deadbeef"]);
}

#[tokio::test]
async fn a_failed_sync_keeps_the_previous_tree() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("src/a.txt"), "one");
    let dest = out.path().join("svc");
    let source = LocalSource::new();
    let first = source
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap();

    write(&base.path().join("src/b.txt"), "two");
    std::os::unix::fs::symlink("/etc/passwd", base.path().join("src/evil")).unwrap();
    let err = source
        .sync(&request(base.path(), "src", &dest))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Escapes { .. }), "{err}");
    assert_eq!(fs::read_to_string(dest.join("a.txt")).unwrap(), "one");
    assert!(!dest.join("evil").exists() && !dest.join("b.txt").exists());
    assert_eq!(digest_tree(&dest).unwrap(), first.digest);
    assert_eq!(leftovers(out.path(), "svc"), Vec::<String>::new());
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
    write(&base.path().join("file"), "x");
    let err = LocalSource::new()
        .sync(&request(base.path(), "file", &out.path().join("svc")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotADirectory { .. }), "{err}");
}

#[tokio::test]
async fn the_source_and_destination_may_not_overlap() {
    let base = tempfile::tempdir().unwrap();
    write(&base.path().join("src/a.txt"), "a");
    for destination in [base.path().join("src/out"), base.path().join("src")] {
        let err = LocalSource::new()
            .sync(&request(base.path(), "src", &destination))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidDestination { .. }), "{err}");
    }
    assert_eq!(
        fs::read_to_string(base.path().join("src/a.txt")).unwrap(),
        "a"
    );
}

/// The four policies on one existing destination.
#[tokio::test]
async fn sync_policies() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("svc");
    write(&base.path().join("v1/kept.txt"), "only in v1");
    write(&base.path().join("v1/both.txt"), "v1");
    write(&base.path().join("v1/becomes_dir"), "a file in v1");
    write(&base.path().join("v1/becomes_file/x"), "a folder in v1");
    write(&base.path().join("v2/both.txt"), "v2");
    write(&base.path().join("v2/new.txt"), "only in v2");
    write(&base.path().join("v2/becomes_dir/y"), "a folder in v2");
    write(&base.path().join("v2/becomes_file"), "a file in v2");
    let source = LocalSource::new();
    let sync = |location: &str, policy: SyncPolicy| {
        let request = request(base.path(), location, &dest).with_policy(policy);
        let source = source.clone();
        async move { source.sync(&request).await }
    };

    // Fail and skip sync a destination that does not exist.
    sync("v1", SyncPolicy::Fail).await.unwrap();
    let v1 = listing(&dest);
    fs::remove_dir_all(&dest).unwrap();
    let first = sync("v1", SyncPolicy::Skip).await.unwrap();
    assert!(!first.kept);
    assert_eq!(listing(&dest), v1);

    // Fail: an error, the tree untouched.
    let err = sync("v2", SyncPolicy::Fail).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert_eq!(listing(&dest), v1);

    // Skip: kept as it is, with its digest.
    let kept = sync("v2", SyncPolicy::Skip).await.unwrap();
    assert!(kept.kept);
    assert_eq!((kept.files, kept.bytes), (0, 0));
    assert_eq!(kept.digest, first.digest);
    assert_eq!(listing(&dest), v1);

    // Merge: the source over the tree; what only the tree has stays.
    let merged = sync("v2", SyncPolicy::Merge).await.unwrap();
    assert_eq!(
        listing(&dest),
        [
            ("becomes_dir".to_owned(), "d".to_owned()),
            ("becomes_dir/y".to_owned(), "f:a folder in v2".to_owned()),
            ("becomes_file".to_owned(), "f:a file in v2".to_owned()),
            ("both.txt".to_owned(), "f:v2".to_owned()),
            ("kept.txt".to_owned(), "f:only in v1".to_owned()),
            ("new.txt".to_owned(), "f:only in v2".to_owned()),
        ]
    );
    assert_eq!(merged.files, 4);
    assert_eq!(merged.digest, digest_tree(&dest).unwrap());

    // Replace: the source's tree only.
    let replaced = sync("v2", SyncPolicy::Replace).await.unwrap();
    assert!(!dest.join("kept.txt").exists());
    assert_eq!(replaced.digest, digest_tree(&dest).unwrap());
    assert_ne!(replaced.digest, merged.digest);
    assert_eq!(leftovers(out.path(), "svc"), Vec::<String>::new());

    for (text, policy) in [
        ("replace", SyncPolicy::Replace),
        ("merge", SyncPolicy::Merge),
        ("skip", SyncPolicy::Skip),
        ("fail", SyncPolicy::Fail),
    ] {
        assert_eq!(text.parse::<SyncPolicy>(), Ok(policy));
    }
    assert!("sync".parse::<SyncPolicy>().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_syncs_of_one_destination_take_turns() {
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    for i in 0..200 {
        write(
            &base.path().join(format!("src/d{}/f{i}", i % 10)),
            "content",
        );
    }
    let dest = out.path().join("svc");
    let syncs: Vec<_> = (0..4)
        .map(|_| {
            let request = request(base.path(), "src", &dest);
            tokio::spawn(async move { LocalSource::new().sync(&request).await })
        })
        .collect();
    let mut digests = Vec::new();
    for sync in syncs {
        digests.push(sync.await.unwrap().unwrap().digest);
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(digest_tree(&dest).unwrap(), digests[0]);
    assert_eq!(leftovers(out.path(), "svc"), Vec::<String>::new());
}
