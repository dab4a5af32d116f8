//! The `python` runtime: a virtualenv per service and deployd's Python adapter serving the
//! llama-index workflow that the service's `import-path` names.
//!
//! The virtualenv lives in `<deployment>/envs/<service>-<digest>`, where the digest covers the
//! interpreter's version, the adapter, the default packages and the service's
//! `python-dependencies` with the contents of every requirements file and local package they
//! name. A deploy whose digest has an environment already reuses it without running the
//! installer; a change builds a new one beside the old, which keeps serving until the switch.
//!
//! Environments are made with `uv` when it is on `PATH` or in deployd's tools folder (installed
//! there with pip on first use, as llama_deploy 0.9 does), otherwise with `python -m venv` and
//! pip. Installers share one cache (`UV_CACHE_DIR` / `PIP_CACHE_DIR` when set, else under the
//! data directory), so a second environment with the same packages takes seconds.
//!
//! The adapter (`sdk/python/deployd_adapter`) is carried in deployd's binary and written into
//! each environment, with a `.pth` file that puts it on the interpreter's path: no package
//! index is needed for it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use deployd_config::{Command, ServiceSpec};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::{Prepare, Prepared, Runtime, Settings};
use crate::Error;
use crate::prepare;

/// The packages every environment has unless the service's dependencies name them: what
/// llama_deploy 0.9.2's own server environment gives a workflow, and the event loop its server
/// runs on (uvloop, from uvicorn's standard extra), which the adapter uses when it is there.
const DEFAULT_PACKAGES: &[(&str, &str)] = &[
    ("llama-index-core", "llama-index-core>=0.11.17,<0.14.0"),
    ("llama-index-workflows", "llama-index-workflows>=0.2.1"),
    ("uvloop", "uvloop>=0.17"),
];

/// The adapter's files, relative to the folder that goes on `sys.path`.
const ADAPTER: &[(&str, &str)] = &[
    (
        "deployd_adapter/__init__.py",
        include_str!("../../../../sdk/python/deployd_adapter/__init__.py"),
    ),
    (
        "deployd_adapter/__main__.py",
        include_str!("../../../../sdk/python/deployd_adapter/__main__.py"),
    ),
    (
        "deployd_adapter/app.py",
        include_str!("../../../../sdk/python/deployd_adapter/app.py"),
    ),
    (
        "deployd_adapter/loader.py",
        include_str!("../../../../sdk/python/deployd_adapter/loader.py"),
    ),
    (
        "deployd_adapter/runner.py",
        include_str!("../../../../sdk/python/deployd_adapter/runner.py"),
    ),
    (
        "deployd_adapter/server.py",
        include_str!("../../../../sdk/python/deployd_adapter/server.py"),
    ),
];

/// Written into an environment once it is complete; holds its `site-packages` folder.
const READY: &str = ".deployd-ready";

/// The most output of an installer shown in an error.
const OUTPUT_TAIL: usize = 4000;

/// Runs llama-index workflows through the adapter.
pub(crate) struct Python {
    settings: Settings,
}

impl Python {
    pub(crate) fn new(settings: Settings) -> Self {
        Self { settings }
    }
}

/// A dependency as llama_deploy 0.9 reads `python-dependencies`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dependency {
    /// A `…requirements.txt` file, installed with `-r`.
    Requirements(PathBuf),
    /// A local folder (a package with a pyproject or setup.py), installed from its path.
    Local(PathBuf),
    /// A requirement spec (`openai>=1`), passed to the installer as it is.
    Spec(String),
}

