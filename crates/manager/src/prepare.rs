//! Preparing a service before it starts: its environment files and its build commands.
//!
//! Build commands run in the service's source folder, in order, each in its own process group,
//! with the service's environment; their output goes to `<logs>/<service>.build.log`. A build is
//! skipped when the last successful build built the same synced tree with the same commands:
//! the digest of every synced tree is recorded in `<deployment>/build/<service>.synced`, and the
//! digest and commands a build succeeded for in `<deployment>/build/<service>.built`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use deployd_config::{Command, ServiceSpec};
use tokio::io::AsyncReadExt;

use crate::Error;

/// The most of a failed build's output kept in its error.
const OUTPUT_TAIL: usize = 4096;

/// Reads the service's `env-files` (relative to `base`, and inside it, links included), in
/// order: later files override earlier ones.
pub(crate) fn env_files(base: &Path, files: &[String]) -> Result<Vec<(String, String)>, Error> {
    let root = base
        .canonicalize()
        .map_err(|err| Error::io("cannot open", base, err))?;
    let mut vars: Vec<(String, String)> = Vec::new();
    // Where each key is in `vars`: later values replace earlier ones in linear time.
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for file in files {
        let path = root.join(file);
        let resolved = path
            .canonicalize()
            .map_err(|err| Error::io("cannot read env file", &path, err))?;
        if !resolved.starts_with(&root) {
            return Err(Error::BadRequest(format!(
                "env file `{file}` resolves to {}, outside the deployment's folder",
                resolved.display()
            )));
        }
        let text = std::fs::read_to_string(&resolved)
            .map_err(|err| Error::io("cannot read env file", &resolved, err))?;
        for (key, value) in parse_dotenv(&text).map_err(|(line, reason)| {
            Error::BadRequest(format!("env file `{file}`, line {line}: {reason}"))
        })? {
            match index.get(&key) {
                Some(&at) => vars[at].1 = value,
                None => {
                    index.insert(key.clone(), vars.len());
                    vars.push((key, value));
                }
            }
        }
    }
    Ok(vars)
}

/// Parses dotenv text: `KEY=value` lines, `export ` allowed, `#` comments, values optionally
/// quoted (`"..."` with `\n`, `\t`, `\"`, `\\` escapes, or `'...'` taken as written).
pub(crate) fn parse_dotenv(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut vars = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((key, value)) = line.split_once('=') else {
            // The line itself is not quoted back: the file may not be an env file at all.
            return Err((number, "expected `KEY=value`".to_owned()));
        };
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err((
                number,
                "invalid variable name (letters, digits, `_` and `.` only)".to_owned(),
            ));
        }
        let value = value.trim();
        let value = if let Some(rest) = value.strip_prefix('"') {
            let Some(end) = closing_quote(rest) else {
                return Err((number, "unterminated double quote".to_owned()));
            };
            unescape(&rest[..end])
        } else if let Some(rest) = value.strip_prefix('\'') {
            let Some(end) = rest.find('\'') else {
                return Err((number, "unterminated single quote".to_owned()));
            };
            rest[..end].to_owned()
        } else {
            // An unquoted value ends at ` #`.
            match value.find(" #") {
                Some(comment) => value[..comment].trim_end().to_owned(),
                None => value.to_owned(),
            }
        };
        vars.push((key.to_owned(), value));
    }
    Ok(vars)
}

fn closing_quote(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some(i),
            _ => escaped = false,
        }
    }
    None
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The files that record what was synced and what was built.
pub(crate) struct BuildMarks {
    synced: PathBuf,
    built: PathBuf,
}

impl BuildMarks {
    pub(crate) fn new(deployment_dir: &Path, service: &str) -> Self {
        let dir = deployment_dir.join("build");
        Self {
            synced: dir.join(format!("{service}.synced")),
            built: dir.join(format!("{service}.built")),
        }
    }

