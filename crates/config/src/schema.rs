//! The JSON Schema of the deployment file, derived from the types of [`crate::raw`].

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value};

use crate::raw::RawDeployment;

/// Keys accepted under another name than their canonical one: (canonical, alias).
pub(crate) const ALIASES: &[(&str, &str)] = &[("import-path", "path")];

/// The schema as schemars derives it, before the other spellings are added.
pub(crate) fn derived() -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    generator.into_root_schema_for::<RawDeployment>().to_value()
}

pub(crate) fn generate() -> String {
    let mut schema = derived();
    if let Value::Object(root) = &mut schema {
        root.insert(
            "$comment".to_owned(),
            Value::String(
                "Generated from the types of crates/config by `cargo xtask codegen`; do not edit."
                    .to_owned(),
            ),
        );
        root.insert(
            "title".to_owned(),
            Value::String("deployd deployment file".to_owned()),
        );
        // `x-…` keys at the top level hold YAML anchors and are ignored.
        let mut patterns = Map::new();
        patterns.insert("^x-".to_owned(), Value::Bool(true));
        root.insert("patternProperties".to_owned(), Value::Object(patterns));
        add_spellings(root);
        if let Some(Value::Object(definitions)) = root.get_mut("$defs") {
            for definition in definitions.values_mut() {
                if let Value::Object(definition) = definition {
                    add_spellings(definition);
                }
            }
        }
    }
    let mut text = String::new();
    write_pretty(&sorted(schema), 0, &mut text);
    text.push('\n');
    text
}

/// Adds the other spelling of every key (`env_files` beside `env-files`) and the aliases.
fn add_spellings(object: &mut Map<String, Value>) {
    let Some(Value::Object(properties)) = object.get_mut("properties") else {
        return;
    };
    let mut extra = Vec::new();
    for (name, schema) in properties.iter() {
        let other = if name.contains('-') {
            name.replace('-', "_")
        } else {
            name.replace('_', "-")
        };
        if other != *name && !properties.contains_key(&other) {
            extra.push((other, spelling_of(name, schema)));
        }
        for (canonical, alias) in ALIASES {
            if name == canonical {
                extra.push(((*alias).to_owned(), spelling_of(name, schema)));
            }
        }
    }
    for (name, schema) in extra {
        properties.insert(name, schema);
    }
}

fn spelling_of(name: &str, schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(object) = &mut schema {
        object.insert(
            "description".to_owned(),
            Value::String(format!("Another spelling of `{name}`.")),
        );
        object.remove("examples");
    }
    schema
}

/// The same value with the keys of every object in order, whatever map serde_json uses.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(object) => {
            let mut entries: Vec<(String, Value)> = object.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Pretty JSON with two-space indentation, keys in the order given.
fn write_pretty(value: &Value, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent + 1);
    match value {
        Value::Object(object) if !object.is_empty() => {
            out.push_str("{\n");
            for (i, (key, item)) in object.iter().enumerate() {
                out.push_str(&pad);
                out.push_str(&Value::String(key.clone()).to_string());
                out.push_str(": ");
                write_pretty(item, indent + 1, out);
                if i + 1 < object.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&"  ".repeat(indent));
            out.push('}');
        }
        Value::Array(items) if !items.is_empty() => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&pad);
                write_pretty(item, indent + 1, out);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&"  ".repeat(indent));
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::decode::{Cx, Decode};
    use crate::raw::{
        RawBackoff, RawControlPlane, RawHealth, RawMessageQueue, RawRestart, RawService, RawSource,
        SCHEMA_NAMES,
    };
    use crate::yaml::{Node, Span, Value as Yaml};

    /// The keys the decoder reads are the properties the schema lists, for every mapping.
    #[test]
    fn decoder_and_schema_agree() {
        let lookup = |_: &str| None;
        let mut cx = Cx::new("t", crate::Interpolation::All(&lookup));
        let empty = Node {
            value: Yaml::Map(Vec::new()),
            span: Span::default(),
        };
        let _ = RawDeployment::decode(&empty, &mut cx);
        let _ = RawService::decode(&empty, &mut cx);
        let _ = RawSource::decode(&empty, &mut cx);
        let _ = RawHealth::decode(&empty, &mut cx);
        let _ = RawRestart::decode(&empty, &mut cx);
        let _ = RawBackoff::decode(&empty, &mut cx);
        let _ = RawControlPlane::decode(&empty, &mut cx);
        let _ = RawMessageQueue::decode(&empty, &mut cx);
        assert_eq!(cx.recorded.len(), SCHEMA_NAMES.len());

        let schema = derived();
        for (kind, known) in &cx.recorded {
            let name = SCHEMA_NAMES
                .iter()
                .find(|(k, _)| k == kind)
                .map(|(_, n)| *n)
                .unwrap();
            let definition = if name == "Deployment" {
                &schema
            } else {
                &schema["$defs"][name]
            };
            let properties: BTreeSet<&str> = definition["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("{name} has no properties"))
                .keys()
                .map(String::as_str)
                .collect();
            let decoded: BTreeSet<&str> = known
                .iter()
                .copied()
                .filter(|k| name != "Service" || !ALIASES.iter().any(|(_, alias)| alias == k))
                .collect();
            assert_eq!(decoded, properties, "{name}");
            assert_eq!(
                definition["additionalProperties"],
                Value::Bool(false),
                "{name}"
            );
        }
    }

    #[test]
    fn both_spellings_are_in_the_schema() {
        let schema: Value = serde_json::from_str(&generate()).unwrap();
        let service = &schema["$defs"]["Service"]["properties"];
        for key in [
            "env-files",
            "env_files",
            "import-path",
            "import_path",
            "path",
        ] {
            assert!(service.get(key).is_some(), "{key}");
        }
        let queue = &schema["$defs"]["MessageQueue"]["properties"];
        assert!(queue.get("exchange-name").is_some());
        assert!(schema["properties"].get("default_service").is_some());
    }
}