#[async_trait]
impl Runtime for Python {
    fn name(&self) -> &'static str {
        "python"
    }

    async fn prepare(&self, request: Prepare<'_>) -> Result<Prepared, Error> {
        let service = request.service;
        let Some(import_path) = service.import_path.clone() else {
            return Err(Error::BadRequest(format!(
                "service `{}` runs with the python runtime but has no `import-path`",
                service.id
            )));
        };
        let interpreter = &self.settings.python;
        let version = interpreter_version(interpreter)
            .await
            .map_err(|output| Error::Build {
                service: service.id.clone(),
                command: format!("{interpreter} --version"),
                output,
            })?;
        let dependencies = resolve_dependencies(service, request.workdir)?;
        // Hashing local packages reads every file of theirs: off the async workers.
        let digest = {
            let (version, dependencies) = (version.clone(), dependencies.clone());
            tokio::task::spawn_blocking(move || digest(&version, &dependencies))
                .await
                .map_err(|err| Error::Build {
                    service: service.id.clone(),
                    command: "hashing python-dependencies".to_owned(),
                    output: err.to_string(),
                })??
        };
        let env_dir =
            request
                .deployment_dir
                .join("envs")
                .join(format!("{}-{}", service.id, &digest[..16]));
        let ready = env_dir.join(READY);
        let site_packages = match std::fs::read_to_string(&ready) {
            Ok(site) if !site.trim().is_empty() => PathBuf::from(site.trim()),
            _ => {
                tracing::info!(service = %service.id, env = %env_dir.display(), "making the python environment");
                let site = self
                    .build_environment(service, &env_dir, &dependencies, request.build_log)
                    .await?;
                std::fs::write(&ready, site.to_string_lossy().as_bytes())
                    .map_err(|err| Error::io("cannot write", &ready, err))?;
                tracing::info!(service = %service.id, "python environment ready");
                site
            }
        };
        install_adapter(&env_dir, &site_packages)?;

        let bin = env_dir.join("bin");
        let mut env = request.env;
        let path = env
            .iter()
            .find(|(key, _)| key == "PATH")
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
        set(&mut env, "PATH", format!("{}:{path}", bin.display()));
        set(
            &mut env,
            "VIRTUAL_ENV",
            env_dir.to_string_lossy().into_owned(),
        );
        set(&mut env, "DEPLOYD_IMPORT_PATH", import_path);
        let root = import_root(service, request.deployment_dir, request.workdir)?;
        set(
            &mut env,
            "DEPLOYD_IMPORT_ROOT",
            root.to_string_lossy().into_owned(),
        );
        // `build` commands run inside the environment too.
        let built = prepare::build(prepare::Build {
            service,
            workdir: request.workdir,
            env: &env,
            log: request.build_log,
            marks: request.marks,
        })
        .await?;
        if built {
            tracing::info!(service = %service.id, "build finished");
        }
        let command = service.command.clone().unwrap_or_else(|| {
            Command::Argv(vec![
                bin.join("python").to_string_lossy().into_owned(),
                "-m".to_owned(),
                "deployd_adapter".to_owned(),
            ])
        });
        Ok(Prepared { command, env })
    }
}

