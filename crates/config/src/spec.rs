use std::collections::BTreeMap;

/// A validated deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentSpec {
    /// The deployment's name: a URL path segment, topic and directory name.
    pub name: String,
    /// The service that takes tasks that name none; always one of `services`.
    pub default_service: String,
    /// The services, in the order of the file.
    pub services: Vec<ServiceSpec>,
}

impl DeploymentSpec {
    /// The service with id `id`.
    pub fn service(&self, id: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.id == id)
    }
}

/// One service of a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The key of the service under `services`: a URL path segment, topic and directory name.
    pub id: String,
    /// Display name.
    pub name: Option<String>,
    /// Where the service's code comes from; without one the service runs in an empty folder.
    pub source: Option<SourceSpec>,
    /// `module/path:attribute` of a Python workflow (llama_deploy's `path` / `import-path`).
    pub import_path: Option<String>,
    /// How to start the service.
    pub command: Option<Command>,
    /// The port the service listens on; allocated by deployd when absent.
    pub port: Option<u16>,
    /// Environment variables given to the service's process.
    pub env: BTreeMap<String, String>,
}

/// How to start a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A command line run by `/bin/sh -c`.
    Shell(String),
    /// A program and its arguments, run directly.
    Argv(Vec<String>),
}

/// Where a service's code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// Git or local.
    pub kind: SourceKind,
    /// For a local source, a folder relative to the deployment file, never escaping it;
    /// for git, the repository URL (possibly with `@ref`).
    pub location: String,
}

/// The kinds of source deployd syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceKind {
    /// A folder next to the deployment file, copied into the deployment's directory.
    Local,
    /// A git repository.
    Git,
}
