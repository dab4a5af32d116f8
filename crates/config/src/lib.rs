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
//! instead, and [`parse_with_options`] also chooses what happens to the variables it does not
//! answer ([`Interpolation`]): a server parsing files sent by others should not hand them its
//! own environment. Diagnostics never show what a variable expanded to, only the text as
//! written.
//!
//! Parsing takes time linear in the size of the file, which is at most [`MAX_FILE_SIZE`]
//! bytes; no mapping or list holds more than [`MAX_ENTRIES`] entries.
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

/// The most entries one mapping (`env`, `services`, ...) or list (`env-files`,
/// `python-dependencies`, ...) may hold; more is an error naming the key.
///
/// A 4 MiB file holds about 100,000 `env` entries of 40 bytes; the limit leaves room for
/// files of shorter entries (down to 16 bytes each), and keeps any one collection to a
/// quarter of the YAML layer's budget of 1,000,000 nodes (keys included). Parsing is linear,
/// so the limit is not there for the parser's sake (an `env` of 250,000 entries parses in
/// about 0.2 s, 0.3 s through the full YAML parser) but to bound what one file can make the
/// server hold and hand on: one process environment, a folder and a port per service.
pub const MAX_ENTRIES: usize = 250_000;

/// Where `${VAR}` and `${VAR:-default}` in values get their value, and what becomes of the ones
/// that get none.
///
/// Whatever the choice, a diagnostic about a value written with `${` shows the text as written
/// (`${HOME}/x`), never what it expanded to; and the deployment's `name` and `default-service`
/// take a variable only with [`Interpolation::All`] (names become URL path segments and
/// directory names; service ids, being keys, never do).
///
/// ```
/// use deployd_config::{Interpolation, ParseOptions, parse_with_options};
///
/// let text = "name: demo\nservices:\n  api:\n    command: ./api --home ${HOME} --user ${USER:-nobody}\n";
/// let lookup = |name: &str| (name == "HOME").then(|| "/srv".to_owned());
/// let command = |interpolation| {
///     let options = ParseOptions::new(interpolation);
///     let spec = parse_with_options(text, "demo.yaml", &options).unwrap().spec;
///     format!("{:?}", spec.services[0].command.clone().unwrap())
/// };
/// assert_eq!(command(Interpolation::All(&lookup)), r#"Shell("./api --home /srv --user nobody")"#);
/// assert_eq!(command(Interpolation::Known(&lookup)), r#"Shell("./api --home /srv --user ${USER:-nobody}")"#);
/// assert_eq!(command(Interpolation::Off), r#"Shell("./api --home ${HOME} --user ${USER:-nobody}")"#);
/// ```
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum Interpolation<'a> {
    /// Every `${VAR}` is replaced by what `lookup` answers for `VAR`, and `${VAR:-default}` by
    /// `default` when the answer is `None` or empty. A variable without an answer nor a default
    /// is an error, and so are a `${` not closed by `}` and a `${…}` around something that is
    /// not a variable name. `$${` is a literal `${`.
    ///
    /// For files the server's operator wrote (read from the server's own disk at startup):
    /// what [`parse`] and [`parse_with`] do.
    All(&'a dyn Fn(&str) -> Option<String>),
    /// Only the variables `lookup` answers are replaced (`${VAR:-default}` as with
    /// [`Interpolation::All`] when it answers); every other `${…}`, with or without a
    /// default, is left exactly as written, and nothing about `${` is an error. `$${` is a
    /// literal `${`. `name` and `default-service` are read as written.
    ///
    /// For files sent over the network: llama_deploy does no `${}` expansion, so a `${…}` it
    /// would load literally loads literally here too, and only the variables the caller chose
    /// to offer are expanded.
    Known(&'a dyn Fn(&str) -> Option<String>),
    /// Values are read exactly as written: no `${…}` is replaced, and `$${` stays `$${`
    /// (llama_deploy's own behaviour).
    Off,
}

impl std::fmt::Debug for Interpolation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interpolation::All(_) => "All(..)",
            Interpolation::Known(_) => "Known(..)",
            Interpolation::Off => "Off",
        })
    }
}

/// How [`parse_with_options`] reads a file.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ParseOptions<'a> {
    /// What `${VAR}` in values becomes.
    pub interpolation: Interpolation<'a>,
}

impl<'a> ParseOptions<'a> {
    /// Options reading `${VAR}` as `interpolation` says.
    pub fn new(interpolation: Interpolation<'a>) -> Self {
        Self { interpolation }
    }
}

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

/// Like [`parse`], reading `${VAR}` from `lookup` (`None` for a variable that is not set):
/// [`parse_with_options`] with [`Interpolation::All`].
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
    parse_with_options(text, origin, &ParseOptions::new(Interpolation::All(lookup)))
}

/// Like [`parse`], reading `${VAR}` as `options` say: see [`Interpolation`] for the choices.
///
/// ```
/// use deployd_config::{Interpolation, ParseOptions, parse_with_options};
///
/// // A file sent over HTTP: only the variables offered are expanded, the rest stay as written.
/// let text = "name: demo\nservices:\n  api:\n    command: ./api\n    env:\n      REGION: ${REGION}\n      TOKEN: ${SERVER_TOKEN}\n";
/// let offered = |name: &str| (name == "REGION").then(|| "eu-west-1".to_owned());
/// let options = ParseOptions::new(Interpolation::Known(&offered));
/// let spec = parse_with_options(text, "demo.yaml", &options).unwrap().spec;
/// assert_eq!(spec.services[0].env["REGION"], "eu-west-1");
/// assert_eq!(spec.services[0].env["TOKEN"], "${SERVER_TOKEN}");
/// ```
pub fn parse_with_options(
    text: &str,
    origin: &str,
    options: &ParseOptions<'_>,
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
    let mut cx = Cx::new(origin, options.interpolation);
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
    let mut found = cx.into_found();
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