impl Python {
    /// Makes the virtualenv in `env_dir` with the default packages and `dependencies`;
    /// returns its `site-packages` folder.
    async fn build_environment(
        &self,
        service: &ServiceSpec,
        env_dir: &Path,
        dependencies: &[Dependency],
        log: &Path,
    ) -> Result<PathBuf, Error> {
        if env_dir.exists() {
            // What an interrupted build left.
            let dir = env_dir.to_owned();
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
                .await
                .ok()
                .and_then(Result::err)
                .map_or(Ok(()), |err| Err(Error::io("cannot remove", env_dir, err)))?;
        }
        if let Some(parent) = env_dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|err| Error::io("cannot create", parent, err))?;
        }
        let interpreter = &self.settings.python;
        let python = env_dir.join("bin").join("python");
        let args = install_args(dependencies);
        let uv = self.uv().await;
        let outcome = match &uv {
            Some(uv) => {
                let uv = uv.to_string_lossy().into_owned();
                let venv = [
                    uv.as_str(),
                    "venv",
                    "--quiet",
                    "--python",
                    interpreter,
                    &env_dir.to_string_lossy(),
                ]
                .map(str::to_owned);
                run(service, &venv, &self.cache_env(), log).await?;
                let mut install = vec![
                    uv,
                    "pip".to_owned(),
                    "install".to_owned(),
                    "--python".to_owned(),
                    python.to_string_lossy().into_owned(),
                ];
                install.extend(args);
                run(service, &install, &self.cache_env(), log).await
            }
            None => {
                let venv = [
                    interpreter.clone(),
                    "-m".to_owned(),
                    "venv".to_owned(),
                    env_dir.to_string_lossy().into_owned(),
                ];
                run(service, &venv, &self.cache_env(), log).await?;
                let mut install = vec![
                    python.to_string_lossy().into_owned(),
                    "-m".to_owned(),
                    "pip".to_owned(),
                    "install".to_owned(),
                    "--disable-pip-version-check".to_owned(),
                ];
                install.extend(args);
                run(service, &install, &self.cache_env(), log).await
            }
        };
        if let Err(err) = outcome {
            // The next deploy starts over.
            let _ = std::fs::remove_dir_all(env_dir);
            return Err(err);
        }
        let probe = [
            python.to_string_lossy().into_owned(),
            "-c".to_owned(),
            "import sysconfig; print(sysconfig.get_paths()['purelib'])".to_owned(),
        ];
        let site = output_of(&probe).await.map_err(|output| Error::Build {
            service: service.id.clone(),
            command: probe.join(" "),
            output,
        })?;
        Ok(PathBuf::from(site.trim()))
    }

    /// The installers' shared caches.
    fn cache_env(&self) -> Vec<(String, String)> {
        let cache = self.settings.data_dir.join("cache");
        let mut env = Vec::new();
        for (var, folder) in [("UV_CACHE_DIR", "uv"), ("PIP_CACHE_DIR", "pip")] {
            let value = std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| cache.join(folder).to_string_lossy().into_owned());
            env.push((var.to_owned(), value));
        }
        // The interpreter is the one named, never one uv would download.
        env.push(("UV_PYTHON_DOWNLOADS".to_owned(), "never".to_owned()));
        env
    }

    /// `uv`: on `PATH`, in deployd's tools folder, or from the interpreter's `uv` package; else
    /// installed into the tools folder with pip; `None` when none of that works (venv and pip
    /// are used then).
    async fn uv(&self) -> Option<PathBuf> {
        let tools = self.settings.data_dir.join("tools").join("uv");
        let python = self.settings.python.clone();
        self.settings
            .uv
            .get_or_init(|| async move {
                if let Some(found) = on_path("uv") {
                    return Some(found);
                }
                let installed = tools.join("bin").join("uv");
                if installed.is_file() {
                    return Some(installed);
                }
                // The `uv` package of the interpreter (`pip install --user uv` puts its
                // binary where PATH may not look).
                let probe = [
                    python.clone(),
                    "-c".to_owned(),
                    "import uv; print(uv.find_uv_bin())".to_owned(),
                ];
                if let Ok(found) = output_of(&probe).await {
                    let found = PathBuf::from(found.trim());
                    if found.is_file() {
                        return Some(found);
                    }
                }
                let install = [
                    python,
                    "-m".to_owned(),
                    "pip".to_owned(),
                    "install".to_owned(),
                    "--quiet".to_owned(),
                    "--disable-pip-version-check".to_owned(),
                    "--target".to_owned(),
                    tools.to_string_lossy().into_owned(),
                    "uv".to_owned(),
                ];
                match output_of(&install).await {
                    Ok(_) if installed.is_file() => Some(installed),
                    Ok(_) => None,
                    Err(output) => {
                        tracing::warn!(%output, "cannot install uv; environments are made with venv and pip");
                        None
                    }
                }
            })
            .await
            .clone()
    }
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => env.push((key.to_owned(), value)),
    }
}

/// The deployment's root as llama_deploy lays it out, for `import-path`: a git source is
/// checked out at the root, so that is the synced source itself; a local source's folder sits
/// at its location under the root, so the root is `<deployment>/roots/<service>` with a link
/// at the location to the synced source (`src:pkg` then imports the folder `src` itself as a
/// package, as in llama_deploy).
fn import_root(
    service: &ServiceSpec,
    deployment_dir: &Path,
    workdir: &Path,
) -> Result<PathBuf, Error> {
    let location = match &service.source {
        Some(source) if source.kind == deployd_config::SourceKind::Local => {
            Path::new(&source.location)
                .components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .collect::<PathBuf>()
        }
        _ => return Ok(workdir.to_owned()),
    };
    if location.as_os_str().is_empty() {
        return Ok(workdir.to_owned());
    }
    let root = deployment_dir.join("roots").join(&service.id);
    let link = root.join(&location);
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(|err| Error::io("cannot create", parent, err))?;
    }
    if std::fs::symlink_metadata(&link).is_ok() {
        std::fs::remove_file(&link).map_err(|err| Error::io("cannot replace", &link, err))?;
    }
    std::os::unix::fs::symlink(workdir, &link)
        .map_err(|err| Error::io("cannot link", &link, err))?;
    Ok(root)
}

