//! From the YAML tree to the typed file as written ([`crate::raw`]), reporting every problem.
//!
//! Decoding never stops at the first mistake: a value of the wrong type, an unknown key or a
//! missing variable is reported where it was written and the value is left out, so the rest of
//! the file is still read and checked.
//!
//! `${VAR}` in scalar values is expanded here, as [`Interpolation`] says. A value written with
//! `${` remembers its text as written ([`At::written`]): every diagnostic about it shows that
//! text, never what it expanded to (the server's environment must not come back in the
//! answer to a file sent over the network).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::Interpolation;
use crate::diagnostic::{Diagnostic, Severity};
use crate::raw::Field;
use crate::yaml::{Entry, Node, Span, Value, is_null_text};

/// Reads variables for `${VAR}` in values.
pub(crate) type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A dotted key path (`services.echo.port`), cheap to make for every value decoded: the path
/// of the mapping is shared by its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyPath {
    parent: Rc<str>,
    leaf: Option<&'static str>,
}

impl KeyPath {
    pub(crate) fn new(path: &str) -> Self {
        Self {
            parent: Rc::from(path),
            leaf: None,
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.parent)?;
        if let Some(leaf) = self.leaf {
            if !self.parent.is_empty() {
                f.write_str(".")?;
            }
            f.write_str(leaf)?;
        }
        Ok(())
    }
}

/// Where a decoded value was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct At {
    /// The dotted key path (`services.echo.port`).
    pub(crate) path: KeyPath,
    /// The value.
    pub(crate) span: Span,
    /// The key the value is written under, when it has one.
    pub(crate) key_span: Option<Span>,
    /// The scalar as written, when it has a `${` (so its value may come from a variable):
    /// what diagnostics show instead of the value.
    pub(crate) written: Option<Rc<str>>,
}

impl At {
    /// How a diagnostic shows `value`, decoded from here: the text as written when it has a
    /// `${`, else the value.
    pub(crate) fn show(&self, value: impl fmt::Display) -> String {
        match &self.written {
            Some(written) => written.to_string(),
            None => value.to_string(),
        }
    }
}

/// The text of a scalar as written, when it has a `${`.
pub(crate) fn written<'n>(node: &'n Node<'_>) -> Option<&'n str> {
    match &node.value {
        Value::Scalar(scalar) if scalar.text.contains("${") => Some(&scalar.text),
        _ => None,
    }
}

/// A decoded value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Located<T> {
    pub(crate) value: T,
    pub(crate) at: At,
}

impl<T: fmt::Display> Located<T> {
    /// The value as a diagnostic shows it: see [`At::show`].
    pub(crate) fn shown(&self) -> String {
        self.at.show(&self.value)
    }
}

impl<T: JsonSchema> JsonSchema for Located<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// The decoding context: diagnostics found so far, the current key path, the environment.
pub(crate) struct Cx<'a> {
    pub(crate) origin: &'a str,
    /// Every diagnostic so far; only [`Cx::report_at`] adds to it, keeping the indexes below.
    found: Vec<Diagnostic>,
    /// How many of `found` are errors.
    errors: usize,
    /// The key path of every error in `found`, and every path it is under (`services.a` and
    /// `services` for `services.a.port`): [`Cx::error_under`] in constant time.
    error_paths: HashSet<String>,
    /// For every diagnostic with a "did you mean" help: the path of the mapping its key is in,
    /// and the help ([`Cx::suggested`]).
    suggestions: HashSet<(String, String)>,
    /// The current key path, dotted, and where each of its steps starts.
    path: String,
    steps: Vec<usize>,
    interpolation: Interpolation<'a>,
    /// A name is being read (`name`, `default-service`): variables only with
    /// [`Interpolation::All`].
    reading_name: bool,
    /// For the schema drift test: every mapping kind decoded and the keys it knows.
    #[cfg(test)]
    pub(crate) recorded: Vec<(&'static str, Vec<&'static str>)>,
}

