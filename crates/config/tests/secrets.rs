//! Diagnostics never show what a variable expanded to (issue 13): a file sent to the server may
//! write `${VAR}` anywhere, and the answer must not carry the server's environment back. A
//! diagnostic about a value written with `${` shows the text as written instead.
//!
//! Every secret the lookup below answers holds `s3cr3t` or `987654`, and no diagnostic may.

use std::path::Path;

use deployd_config::parse_with;

/// What the server's environment holds.
fn lookup(name: &str) -> Option<String> {
    let value = match name {
        "SECRET" => "s3cr3t-value",
        "SECRET_SPACED" => "s3cr3t value",
        "SECRET_ABSOLUTE" => "/s3cr3t/value",
        "SECRET_REF" => "s3cr3t..value",
        "SECRET_URL" => "redis://user:s3cr3t@host:6379",
        // A likely typo of `always`: a suggestion would tell what it is.
        "SECRET_TYPO" => "alwayss3cr3t",
        "SECRET_NUMBER" => "987654",
        "SECRET_NEGATIVE" => "-987654",
        "SECRET_DURATION" => "987654s",
        "SECRET_PORT" => "49876",
        _ => return None,
    };
    Some(value.to_owned())
}

const MARKERS: &[&str] = &["s3cr3t", "987654", "49876"];

/// Everything the parse of `text` says, rendered both ways; the file may load or not.
fn said(text: &str) -> String {
    match parse_with(text, "secret.yaml", &lookup) {
        Ok(loaded) => {
            let lines: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
            format!(
                "{}\n{}",
                lines.join("\n"),
                deployd_config::render_all(&loaded.warnings, text)
            )
        }
        Err(diagnostics) => format!("{diagnostics}\n{}", diagnostics.render(text)),
    }
}

/// The diagnostics of `text` hold none of the secrets, and show `written` (a `${…}` as it is
/// in the file) in a message.
#[track_caller]
fn check(text: &str, written: &str) {
    let said = said(text);
    for marker in MARKERS {
        assert!(
            !said.contains(marker),
            "a secret ({marker}) in the diagnostics of\n{text}\n---\n{said}"
        );
    }
    let in_a_message = said
        .lines()
        .any(|line| line.starts_with("secret.yaml:") && line.contains(written));
    assert!(
        in_a_message,
        "`{written}` is not shown in a message of\n{text}\n---\n{said}"
    );
}

fn service(lines: &str) -> String {
    format!("name: secrets\nservices:\n  api:\n    command: ./api\n{lines}")
}

#[test]
fn restart_policy() {
    check(
        &service("    restart:\n      policy: ${SECRET}\n"),
        "`${SECRET}` is not a restart policy",
    );
}

#[test]
fn sync_policy() {
    check(
        &service(
            "    source:\n      type: local\n      location: src\n      sync-policy: ${SECRET}\n",
        ),
        "`${SECRET}` is not a sync policy",
    );
}

#[test]
fn runtime() {
    check(
        &service("    runtime: ${SECRET}\n"),
        "`${SECRET}` is not a runtime",
    );
}

#[test]
fn health_path() {
    check(
        &service("    health:\n      path: ${SECRET}\n"),
        "the health path `${SECRET}` must start with `/`",
    );
}

#[test]
fn name() {
    check(
        "name: ${SECRET}.deployment\nservices:\n  api:\n    command: ./api\n",
        "invalid deployment name `${SECRET}.deployment`",
    );
    check(
        "name: ${SECRET_SPACED}\nservices:\n  api:\n    command: ./api\n",
        "invalid deployment name `${SECRET_SPACED}`",
    );
}

/// Suggestions are made from the text as written: one made from the value would tell it.
#[test]
fn no_suggestion_from_a_value() {
    let text = service("    restart:\n      policy: ${SECRET_TYPO}\n");
    check(&text, "`${SECRET_TYPO}` is not a restart policy");
    assert!(!said(&text).contains("did you mean"), "{}", said(&text));
}

