//! The deployment file of deployd: its model, parsing, validation and diagnostics.
//!
//! [`parse`] turns the text of a deployment YAML (llama_deploy's format, in every spelling it
//! has used, plus deployd's own keys) into a validated [`DeploymentSpec`], or into
//! [`Diagnostics`] that name every problem with its file, line, column and key path.
//! [`Diagnostic::render`] and [`Diagnostics::render`] write them as rustc does.
//! [`json_schema`] is the JSON Schema of the file, and [`DeploymentSpec::to_yaml`] writes a spec
//! back as a file.
//!
//! The crate does no file or network IO: the caller reads the file and hands its text in,
//! together with the name to report it under. The one thing read from outside is the process
//! environment, for `${VAR}` in values, and only by [`parse`]: [`parse_with`] takes the lookup
//! instead (a server parsing files sent by others should not hand them its own environment).
//!
//! ```
//! let text = "name: quickstart\nservices:\n  echo:\n    command: python3 echo.py\n    port: 8080\n";
//! let loaded = deployd_config::parse(text, "deployment.yaml").unwrap();
//! assert_eq!(loaded.spec.default_service, "echo");
//! assert_eq!(loaded.spec.services[0].port, Some(8080));
//!
//! let broken = "name: quickstart\nservices:\n  echo:\n    comand: python3 echo.py\n";
//! let diagnostics = deployd_config::parse(broken, "deployment.yaml").unwrap_err();
//! assert_eq!(
//!     diagnostics.items[0].to_string(),
//!     "deployment.yaml:4:5: error: `services.echo.comand`: unknown key `comand` in a service \
//!      (did you mean `command`?)"
//! );
//! ```

mod decode;
mod diagnostic;
mod fast;
mod raw;
mod schema;
mod spec;
mod validate;
mod write;
mod yaml;

pub use diagnostic::{Diagnostic, Diagnostics, Severity, render_all};
pub use spec::{
    Command, DeploymentSpec, HealthSpec, MessageQueueSpec, RestartPolicy, RestartSpec, Runtime,
    ServiceSpec, SourceKind, SourceSpec, StateStoreSpec, SyncPolicy, UiSpec,
};

use decode::{Cx, Decode};
use yaml::Span;

/// The largest deployment file accepted, in bytes.
pub const MAX_FILE_SIZE: usize = 4 * 1024 * 1024;

/// A parsed deployment, with the warnings found on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The validated deployment.
    pub spec: DeploymentSpec,
    /// Problems that did not stop the file from loading (keys accepted and ignored, ...), in
    /// the order of the file.
    pub warnings: Vec<Diagnostic>,
}

/// Parses and validates the deployment file `text`, reported as `origin` (usually its path).
///
/// `${VAR}` and `${VAR:-default}` in values are read from the process environment; use
/// [`parse_with`] to choose where they come from. Every problem found is reported, not only the
/// first.
pub fn parse(text: &str, origin: &str) -> Result<Loaded, Diagnostics> {
    parse_with(text, origin, &|name| std::env::var(name).ok())
}

/// Like [`parse`], reading `${VAR}` from `lookup` (`None` for a variable that is not set).
///
/// ```
/// let text = "name: demo\nservices:\n  api:\n    command: ./api\n    port: ${PORT:-8080}\n    env:\n      TOKEN: ${TOKEN}\n";
/// let lookup = |name: &str| (name == "TOKEN").then(|| "s3cret".to_owned());
/// let spec = deployd_config::parse_with(text, "demo.yaml", &lookup).unwrap().spec;
/// assert_eq!(spec.services[0].port, Some(8080));
/// assert_eq!(spec.services[0].env["TOKEN"], "s3cret");
///
/// let none = |_: &str| None;
/// let err = deployd_config::parse_with(text, "demo.yaml", &none).unwrap_err();
/// assert_eq!(err.items[0].message, "environment variable `TOKEN` is not set");
/// ```
pub fn parse_with(
    text: &str,
    origin: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, Diagnostics> {
    if text.len() > MAX_FILE_SIZE {
        return Err(Diagnostics::one(Diagnostic::error(
            origin,
            format!(
                "the file is {} bytes; the largest accepted is {MAX_FILE_SIZE}",
                text.len()
            ),
        )));
    }
    let mut cx = Cx::new(origin, lookup);
    let (tree, problems) = yaml::parse(text);
    for problem in problems {
        cx.report_at(
            Severity::Error,
            &problem.path,
            problem.span,
            problem.message,
            None,
        );
    }
    let spec = match tree {
        Err(problem) => {
            cx.report_at(
                Severity::Error,
                &problem.path,
                problem.span,
                problem.message,
                None,
            );
            None
        }
        Ok(None) => {
            cx.report_at(
                Severity::Error,
                "",
                Span {
                    line: 1,
                    column: 1,
                    end_line: 1,
                    end_column: 1,
                },
                "the file is empty: a deployment needs a `name` and `services`".to_owned(),
                None,
            );
            None
        }
        Ok(Some(root)) => raw::RawDeployment::decode(&root, &mut cx)
            .and_then(|raw| validate::validate(raw, root.span, &mut cx)),
    };
    let mut found = cx.found;
    // In the order of the file; diagnostics without a place come last.
    found.sort_by_key(|d| (d.line.is_none(), d.line, d.column));
    match spec {
        Some(spec) if !found.iter().any(|d| d.severity == Severity::Error) => Ok(Loaded {
            spec,
            warnings: found,
        }),
        _ => Err(Diagnostics { items: found }),
    }
}

/// The JSON Schema (draft 2020-12) of the deployment file, pretty-printed with sorted keys and
/// a final newline; the same text on every call.
///
/// It is derived from the types the parser reads the file into, and checked in as
/// `docs/deployment.schema.json` (`cargo xtask codegen` writes it).
pub fn json_schema() -> String {
    schema::generate()
}
