//! The content digest: equal for equal trees wherever they are, different when one byte, one
//! mode bit or one name differs.

mod support;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use deployd_sources::{Digest, LocalSource, SourceManager, SyncRequest, digest_tree};
use support::{chmod, write};

/// A small tree with a folder, an executable, an empty file, an empty folder and a link.
fn make_tree(root: &Path) {
    write(&root.join("app.py"), "print('hello')\n");
    write(&root.join("pkg/__init__.py"), "");
    write(&root.join("pkg/mod.py"), "x = 1\n");
    write(&root.join("bin/run"), "#!/bin/sh\nexec python app.py\n");
    fs::create_dir_all(root.join("empty")).unwrap();
    std::os::unix::fs::symlink("pkg/mod.py", root.join("mod.py")).unwrap();
    for (path, mode) in [
        ("app.py", 0o644),
        ("pkg/__init__.py", 0o644),
        ("pkg/mod.py", 0o644),
        ("bin/run", 0o755),
        ("pkg", 0o755),
        ("bin", 0o755),
        ("empty", 0o755),
    ] {
        chmod(&root.join(path), mode);
    }
}

fn digest(root: &Path) -> Digest {
    digest_tree(root).unwrap()
}

#[test]
fn identical_trees_in_different_folders_have_one_digest() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    make_tree(a.path());
    // Written in another order, at other times.
    write(&b.path().join("pkg/mod.py"), "x = 1\n");
    make_tree_after_shuffle(b.path());
    assert_eq!(digest(a.path()), digest(b.path()));

    // Times do not count.
    let old = SystemTime::now() - Duration::from_secs(86_400);
    fs::File::options()
        .write(true)
        .open(b.path().join("app.py"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(digest(a.path()), digest(b.path()));

    // The digest is the same on every machine: it depends on nothing but the tree.
    assert_eq!(
        digest(a.path()).to_string(),
        "b8d9e0dff2e9302792dd378e9029eb0a9ffc0eecc1a32a2b55bae0239df8fcad"
    );
}

/// `make_tree` with the files created in another order (the folder order on disk differs).
fn make_tree_after_shuffle(root: &Path) {
    std::os::unix::fs::symlink("pkg/mod.py", root.join("mod.py")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    write(&root.join("bin/run"), "#!/bin/sh\nexec python app.py\n");
    write(&root.join("pkg/__init__.py"), "");
    write(&root.join("app.py"), "print('hello')\n");
    for (path, mode) in [
        ("app.py", 0o644),
        ("pkg/__init__.py", 0o644),
        ("pkg/mod.py", 0o644),
        ("bin/run", 0o755),
        ("pkg", 0o755),
        ("bin", 0o755),
        ("empty", 0o755),
    ] {
        chmod(&root.join(path), mode);
    }
}

/// Changes a copy of the tree.
type Change = fn(&Path);

#[test]
fn one_byte_one_mode_bit_or_one_name_changes_the_digest() {
    let base = tempfile::tempdir().unwrap();
    make_tree(base.path());
    let original = digest(base.path());
    let changes: [(&str, Change); 9] = [
        ("one byte of content", |root| {
            write(&root.join("pkg/mod.py"), "x = 2\n")
        }),
        ("one byte more", |root| {
            write(&root.join("pkg/mod.py"), "x = 1\n\n")
        }),
        ("one mode bit of a file", |root| {
            chmod(&root.join("app.py"), 0o645)
        }),
        ("the executable bit", |root| {
            chmod(&root.join("bin/run"), 0o655)
        }),
        ("one mode bit of a folder", |root| {
            chmod(&root.join("pkg"), 0o775)
        }),
        ("one name", |root| {
            fs::rename(root.join("pkg/mod.py"), root.join("pkg/mad.py")).unwrap()
        }),
        ("a link's target", |root| {
            fs::remove_file(root.join("mod.py")).unwrap();
            std::os::unix::fs::symlink("pkg/mad.py", root.join("mod.py")).unwrap();
        }),
        ("a file for a link", |root| {
            fs::remove_file(root.join("mod.py")).unwrap();
            write(&root.join("mod.py"), "pkg/mod.py");
        }),
        ("an empty folder removed", |root| {
            fs::remove_dir(root.join("empty")).unwrap()
        }),
    ];
    for (what, change) in changes {
        let copy = tempfile::tempdir().unwrap();
        make_tree(copy.path());
        assert_eq!(digest(copy.path()), original, "before: {what}");
        change(copy.path());
        assert_ne!(digest(copy.path()), original, "{what}");
    }
    // Content moved from one file to another.
    let a = tempfile::tempdir().unwrap();
    write(&a.path().join("a"), "xy");
    write(&a.path().join("b"), "");
    let b = tempfile::tempdir().unwrap();
    write(&b.path().join("a"), "x");
    write(&b.path().join("b"), "y");
    assert_ne!(digest(a.path()), digest(b.path()));
}

#[tokio::test]
async fn syncs_of_one_source_to_two_destinations_have_one_digest() {
    let base = tempfile::tempdir().unwrap();
    make_tree(&base.path().join("src"));
    let out = tempfile::tempdir().unwrap();
    let source = LocalSource::new();
    let one = source
        .sync(&SyncRequest::new(
            "src",
            base.path(),
            out.path().join("one"),
        ))
        .await
        .unwrap();
    let two = source
        .sync(&SyncRequest::new(
            "src",
            base.path(),
            out.path().join("two"),
        ))
        .await
        .unwrap();
    assert_eq!(one.digest, two.digest);
    assert_eq!(one.digest, digest(&base.path().join("src")));
}
