use std::fmt;

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The file loads; the user should still look.
    Warning,
    /// The file does not load.
    Error,
}

/// One problem in a deployment file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The name the file is reported under (usually its path).
    pub origin: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted path of the offending key (`services.echo.port`), when known.
    pub key: Option<String>,
    /// What is wrong, lowercase, without a trailing period.
    pub message: String,
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

    /// Sets the location.
    pub fn at(mut self, location: Option<(usize, usize)>) -> Self {
        if let Some((line, column)) = location {
            self.line = Some(line);
            self.column = Some(column);
        }
        self
    }

    pub(crate) fn from_yaml(origin: &str, err: &serde_yaml::Error) -> Self {
        let mut message = err.to_string();
        let location = err.location().map(|l| (l.line(), l.column()));
        if let Some((line, column)) = location {
            // The YAML library appends its own "at line L column C"; we print the location first.
            for suffix in [
                format!(" at line {line} column {column}"),
                format!(" at position {}", err.location().map_or(0, |l| l.index())),
            ] {
                if let Some(stripped) = message.strip_suffix(&suffix) {
                    message = stripped.to_owned();
                }
            }
        }
        // The library prefixes the key path ("services.echo.port: invalid type ...").
        let mut key = None;
        if let Some((path, rest)) = message.split_once(": ") {
            if !path.is_empty() && !path.contains(' ') {
                key = Some(path.to_owned());
                message = rest.to_owned();
            }
        }
        Self {
            severity: Severity::Error,
            origin: origin.to_owned(),
            line: location.map(|l| l.0),
            column: location.map(|l| l.1),
            key,
            message,
        }
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
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, ": {severity}: ")?;
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Every problem found in a file that did not load; at least one is an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics {
    /// Errors and warnings, in the order they were found.
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
        self.items
            .iter()
            .filter(|d| d.severity == Severity::Error)
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