/// `program` on deployd's `PATH`.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// The interpreter's full version (`sys.version`), or its error output.
async fn interpreter_version(interpreter: &str) -> Result<String, String> {
    output_of(&[
        interpreter.to_owned(),
        "-c".to_owned(),
        "import sys; print(sys.version)".to_owned(),
    ])
    .await
}

/// Runs `argv` and returns its standard output, or its combined output on failure.
async fn output_of(argv: &[String]) -> Result<String, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no command".to_owned());
    };
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|err| format!("cannot run `{program}`: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Err(format!("{}: {}", output.status, tail(&text)))
    }
}

/// Runs an installer step with its output appended to `log`; a failure is a build error with
/// the installer's last lines.
async fn run(
    service: &ServiceSpec,
    argv: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<(), Error> {
    use std::io::Write;
    let shown = argv.join(" ");
    let failed = |output: String| Error::Build {
        service: service.id.clone(),
        command: shown.clone(),
        output,
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(failed("no command".to_owned()));
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| failed(format!("cannot start: {err}")))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let read_out = async {
        if let Some(pipe) = stdout.as_mut() {
            let _ = pipe.read_to_end(&mut out).await;
        }
    };
    let read_err = async {
        if let Some(pipe) = stderr.as_mut() {
            let _ = pipe.read_to_end(&mut err).await;
        }
    };
    tokio::join!(read_out, read_err);
    let status = child
        .wait()
        .await
        .map_err(|e| failed(format!("cannot wait: {e}")))?;
    let mut text = String::from_utf8_lossy(&out).into_owned();
    text.push_str(&String::from_utf8_lossy(&err));
    if let Ok(mut file) = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
    } {
        let _ = writeln!(file, "--- deployd: {shown} ---\n{text}");
    }
    if status.success() {
        Ok(())
    } else {
        Err(failed(format!("{status}\n{}", tail(&text))))
    }
}

