//! Big files: an `env` of 100,000 entries with keys written twice or merged over keeps its
//! meaning (the work is linear; `benches/parse.rs` times it), and no mapping or list holds more
//! than `MAX_ENTRIES` entries, whichever reader reads the file.

use std::fmt::Write as _;

use deployd_config::{Diagnostics, Loaded, MAX_ENTRIES, MAX_FILE_SIZE, parse_with};

const ENTRIES: usize = 100_000;
const DUPLICATE_EVERY: usize = 20;
const HEADER: &str = "name: big\nservices:\n  api:\n    command: ./api\n    env:\n";
/// Lines of `HEADER`: the first entry is on the next one.
const HEADER_LINES: usize = 5;

fn parse(text: &str) -> Result<Loaded, Diagnostics> {
    assert!(text.len() <= MAX_FILE_SIZE, "{} bytes", text.len());
    parse_with(text, "big.yaml", &|_| None)
}

/// A key written twice is an error (the first is kept, as for any mapping), reported on the
/// line of the second with the line of the first; nothing else is reported.
#[test]
fn an_env_of_100k_entries_with_keys_written_twice() {
    let mut text = HEADER.to_owned();
    let mut expected = Vec::new();
    for i in 0..ENTRIES {
        let line = HEADER_LINES + 1 + i;
        let key = if i > 0 && i % DUPLICATE_EVERY == 0 {
            // The key of the entry before, whose line is `line - 1`.
            expected.push(format!(
                "big.yaml:{line}:7: error: `services.api.env.VAR_{:06}`: `VAR_{:06}` is written twice (first on line {})",
                i - 1,
                i - 1,
                line - 1
            ));
            i - 1
        } else {
            i
        };
        let _ = writeln!(text, "      VAR_{key:06}: value-{i}");
    }
    let diagnostics = parse(&text).unwrap_err();
    let lines: Vec<String> = diagnostics.items.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), ENTRIES / DUPLICATE_EVERY - 1);
    assert_eq!(lines, expected);
}

/// Merged keys (`<<`) never override the keys written in the mapping itself, and the first
/// mapping merged wins over the next.
#[test]
fn an_env_of_100k_entries_merged_over() {
    let half = ENTRIES / 2;
    let mut text = String::from("x-first: &first\n");
    for i in 0..half {
        let _ = writeln!(text, "  VAR_{i:06}: first-{i}");
    }
    text.push_str("x-second: &second\n");
    for i in 0..half {
        let _ = writeln!(text, "  VAR_{:06}: second-{i}", i * 2);
    }
    text.push_str(HEADER);
    text.push_str("      <<: [*first, *second]\n");
    for i in 0..half {
        if i % DUPLICATE_EVERY == 0 {
            let _ = writeln!(text, "      VAR_{i:06}: own-{i}");
        }
    }
    let env = &parse(&text).unwrap().spec.services[0].env;
    // Keys 0..half from the first, the even ones up to 2 * half from the second.
    assert_eq!(env.len(), half + half / 2);
    for (i, key) in [0, 1, 19, 20, 21, 40, half - 1, half, half + 2, 2 * half - 2]
        .into_iter()
        .map(|i| (i, format!("VAR_{i:06}")))
    {
        let expected = if i >= half {
            format!("second-{}", i / 2)
        } else if i % DUPLICATE_EVERY == 0 {
            format!("own-{i}")
        } else {
            format!("first-{i}")
        };
        assert_eq!(env[&key], expected, "{key}");
    }
    assert!(!env.contains_key(&format!("VAR_{:06}", 2 * half - 1)));
}

/// `count` entries of an env in block style: `      k0a1f2: v`.
fn block_env(count: usize) -> String {
    let mut text = HEADER.to_owned();
    for i in 0..count {
        let _ = writeln!(text, "      k{i:05x}: v");
    }
    text
}

fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(loaded) => panic!("loads, with {} services", loaded.spec.services.len()),
        Err(diagnostics) => diagnostics.items.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn a_mapping_holds_at_most_max_entries() {
    let full = block_env(MAX_ENTRIES);
    assert_eq!(
        parse(&full).unwrap().spec.services[0].env.len(),
        MAX_ENTRIES
    );
    let over = block_env(MAX_ENTRIES + 1);
    let expected = [format!(
        "big.yaml:6:7: error: `services.api.env`: this mapping has more than {MAX_ENTRIES} \
         entries; the most accepted is {MAX_ENTRIES}"
    )];
    // The fast reader leaves it to the full parser, which reports it; the same with `---`.
    assert_eq!(errors(&over), expected);
    let expected = [expected[0].replace(":6:7:", ":7:7:")];
    assert_eq!(errors(&format!("---\n{over}")), expected);
}

#[test]
fn a_list_holds_at_most_max_entries() {
    let list = |count: usize| {
        let mut text =
            String::from("name: big\nservices:\n  api:\n    command: ./api\n    env-files: [");
        text.push_str(&"a, ".repeat(count - 1));
        text.push_str("a]\n");
        text
    };
    let full = parse(&list(MAX_ENTRIES)).unwrap();
    assert_eq!(full.spec.services[0].env_files.len(), MAX_ENTRIES);
    assert_eq!(
        errors(&list(MAX_ENTRIES + 1)),
        [format!(
            "big.yaml:5:16: error: `services.api.env-files`: this list has more than \
             {MAX_ENTRIES} items; the most accepted is {MAX_ENTRIES}"
        )]
    );
}

/// Mappings merged together count too.
#[test]
fn a_merged_mapping_holds_at_most_max_entries() {
    let half = MAX_ENTRIES / 2 + 1;
    let mut text = String::new();
    for (anchor, from) in [("a", 0), ("b", half)] {
        let _ = write!(text, "x-{anchor}: &{anchor} {{");
        for i in from..from + half {
            let _ = write!(text, "k{i:05x}: v, ");
        }
        text.truncate(text.len() - 2);
        text.push_str("}\n");
    }
    text.push_str(HEADER);
    text.push_str("      <<: [*a, *b]\n");
    assert_eq!(
        errors(&text),
        [format!(
            "big.yaml:8:7: error: `services.api.env`: this mapping has more than \
             {MAX_ENTRIES} entries; the most accepted is {MAX_ENTRIES}"
        )]
    );
}

/// The fast reader gives up on a tree the full parser would refuse for its size, so that the
/// full parser reports it.
#[test]
fn a_file_holds_at_most_a_million_nodes() {
    let mut text = String::from("name: big\nservices:\n  api:\n    command: ./api\n");
    for list in 0..5 {
        let _ = writeln!(text, "x-{list}: [{}a]", "a, ".repeat(200_000 - 1));
    }
    let errors = errors(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("the file has too many nodes"),
        "{errors:?}"
    );
}
