//! Parsing never panics: arbitrary bytes, token soups and arbitrary YAML trees built from the
//! file's own keys (over 100,000 cases in all), each parsed (expanding every variable, and only
//! the known ones) and, when it fails, rendered; no diagnostic shows a variable's value.

use deployd_config::{Interpolation, ParseOptions, Severity, parse_with, parse_with_options};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

/// The value of `SET`: no diagnostic may show it (they show `${SET}`, as written).
const SECRET: &str = "zq9s3cr3t";

fn lookup(name: &str) -> Option<String> {
    (name == "SET").then(|| SECRET.to_owned())
}

/// Parses `text` expanding every variable and only the known ones; a failure must hold an
/// error, every diagnostic must render, and none may show what a variable expanded to.
fn check(text: &str) {
    for interpolation in [Interpolation::All(&lookup), Interpolation::Known(&lookup)] {
        check_with(text, interpolation);
    }
}

fn check_with(text: &str, interpolation: Interpolation<'_>) {
    let options = ParseOptions::new(interpolation);
    match parse_with_options(text, "fuzz.yaml", &options) {
        Ok(loaded) => {
            assert!(!loaded.spec.services.is_empty());
            for warning in &loaded.warnings {
                let rendered = warning.render(text);
                assert!(!rendered.contains(SECRET), "{interpolation:?}: {rendered}");
            }
            // What loads can be written back and loads again to the same spec.
            let again = parse_with(&loaded.spec.to_yaml(), "again.yaml", &|_| None)
                .map(|l| l.spec)
                .map_err(|d| d.render(&loaded.spec.to_yaml()));
            assert_eq!(again, Ok(loaded.spec));
        }
        Err(diagnostics) => {
            assert!(
                diagnostics
                    .items
                    .iter()
                    .any(|d| d.severity == Severity::Error)
            );
            let rendered = format!("{diagnostics}\n{}", diagnostics.render(text));
            assert!(!rendered.contains(SECRET), "{interpolation:?}: {rendered}");
        }
    }
}

/// Words of the file and of YAML, glued at random.
const TOKENS: &[&str] = &[
    "name",
    "services",
    "echo",
    "command",
    "source",
    "type",
    "git",
    "local",
    "location",
    "port",
    "env",
    "env_files",
    "import-path",
    "path",
    "message-queue",
    "redis",
    "default-service",
    "ui",
    "control-plane",
    "restart",
    "policy",
    "health",
    "build",
    "replicas",
    ":",
    ": ",
    " ",
    "  ",
    "\n",
    "\n  ",
    "\n    ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "&a ",
    "*a",
    "<<: ",
    "!!str ",
    "!x ",
    "'",
    "\"",
    "\\",
    "#",
    "${SET}",
    "${UNSET}",
    "${X:-d}",
    "$${",
    "8080",
    "0",
    "-1",
    "1e9",
    "70000",
    "0x1F",
    "true",
    "~",
    "null",
    "@",
    "@main",
    "https://h/r.git",
    "git@h:o/r.git",
    "|",
    ">",
    "? ",
    "---",
    "...",
    "%YAML 1.2",
    "\t",
    "é",
    "\u{FEFF}",
    "\r\n",
    "30s",
    "1.5",
    "../x",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..40).prop_map(|tokens| tokens.concat())
}

/// A YAML tree whose keys are mostly keys the file knows.
#[derive(Debug, Clone)]
enum Tree {
    Scalar(String),
    Seq(Vec<Tree>),
    Map(Vec<(String, Tree)>),
}

const KEYS: &[&str] = &[
    "name",
    "services",
    "a",
    "b",
    "command",
    "source",
    "type",
    "location",
    "ref",
    "sync-policy",
    "port",
    "env",
    "env-files",
    "env_files",
    "import-path",
    "path",
    "python-dependencies",
    "message-queue",
    "url",
    "host",
    "db",
    "default-service",
    "ui",
    "control-plane",
    "state_store_uri",
    "state-store",
    "restart",
    "policy",
    "backoff",
    "initial",
    "max",
    "max-restarts",
    "window",
    "health",
    "timeout",
    "build",
    "replicas",
    "runtime",
    "max-concurrency",
    "ts-dependencies",
    "x-anchor",
    "<<",
    "unknown",
];

