//! Services whose code comes from git repositories.

use std::path::Path;
use std::time::Duration;

use deployd_e2e::{Project, Server, copy_python_fixtures, git, success, wait_for, workspace};

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

/// A llama_deploy workflow from a git repository: the checkout is the deployment's root, so
/// `import-path` and `python-dependencies` are relative to the repository; `env` and
/// `env-files` (from the repository, later files over earlier ones and over `env`) reach the
/// workflow.
#[test]
fn a_python_workflow_deploys_from_a_git_repository() {
    let project = Project::new();
    let repo = project.path().join("flows");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    git(&repo, &["init", "-q"]);
    copy_python_fixtures(&repo.join("src"));
    std::fs::write(repo.join("src/env.py"), ENV_WORKFLOW).unwrap();
    std::fs::write(repo.join("base.env"), "FROM_FILE=base\nOVERRIDDEN=base\n").unwrap();
    std::fs::write(repo.join("later.env"), "OVERRIDDEN=later\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "flows"]);
    let file = project.write(
        "flows.yml",
        &format!(
            "name: gitflows\nservices:\n  echo:\n    source:\n      type: git\n      \
             location: file://{repo}\n    import-path: src/workflow:echo_workflow\n    \
             python-dependencies: [src/requirements.txt]\n  env:\n    source:\n      type: git\n      \
             location: file://{repo}\n    import-path: src/env:env_workflow\n    env:\n      \
             FROM_ENV: env\n      OVERRIDDEN: env\n    env-files: [base.env, later.env]\n",
            repo = repo.display()
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data"), &[]);
    success(&server.cli(&["deploy", file.to_str().unwrap()]));
    let (status, body) = server.post(
        "/deployments/gitflows/tasks/run",
        &serde_json::json!({ "input": serde_json::json!({"message": "hi"}).to_string() }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "Message received: hi (six 1.16.0)");
    let (status, body) = server.post(
        "/deployments/gitflows/tasks/run",
        &serde_json::json!({ "input": "{}", "service_id": "env" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "env base later");
}

const ENV_WORKFLOW: &str = r#"
import os

from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step


class EnvWorkflow(Workflow):
    @step()
    async def read(self, ev: StartEvent) -> StopEvent:
        names = ["FROM_ENV", "FROM_FILE", "OVERRIDDEN"]
        return StopEvent(result=" ".join(os.environ.get(n, "-") for n in names))


env_workflow = EnvWorkflow()
"#;
