//! The git backend against real repositories, served over `file://` and by `git daemon`.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use deployd_sources::{
    Credentials, Error, GitOptions, GitSource, SourceManager, SyncPolicy, SyncRequest, Synced,
    digest_tree, split_url_ref,
};
use support::{Fixture, GitDaemon, Repo, leftovers, listing};

fn source() -> GitSource {
    let mut options = GitOptions::default();
    options.credentials = Credentials::none();
    options.timeout = Duration::from_secs(60);
    GitSource::with_options(options)
}

fn request(url: &str, reference: Option<&str>, destination: &Path) -> SyncRequest {
    SyncRequest::new(url, "/nonexistent-base", destination).with_reference(reference)
}

async fn sync(url: &str, reference: Option<&str>, destination: &Path) -> Result<Synced, Error> {
    source().sync(&request(url, reference, destination)).await
}

fn app(destination: &Path) -> String {
    fs::read_to_string(destination.join("app.py")).unwrap()
}

fn packs(destination: &Path) -> BTreeSet<String> {
    let name = destination.file_name().unwrap().to_string_lossy();
    let dir = destination
        .with_file_name(format!(".{name}.git"))
        .join("objects/pack");
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".pack"))
                .collect()
        })
        .unwrap_or_default()
}

fn clone_inode(destination: &Path) -> u64 {
    let name = destination.file_name().unwrap().to_string_lossy();
    fs::metadata(destination.with_file_name(format!(".{name}.git")))
        .unwrap()
        .ino()
}

