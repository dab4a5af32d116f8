//! `cargo bench -p deployd-sources` (run by `cargo xtask bench`): the sync targets of issue 4,
//! each measured against its baseline in the same run, medians of several rounds.
//!
//! - copy: syncing a 10,000-file tree with `LocalSource` is at least as fast as `cp -r` of the
//!   same tree (ratio = cp / sync, target >= 1);
//! - fetch: updating a checkout of a 1,000-commit repository by one new commit is at least 10x
//!   faster than a fresh clone of it (ratio = clone / update, target >= 10), over `file://`.
//!   The same over `git daemon` is printed for information: there the fresh clone is shallow.
//!
//! Prints one line per measurement and exits non-zero when a target is missed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use deployd_sources::{
    Credentials, GitOptions, GitSource, LocalSource, SourceManager, SyncRequest,
};

const FILES: usize = 10_000;
const COMMITS: usize = 1_000;
const ROUNDS: usize = 5;

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; a filter, if any, is ignored.
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut missed = Vec::new();

    let copy = runtime.block_on(copy_bench());
    report("copy 10,000 files", "cp -r", copy, 1.0, &mut missed);

    let (file, daemon) = runtime.block_on(fetch_bench());
    report(
        "update fetch vs fresh clone, file://",
        "clone",
        file,
        10.0,
        &mut missed,
    );
    println!(
        "info  update fetch vs fresh shallow clone, git daemon: clone {:.1} ms, update {:.1} ms, ratio {:.1}x",
        ms(daemon.0),
        ms(daemon.1),
        ratio(daemon)
    );

    if missed.is_empty() {
        println!("sources bench: all targets met");
        ExitCode::SUCCESS
    } else {
        println!("sources bench: MISSED {}", missed.join(", "));
        ExitCode::FAILURE
    }
}

/// (baseline, deployd) medians.
type Pair = (Duration, Duration);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio((baseline, ours): Pair) -> f64 {
    baseline.as_secs_f64() / ours.as_secs_f64().max(1e-9)
}

fn report(what: &str, baseline: &str, pair: Pair, target: f64, missed: &mut Vec<String>) {
    let ratio = ratio(pair);
    let verdict = if ratio >= target { "ok" } else { "MISS" };
    println!(
        "{verdict:<5} {what}: {baseline} {:.1} ms, deployd {:.1} ms, ratio {ratio:.2}x (target >= {target}x)",
        ms(pair.0),
        ms(pair.1),
    );
    if ratio < target {
        missed.push(what.to_owned());
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A source tree of `FILES` files of 100 B to 8 KiB in 100 folders of two levels.
fn make_tree(root: &Path) {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..FILES {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 100 + (seed % 8092) as usize;
        let line = format!("line of file {i} with some code in it: x = {seed}\n");
        let content: String = line.repeat(len / line.len() + 1)[..len].to_owned();
        let path = root.join(format!("pkg{}/mod{}/file{i}.py", i % 10, i % 100));
        if i < 100 {
            fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        }
        fs::write(&path, content).expect("write");
    }
}

fn cp_r(from: &Path, to: &Path) -> Duration {
    let started = Instant::now();
    let status = Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    let elapsed = started.elapsed();
    assert!(status.success(), "cp -r failed");
    elapsed
}

async fn copy_bench() -> Pair {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let base = dir.path().join("base");
    make_tree(&base.join("src"));
    let out = dir.path().join("out");
    fs::create_dir(&out).expect("mkdir");
    let source = LocalSource::new();
    // Warm the page cache and the code paths.
    cp_r(&base.join("src"), &out.join("warm-cp"));
    source
        .sync(&SyncRequest::new("src", &base, out.join("warm")))
        .await
        .expect("sync");

    let (mut cp, mut ours) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let cp_target = out.join(format!("cp{round}"));
        let our_target = out.join(format!("sync{round}"));
        let sync = async || {
            let started = Instant::now();
            source
                .sync(&SyncRequest::new("src", &base, &our_target))
                .await
                .expect("sync");
            started.elapsed()
        };
        // Alternate which goes first.
        if round % 2 == 0 {
            cp.push(cp_r(&base.join("src"), &cp_target));
            ours.push(sync().await);
        } else {
            ours.push(sync().await);
            cp.push(cp_r(&base.join("src"), &cp_target));
        }
        let _ = fs::remove_dir_all(&cp_target);
        let _ = fs::remove_dir_all(&our_target);
    }
    (median(cp), median(ours))
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdout(Stdio::null())
        .status()
        .expect("git");
    assert!(status.success(), "git {args:?} failed");
}

/// A repository of `COMMITS` commits on main, made with `git fast-import`: 200 files of about
/// 2 KiB; each commit after the first rewrites one line of one file.
fn make_repo(path: &Path) {
    fs::create_dir_all(path).expect("mkdir");
    git(path, &["init", "-q", "-b", "main"]);
    let mut stream = Vec::new();
    let mut files: Vec<Vec<String>> = (0..200)
        .map(|f| {
            (0..40)
                .map(|l| format!("def f{f}_{l}(x): return x + {l}\n"))
                .collect()
        })
        .collect();
    for commit in 0..COMMITS {
        let changed: Vec<usize> = if commit == 0 {
            (0..files.len()).collect()
        } else {
            let file = commit * 7 % files.len();
            let line = commit * 13 % 40;
            files[file][line] = format!("def f{file}_{line}(x): return x * {commit}\n");
            vec![file]
        };
        let _ = writeln!(stream, "commit refs/heads/main");
        let _ = writeln!(
            stream,
            "committer bench <bench@example.invalid> {} +0000",
            1_700_000_000 + commit
        );
        let message = format!("commit {commit}");
        let _ = writeln!(stream, "data {}\n{message}", message.len());
        for file in changed {
            let content = files[file].concat();
            let _ = writeln!(stream, "M 100644 inline src/file{file}.py");
            let _ = writeln!(stream, "data {}\n{content}", content.len());
        }
        let _ = writeln!(stream);
    }
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(path)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&stream)
        .expect("feed fast-import");
    assert!(child.wait().expect("fast-import").success());
    // As a server's repository would be: packed.
    git(path, &["gc", "-q"]);
    git(path, &["checkout", "-q", "main"]);
}