const SCALARS: &[&str] = &[
    "x",
    "echo",
    "./run",
    "local",
    "git",
    "redis",
    "kafka",
    "simple",
    "python",
    "process",
    "on-failure",
    "merge",
    "8080",
    "0",
    "70000",
    "-3",
    "true",
    "no",
    "~",
    "",
    "30s",
    "0s",
    "1.5",
    "src",
    "../up",
    "/abs",
    "https://h/r.git@v1",
    "git@h:o/r.git",
    "sqlite:s.db",
    "postgres://db/x",
    "${SET}",
    "${UNSET}",
    "${UNSET:-d}",
    "a b",
    "b.c",
    "é",
    "\"",
    "'",
    "#x",
];

/// A small deterministic generator (splitmix64): building trees from a seed is much cheaper
/// than proptest's recursive strategies in a debug build, and a failure names its seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.below(words.len())]
    }

    fn scalar(&mut self) -> String {
        if self.below(5) > 0 {
            return self.pick(SCALARS).to_owned();
        }
        let len = self.below(12);
        (0..len)
            .filter_map(|_| char::from_u32((self.next() % 0x3000) as u32))
            .collect()
    }

    fn tree(&mut self, depth: usize) -> Tree {
        match if depth == 0 { 0 } else { self.below(3) } {
            0 => Tree::Scalar(self.scalar()),
            1 => Tree::Seq((0..self.below(3)).map(|_| self.tree(depth - 1)).collect()),
            _ => Tree::Map(
                (0..self.below(5))
                    .map(|_| (self.pick(KEYS).to_owned(), self.tree(depth - 1)))
                    .collect(),
            ),
        }
    }
}

fn quoted(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A scalar written plain when that is safe for the word list, else quoted.
fn scalar_text(text: &str) -> String {
    if SCALARS.contains(&text) && !text.is_empty() && !text.starts_with(['"', '\'', '#']) {
        text.to_owned()
    } else {
        quoted(text)
    }
}

fn block(tree: &Tree, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match tree {
        Tree::Scalar(text) => {
            out.push(' ');
            out.push_str(&scalar_text(text));
            out.push('\n');
        }
        Tree::Seq(items) if items.is_empty() => out.push_str(" []\n"),
        Tree::Map(entries) if entries.is_empty() => out.push_str(" {}\n"),
        Tree::Seq(items) => {
            out.push('\n');
            for item in items {
                out.push_str(&pad);
                out.push('-');
                block(item, indent + 2, out);
            }
        }
        Tree::Map(entries) => {
            out.push('\n');
            for (key, value) in entries {
                out.push_str(&pad);
                out.push_str(key);
                out.push(':');
                block(value, indent + 2, out);
            }
        }
    }
}

fn flow(tree: &Tree, out: &mut String) {
    match tree {
        Tree::Scalar(text) => out.push_str(&quoted(text)),
        Tree::Seq(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                flow(item, out);
            }
            out.push(']');
        }
        Tree::Map(entries) => {
            out.push('{');
            for (i, (key, value)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(key);
                out.push_str(": ");
                flow(value, out);
            }
            out.push('}');
        }
    }
}

/// A document from `seed`: a mapping with a name and services, and arbitrary other keys,
/// in block or flow style.
fn document(seed: u64, flow_style: bool) -> String {
    let mut generator = Gen(seed);
    let mut top: Vec<(String, Tree)> = vec![("name".to_owned(), Tree::Scalar("fuzz".to_owned()))];
    for _ in 0..generator.below(4) {
        let key = generator.pick(KEYS).to_owned();
        let depth = generator.below(4);
        top.push((key, generator.tree(depth)));
    }
    let services = (0..generator.below(3))
        .map(|_| {
            let id = generator.pick(&["a", "b", "c"]).to_owned();
            let depth = 1 + generator.below(3);
            (id, generator.tree(depth))
        })
        .collect();
    top.push(("services".to_owned(), Tree::Map(services)));
    let root = Tree::Map(top);
    let mut out = String::new();
    if flow_style {
        flow(&root, &mut out);
    } else {
        block(&root, 0, &mut out);
    }
    out
}

proptest! {
    #![proptest_config(config(30_000))]
    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        check(&String::from_utf8_lossy(&bytes));
    }
}

proptest! {
    #![proptest_config(config(30_000))]
    #[test]
    fn token_soups(text in token_soup()) {
        check(&text);
    }
}

proptest! {
    #![proptest_config(config(40_000))]
    #[test]
    fn arbitrary_yaml_trees(seed in any::<u64>(), flow_style in any::<bool>()) {
        check(&document(seed, flow_style));
    }
}
