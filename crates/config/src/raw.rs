//! The file as written: every key llama_deploy and deployd accept, both spellings, before
//! validation. Only this module knows the YAML shape.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_yaml::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeployment {
    pub(crate) name: String,
    #[serde(default, rename = "control-plane", alias = "control_plane")]
    pub(crate) control_plane: Option<Value>,
    #[serde(default, rename = "message-queue", alias = "message_queue")]
    pub(crate) message_queue: Option<Value>,
    #[serde(default, rename = "default-service", alias = "default_service")]
    pub(crate) default_service: Option<String>,
    pub(crate) services: OrderedMap<RawService>,
    #[serde(default)]
    pub(crate) ui: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) source: Option<RawSource>,
    #[serde(default, rename = "import-path", alias = "import_path", alias = "path")]
    pub(crate) import_path: Option<String>,
    #[serde(default)]
    pub(crate) command: Option<RawCommand>,
    #[serde(default)]
    pub(crate) host: Option<String>,
    #[serde(default)]
    pub(crate) port: Option<u16>,
    #[serde(default)]
    pub(crate) env: Option<OrderedMap<Scalar>>,
    #[serde(default, rename = "env-files", alias = "env_files")]
    pub(crate) env_files: Option<Vec<String>>,
    #[serde(
        default,
        rename = "python-dependencies",
        alias = "python_dependencies"
    )]
    pub(crate) python_dependencies: Option<Vec<String>>,
    #[serde(default, rename = "ts-dependencies", alias = "ts_dependencies")]
    pub(crate) ts_dependencies: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    #[serde(rename = "type")]
    pub(crate) kind: RawSourceKind,
    #[serde(default)]
    pub(crate) location: Option<String>,
    /// The older spelling of `location`.
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default, rename = "sync-policy", alias = "sync_policy")]
    pub(crate) sync_policy: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawSourceKind {
    Local,
    Git,
    Docker,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a command line (string) or a list of arguments")]
pub(crate) enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

/// A scalar written where a string is wanted (`PORT: 8080`), kept as its text.
#[derive(Debug)]
pub(crate) struct Scalar(pub(crate) String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// A mapping that keeps the order of the file and rejects a key written twice.
#[derive(Debug)]
pub(crate) struct OrderedMap<V>(pub(crate) Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format_args!(
                            "`{key}` is defined twice"
                        )));
                    }
                    let value = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}
