//! Services whose code comes from git repositories.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use deployd_e2e::{Project, Server, success, wait_for, workspace};

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A repository holding the test service, with tags `v1` and `v2` whose `RESULT_PREFIX` (which
/// the service puts before every result) differ.
fn repository(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q"]);
    std::fs::copy(
        workspace().join("tests/fixtures/services/echo.py"),
        dir.join("echo.py"),
    )
    .unwrap();
    for version in ["v1", "v2"] {
        std::fs::write(dir.join("RESULT_PREFIX"), format!("{version} ")).unwrap();
        git(dir, &["add", "."]);
        git(dir, &["commit", "-q", "-m", version]);
        git(dir, &["tag", "-a", version, "-m", version]);
    }
}

/// Done when 5 of issue 4: deploy from a local repository at a tag, reload at another tag, and
/// the running service answers with the new code.
#[test]
fn a_git_service_deploys_at_a_tag_and_reloads_at_another() {
    let project = Project::new();
    let repo = project.path().join("repo");
    repository(&repo);
    let deployment = |version: &str| {
        format!(
            "name: gitsvc\nservices:\n  svc:\n    source:\n      type: git\n      location: file://{}@{version}\n    command: python3 echo.py\n",
            repo.display()
        )
    };
    let file = project.write("gitsvc.yaml", &deployment("v1"));
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);

    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let out = success(&server.cli(&["run", "-d", "gitsvc", "-a", "message", "hello"]));
    assert_eq!(out, "v1 svc: hello\n");

    project.write("gitsvc.yaml", &deployment("v2"));
    success(&server.cli(&["deploy", "--reload", file.to_str().unwrap()]));
    server.wait_ready("gitsvc");
    let out = success(&server.cli(&["run", "-d", "gitsvc", "-a", "message", "hello"]));
    assert_eq!(out, "v2 svc: hello\n");

    // A ref that does not exist is a clear error naming the nearest refs, and the running
    // deployment is not replaced.
    project.write("gitsvc.yaml", &deployment("v3"));
    let out = server.cli(&["deploy", "--reload", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("v3"), "{stderr}");
    assert!(stderr.contains("HTTP 400"), "{stderr}");
    let out = wait_for(
        "the v2 service to still answer",
        Duration::from_secs(30),
        || {
            let out = server.cli(&["run", "-d", "gitsvc", "-a", "message", "still"]);
            out.status.success().then_some(out)
        },
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v2 svc: still\n");
}