impl<'a> Cx<'a> {
    pub(crate) fn new(origin: &'a str, interpolation: Interpolation<'a>) -> Self {
        Self {
            origin,
            found: Vec::new(),
            errors: 0,
            error_paths: HashSet::new(),
            suggestions: HashSet::new(),
            path: String::new(),
            steps: Vec::new(),
            interpolation,
            reading_name: false,
            #[cfg(test)]
            recorded: Vec::new(),
        }
    }

    /// The diagnostics found, in the order they were.
    pub(crate) fn into_found(self) -> Vec<Diagnostic> {
        self.found
    }

    /// How many errors were reported so far.
    pub(crate) fn errors(&self) -> usize {
        self.errors
    }

    /// Whether an error was reported at `path` or under it (`path.…`, `path[…]`).
    pub(crate) fn error_under(&self, path: &str) -> bool {
        self.error_paths.contains(path)
    }

    /// Whether an unknown key of the mapping at `parent` was reported as a likely typo of
    /// `key`.
    pub(crate) fn suggested(&self, parent: &str, key: &str) -> bool {
        self.suggestions
            .contains(&(parent.to_owned(), format!("did you mean `{key}`?")))
    }

    /// The current key path, dotted.
    pub(crate) fn path(&self) -> String {
        self.path.clone()
    }

    fn at(&self, node: &Node, key_span: Option<Span>) -> At {
        At {
            path: KeyPath::new(&self.path),
            span: node.span,
            key_span,
            written: written(node).map(Rc::from),
        }
    }

    /// Steps into the value of `key`.
    pub(crate) fn push_key(&mut self, key: &str) {
        self.steps.push(self.path.len());
        if !self.path.is_empty() {
            self.path.push('.');
        }
        self.path.push_str(key);
    }

    /// Steps into the item at `index` of a list.
    pub(crate) fn push_index(&mut self, index: usize) {
        self.steps.push(self.path.len());
        self.path.push('[');
        self.path.push_str(&index.to_string());
        self.path.push(']');
    }

    /// Steps back out.
    pub(crate) fn pop(&mut self) {
        if let Some(start) = self.steps.pop() {
            self.path.truncate(start);
        }
    }

    /// Reports a problem at `span` under the current key path.
    pub(crate) fn report(
        &mut self,
        severity: Severity,
        span: Span,
        message: String,
        help: Option<String>,
    ) {
        let path = self.path();
        self.report_at(severity, &path, span, message, help);
    }

    /// Reports a problem at `span` under `path`.
    pub(crate) fn report_at(
        &mut self,
        severity: Severity,
        path: &str,
        span: Span,
        message: String,
        help: Option<String>,
    ) {
        let mut diagnostic = Diagnostic::error(self.origin, message).at_span(span);
        diagnostic.severity = severity;
        if !path.is_empty() {
            diagnostic = diagnostic.at_key(path);
            if severity == Severity::Error {
                for (end, c) in path.char_indices() {
                    if matches!(c, '.' | '[') && !self.error_paths.contains(&path[..end]) {
                        self.error_paths.insert(path[..end].to_owned());
                    }
                }
                if !self.error_paths.contains(path) {
                    self.error_paths.insert(path.to_owned());
                }
            }
            if let Some(help) = help.as_deref().filter(|h| h.starts_with("did you mean `")) {
                let parent = path.rsplit_once('.').map_or("", |(parent, _)| parent);
                self.suggestions
                    .insert((parent.to_owned(), help.to_owned()));
            }
        }
        if severity == Severity::Error {
            self.errors += 1;
        }
        diagnostic.help = help;
        self.found.push(diagnostic);
    }

    pub(crate) fn error(&mut self, span: Span, message: String) {
        self.report(Severity::Error, span, message, None);
    }

