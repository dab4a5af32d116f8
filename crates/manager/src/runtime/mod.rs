//! The `Runtime` seam: how a service's environment is prepared from its synced source and how
//! its instances are started.
//!
//! Two runtimes: [`process`] runs the service's own `command`, which speaks the service protocol
//! itself; [`python`] makes a virtualenv for the service (cached by a digest of its
//! dependencies) and runs deployd's Python adapter, which serves the llama-index workflow its
//! `import-path` names. The deploy pipeline, the worker and the supervisor know only this
//! module's types: what a runtime prepared ([`Prepared`]) and the instance it launched (a
//! supervised process whose state carries its endpoint). A third runtime (Rust graphs served
//! in process) adds an implementation here and touches neither the worker nor the pipeline.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use deployd_config::{Command, ServiceSpec};

use crate::Error;
use crate::prepare::BuildMarks;
use crate::supervisor::{Policy, ProcessSpec, Supervisor};

pub(crate) mod process;
pub(crate) mod python;

/// What preparing a service needs.
pub(crate) struct Prepare<'a> {
    pub(crate) service: &'a ServiceSpec,
    /// The service's synced source: where it is built and started.
    pub(crate) workdir: &'a Path,
    /// The process environment so far (deployd's variables, `env`, `env-files`).
    pub(crate) env: Vec<(String, String)>,
    /// The deployment's folder under the data directory.
    pub(crate) deployment_dir: &'a Path,
    /// Where build output goes.
    pub(crate) build_log: &'a Path,
    pub(crate) marks: &'a BuildMarks,
}

/// How to start a prepared service.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) command: Command,
    /// The whole environment of its process.
    pub(crate) env: Vec<(String, String)>,
}

/// Prepares services of one kind and starts their instances.
#[async_trait]
pub(crate) trait Runtime: Send + Sync {
    /// The runtime's name, for messages.
    fn name(&self) -> &'static str;

    /// Makes the service's environment ready in its synced source (build commands, a
    /// virtualenv); returns how to start an instance. Skips what is unchanged since last time.
    async fn prepare(&self, request: Prepare<'_>) -> Result<Prepared, Error>;

    /// Starts a supervised instance. Its state (phase, port) is the instance's endpoint; it
    /// takes tasks once its state is `ready`; `stop` ends it (the worker drains it first).
    fn launch(
        &self,
        service: &ServiceSpec,
        prepared: Prepared,
        workdir: PathBuf,
        port: u16,
        log: PathBuf,
        policy: Policy,
    ) -> Supervisor {
        Supervisor::start(
            ProcessSpec {
                service: service.id.clone(),
                command: prepared.command,
                workdir,
                env: prepared.env,
                port,
                log,
            },
            policy,
        )
    }
}

/// Settings the runtimes share, from the Manager's options.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The Manager's data directory: tools and caches live under it.
    pub(crate) data_dir: PathBuf,
    /// The Python interpreter new virtualenvs are made from.
    pub(crate) python: String,
    /// Where `uv` is, once looked for.
    pub(crate) uv: python::UvCell,
}

/// The runtime a service runs with.
pub(crate) fn of(service: &ServiceSpec, settings: &Settings) -> Box<dyn Runtime> {
    match service.runtime {
        deployd_config::Runtime::Python => Box::new(python::Python::new(settings.clone())),
        _ => Box::new(process::Process),
    }
}
