//! The deployment file of deployd: its model, parsing, validation and diagnostics.
//!
//! [`parse`] turns the text of a deployment YAML (llama_deploy's format plus deployd's own keys)
//! into a validated [`DeploymentSpec`], or into [`Diagnostics`] that name every problem with its
//! location. The crate does no IO: the caller reads the file and hands its text in, together with
//! the name to report it under.

mod diagnostic;
mod raw;
mod spec;
mod validate;

pub use diagnostic::{Diagnostic, Diagnostics, Severity};
pub use spec::{Command, DeploymentSpec, ServiceSpec, SourceKind, SourceSpec};

/// The largest deployment file accepted, in bytes.
pub const MAX_FILE_SIZE: usize = 4 * 1024 * 1024;

/// A parsed deployment, with the warnings found on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The validated deployment.
    pub spec: DeploymentSpec,
    /// Problems that did not stop the file from loading (keys accepted and ignored, ...).
    pub warnings: Vec<Diagnostic>,
}

/// Parses and validates the deployment file `text`, reported as `origin` (usually its path).
///
/// Every problem found is reported, not only the first.
pub fn parse(text: &str, origin: &str) -> Result<Loaded, Diagnostics> {
    if text.len() > MAX_FILE_SIZE {
        return Err(Diagnostics::one(Diagnostic::error(
            origin,
            format!(
                "the file is {} bytes; the largest accepted is {MAX_FILE_SIZE}",
                text.len()
            ),
        )));
    }
    let raw: raw::RawDeployment = match serde_yaml::from_str(text) {
        Ok(raw) => raw,
        Err(err) => return Err(Diagnostics::one(Diagnostic::from_yaml(origin, &err))),
    };
    validate::validate(raw, text, origin)
}