    /// The text of a scalar value with `${VAR}` and `${VAR:-default}` replaced, as
    /// `self.interpolation` says.
    fn interpolate(&mut self, node: &Node, text: &str) -> Option<String> {
        if !text.contains('$') {
            return Some(text.to_owned());
        }
        let (lookup, strict) = match self.interpolation {
            Interpolation::All(lookup) => (lookup, true),
            _ if self.reading_name => return Some(text.to_owned()),
            Interpolation::Known(lookup) => (lookup, false),
            Interpolation::Off => return Some(text.to_owned()),
        };
        match interpolate(text, lookup, strict) {
            Ok(value) => Some(value),
            Err(problem) => {
                let (message, help) = match problem {
                    Problem::Missing(name) => (
                        format!("environment variable `{name}` is not set"),
                        Some(format!("set it, or give a default: `${{{name}:-default}}`")),
                    ),
                    Problem::Unclosed => (
                        "`${` is not closed by `}`".to_owned(),
                        Some("write `$${` for a literal `${`".to_owned()),
                    ),
                    Problem::BadName(name) => (
                        format!("`{name}` is not a variable name"),
                        Some(
                            "a variable name has letters, digits and `_` and does not start \
                             with a digit"
                                .to_owned(),
                        ),
                    ),
                };
                self.report(Severity::Error, node.span, message, help);
                None
            }
        }
    }

    /// The text of a scalar, interpolated; reports anything else.
    fn scalar_text(&mut self, node: &Node, expected: &str) -> Option<String> {
        match &node.value {
            Value::Scalar(scalar) if !(scalar.plain && is_null_text(&scalar.text)) => {
                self.interpolate(node, &scalar.text)
            }
            _ => {
                self.mismatch(node, expected);
                None
            }
        }
    }

    fn mismatch(&mut self, node: &Node, expected: &str) {
        let message = format!("expected {expected}, found {}", node.describe());
        self.error(node.span, message);
    }
}

/// Why a `${…}` could not be expanded.
#[derive(Debug, PartialEq, Eq)]
enum Problem {
    Missing(String),
    Unclosed,
    BadName(String),
}

/// Replaces `${VAR}` and `${VAR:-default}` (the default when `VAR` is unset or empty); `$${`
/// is a literal `${`, and any other `$` stays as it is.
///
/// When `strict` is off, a `${…}` that cannot be expanded (`VAR` unset, with a default or not;
/// not a variable name; no closing `}`) is kept as written instead of being a problem.
fn interpolate(text: &str, lookup: Lookup<'_>, strict: bool) -> Result<String, Problem> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let Some(end) = tail.find('}') else {
                if strict {
                    return Err(Problem::Unclosed);
                }
                out.push_str(&rest[dollar..]);
                return Ok(out);
            };
            let inner = &tail[..end];
            let as_written = &rest[dollar..dollar + end + 3];
            rest = &tail[end + 1..];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                if strict {
                    return Err(Problem::BadName(name.to_owned()));
                }
                out.push_str(as_written);
                continue;
            }
            match (lookup(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, _) if !strict => out.push_str(as_written),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(Problem::Missing(name.to_owned())),
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Escapes text so that [`interpolate`] gives it back unchanged (with [`Interpolation::All`]
/// and [`Interpolation::Known`]).
pub(crate) fn escape_interpolation(text: &str) -> Cow<'_, str> {
    if text.contains("${") {
        Cow::Owned(text.replace("${", "$${"))
    } else {
        Cow::Borrowed(text)
    }
}

/// A type read from a node of the tree.
pub(crate) trait Decode: Sized {
    /// Reads `node`; on a mistake, reports it and returns `None`.
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self>;
}

impl Decode for String {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        cx.scalar_text(node, "a string")
    }
}

impl Decode for bool {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let text = cx.scalar_text(node, "`true` or `false`")?;
        match text.as_str() {
            "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
            "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
            _ => {
                cx.mismatch(node, "`true` or `false`");
                None
            }
        }
    }
}

/// Reads an integer: decimal, `0x…` or `0o…`, with an optional sign.
pub(crate) fn parse_integer(text: &str) -> Option<i64> {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let magnitude = if let Some(hex) = digits.strip_prefix("0x") {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        i64::from_str_radix(hex, 16).ok()?
    } else if let Some(octal) = digits.strip_prefix("0o") {
        if octal.is_empty() || !octal.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return None;
        }
        i64::from_str_radix(octal, 8).ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()?
    } else {
        return None;
    };
    Some(if negative { -magnitude } else { magnitude })
}

