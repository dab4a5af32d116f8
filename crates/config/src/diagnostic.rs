use std::fmt::{self, Write as _};

use crate::yaml::Span;

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The file loads; the user should still look.
    Warning,
    /// The file does not load.
    Error,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One problem in a deployment file, with where it is.
///
/// [`Display`](fmt::Display) writes it on one line
/// (`file:line:col: error: `key`: message`); [`Diagnostic::render`] writes it as rustc does,
/// with the offending line and a caret under the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The name the file is reported under (usually its path).
    pub origin: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
    /// Dotted path of the offending key (`services.echo.port`), when known.
    pub key: Option<String>,
    /// What is wrong, lowercase, without a trailing period.
    pub message: String,
    /// How many characters from `column` the problem covers on its line, when known.
    pub width: Option<usize>,
    /// A hint to fix it ("did you mean `command`?"), when there is one.
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error without a location.
    pub fn error(origin: &str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            origin: origin.to_owned(),
            line: None,
            column: None,
            key: None,
            message: message.into(),
            width: None,
            help: None,
        }
    }

    /// A warning without a location.
    pub fn warning(origin: &str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(origin, message)
        }
    }

    /// Sets the key path.
    pub fn at_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the location (1-based line and column).
    pub fn at(mut self, location: Option<(usize, usize)>) -> Self {
        if let Some((line, column)) = location {
            self.line = Some(line);
            self.column = Some(column);
        }
        self
    }

    /// Sets the help line.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub(crate) fn at_span(mut self, span: Span) -> Self {
        if span.line > 0 {
            self.line = Some(span.line);
            self.column = Some(span.column);
            self.width = span.width();
        }
        self
    }

    /// Writes the diagnostic as rustc does, quoting the line of `text` (the file it is about)
    /// with a caret under the problem:
    ///
    /// ```text
    /// error: port 80 is already used by service `a`
    ///  --> deployment.yaml:7:11
    ///   |
    /// 7 |     port: 80
    ///   |           ^^
    ///   = key: services.b.port
    ///   = help: did you mean `command`?
    /// ```
    ///
    /// The output ends with a newline. Without a location (or when `text` has no such line)
    /// only the message, the file and the notes are written.
    pub fn render(&self, text: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}: {}", self.severity.label(), self.message);
        let source_line = self
            .line
            .and_then(|line| text.lines().nth(line.checked_sub(1)?));
        let gutter = self.line.map_or(1, |line| line.to_string().len());
        let pad = " ".repeat(gutter);
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                let _ = writeln!(out, "{pad}--> {}:{line}:{column}", self.origin);
            }
            (Some(line), None) => {
                let _ = writeln!(out, "{pad}--> {}:{line}", self.origin);
            }
            _ => {
                let _ = writeln!(out, "{pad}--> {}", self.origin);
            }
        }
        if let (Some(line), Some(source)) = (self.line, source_line) {
            let source = source.trim_end_matches('\r');
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{line} | {}", source.replace('\t', " "));
            if let Some(column) = self.column {
                let available = source.chars().count().saturating_sub(column - 1).max(1);
                let width = self.width.unwrap_or(1).clamp(1, available);
                let _ = writeln!(
                    out,
                    "{pad} | {}{}",
                    " ".repeat(column.saturating_sub(1)),
                    "^".repeat(width)
                );
            }
        }
        if let Some(key) = &self.key {
            let _ = writeln!(out, "{pad} = key: {key}");
        }
        if let Some(help) = &self.help {
            let _ = writeln!(out, "{pad} = help: {help}");
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}: ", self.severity.label())?;
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, " ({help})")?;
        }
        Ok(())
    }
}

/// Every problem found in a file that did not load; at least one is an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics {
    /// Errors and warnings, in the order of the file.
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub(crate) fn one(diagnostic: Diagnostic) -> Self {
        Self {
            items: vec![diagnostic],
        }
    }

    /// The errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    /// Writes every diagnostic as [`Diagnostic::render`] does, a blank line between two,
    /// then a summary line (`error: could not load `deployment.yaml`: 2 errors, 1 warning`).
    pub fn render(&self, text: &str) -> String {
        let mut out = render_all(&self.items, text);
        let errors = self.errors().count();
        let warnings = self.items.len() - errors;
        let origin = self.items.first().map_or("", |d| d.origin.as_str());
        let _ = write!(
            out,
            "error: could not load `{origin}`: {}",
            plural(errors, "error")
        );
        if warnings > 0 {
            let _ = write!(out, ", {}", plural(warnings, "warning"));
        }
        out.push('\n');
        out
    }
}

/// Writes `diagnostics` (the warnings of a file that loaded, say) as [`Diagnostic::render`]
/// does, a blank line after each.
pub fn render_all(diagnostics: &[Diagnostic], text: &str) -> String {
    let mut out = String::new();
    for diagnostic in diagnostics {
        out.push_str(&diagnostic.render(text));
        out.push('\n');
    }
    out
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}