/// Checks out every kind of ref from `url` (which serves the fixture) into fresh destinations.
async fn clones_every_kind_of_ref(fixture: &Fixture, url: &str, shallow: bool) {
    let out = tempfile::tempdir().unwrap();
    let short = &fixture.c2[..7];
    for (i, (reference, commit, content, resolved)) in [
        (None, &fixture.c3, "version = 3\n", "refs/heads/main"),
        (
            Some("main"),
            &fixture.c3,
            "version = 3\n",
            "refs/heads/main",
        ),
        (
            Some("dev"),
            &fixture.c4,
            "version = 'dev'\n",
            "refs/heads/dev",
        ),
        (Some("v1"), &fixture.c1, "version = 1\n", "refs/tags/v1"),
        (Some("v2"), &fixture.c3, "version = 3\n", "refs/tags/v2"),
        (
            Some("refs/tags/v1"),
            &fixture.c1,
            "version = 1\n",
            "refs/tags/v1",
        ),
        (
            Some(fixture.c2.as_str()),
            &fixture.c2,
            "version = 2\n",
            fixture.c2.as_str(),
        ),
        (Some(short), &fixture.c2, "version = 2\n", short),
        (
            Some(&fixture.c4[..10]),
            &fixture.c4,
            "version = 'dev'\n",
            "refs/heads/dev",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let destination = out.path().join(format!("svc{i}"));
        let synced = sync(url, reference, &destination)
            .await
            .unwrap_or_else(|err| panic!("{reference:?}: {err}"));
        let git = synced.git.clone().unwrap();
        assert_eq!(&git.commit, commit, "{reference:?}");
        assert_eq!(git.reference, resolved, "{reference:?}");
        assert!(git.cloned && git.fetched, "{reference:?}: {git:?}");
        let is_commit = reference.is_some_and(|r| r.len() <= 40 && r.starts_with(&fixture.c2[..4]));
        assert_eq!(git.shallow, shallow && !is_commit, "{reference:?}: {git:?}");
        assert_eq!(app(&destination), content, "{reference:?}");
        assert!(!destination.join(".git").exists());
        assert_eq!(synced.digest, digest_tree(&destination).unwrap());
    }
    // The tree of c3, as git records it: modes, links.
    let destination = out.path().join("svc1");
    assert_eq!(
        listing(&destination),
        [
            ("app.py".to_owned(), "f:version = 3\n".to_owned()),
            ("lib".to_owned(), "d".to_owned()),
            ("lib/util.py".to_owned(), "f:def f(): pass\n".to_owned()),
            ("run.sh".to_owned(), "f:#!/bin/sh\n".to_owned()),
            ("util.py".to_owned(), "l:lib/util.py".to_owned()),
        ]
    );
    let mode = |p: &str| {
        fs::metadata(destination.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        (mode("app.py"), mode("run.sh"), mode("lib")),
        (0o644, 0o755, 0o755)
    );
    assert!(
        leftovers(out.path(), "svc1")
            .iter()
            .all(
                |n| n.starts_with(".svc") && (n.ends_with(".git") || n.ends_with(".lock"))
                    || n.starts_with("svc")
            )
    );
}

/// Syncs `url` at main, adds a commit upstream, syncs again: the second sync fetches into the
/// same clone and receives at most `max_objects` objects, not the history.
async fn updates_by_fetching(repo: &Repo, url: &str, max_objects: usize) {
    let out = tempfile::tempdir().unwrap();
    let destination = out.path().join("svc");
    let first = sync(url, Some("main"), &destination).await.unwrap();
    let first_git = first.git.clone().unwrap();
    assert!(first_git.cloned);
    let inode = clone_inode(&destination);
    let packs_before = packs(&destination);
    fs::write(destination.join("scratch.txt"), "written by the service").unwrap();

    repo.write("app.py", "version = 4\n");
    let c5 = repo.commit("c5");
    let second = sync(url, Some("main"), &destination).await.unwrap();
    let git = second.git.clone().unwrap();
    assert_eq!(git.commit, c5);
    assert!(!git.cloned, "the clone was reused: {git:?}");
    assert!(git.fetched);
    assert!(
        git.received_objects > 0 && git.received_objects <= max_objects,
        "at most {max_objects} objects: {git:?} (a clone received {})",
        first_git.received_objects
    );
    assert!(git.received_objects < first_git.received_objects);
    assert_eq!(
        clone_inode(&destination),
        inode,
        "the clone was not re-created"
    );
    assert!(
        packs(&destination).is_superset(&packs_before),
        "the objects fetched before are still there"
    );
    assert_eq!(app(&destination), "version = 4\n");
    assert!(
        !destination.join("scratch.txt").exists(),
        "replaced, not merged"
    );
    assert_ne!(first.digest, second.digest);

    // The same ref again: nothing to download, the same tree, made from the tree before the
    // current one (kept aside): only what differs from it is written, what the service wrote in
    // it is gone.
    let third = sync(url, Some("main"), &destination).await.unwrap();
    let git = third.git.clone().unwrap();
    assert!(!git.cloned && !git.fetched, "{git:?}");
    assert_eq!(third.digest, second.digest);
    assert_eq!(third.files, 1, "only app.py differs from the tree of c3");
    assert!(!destination.join("scratch.txt").exists());
    assert_eq!(digest_tree(&destination).unwrap(), third.digest);

    // Another ref (a tag of an older commit): fetched into the same clone.
    let fourth = sync(url, Some("v1"), &destination).await.unwrap();
    let git = fourth.git.unwrap();
    assert!(!git.cloned, "{git:?}");
    assert_eq!(app(&destination), "version = 1\n");

    // A commit no ref points to, by a short id: the whole history is fetched (a shallow clone
    // is deepened) into the same clone.
    let c2 = repo.rev("main~2");
    let fifth = sync(url, Some(&c2[..8]), &destination).await.unwrap();
    let git = fifth.git.unwrap();
    assert_eq!(git.commit, c2);
    assert!(!git.cloned && !git.shallow, "{git:?}");
    assert_eq!(app(&destination), "version = 2\n");
    assert_eq!(leftovers(out.path(), "svc"), Vec::<String>::new());
}

#[tokio::test]
async fn clones_branches_tags_and_commits_over_file_urls() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    clones_every_kind_of_ref(&fixture, &fixture.repo.url(), false).await;
}

#[tokio::test]
async fn clones_branches_tags_and_commits_from_git_daemon_shallowly() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let daemon = GitDaemon::start(dir.path());
    clones_every_kind_of_ref(&fixture, &daemon.url("origin"), true).await;
}

#[tokio::test]
async fn updates_by_fetching_over_file_urls() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    // libgit2's local transport does not negotiate: it sends the new commit's whole tree (7
    // objects) and the annotated tag again, but not the history.
    updates_by_fetching(&fixture.repo, &fixture.repo.url(), 9).await;
}

#[tokio::test]
async fn updates_by_fetching_from_git_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let daemon = GitDaemon::start(dir.path());
    // The commit, its tree, the one blob that changed.
    updates_by_fetching(&fixture.repo, &daemon.url("origin"), 3).await;
}

#[tokio::test]
async fn a_plain_path_is_relative_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let out = tempfile::tempdir().unwrap();
    let destination = out.path().join("svc");
    let request = SyncRequest::new("origin", dir.path(), &destination).with_reference(Some("v2"));
    let synced = source().sync(&request).await.unwrap();
    assert_eq!(synced.git.unwrap().commit, fixture.c3);
}