    /// Records the digest of the tree a sync produced, and the commit of a git source.
    pub(crate) fn record_sync(&self, digest: &str, commit: Option<&str>) -> Result<(), Error> {
        if let Some(dir) = self.synced.parent() {
            std::fs::create_dir_all(dir).map_err(|err| Error::io("cannot create", dir, err))?;
        }
        let commit_file = self.synced.with_extension("commit");
        match commit {
            Some(commit) => std::fs::write(&commit_file, commit)
                .map_err(|err| Error::io("cannot write", &commit_file, err))?,
            None => {
                let _ = std::fs::remove_file(&commit_file);
            }
        }
        std::fs::write(&self.synced, digest)
            .map_err(|err| Error::io("cannot write", &self.synced, err))
    }

    /// The commit of the git source synced last, if it is one.
    pub(crate) fn synced_commit(&self) -> Option<String> {
        std::fs::read_to_string(self.synced.with_extension("commit")).ok()
    }

    /// The digest of the tree synced last, if one was recorded.
    pub(crate) fn synced(&self) -> Option<String> {
        std::fs::read_to_string(&self.synced).ok()
    }

    /// What a build is of: the tree synced last and the build's own commands.
    fn key(&self, service: &ServiceSpec) -> Option<String> {
        let synced = std::fs::read_to_string(&self.synced).ok()?;
        (!synced.is_empty()).then(|| format!("{synced}\n{:?}", service.build))
    }

    /// Whether the last successful build built the tree synced last with the same commands.
    pub(crate) fn is_current(&self, service: &ServiceSpec) -> bool {
        match (self.key(service), std::fs::read_to_string(&self.built)) {
            (Some(key), Ok(built)) => key == built,
            _ => false,
        }
    }

    fn record_build(&self, service: &ServiceSpec) -> Result<(), Error> {
        // A service without a source has no sync record, and so no folder for it yet.
        if let Some(dir) = self.built.parent() {
            std::fs::create_dir_all(dir).map_err(|err| Error::io("cannot create", dir, err))?;
        }
        let key = self.key(service).unwrap_or_default();
        std::fs::write(&self.built, key).map_err(|err| Error::io("cannot write", &self.built, err))
    }
}

/// What a build needs.
pub(crate) struct Build<'a> {
    pub(crate) service: &'a ServiceSpec,
    pub(crate) workdir: &'a Path,
    pub(crate) env: &'a [(String, String)],
    pub(crate) log: &'a Path,
    pub(crate) marks: &'a BuildMarks,
}

/// Runs the service's build commands unless the source is unchanged since the last successful
/// build. Returns whether it ran them.
pub(crate) async fn build(build: Build<'_>) -> Result<bool, Error> {
    if build.service.build.is_empty() || build.marks.is_current(build.service) {
        return Ok(false);
    }
    for command in &build.service.build {
        run_build_command(&build, command).await?;
    }
    build.marks.record_build(build.service)?;
    Ok(true)
}

