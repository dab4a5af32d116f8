//! The corpus of deployment files under `tests/config/` at the workspace root:
//! every file in `valid/` loads, to the spec its snapshot shows; every file in `broken/` fails,
//! with the diagnostics its snapshot shows, each with a line, a column and (but for problems of
//! the file as a whole) a key path.
//!
//! Snapshots live in `tests/snapshots/`; after a deliberate change, review them with
//! `cargo insta review` (or run with `INSTA_UPDATE=always` and read the diff).

use std::path::{Path, PathBuf};

use deployd_config::{Loaded, parse_with};

/// The environment the corpus is parsed with.
fn lookup(name: &str) -> Option<String> {
    let value = match name {
        "REDIS_HOST" => "redis.internal",
        "REDIS_PASSWORD" => "p@ss:word",
        "API_TOKEN" => "t0ken",
        "PORT" => "9000",
        "EMPTY" => "",
        _ => return None,
    };
    Some(value.to_owned())
}

fn corpus(kind: &str) -> Vec<(String, PathBuf)> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/config")
        .join(kind);
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(&folder)
        .unwrap_or_else(|err| panic!("{}: {err}", folder.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .map(|path| {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, path)
        })
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn parse_file(kind: &str, stem: &str, text: &str) -> Result<Loaded, deployd_config::Diagnostics> {
    parse_with(text, &format!("tests/config/{kind}/{stem}.yaml"), &lookup)
}

#[test]
fn valid_files_load_to_the_expected_spec() {
    let files = corpus("valid");
    assert!(files.len() >= 12, "only {} valid files", files.len());
    for (stem, path) in files {
        let text = read(&path);
        let loaded = match parse_file("valid", &stem, &text) {
            Ok(loaded) => loaded,
            Err(diagnostics) => panic!("{stem} does not load:\n{}", diagnostics.render(&text)),
        };
        let mut snapshot = format!("{:#?}\n", loaded.spec);
        for warning in &loaded.warnings {
            snapshot.push_str(&format!("{warning}\n"));
        }
        insta::assert_snapshot!(format!("valid__{stem}"), snapshot);

        // What the spec says, written back, is the same spec.
        let again =
            parse_with(&loaded.spec.to_yaml(), "again.yaml", &|_| None).unwrap_or_else(|d| {
                panic!("{stem} written back:\n{}", d.render(&loaded.spec.to_yaml()))
            });
        assert_eq!(again.spec, loaded.spec, "{stem} written back");
    }
}

/// Broken files whose problem is the file as a whole, so has no key path.
const FILE_LEVEL: &[&str] = &["empty_file", "two_documents", "tab_indentation"];

#[test]
fn broken_files_give_the_expected_diagnostics() {
    let files = corpus("broken");
    assert!(files.len() >= 25, "only {} broken files", files.len());
    for (stem, path) in files {
        let text = read(&path);
        let diagnostics = match parse_file("broken", &stem, &text) {
            Ok(loaded) => panic!("{stem} loads: {:#?}", loaded.spec),
            Err(diagnostics) => diagnostics,
        };
        assert!(diagnostics.errors().next().is_some(), "{stem}: no error");
        for diagnostic in &diagnostics.items {
            assert!(
                diagnostic.line.is_some() && diagnostic.column.is_some(),
                "{stem}: no location: {diagnostic}"
            );
            assert!(
                diagnostic.key.is_some() || FILE_LEVEL.contains(&stem.as_str()),
                "{stem}: no key: {diagnostic}"
            );
        }
        let snapshot = format!("{diagnostics}\n\n{}", diagnostics.render(&text));
        insta::assert_snapshot!(format!("broken__{stem}"), snapshot);
    }
}

/// The valid corpus writes every key of the schema, and every key with a `-` in both spellings.
#[test]
fn valid_files_cover_every_key() {
    let corpus: String = corpus("valid").iter().map(|(_, path)| read(path)).collect();
    let schema: serde_json::Value = serde_json::from_str(&deployd_config::json_schema()).unwrap();
    let mut objects = vec![&schema];
    objects.extend(schema["$defs"].as_object().unwrap().values());
    let mut missing = Vec::new();
    for object in objects {
        let Some(properties) = object["properties"].as_object() else {
            continue;
        };
        for (key, property) in properties {
            // Every key as the schema names it; and the other spelling of a key with a `-`
            // (llama_deploy has written those both ways; its `_` keys it wrote one way).
            let description = property["description"].as_str().unwrap_or("");
            let needed = match description.strip_prefix("Another spelling of `") {
                Some(rest) => rest
                    .split('`')
                    .next()
                    .is_some_and(|canonical| canonical.contains('-')),
                None => true,
            };
            let pattern = format!("{key}:");
            let written = corpus
                .match_indices(&pattern)
                .any(|(i, _)| i == 0 || matches!(corpus.as_bytes()[i - 1], b' ' | b'\n' | b'{'));
            if needed && !written {
                missing.push(key.clone());
            }
        }
    }
    assert!(missing.is_empty(), "keys no valid file writes: {missing:?}");
}