impl Decode for i64 {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let text = cx.scalar_text(node, "an integer")?;
        let value = parse_integer(text.trim());
        if value.is_none() {
            cx.mismatch(node, "an integer");
        }
        value
    }
}

impl Decode for f64 {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let text = cx.scalar_text(node, "a number")?;
        let text = text.trim();
        let value = parse_integer(text)
            .map(|i| i as f64)
            .or_else(|| parse_float(text));
        if value.is_none() {
            cx.mismatch(node, "a number");
        }
        value
    }
}

fn parse_float(text: &str) -> Option<f64> {
    let lower = text.to_ascii_lowercase();
    let body = lower.trim_start_matches(['+', '-']);
    if body.is_empty() || body.starts_with("inf") || body.starts_with("nan") {
        return None;
    }
    text.parse().ok().filter(|f: &f64| f.is_finite())
}

impl<T: Decode> Decode for Vec<T> {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let Value::Seq(items) = &node.value else {
            cx.mismatch(node, "a list");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut failed = false;
        for (index, item) in items.iter().enumerate() {
            cx.push_index(index);
            match T::decode(item, cx) {
                Some(value) => out.push(value),
                None => failed = true,
            }
            cx.pop();
        }
        (!failed).then_some(out)
    }
}

/// A mapping of names (service ids, variable names) to values, in the order of the file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Named<T>(pub(crate) Vec<(Located<String>, Option<T>)>);

impl<T: Decode> Decode for Named<T> {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let Value::Map(entries) = &node.value else {
            cx.mismatch(node, "a mapping");
            return None;
        };
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            cx.push_key(&entry.key);
            let value = T::decode(&entry.value, cx);
            let name = Located {
                value: entry.key.clone().into_owned(),
                at: At {
                    path: KeyPath::new(&cx.path),
                    span: entry.key_span,
                    key_span: Some(entry.key_span),
                    written: None,
                },
            };
            cx.pop();
            out.push((name, value));
        }
        Some(Named(out))
    }
}

impl<T: JsonSchema> JsonSchema for Named<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("Named_{}", T::schema_name()).into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let values = generator.subschema_for::<T>();
        json_schema!({
            "type": "object",
            "additionalProperties": values,
        })
    }
}

impl<T: Decode> Decode for Located<T> {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let value = T::decode(node, cx)?;
        Some(Located {
            value,
            at: cx.at(node, None),
        })
    }
}

/// Anything: read and not looked at (keys deployd accepts and ignores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Any;

impl Decode for Any {
    fn decode(_: &Node, _: &mut Cx<'_>) -> Option<Self> {
        Some(Any)
    }
}

impl JsonSchema for Any {
    fn schema_name() -> Cow<'static, str> {
        "Any".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!(true)
    }
}

/// A length of time: `30s`, `100ms`, `2m`, `1h`, `1.5s`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawDuration(pub(crate) Duration);

impl Decode for RawDuration {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let text = cx.scalar_text(node, "a duration")?;
        match parse_duration(text.trim()) {
            Some(duration) => Some(RawDuration(duration)),
            None => {
                let message = format!("expected a duration, found {}", node.describe());
                cx.report(
                    Severity::Error,
                    node.span,
                    message,
                    Some("write a number and a unit: `500ms`, `30s`, `2m`, `1h`".to_owned()),
                );
                None
            }
        }
    }
}

impl JsonSchema for RawDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A length of time: a number and a unit (`ns`, `us`, `ms`, `s`, `m`, `h`), or a number of seconds.",
            "anyOf": [
                {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h)$"},
                {"type": "number", "minimum": 0}
            ],
            "examples": ["30s", "100ms", "2m"]
        })
    }
}

