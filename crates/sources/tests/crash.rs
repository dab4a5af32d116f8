//! A sync killed halfway (SIGKILL to the process doing it) leaves the previous tree intact, and
//! the next sync leaves no temporary folder behind.
//!
//! Each test re-executes this test binary, running only itself, with `CHILD` set: in that child
//! the test performs the sync its parent kills.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deployd_sources::{
    Credentials, GitOptions, GitSource, LocalSource, SourceManager, SyncRequest, digest_tree,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::{Repo, leftovers, write};

/// Set in the child: `<backend>\n<location>\n<base>\n<destination>[\n<reference>]`.
const CHILD: &str = "DEPLOYD_SOURCES_CRASH_CHILD";

/// In the child: runs the sync described by `CHILD` and returns `true`; in the parent: `false`.
fn run_child() -> bool {
    let Ok(spec) = std::env::var(CHILD) else {
        return false;
    };
    let parts: Vec<&str> = spec.lines().collect();
    let request = SyncRequest::new(parts[1], parts[2], parts[3])
        .with_reference(parts.get(4).map(|r| (*r).to_owned()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(async {
            if parts[0] == "git" {
                let mut options = GitOptions::default();
                options.credentials = Credentials::none();
                GitSource::with_options(options).sync(&request).await
            } else {
                LocalSource::new().sync(&request).await
            }
        })
        .unwrap();
    true
}

/// Starts this test again in a child that syncs `spec`, waits until its temporary tree holds at
/// least `entries` entries, and kills it with SIGKILL. Returns the temporary folder it left.
fn kill_midway(test: &str, spec: &str, parent: &Path, name: &str, entries: usize) -> PathBuf {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let prefix = format!(".{name}.sync-");
    let started = Instant::now();
    let staging = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the child never started writing"
        );
        let staging = fs::read_dir(parent)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path());
        if let Some(staging) = staging {
            let written = walkdir::WalkDir::new(&staging).into_iter().count();
            if written >= entries {
                kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
                break staging;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sync finished before it could be killed: make the tree larger"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(Signal::SIGKILL as i32),
        "killed, not finished"
    );
    staging
}

/// Many files, so that a sync takes long enough to be killed in the middle.
fn big_tree(root: &Path, version: &str) {
    let content = format!("{version}\n").repeat(1024);
    for i in 0..4000 {
        write(&root.join(format!("d{}/f{i}.txt", i % 40)), &content);
    }
    write(&root.join("version.txt"), version);
}

#[test]
fn a_killed_local_sync_leaves_the_previous_tree() {
    if run_child() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&base.path().join("old/version.txt"), "old");
    write(&base.path().join("old/only-old.txt"), "old");
    big_tree(&base.path().join("new"), "new");
    let destination = out.path().join("svc");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let old = runtime
        .block_on(LocalSource::new().sync(&SyncRequest::new("old", base.path(), &destination)))
        .unwrap();

    let spec = format!(
        "local\nnew\n{}\n{}",
        base.path().display(),
        destination.display()
    );
    let staging = kill_midway(
        "a_killed_local_sync_leaves_the_previous_tree",
        &spec,
        out.path(),
        "svc",
        500,
    );

    assert!(staging.is_dir(), "the kill left a half-written tree aside");
    assert_eq!(
        digest_tree(&destination).unwrap(),
        old.digest,
        "the old tree is intact"
    );
    assert_eq!(
        fs::read_to_string(destination.join("version.txt")).unwrap(),
        "old"
    );

    let new = runtime
        .block_on(LocalSource::new().sync(&SyncRequest::new("new", base.path(), &destination)))
        .unwrap();
    assert_eq!(leftovers(out.path(), "svc"), Vec::<String>::new());
    assert_eq!(new.files, 4001);
    assert_eq!(digest_tree(&destination).unwrap(), new.digest);
    assert!(!destination.join("only-old.txt").exists());
}

#[test]
fn a_killed_git_sync_leaves_the_previous_tree_and_a_usable_clone() {
    if run_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(&dir.path().join("origin"));
    repo.write("version.txt", "old");
    repo.commit("old");
    repo.git(&["tag", "old"]);
    big_tree(&repo.path, "new");
    let new_commit = repo.commit("new");
    repo.git(&["tag", "new"]);
    let out = tempfile::tempdir().unwrap();
    let destination = out.path().join("svc");
    let mut options = GitOptions::default();
    options.credentials = Credentials::none();
    let source = GitSource::with_options(options);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let at = |reference: &str| {
        SyncRequest::new(repo.url(), "/", &destination).with_reference(Some(reference))
    };
    let old = runtime.block_on(source.sync(&at("old"))).unwrap();

    let spec = format!("git\n{}\n/\n{}\nnew", repo.url(), destination.display());
    let staging = kill_midway(
        "a_killed_git_sync_leaves_the_previous_tree_and_a_usable_clone",
        &spec,
        out.path(),
        "svc",
        500,
    );

    assert!(staging.is_dir(), "the kill left a half-written tree aside");
    assert_eq!(
        digest_tree(&destination).unwrap(),
        old.digest,
        "the old tree is intact"
    );

    let new = runtime.block_on(source.sync(&at("new"))).unwrap();
    let git = new.git.unwrap();
    assert_eq!(git.commit, new_commit);
    assert!(!git.cloned, "the clone survived the kill: {git:?}");
    assert_eq!(leftovers(out.path(), "svc"), Vec::<String>::new());
    assert_eq!(
        fs::read_to_string(destination.join("version.txt")).unwrap(),
        "new"
    );
    assert_eq!(digest_tree(&destination).unwrap(), new.digest);
}
