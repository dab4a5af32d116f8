//! The JSON Schema checked in as `docs/deployment.schema.json` is the one the types give, and
//! every key it lists is documented in `docs/configuration.md`.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

#[test]
fn checked_in_schema_is_up_to_date() {
    let path = docs().join("deployment.schema.json");
    let generated = deployd_config::json_schema();
    // `cargo xtask codegen` writes the file; DEPLOYD_WRITE_SCHEMA=1 does the same from here.
    if std::env::var_os("DEPLOYD_WRITE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/deployment.schema.json is out of date: run `cargo xtask codegen`"
    );
    assert_eq!(
        deployd_config::json_schema(),
        generated,
        "not deterministic"
    );
}

#[test]
fn every_key_is_documented() {
    let schema: Value = serde_json::from_str(&deployd_config::json_schema()).unwrap();
    let guide = std::fs::read_to_string(docs().join("configuration.md")).unwrap();
    let mut objects = vec![&schema];
    objects.extend(schema["$defs"].as_object().unwrap().values());
    let mut missing = Vec::new();
    for object in objects {
        let Some(properties) = object["properties"].as_object() else {
            continue;
        };
        for (key, property) in properties {
            let other_spelling = property["description"]
                .as_str()
                .is_some_and(|d| d.starts_with("Another spelling of"));
            if !other_spelling && !guide.contains(&format!("`{key}`")) {
                missing.push(key.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
}