/// Parses `30s`, `1.5s`, `100ms`, `2m`, `1h`, `250us`, `10ns` or a number of seconds.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let nanos_per_unit: u128 = match unit.trim() {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.') || whole.len() > 20 || fraction.len() > 18 {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let mut nanos = whole.checked_mul(nanos_per_unit)?;
    if !fraction.is_empty() {
        let digits: u128 = fraction.parse().ok()?;
        let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
        nanos = nanos.checked_add(digits.checked_mul(nanos_per_unit)? / scale)?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    let sub = u32::try_from(nanos % 1_000_000_000).ok()?;
    Some(Duration::new(secs, sub))
}

/// Writes a duration so that [`parse_duration`] reads it back exactly.
pub(crate) fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    for (unit, per) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if nanos >= per && nanos.is_multiple_of(per) {
            return format!("{}{unit}", nanos / per);
        }
    }
    format!("{nanos}ns")
}

/// A word out of a fixed set (`local`, `git`, ...).
pub(crate) trait Keyword: Sized + Copy + 'static {
    /// What the word names, for messages ("a source type").
    const WHAT: &'static str;
    /// Every word and its value.
    const ALL: &'static [(&'static str, Self)];

    fn word(self) -> &'static str
    where
        Self: PartialEq,
    {
        Self::ALL
            .iter()
            .find(|(_, v)| *v == self)
            .map_or("", |(w, _)| w)
    }
}

impl<K: Keyword> Decode for K {
    fn decode(node: &Node, cx: &mut Cx<'_>) -> Option<Self> {
        let text = cx.scalar_text(node, K::WHAT)?;
        if let Some((_, value)) = K::ALL.iter().find(|(word, _)| fold(word) == fold(&text)) {
            return Some(*value);
        }
        // Neither the message nor the suggestion may tell what a variable expanded to.
        let shown = written(node).unwrap_or(&text);
        let words: Vec<&str> = K::ALL.iter().map(|(w, _)| *w).collect();
        let help = match suggest(shown, &words) {
            Some(best) => format!("did you mean `{best}`?"),
            None => format!("use one of {}", list(&words)),
        };
        cx.report(
            Severity::Error,
            node.span,
            format!("`{shown}` is not {}", K::WHAT),
            Some(help),
        );
        None
    }
}

/// `a`, `b` and `c`.
pub(crate) fn list(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Keys compare with `_` and `-` as the same character: llama_deploy has used both.
pub(crate) fn fold(key: &str) -> Cow<'_, str> {
    if key.contains('_') {
        Cow::Owned(key.replace('_', "-"))
    } else {
        Cow::Borrowed(key)
    }
}

/// Whether two keys are the same, `_` and `-` being the same character.
pub(crate) fn same_key(a: &str, b: &str) -> bool {
    let norm = |c: u8| if c == b'_' { b'-' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| norm(x) == norm(y))
}

/// The candidate closest to `word`, when it is close enough to be a likely typo.
pub(crate) fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    // The distance is at least the difference in length: a word much longer than every
    // candidate is close to none, and the distance (quadratic in time and memory) is not
    // worth computing.
    let longest = candidates.iter().map(|c| c.chars().count()).max()?;
    if word.chars().count() > 2 * longest + 1 {
        return None;
    }
    let word = fold(word).to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&word, &fold(c)), *c))
        .filter(|(distance, candidate)| {
            *distance <= (candidate.chars().count() / 3).max(1)
                || (word.len() >= 3 && fold(candidate).contains(word.as_str()))
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// Reads the keys of a mapping, reporting unknown keys and keys written in two spellings.
pub(crate) struct MapReader<'n> {
    kind: &'static str,
    /// The mapping's own key path.
    parent: Rc<str>,
    entries: &'n [Entry<'n>],
    used: Vec<bool>,
    known: Vec<&'static str>,
}

