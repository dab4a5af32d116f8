//! The ops files under `deploy/` (the container image and the Kubernetes example) parse, and
//! name only options and variables that `deployd serve` has: a renamed option fails here, not in
//! somebody's cluster.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `deployd serve --help`: every option, with the variable it reads.
fn serve_help() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_deployd"))
        .args(["serve", "--help"])
        .output()
        .expect("cannot run deployd");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{path:?}: {err}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|err| panic!("{path:?}: {err}")))
        .collect()
}

fn text<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut here = value;
    for key in path {
        here = &here[*key];
    }
    here.as_str()
        .unwrap_or_else(|| panic!("{} is not text in {value:?}", path.join(".")))
}

#[test]
fn the_kubernetes_example_parses_and_uses_only_what_deployd_serve_reads() {
    let help = serve_help();
    let folder = workspace().join("deploy/kubernetes");
    let kustomization = documents(&folder.join("kustomization.yaml"));
    let resources: Vec<&str> = kustomization[0]["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(resources.contains(&"deployd.yaml"), "{resources:?}");
    let mut deployd = None;
    for file in resources.iter().chain(["secret.example.yaml"].iter()) {
        for doc in documents(&folder.join(file)) {
            text(&doc, &["apiVersion"]);
            text(&doc, &["metadata", "name"]);
            if text(&doc, &["kind"]) == "StatefulSet"
                && text(&doc, &["metadata", "name"]) == "deployd"
            {
                deployd = Some(doc);
            }
        }
    }
    let set = deployd.expect("the deployd StatefulSet");
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0].as_str(), Some("serve"));
    let env = container["env"].as_sequence().expect("env");
    let mut listen = None;
    let mut seen = Vec::new();
    for var in env {
        let name = text(var, &["name"]);
        if let Some(value) = var["value"].as_str()
            && name == "DEPLOYD_LISTEN"
        {
            listen = Some(value.to_owned());
        }
        if name.starts_with("DEPLOYD_") {
            assert!(
                help.contains(&format!("env: {name}")),
                "`deployd serve` reads no {name}"
            );
            seen.push(name.to_owned());
        }
    }
    for needed in [
        "DEPLOYD_STORE",
        "DEPLOYD_CLUSTER",
        "DEPLOYD_QUEUE",
        "DEPLOYD_TOKEN",
    ] {
        assert!(
            seen.iter().any(|s| s == needed),
            "{needed} is set: {seen:?}"
        );
    }
    let port: u64 = listen
        .expect("DEPLOYD_LISTEN")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(text(container, &[probe, "httpGet", "path"]), "/status/");
        assert_eq!(container[probe]["httpGet"]["port"].as_u64(), Some(port));
    }
}

#[test]
fn the_container_image_runs_deployd_serve_with_variables_it_reads() {
    let help = serve_help();
    let dockerfile = std::fs::read_to_string(workspace().join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked -p deployd --bin deployd"));
    assert!(
        dockerfile.contains("COPY --from=build /src/target/release/deployd /usr/local/bin/deployd")
    );
    assert!(dockerfile.contains(r#"CMD ["serve"]"#));
    // `ENV A=1 \` and its continuation lines.
    let mut names = Vec::new();
    let mut continued = false;
    for line in dockerfile.lines() {
        let line = line.trim();
        let rest = match line.strip_prefix("ENV ") {
            Some(rest) => rest,
            None if continued => line,
            None => continue,
        };
        continued = rest.ends_with('\\');
        for pair in rest.trim_end_matches('\\').split_whitespace() {
            if let Some((name, value)) = pair.split_once('=') {
                names.push((name.to_owned(), value.to_owned()));
            }
        }
    }
    assert!(!names.is_empty(), "the image sets deployd's variables");
    for (name, _) in &names {
        assert!(
            help.contains(&format!("env: {name}")),
            "`deployd serve` reads no {name}"
        );
    }
    let listen = names
        .iter()
        .find(|(name, _)| name == "DEPLOYD_LISTEN")
        .map(|(_, value)| value.clone())
        .expect("DEPLOYD_LISTEN");
    let port = listen.rsplit(':').next().unwrap();
    assert!(dockerfile.contains(&format!("EXPOSE {port}")), "{listen}");
}