fn tail(text: &str) -> String {
    let text = text.trim_end();
    let mut start = text.len().saturating_sub(OUTPUT_TAIL);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// Reads `python-dependencies` as llama_deploy 0.9 does: a `…requirements.txt` is installed
/// with `-r`, a path that exists in the source is installed from that path, anything else is a
/// requirement spec. Paths are relative to the deployment's root as in llama_deploy: in the
/// copy of a local source's folder, its leading folders are dropped one at a time until the
/// path is found. A path that resolves outside the source (a link) is refused.
fn resolve_dependencies(service: &ServiceSpec, workdir: &Path) -> Result<Vec<Dependency>, Error> {
    let root = workdir
        .canonicalize()
        .map_err(|err| Error::io("cannot open", workdir, err))?;
    let mut out = Vec::new();
    for dependency in &service.python_dependencies {
        let trimmed = dependency.trim();
        let found = find_in(service, &root, trimmed);
        let is_requirements = trimmed.ends_with("requirements.txt");
        match found {
            Some(path) => {
                let resolved = path
                    .canonicalize()
                    .map_err(|err| Error::io("cannot open", &path, err))?;
                if !resolved.starts_with(&root) {
                    return Err(Error::BadRequest(format!(
                        "service `{}`: python dependency `{trimmed}` resolves outside the \
                         service's source",
                        service.id
                    )));
                }
                out.push(if is_requirements || resolved.is_file() {
                    Dependency::Requirements(resolved)
                } else {
                    Dependency::Local(resolved)
                });
            }
            None if is_requirements => {
                return Err(Error::BadRequest(format!(
                    "service `{}`: requirements file `{trimmed}` is not in the service's source",
                    service.id
                )));
            }
            None => out.push(Dependency::Spec(trimmed.to_owned())),
        }
    }
    Ok(out)
}

/// Where `relative` (relative to the deployment's root) is in the synced source `root`: a
/// local source's folder is copied to `root`, so its location is dropped from the front of the
/// path; a git source is checked out at `root`, so the path stays as it is. `None` when there
/// is nothing at that place.
fn find_in(service: &ServiceSpec, root: &Path, relative: &str) -> Option<PathBuf> {
    let path = Path::new(relative);
    if path.is_absolute() || relative.contains("://") {
        return None;
    }
    let normal = |p: &Path| -> PathBuf {
        p.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    };
    let path = normal(path);
    let inside = match &service.source {
        Some(source) if source.kind == deployd_config::SourceKind::Local => {
            let location = normal(Path::new(&source.location));
            path.strip_prefix(&location)
                .map(Path::to_owned)
                .unwrap_or(path)
        }
        _ => path,
    };
    let full = root.join(inside);
    full.exists().then_some(full)
}

/// The installer's arguments: the default packages the dependencies do not name, then the
/// dependencies.
fn install_args(dependencies: &[Dependency]) -> Vec<String> {
    let named: Vec<String> = dependencies
        .iter()
        .filter_map(|d| match d {
            Dependency::Spec(spec) => Some(package_name(spec)),
            _ => None,
        })
        .collect();
    let mut args: Vec<String> = DEFAULT_PACKAGES
        .iter()
        .filter(|(name, _)| !named.iter().any(|n| n == name))
        .map(|(_, spec)| (*spec).to_owned())
        .collect();
    for dependency in dependencies {
        match dependency {
            Dependency::Requirements(path) => {
                args.push("-r".to_owned());
                args.push(path.to_string_lossy().into_owned());
            }
            Dependency::Local(path) => args.push(path.to_string_lossy().into_owned()),
            Dependency::Spec(spec) => args.push(spec.clone()),
        }
    }
    args
}

/// The normalized distribution name of a requirement spec (PEP 503: lowercase, runs of `-_.`
/// as `-`).
fn package_name(spec: &str) -> String {
    let end = spec
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(spec.len());
    let mut name = String::new();
    for c in spec[..end].chars() {
        let c = c.to_ascii_lowercase();
        if matches!(c, '-' | '_' | '.') {
            if !name.ends_with('-') {
                name.push('-');
            }
        } else {
            name.push(c);
        }
    }
    name
}

/// The environment's digest: the interpreter, the adapter, the default packages and every
/// dependency with the contents of the files it names.
fn digest(version: &str, dependencies: &[Dependency]) -> Result<String, Error> {
    let mut hash = Sha256::new();
    hash.update(b"deployd python environment 1\0");
    hash.update(version.as_bytes());
    hash.update(b"\0");
    for (path, text) in ADAPTER {
        hash.update(path.as_bytes());
        hash.update(text.as_bytes());
    }
    for (_, spec) in DEFAULT_PACKAGES {
        hash.update(spec.as_bytes());
        hash.update(b"\0");
    }
    for dependency in dependencies {
        match dependency {
            Dependency::Spec(spec) => {
                hash.update(b"spec\0");
                hash.update(spec.as_bytes());
            }
            Dependency::Requirements(path) | Dependency::Local(path) => {
                hash.update(b"path\0");
                hash_tree(&mut hash, path)?;
            }
        }
        hash.update(b"\0");
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Adds the files under `path` (or the file itself), names and contents, in a stable order.
/// Caches and virtualenvs inside a local package are left out.
fn hash_tree(hash: &mut Sha256, path: &Path) -> Result<(), Error> {
    let skipped = |name: &str| {
        matches!(
            name,
            "__pycache__" | ".git" | ".venv" | "venv" | "node_modules" | ".mypy_cache"
        ) || name.ends_with(".egg-info")
    };
    let walker = walkdir::WalkDir::new(path)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|entry| !skipped(&entry.file_name().to_string_lossy()));
    for entry in walker {
        let entry = entry.map_err(|err| Error::Io {
            action: "cannot read",
            path: path.to_owned(),
            source: err.into(),
        })?;
        if entry.file_type().is_file() {
            let relative = entry.path().strip_prefix(path).unwrap_or(entry.path());
            hash.update(relative.to_string_lossy().as_bytes());
            hash.update(b"\0");
            let bytes = std::fs::read(entry.path())
                .map_err(|err| Error::io("cannot read", entry.path(), err))?;
            hash.update(&bytes);
            hash.update(b"\0");
        }
    }
    Ok(())
}

/// Writes the adapter into `env_dir/deployd-adapter` (when it differs) and a `.pth` file into
/// `site_packages` that puts it on the interpreter's path.
fn install_adapter(env_dir: &Path, site_packages: &Path) -> Result<(), Error> {
    let folder = env_dir.join("deployd-adapter");
    for (relative, text) in ADAPTER {
        let path = folder.join(relative);
        if std::fs::read_to_string(&path).is_ok_and(|current| current == *text) {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|err| Error::io("cannot create", parent, err))?;
        }
        std::fs::write(&path, text).map_err(|err| Error::io("cannot write", &path, err))?;
    }
    let pth = site_packages.join("deployd_adapter.pth");
    let line = format!("{}\n", folder.display());
    if std::fs::read_to_string(&pth).ok().as_deref() != Some(line.as_str()) {
        std::fs::write(&pth, line).map_err(|err| Error::io("cannot write", &pth, err))?;
    }
    Ok(())
}

/// The shared `uv` lookup: one per Manager.
pub(crate) type UvCell = Arc<tokio::sync::OnceCell<Option<PathBuf>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_are_normalized() {
        for (spec, name) in [
            ("llama-index-core==0.12.1", "llama-index-core"),
            ("Llama_Index.Core>=0.12", "llama-index-core"),
            ("openai", "openai"),
            ("requests[socks]>=2", "requests"),
        ] {
            assert_eq!(package_name(spec), name, "{spec}");
        }
    }

    #[test]
    fn a_pinned_default_package_is_left_to_the_service() {
        let args = install_args(&[Dependency::Spec("llama-index-core==0.12.52".into())]);
        assert_eq!(
            args,
            [
                "llama-index-workflows>=0.2.1",
                "uvloop>=0.17",
                "llama-index-core==0.12.52"
            ]
        );
    }

    #[test]
    fn dependencies_as_llama_deploy_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("src");
        std::fs::create_dir_all(root.join("pkg")).unwrap();
        std::fs::write(root.join("requirements.txt"), "httpx\n").unwrap();
        std::fs::write(root.join("pkg/pyproject.toml"), "[project]\nname='p'\n").unwrap();
        let outside = dir.path().join("secret.txt");
        std::fs::write(&outside, "x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link-requirements.txt")).unwrap();
        let mut service = deployd_config::parse(
            "name: d\nservices:\n  svc:\n    import-path: src/w:wf\n    source:\n      \
             type: local\n      location: src\n",
            "d.yaml",
        )
        .unwrap()
        .spec
        .services
        .remove(0);
        service.python_dependencies = vec![
            "src/requirements.txt".into(),
            "./pkg".into(),
            "openai>=1".into(),
        ];
        let root_real = root.canonicalize().unwrap();
        assert_eq!(
            resolve_dependencies(&service, &root).unwrap(),
            [
                Dependency::Requirements(root_real.join("requirements.txt")),
                Dependency::Local(root_real.join("pkg")),
                Dependency::Spec("openai>=1".into()),
            ]
        );
        service.python_dependencies = vec!["link-requirements.txt".into()];
        let err = resolve_dependencies(&service, &root)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside"), "{err}");
        service.python_dependencies = vec!["missing/requirements.txt".into()];
        let err = resolve_dependencies(&service, &root)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing/requirements.txt"), "{err}");
    }

    #[test]
    fn the_digest_follows_the_contents_of_dependency_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("requirements.txt");
        std::fs::write(&file, "httpx\n").unwrap();
        let deps = [Dependency::Requirements(file.clone())];
        let first = digest("3.11", &deps).unwrap();
        assert_eq!(first, digest("3.11", &deps).unwrap());
        assert_ne!(first, digest("3.12", &deps).unwrap());
        std::fs::write(&file, "httpx==0.27\n").unwrap();
        assert_ne!(first, digest("3.11", &deps).unwrap());
    }
}