impl<'n> MapReader<'n> {
    /// Starts reading `node` as a `kind` ("service", ...); reports anything but a mapping.
    pub(crate) fn new(node: &'n Node<'n>, cx: &mut Cx<'_>, kind: &'static str) -> Option<Self> {
        match &node.value {
            Value::Map(entries) => Some(Self {
                kind,
                parent: Rc::from(cx.path.as_str()),
                entries,
                used: vec![false; entries.len()],
                known: Vec::with_capacity(24),
            }),
            _ => {
                let message = format!("expected a mapping ({kind}), found {}", node.describe());
                cx.error(node.span, message);
                None
            }
        }
    }

    /// The entry written under `name` (any spelling) or one of its `aliases`.
    fn entry(
        &mut self,
        cx: &mut Cx<'_>,
        name: &'static str,
        aliases: &[&'static str],
    ) -> Option<&'n Entry<'n>> {
        self.known.push(name);
        self.known.extend_from_slice(aliases);
        let mut found: Option<&'n Entry<'n>> = None;
        for (index, entry) in self.entries.iter().enumerate() {
            if !same_key(&entry.key, name) && !aliases.iter().any(|a| same_key(&entry.key, a)) {
                continue;
            }
            self.used[index] = true;
            match found {
                None => found = Some(entry),
                Some(first) => {
                    cx.push_key(name);
                    cx.report(
                        Severity::Error,
                        entry.key_span,
                        format!(
                            "`{}` is another spelling of `{}`, already given on line {}",
                            entry.key, first.key, first.key_span.line
                        ),
                        Some("keep one of the two".to_owned()),
                    );
                    cx.pop();
                }
            }
        }
        found
    }

    /// Reads the optional key `name`; a key without a value (`name:`) counts as absent.
    pub(crate) fn field<T: Decode>(
        &mut self,
        cx: &mut Cx<'_>,
        name: &'static str,
    ) -> Option<Located<T>> {
        self.field_or(cx, name, &[])
    }

    /// Like [`Self::field`], for a key whose value is a name or names one (`name`,
    /// `default-service`): it takes variables only with [`Interpolation::All`], and is read as
    /// written otherwise.
    pub(crate) fn name_field(&mut self, cx: &mut Cx<'_>, name: &'static str) -> Field<String> {
        cx.reading_name = true;
        let value = self.field(cx, name);
        cx.reading_name = false;
        value
    }

    /// Like [`Self::field`], also accepting older names of the key.
    pub(crate) fn field_or<T: Decode>(
        &mut self,
        cx: &mut Cx<'_>,
        name: &'static str,
        aliases: &[&'static str],
    ) -> Option<Located<T>> {
        let entry = self.entry(cx, name, aliases)?;
        if entry.value.is_null() {
            return None;
        }
        cx.push_key(name);
        let value = T::decode(&entry.value, cx);
        cx.pop();
        value.map(|value| Located {
            value,
            at: At {
                path: KeyPath {
                    parent: self.parent.clone(),
                    leaf: Some(name),
                },
                span: entry.value.span,
                key_span: Some(entry.key_span),
                written: written(&entry.value).map(Rc::from),
            },
        })
    }

    /// Reports every key no field asked for; `x-…` keys pass when `extensions` is set.
    pub(crate) fn finish(self, cx: &mut Cx<'_>, extensions: bool) {
        #[cfg(test)]
        cx.recorded.push((self.kind, self.known.clone()));
        for (entry, used) in self.entries.iter().zip(&self.used) {
            if *used || (extensions && entry.key.starts_with("x-")) {
                continue;
            }
            let help = match suggest(&entry.key, &self.known) {
                Some(best) => format!("did you mean `{best}`?"),
                None => format!(
                    "the keys of {} are {}",
                    article(self.kind),
                    list_all(&self.known)
                ),
            };
            cx.push_key(&entry.key);
            cx.report(
                Severity::Error,
                entry.key_span,
                format!("unknown key `{}` in {}", entry.key, article(self.kind)),
                Some(help),
            );
            cx.pop();
        }
    }
}

fn list_all(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
    quoted.join(", ")
}

fn article(kind: &str) -> String {
    if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {kind}")
    } else {
        format!("a {kind}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/home/me".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolation() {
        let ok = |text: &str| interpolate(text, &env, true).unwrap();
        assert_eq!(ok("${HOME}/x"), "/home/me/x");
        assert_eq!(ok("${NOPE:-a:b}"), "a:b");
        assert_eq!(ok("${EMPTY:-d}"), "d");
        assert_eq!(ok("${EMPTY}"), "");
        assert_eq!(ok("$HOME $$ $${HOME}"), "$HOME $$ ${HOME}");
        assert_eq!(ok("${NOPE:-}"), "");
        assert_eq!(
            interpolate("${NOPE}", &env, true),
            Err(Problem::Missing("NOPE".into()))
        );
        assert_eq!(interpolate("${HOME", &env, true), Err(Problem::Unclosed));
        assert_eq!(
            interpolate("${1x}", &env, true),
            Err(Problem::BadName("1x".into()))
        );
        for text in ["a${b}c", "$${", "${", "x$"] {
            let escaped = escape_interpolation(text);
            for strict in [true, false] {
                assert_eq!(
                    interpolate(&escaped, &|_| Some("v".into()), strict).unwrap(),
                    text
                );
            }
        }
    }

    /// Not strict: what cannot be expanded stays exactly as written.
    #[test]
    fn interpolation_of_known_variables() {
        let known = |text: &str| interpolate(text, &env, false).unwrap();
        assert_eq!(known("${HOME}/x"), "/home/me/x");
        assert_eq!(known("${EMPTY:-d}"), "d");
        assert_eq!(known("${EMPTY}"), "");
        assert_eq!(known("$${HOME}"), "${HOME}");
        for literal in [
            "${NOPE}",
            "${NOPE:-default}",
            "${NOPE:-}",
            "${1x}",
            "${a b:-c}",
            "${}",
            "${HOME",
            "x ${NOPE} y ${",
            "$ $$ $x {}",
        ] {
            assert_eq!(known(literal), literal);
        }
        assert_eq!(
            known("${NOPE}:${HOME}:${1x}:${NOPE:-d}:${HOME:-d}:${HOME"),
            "${NOPE}:/home/me:${1x}:${NOPE:-d}:/home/me:${HOME"
        );
    }

    #[test]
    fn durations() {
        let d = |t: &str| parse_duration(t);
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("30"), Some(Duration::from_secs(30)));
        assert_eq!(d("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(d("0.1"), Some(Duration::from_millis(100)));
        assert_eq!(d("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(d("2m"), Some(Duration::from_secs(120)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("7ns"), Some(Duration::from_nanos(7)));
        for bad in [
            "",
            "s",
            "1x",
            "-1s",
            ".5s",
            "1.s",
            "1.2.3s",
            "99999999999999999999999h",
        ] {
            assert_eq!(d(bad), None, "{bad}");
        }
        for ns in [
            0,
            1,
            999,
            1_000,
            1_500_000,
            2_000_000_000,
            3_600_000_000_000,
            3_601_000_000_000,
        ] {
            let duration = Duration::from_nanos(ns);
            assert_eq!(d(&format_duration(duration)), Some(duration), "{ns}");
        }
    }

    #[test]
    fn suggestions() {
        let keys = ["name", "source", "import-path", "command", "env-files"];
        assert_eq!(suggest("comand", &keys), Some("command"));
        assert_eq!(suggest("env_file", &keys), Some("env-files"));
        assert_eq!(suggest("srouce", &keys), Some("source"));
        assert_eq!(suggest("import", &keys), Some("import-path"));
        assert_eq!(suggest("zzz", &keys), None);
    }

    #[test]
    fn integers() {
        assert_eq!(parse_integer("8080"), Some(8080));
        assert_eq!(parse_integer("-1"), Some(-1));
        assert_eq!(parse_integer("0x1F"), Some(31));
        assert_eq!(parse_integer("0o17"), Some(15));
        for bad in ["", "-", "1.5", "1e3", "eighty", "99999999999999999999"] {
            assert_eq!(parse_integer(bad), None, "{bad}");
        }
    }
}