#[tokio::test]
async fn url_at_ref_splits_and_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let out = tempfile::tempdir().unwrap();
    let written = format!("{}@v1", fixture.repo.url());
    let (url, reference) = split_url_ref(&written);
    assert_eq!((url, reference), (fixture.repo.url().as_str(), Some("v1")));
    let synced = sync(url, reference, &out.path().join("svc")).await.unwrap();
    assert_eq!(synced.git.unwrap().commit, fixture.c1);

    for (written, url, reference) in [
        (
            "git@github.com:org/repo.git@v1.2",
            "git@github.com:org/repo.git",
            Some("v1.2"),
        ),
        (
            "ssh://git@host:2222/org/repo.git@main",
            "ssh://git@host:2222/org/repo.git",
            Some("main"),
        ),
        (
            "https://user:t0ken@host/org/repo.git@feature/x",
            "https://user:t0ken@host/org/repo.git",
            Some("feature/x"),
        ),
        (
            "https://user:t0ken@host/org/repo.git",
            "https://user:t0ken@host/org/repo.git",
            None,
        ),
    ] {
        assert_eq!(split_url_ref(written), (url, reference), "{written}");
    }
}

#[tokio::test]
async fn a_missing_ref_names_the_nearest_ones() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let out = tempfile::tempdir().unwrap();
    let destination = out.path().join("svc");
    let err = sync(&fixture.repo.url(), Some("v3"), &destination)
        .await
        .unwrap_err();
    match &err {
        Error::RefNotFound {
            wanted, nearest, ..
        } => {
            assert_eq!(wanted, "v3");
            assert_eq!(nearest, &["v1", "v2", "dev"]);
        }
        other => panic!("{other}"),
    }
    assert!(
        err.to_string().contains("ref `v3` not found")
            && err.to_string().contains("nearest: v1, v2, dev"),
        "{err}"
    );
    // An id that no commit has.
    let err = sync(&fixture.repo.url(), Some("deadbeef"), &destination)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RefNotFound { .. }), "{err}");
    assert!(!destination.exists());
}

#[tokio::test]
async fn a_missing_repository_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let _fixture = Fixture::new(dir.path());
    let daemon = GitDaemon::start(dir.path());
    let out = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    for url in [
        format!("file://{}", missing.display()),
        missing.display().to_string(),
        daemon.url("missing"),
    ] {
        let err = sync(&url, None, &out.path().join("svc")).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{url}: {err:?}");
    }
}