/// Adds one commit to main (rewriting one file).
fn add_commit(repo: &Path, round: usize) {
    fs::write(
        repo.join(format!("src/file{}.py", round % 200)),
        format!("def changed(): return {round}\n"),
    )
    .expect("write");
    git(
        repo,
        &[
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.invalid",
            "commit",
            "-qam",
            "one more",
        ],
    );
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn git_daemon(base: &Path) -> (Daemon, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("git")
        .arg("daemon")
        .arg("--export-all")
        .arg(format!("--base-path={}", base.display()))
        .arg("--reuseaddr")
        .arg("--listen=127.0.0.1")
        .arg(format!("--port={port}"))
        .arg(base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon");
    let daemon = Daemon(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "git daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (daemon, port)
}

async fn fetch_bench() -> (Pair, Pair) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let repo = dir.path().join("repo");
    make_repo(&repo);
    let (_daemon, port) = git_daemon(dir.path());
    let mut options = GitOptions::default();
    options.credentials = Credentials::none();
    let source = GitSource::with_options(options);
    let file_url = format!("file://{}", repo.display());
    let daemon_url = format!("git://127.0.0.1:{port}/repo");
    let mut round = 0;
    let file = compare(&source, &file_url, &repo, dir.path(), "file", &mut round).await;
    let daemon = compare(
        &source,
        &daemon_url,
        &repo,
        dir.path(),
        "daemon",
        &mut round,
    )
    .await;
    (file, daemon)
}

/// (fresh clone, update by one commit) medians for `url`.
async fn compare(
    source: &GitSource,
    url: &str,
    repo: &Path,
    dir: &Path,
    name: &str,
    round: &mut usize,
) -> Pair {
    let out = dir.join(format!("out-{name}"));
    fs::create_dir(&out).expect("mkdir");
    let sync = async |destination: &PathBuf| {
        let started = Instant::now();
        let synced = source
            .sync(&SyncRequest::new(url, "/", destination).with_reference(Some("main")))
            .await
            .expect("git sync");
        (started.elapsed(), synced.git.expect("git stats"))
    };
    let (mut clones, mut updates) = (Vec::new(), Vec::new());
    let kept = out.join("kept");
    sync(&kept).await; // the checkout that is updated
    for i in 0..ROUNDS {
        let fresh = out.join(format!("fresh{i}"));
        let (elapsed, stats) = sync(&fresh).await;
        assert!(stats.cloned);
        clones.push(elapsed);
        let _ = fs::remove_dir_all(&fresh);
        let _ = fs::remove_dir_all(out.join(format!(".fresh{i}.git")));

        *round += 1;
        add_commit(repo, *round);
        let (elapsed, stats) = sync(&kept).await;
        assert!(!stats.cloned && stats.fetched, "{stats:?}");
        updates.push(elapsed);
    }
    (median(clones), median(updates))
}
