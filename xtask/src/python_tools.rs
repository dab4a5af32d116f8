//! The Python tools the end-to-end scenarios drive deployd with: llama-deploy 0.9.2's own
//! `llamactl` and `llama_deploy.Client`, installed unchanged in a virtualenv of their own under
//! `target/python-tools/llama-deploy-0.9.2`, with schemathesis beside them.
//!
//! The virtualenv is made once and reused while its spec (the requirement and the interpreter's
//! version, kept in `.deployd-spec`) is the same and `llama_deploy` imports; a lock file keeps two
//! makers from racing. It is made with `uv venv` + `uv pip install` (uv on `PATH`, or the
//! interpreter's `uv` package), with `UV_PYTHON_DOWNLOADS=never`; without uv, with
//! `python3 -m venv` + pip. The scenarios (`tests/scenarios/llama_tools.rs`) read its interpreter
//! from `DEPLOYD_LLAMA_DEPLOY_PYTHON`, and make or find the same virtualenv the same way when the
//! variable is not set.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The variable the scenarios read the virtualenv's interpreter from.
pub(crate) const ENV_VAR: &str = "DEPLOYD_LLAMA_DEPLOY_PYTHON";

/// What the virtualenv holds: llama_deploy's tools, schemathesis, which the scenarios run
/// against deployd's OpenAPI document, and OpenTelemetry's protobuf definitions, with which
/// the traces scenario's OTLP receiver decodes what deployd exports.
const REQUIREMENTS: &[&str] = &[
    "llama-deploy==0.9.2",
    "schemathesis==4.32.5",
    "opentelemetry-proto==1.45.2",
];

/// The interpreter the virtualenv is made from.
const INTERPRETER: &str = "python3";

/// Makes (or finds) the virtualenv and returns the variable to give the scenarios: its name and
/// the virtualenv's interpreter. Leaked once, so that the caller can hand it on as it is.
pub(crate) fn scenario_env(target: &Path) -> anyhow::Result<(&'static str, &'static OsStr)> {
    let python = llama_deploy_python(target)?;
    eprintln!("xtask: {ENV_VAR}={}", python.display());
    let leaked: &'static OsStr = Box::leak(python.into_os_string().into_boxed_os_str());
    Ok((ENV_VAR, leaked))
}

/// `cargo xtask llama-deploy-python`: makes (or finds) the virtualenv and prints its
/// interpreter; what the scenarios run when `cargo xtask e2e` did not give them the variable.
pub(crate) fn print_llama_deploy_python() -> anyhow::Result<()> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::root().join("target"), PathBuf::from);
    println!("{}", llama_deploy_python(&target)?.display());
    Ok(())
}

/// The interpreter of a virtualenv with llama-deploy 0.9.2 (and its `llamactl` beside it), made
/// when missing or stale.
pub(crate) fn llama_deploy_python(target: &Path) -> anyhow::Result<PathBuf> {
    let tools = target.join("python-tools");
    std::fs::create_dir_all(&tools)
        .with_context(|| format!("cannot create {}", tools.display()))?;
    let lock_path = tools.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;

    let venv = tools.join("llama-deploy-0.9.2");
    let python = venv.join("bin").join("python");
    let spec = format!(
        "{} | python {}",
        REQUIREMENTS.join(" "),
        interpreter_version()?
    );
    let spec_file = venv.join(".deployd-spec");
    if std::fs::read_to_string(&spec_file).is_ok_and(|found| found == spec) && usable(&venv) {
        return Ok(python);
    }
    eprintln!(
        "xtask: making {} ({})",
        venv.display(),
        REQUIREMENTS.join(", ")
    );
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .with_context(|| format!("cannot remove {}", venv.display()))?;
    }
    let cache = |var: &str, folder: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| target.join("python-cache").join(folder).into_os_string())
    };
    let made = match find_uv() {
        Some(uv) => {
            let env = [
                ("UV_PYTHON_DOWNLOADS", "never".into()),
                ("UV_CACHE_DIR", cache("UV_CACHE_DIR", "uv")),
            ];
            step(
                Command::new(&uv)
                    .args(["venv", "--quiet", "--python", INTERPRETER])
                    .arg(&venv)
                    .envs(env.clone()),
            )
            .and_then(|()| {
                step(
                    Command::new(&uv)
                        .args(["pip", "install", "--quiet", "--python"])
                        .arg(&python)
                        .args(REQUIREMENTS)
                        .envs(env),
                )
            })
        }
        None => step(Command::new(INTERPRETER).args(["-m", "venv"]).arg(&venv)).and_then(|()| {
            step(
                Command::new(&python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                    ])
                    .args(REQUIREMENTS)
                    .env("PIP_CACHE_DIR", cache("PIP_CACHE_DIR", "pip")),
            )
        }),
    };
    if let Err(err) = made {
        // The next run starts over.
        let _ = std::fs::remove_dir_all(&venv);
        return Err(err.context(format!(
            "cannot make {} with {}",
            venv.display(),
            REQUIREMENTS.join(", ")
        )));
    }
    if !usable(&venv) {
        bail!(
            "{} was made but `import llama_deploy` fails or bin/llamactl is missing",
            venv.display()
        );
    }
    std::fs::write(&spec_file, &spec)
        .with_context(|| format!("cannot write {}", spec_file.display()))?;
    Ok(python)
}

/// Whether the virtualenv has `llamactl` and `schemathesis` and imports llama_deploy's client
/// and CLI.
fn usable(venv: &Path) -> bool {
    venv.join("bin").join("llamactl").is_file()
        && venv.join("bin").join("schemathesis").is_file()
        && Command::new(venv.join("bin").join("python"))
            .args([
                "-W",
                "ignore",
                "-c",
                "import llama_deploy.client, llama_deploy.cli",
            ])
            .output()
            .is_ok_and(|out| out.status.success())
}

/// The interpreter's `sys.version`.
fn interpreter_version() -> anyhow::Result<String> {
    let output = Command::new(INTERPRETER)
        .args(["-c", "import sys; print(sys.version)"])
        .output()
        .with_context(|| format!("cannot run {INTERPRETER}"))?;
    if !output.status.success() {
        bail!(
            "{INTERPRETER} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `uv` on `PATH`, else the binary of the interpreter's `uv` package.
fn find_uv() -> Option<PathBuf> {
    if let Some(found) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("uv"))
            .find(|candidate| candidate.is_file())
    }) {
        return Some(found);
    }
    let output = Command::new(INTERPRETER)
        .args(["-c", "import uv; print(uv.find_uv_bin())"])
        .output()
        .ok()?;
    let found = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    (output.status.success() && found.is_file()).then_some(found)
}

/// Runs an installer step; fails with its output.
fn step(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