/// An HTTP server on 127.0.0.1 that answers every request with `status`, and reports the
/// requests it got.
fn http_server(status: &'static str) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(mut stream) = stream else { break };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = vec![0u8; 8192];
            let n = stream.read(&mut request).unwrap_or(0);
            let _ = sender.send(String::from_utf8_lossy(&request[..n]).into_owned());
            let response = format!(
                "HTTP/1.1 {status}\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (port, receiver)
}

#[tokio::test]
async fn refused_credentials_are_an_authentication_failure_that_shows_no_secret() {
    let (port, requests) = http_server("401 Unauthorized");
    let out = tempfile::tempdir().unwrap();
    let url = format!("http://deploy:s3cr3t-t0ken@127.0.0.1:{port}/org/repo.git");
    let mut options = GitOptions::default();
    options.credentials = Credentials::none().with_token(None, "env-t0ken");
    options.timeout = Duration::from_secs(30);
    let err = GitSource::with_options(options)
        .sync(&request(&url, Some("main"), &out.path().join("svc")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AuthFailed { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains("s3cr3t") && !shown.contains("env-t0ken"),
        "{shown}"
    );
    assert!(shown.contains("deploy:***@127.0.0.1"), "{shown}");
    // Both the URL's password and the token were offered.
    let requests: Vec<String> = requests.try_iter().collect();
    let authorizations: Vec<&str> = requests
        .iter()
        .filter_map(|r| {
            r.lines()
                .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
        })
        .collect();
    assert_eq!(authorizations.len(), 2, "{requests:?}");
}

#[tokio::test]
async fn a_404_is_not_found() {
    let (port, _requests) = http_server("404 Not Found");
    let out = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/org/missing.git");
    let err = sync(&url, None, &out.path().join("svc")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn a_stalled_server_times_out() {
    // Accepts connections and never answers; closes them when told, so that the abandoned
    // libgit2 call returns and the test's runtime can shut down.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = mpsc::channel::<()>();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let mut held = Vec::new();
        let started = std::time::Instant::now();
        while stopped.try_recv().is_err() && started.elapsed() < Duration::from_secs(60) {
            if let Ok((stream, _)) = listener.accept() {
                held.push(stream);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        held.len()
    });
    let out = tempfile::tempdir().unwrap();
    let mut options = GitOptions::default();
    options.credentials = Credentials::none();
    options.timeout = Duration::from_secs(1);
    let err = GitSource::with_options(options)
        .sync(&request(
            &format!("git://127.0.0.1:{port}/repo.git"),
            None,
            &out.path().join("svc"),
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
    stop.send(()).unwrap();
    assert_eq!(server.join().unwrap(), 1, "the sync connected once");
}

#[tokio::test]
async fn a_new_remote_replaces_the_clone() {
    let dir = tempfile::tempdir().unwrap();
    let first = Fixture::new(&dir.path().join("a"));
    let second = Fixture::new(&dir.path().join("b"));
    let out = tempfile::tempdir().unwrap();
    let destination = out.path().join("svc");
    sync(&first.repo.url(), Some("v1"), &destination)
        .await
        .unwrap();
    let synced = sync(&second.repo.url(), Some("v1"), &destination)
        .await
        .unwrap();
    let git = synced.git.unwrap();
    assert!(git.cloned, "{git:?}");
    assert_eq!(git.commit, second.c1);
}

#[tokio::test]
async fn policies_apply_to_git_sources() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let url = fixture.repo.url();
    let out = tempfile::tempdir().unwrap();
    let destination = out.path().join("svc");
    sync(&url, Some("v1"), &destination).await.unwrap();
    fs::write(destination.join("local.txt"), "kept").unwrap();

    let at =
        |reference: &str, policy| request(&url, Some(reference), &destination).with_policy(policy);
    let kept = source().sync(&at("v2", SyncPolicy::Skip)).await.unwrap();
    assert!(kept.kept && kept.git.is_none());
    assert_eq!(app(&destination), "version = 1\n");
    assert_eq!(kept.digest, digest_tree(&destination).unwrap());

    let err = source()
        .sync(&at("v2", SyncPolicy::Fail))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");

    let merged = source().sync(&at("v2", SyncPolicy::Merge)).await.unwrap();
    assert_eq!(app(&destination), "version = 3\n");
    assert_eq!(
        fs::read_to_string(destination.join("local.txt")).unwrap(),
        "kept"
    );
    assert_eq!(merged.digest, digest_tree(&destination).unwrap());
}

#[tokio::test]
async fn a_destination_outside_its_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let root = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let err = source()
        .sync(
            &request(&fixture.repo.url(), None, &elsewhere.path().join("svc")).within(root.path()),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidDestination { .. }), "{err}");
    assert!(fs::read_dir(elsewhere.path()).unwrap().next().is_none());
    let inside: PathBuf = root.path().join("svc");
    source()
        .sync(&request(&fixture.repo.url(), None, &inside).within(root.path()))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_previous_tree_is_reused_whatever_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let url = fixture.repo.url();
    let out = tempfile::tempdir().unwrap();
    let destination = out.path().join("svc");
    sync(&url, Some("v2"), &destination).await.unwrap();
    sync(&url, Some("v1"), &destination).await.unwrap();
    // The kept tree (of v2) as a running service may leave it.
    let previous = out.path().join(".svc.prev");
    assert_eq!(app(&previous), "version = 3\n");
    fs::write(previous.join("app.py"), "version = 9\n").unwrap(); // same size, other bytes
    // The same content and mode, but one inode with a file outside the tree.
    let elsewhere = out.path().join("elsewhere.txt");
    fs::write(&elsewhere, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o755)).unwrap();
    fs::remove_file(previous.join("run.sh")).unwrap();
    fs::hard_link(&elsewhere, previous.join("run.sh")).unwrap();
    fs::remove_file(previous.join("util.py")).unwrap();
    std::os::unix::fs::symlink("app.py", previous.join("util.py")).unwrap();
    fs::remove_dir_all(previous.join("lib")).unwrap();
    fs::write(previous.join("lib"), "a file where a folder was").unwrap();
    fs::create_dir_all(previous.join("__pycache__/deep")).unwrap();
    fs::write(previous.join("__pycache__/deep/x.pyc"), "cache").unwrap();

    let synced = sync(&url, Some("v2"), &destination).await.unwrap();
    let fresh = out.path().join("fresh");
    let expected = sync(&url, Some("v2"), &fresh).await.unwrap();
    assert_eq!(listing(&destination), listing(&fresh));
    assert_eq!(synced.digest, expected.digest);
    assert_eq!(digest_tree(&destination).unwrap(), expected.digest);
    assert_eq!(fs::metadata(destination.join("run.sh")).unwrap().nlink(), 1);
    fs::write(destination.join("run.sh"), "changed").unwrap();
    assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "#!/bin/sh\n");
}

#[tokio::test]
async fn ssh_urls_reach_the_ssh_transport_and_errors_show_no_secret() {
    let port = support::free_port(); // nothing listens there
    let out = tempfile::tempdir().unwrap();
    for url in [
        format!("ssh://git:pa55word@127.0.0.1:{port}/org/repo.git"),
        format!("ssh://git@127.0.0.1:{port}/org/repo.git"),
        format!("http://user:pa55word@127.0.0.1:{port}/org/repo.git"),
    ] {
        let err = sync(&url, Some("main"), &out.path().join("svc"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unreachable { .. }), "{url}: {err:?}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("pa55word"), "{shown}");
    }
}
