//! Helpers shared by the integration tests: trees on disk, git repositories made with the git
//! command, and a `git daemon` on 127.0.0.1.
#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Writes `text` at `path`, creating its folders.
pub fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// Sets the permission bits of `path`.
pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The names in a folder, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Names in a folder that a sync of `name` may not leave behind: anything but the destination,
/// its lock file, its git clone and the previous tree the git backend keeps.
pub fn leftovers(dir: &Path, name: &str) -> Vec<String> {
    let kept = [
        name.to_owned(),
        format!(".{name}.lock"),
        format!(".{name}.git"),
        format!(".{name}.prev"),
    ];
    names(dir)
        .into_iter()
        .filter(|n| !kept.contains(n))
        .collect()
}

/// Every path under `root` with what it is: `d` folder, `f:<content>`, `l:<target>`.
pub fn listing(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = entry.unwrap();
        let relative = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let what = if entry.file_type().is_symlink() {
            format!("l:{}", fs::read_link(entry.path()).unwrap().display())
        } else if entry.file_type().is_dir() {
            "d".to_owned()
        } else {
            format!(
                "f:{}",
                String::from_utf8_lossy(&fs::read(entry.path()).unwrap())
            )
        };
        out.push((relative, what));
    }
    out
}

/// A git repository driven by the git command, isolated from the user's configuration.
pub struct Repo {
    pub path: PathBuf,
}

impl Repo {
    pub fn init(path: &Path) -> Self {
        fs::create_dir_all(path).unwrap();
        let repo = Self {
            path: path.to_owned(),
        };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn git(&self, args: &[&str]) -> String {
        git(&self.path, args)
    }

    pub fn write(&self, relative: &str, text: &str) {
        write(&self.path.join(relative), text);
    }

    /// Stages everything and commits; returns the commit id.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.rev("HEAD")
    }

    pub fn rev(&self, spec: &str) -> String {
        self.git(&["rev-parse", spec]).trim().to_owned()
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }
}

/// Runs git in `dir` with a fixed identity and no user or system configuration.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "deployd")
        .env("GIT_AUTHOR_EMAIL", "deployd@example.invalid")
        .env("GIT_COMMITTER_NAME", "deployd")
        .env("GIT_COMMITTER_EMAIL", "deployd@example.invalid")
        .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The repository most tests use, in `<dir>/origin`:
///
/// ```text
/// main:  c1 (tag v1, annotated) ── c2 ── c3 (tag v2, lightweight)
/// dev:                              └── c4
/// ```
pub struct Fixture {
    pub repo: Repo,
    pub c1: String,
    pub c2: String,
    pub c3: String,
    pub c4: String,
}

impl Fixture {
    pub fn new(dir: &Path) -> Self {
        let repo = Repo::init(&dir.join("origin"));
        repo.write("app.py", "version = 1\n");
        repo.write("lib/util.py", "def f(): pass\n");
        let c1 = repo.commit("c1");
        repo.git(&["tag", "-a", "v1", "-m", "release 1"]);
        repo.write("app.py", "version = 2\n");
        let c2 = repo.commit("c2");
        repo.write("app.py", "version = 3\n");
        repo.write("run.sh", "#!/bin/sh\n");
        chmod(&repo.path.join("run.sh"), 0o755);
        std::os::unix::fs::symlink("lib/util.py", repo.path.join("util.py")).unwrap();
        let c3 = repo.commit("c3");
        repo.git(&["tag", "v2"]);
        repo.git(&["checkout", "-q", "-b", "dev", &c2]);
        repo.write("app.py", "version = 'dev'\n");
        let c4 = repo.commit("c4");
        repo.git(&["checkout", "-q", "main"]);
        Self {
            repo,
            c1,
            c2,
            c3,
            c4,
        }
    }
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `git daemon` serving every repository under `base` on 127.0.0.1; killed when dropped.
pub struct GitDaemon {
    child: Child,
    pub port: u16,
}

impl GitDaemon {
    pub fn start(base: &Path) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("git")
                .arg("daemon")
                .arg("--export-all")
                .arg(format!("--base-path={}", base.display()))
                .arg("--reuseaddr")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(base)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("git daemon must be installed for these tests");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { child, port };
                }
                if child.try_wait().unwrap().is_some() {
                    break; // the port was taken meanwhile: another one
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("git daemon did not start");
    }

    /// The `git://` URL of the repository at `<base>/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