/// Every other message that quotes a value.
#[test]
fn every_message_about_a_value() {
    let cases: &[(&str, &str)] = &[
        (
            "    source:\n      type: ${SECRET}\n      location: src\n",
            "`${SECRET}` is not a source type",
        ),
        (
            "    port: ${SECRET_NUMBER}\n",
            "port ${SECRET_NUMBER} is outside",
        ),
        ("    port: ${SECRET}\n", "found `${SECRET}`"),
        (
            "    port: ${SECRET_PORT}\n  other:\n    command: ./other\n    port: ${SECRET_PORT}\n",
            "port ${SECRET_PORT} is already used by service `api`",
        ),
        (
            "    port: ${SECRET_PORT}\n    replicas: 2\n",
            "port ${SECRET_PORT} cannot be shared by 2 replicas",
        ),
        (
            "    replicas: ${SECRET_NUMBER}\n",
            "`replicas` is ${SECRET_NUMBER}",
        ),
        (
            "    max-concurrency: ${SECRET_NEGATIVE}\n",
            "`max-concurrency` is ${SECRET_NEGATIVE}",
        ),
        ("    timeout: ${SECRET}\n", "found `${SECRET}`"),
        (
            "    restart:\n      max-restarts: ${SECRET_NEGATIVE}\n",
            "`max-restarts` is ${SECRET_NEGATIVE}",
        ),
        (
            "    restart:\n      backoff:\n        initial: ${SECRET_DURATION}\n        max: 1s\n",
            "is shorter than its `initial` (${SECRET_DURATION})",
        ),
        (
            "    restart:\n      backoff:\n        initial: 1h\n        max: ${SECRET_NUMBER}ms\n",
            "the backoff's `max` (${SECRET_NUMBER}ms)",
        ),
        (
            "    import-path: ${SECRET_ABSOLUTE}:flow\n",
            "the import path `${SECRET_ABSOLUTE}:flow` is absolute",
        ),
        (
            "    source:\n      type: local\n      location: ${SECRET_ABSOLUTE}\n",
            "local source `${SECRET_ABSOLUTE}` is absolute",
        ),
        (
            "    source:\n      type: git\n      location: https://host/${SECRET_SPACED}.git\n",
            "git URL `https://host/${SECRET_SPACED}.git` contains a space",
        ),
        (
            "    source:\n      type: git\n      location: https://host/repo.git@${SECRET_REF}\n",
            "git ref `${SECRET_REF}` is not a valid git ref name",
        ),
        (
            "    source:\n      type: git\n      location: https://host/repo.git\n      ref: ${SECRET_REF}\n",
            "git ref `${SECRET_REF}` is not a valid git ref name",
        ),
        (
            "    env-files:\n      - ${SECRET_ABSOLUTE}\n",
            "the env file `${SECRET_ABSOLUTE}` is absolute",
        ),
        (
            "    python-dependencies:\n      - ../${SECRET}.txt\n",
            "the dependency `../${SECRET}.txt` escapes",
        ),
    ];
    for (lines, written) in cases {
        check(&service(lines), written);
    }
    let top: &[(&str, &str)] = &[
        (
            "default-service: ${SECRET}\n",
            "`default-service` names no service (`${SECRET}`)",
        ),
        (
            "state-store: ${SECRET}\n",
            "`${SECRET}` is not a state store",
        ),
        (
            "state-store: sqlite:${SECRET_ABSOLUTE}\n",
            "the SQLite path `${SECRET_ABSOLUTE}` is absolute",
        ),
        (
            "control-plane:\n  state_store_uri: ${SECRET_URL}\n",
            "state store `${SECRET_URL}` is not supported",
        ),
        (
            "message-queue:\n  type: ${SECRET}\n",
            "`${SECRET}` is not a message queue type",
        ),
        (
            "message-queue:\n  type: redis\n  db: ${SECRET_NEGATIVE}\n",
            "the redis database `${SECRET_NEGATIVE}` is negative",
        ),
        (
            "message-queue:\n  type: redis\n  ssl: ${SECRET}\n",
            "found `${SECRET}`",
        ),
        (
            "ui:\n  port: ${SECRET_NUMBER}\n",
            "port ${SECRET_NUMBER} is outside",
        ),
    ];
    for (lines, written) in top {
        check(&format!("{}{lines}", service("")), written);
    }
}

/// Every scalar value of every corpus file, replaced by each secret in turn: no diagnostic
/// holds one.
#[test]
fn corpus_values_replaced_by_secrets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/config");
    let secrets = [
        "SECRET",
        "SECRET_SPACED",
        "SECRET_ABSOLUTE",
        "SECRET_REF",
        "SECRET_URL",
        "SECRET_TYPO",
        "SECRET_NUMBER",
        "SECRET_NEGATIVE",
        "SECRET_DURATION",
        "SECRET_PORT",
    ];
    let mut replaced = 0;
    for kind in ["valid", "broken"] {
        let mut paths: Vec<_> = std::fs::read_dir(root.join(kind))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (index, line) in lines.iter().enumerate() {
                let Some(value_at) = block_value(line) else {
                    continue;
                };
                for secret in secrets {
                    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
                    edited[index] = format!("{}${{{secret}}}", &line[..value_at]);
                    let edited = edited.join("\n") + "\n";
                    let said = said(&edited);
                    for marker in MARKERS {
                        assert!(
                            !said.contains(marker),
                            "{}:{}: a secret ({marker}) in the diagnostics of\n{edited}\n---\n{said}",
                            path.display(),
                            index + 1
                        );
                    }
                    replaced += 1;
                }
            }
        }
    }
    assert!(replaced > 2_000, "only {replaced} values replaced");
}

/// Where the plain value of a block `key: value` or `- value` line starts.
fn block_value(line: &str) -> Option<usize> {
    let trimmed = line.trim_start();
    let value_at = if let Some(item) = trimmed.strip_prefix("- ") {
        if item.contains(": ") {
            line.find(": ")? + 2
        } else {
            line.len() - item.len()
        }
    } else if trimmed.starts_with('#') {
        return None;
    } else {
        line.find(": ")? + 2
    };
    let value = &line[value_at..];
    let plain = !value.is_empty()
        && !value.starts_with(['[', '{', '|', '>', '&', '*', '!', '#', '"', '\''])
        && !value.contains(" #");
    plain.then_some(value_at)
}