async fn run_build_command(build: &Build<'_>, command: &Command) -> Result<(), Error> {
    let shown = match command {
        Command::Shell(line) => line.clone(),
        Command::Argv(argv) => argv.join(" "),
    };
    let mut process = match command {
        Command::Shell(line) => {
            let mut process = tokio::process::Command::new("/bin/sh");
            process.arg("-c").arg(line);
            process
        }
        Command::Argv(argv) => {
            let mut process = tokio::process::Command::new(&argv[0]);
            process.args(&argv[1..]);
            process
        }
    };
    use std::os::unix::fs::OpenOptionsExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(build.log)
        .map_err(|err| Error::io("cannot open", build.log, err))?;
    let failed = |detail: String| Error::Build {
        service: build.service.id.clone(),
        command: shown.clone(),
        output: detail,
    };
    let mut child = process
        .current_dir(build.workdir)
        .env_clear()
        .envs(build.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            log.try_clone()
                .map_err(|err| Error::io("cannot open", build.log, err))?,
        ))
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| failed(format!("cannot start: {err}")))?;
    // stdout is read here and appended to the log; stderr goes to the log directly. The tail of
    // both is read back from the log for the error.
    let mut output = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        let mut log = tokio::fs::File::from_std(log);
        let mut chunk = vec![0u8; 8192];
        loop {
            match stdout.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    use tokio::io::AsyncWriteExt;
                    let _ = log.write_all(&chunk[..n]).await;
                    output.extend_from_slice(&chunk[..n]);
                    if output.len() > 2 * OUTPUT_TAIL {
                        output.drain(..output.len() - OUTPUT_TAIL);
                    }
                }
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|err| failed(format!("cannot wait: {err}")))?;
    if status.success() {
        return Ok(());
    }
    let tail = log_tail(build.log);
    Err(failed(format!("{status}\n{tail}")))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&text[start..])
        .trim_end()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: &[(&str, &str)]) {
        let parsed = parse_dotenv(text).unwrap();
        let parsed: Vec<(&str, &str)> = parsed
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(parsed, expected, "{text}");
    }

    #[test]
    fn dotenv() {
        check(
            "A=1\n# c\n\nexport B = two words \n",
            &[("A", "1"), ("B", "two words")],
        );
        check("A=\"x\\ny \\\"q\\\"\" # c\n", &[("A", "x\ny \"q\"")]);
        check(
            "A='$NOT \\n' \nB=v # comment\nC=#notcomment\n",
            &[("A", "$NOT \\n"), ("B", "v"), ("C", "#notcomment")],
        );
        check("EMPTY=\n", &[("EMPTY", "")]);
        assert_eq!(parse_dotenv("A=1\nnope\n").unwrap_err().0, 2);
        assert_eq!(parse_dotenv("A=\"open\n").unwrap_err().0, 1);
        assert_eq!(parse_dotenv("BAD KEY=1\n").unwrap_err().0, 1);
    }

    #[test]
    fn env_files_stay_inside_the_base_and_override_in_order() {
        let outer = tempfile::tempdir().unwrap();
        let base = outer.path().join("project");
        std::fs::create_dir(&base).unwrap();
        std::fs::write(base.join("a.env"), "A=1\nB=1\n").unwrap();
        std::fs::write(base.join("b.env"), "B=2\n").unwrap();
        std::fs::write(outer.path().join("secret.env"), "S=1\n").unwrap();
        std::os::unix::fs::symlink(outer.path().join("secret.env"), base.join("link.env")).unwrap();
        let vars = env_files(&base, &["a.env".into(), "b.env".into()]).unwrap();
        assert_eq!(
            vars,
            [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "2".to_owned())
            ]
        );
        let err = env_files(&base, &["link.env".into()]).unwrap_err();
        assert!(
            err.to_string().contains("outside the deployment's folder"),
            "{err}"
        );
    }

    #[test]
    fn a_parse_error_quotes_no_content_of_the_file() {
        let base = tempfile::tempdir().unwrap();
        // A file that is not an env file: a line with no `=`, and a key that is a secret.
        std::fs::write(base.path().join("a.env"), "OK=1\nroot:s3cr3t-line\n").unwrap();
        std::fs::write(base.path().join("b.env"), "s3cr3t key=1\n").unwrap();
        for file in ["a.env", "b.env"] {
            let err = env_files(base.path(), &[file.into()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(file), "{err}");
            assert!(err.contains("line"), "{err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
    }

    #[test]
    fn many_duplicate_keys_keep_the_last_value_in_first_position() {
        let base = tempfile::tempdir().unwrap();
        let text: String = (0..200_000)
            .map(|i| format!("K{}={i}\n", i % 1000))
            .collect();
        std::fs::write(base.path().join("big.env"), text).unwrap();
        let vars = env_files(base.path(), &["big.env".into()]).unwrap();
        assert_eq!(vars.len(), 1000);
        assert_eq!(vars[0], ("K0".to_owned(), "199000".to_owned()));
        assert_eq!(vars[999], ("K999".to_owned(), "199999".to_owned()));
    }
}
