//! The interpolation policies of `parse_with_options`: every variable, only the variables the
//! lookup answers, or none; and names, which take variables only from the first.

use deployd_config::{
    Diagnostics, Interpolation, Loaded, ParseOptions, parse, parse_with, parse_with_options,
};

/// What the caller offers.
fn offered(name: &str) -> Option<String> {
    match name {
        "REGION" => Some("eu-west-1".to_owned()),
        "EMPTY" => Some(String::new()),
        "SECRET" => Some("s3cr3t-value".to_owned()),
        "NAME" => Some("from-the-environment".to_owned()),
        _ => None,
    }
}

fn load(text: &str, interpolation: Interpolation<'_>) -> Result<Loaded, Diagnostics> {
    parse_with_options(text, "d.yaml", &ParseOptions::new(interpolation))
}

fn env_of(text: &str, interpolation: Interpolation<'_>) -> Vec<(String, String)> {
    match load(text, interpolation) {
        Ok(loaded) => loaded.spec.services[0].env.clone().into_iter().collect(),
        Err(diagnostics) => panic!("{}", diagnostics.render(text)),
    }
}

const VALUES: &str = "\
name: demo
services:
  api:
    command: ./api
    env:
      KNOWN: ${REGION}
      KNOWN_EMPTY_DEFAULTED: ${EMPTY:-fallback}
      UNKNOWN: ${UNSET}
      UNKNOWN_DEFAULTED: ${UNSET:-fallback}
      MIXED: ${REGION}/${UNSET}/${UNSET:-d}
      ESCAPED: $${REGION}
      BAD_NAME: ${1x}
      UNCLOSED: a ${REGION
      DOLLARS: $REGION $$ $
";

#[test]
fn known_expands_what_the_lookup_answers_and_keeps_the_rest_as_written() {
    let env = env_of(VALUES, Interpolation::Known(&offered));
    let expected = [
        ("BAD_NAME", "${1x}"),
        ("DOLLARS", "$REGION $$ $"),
        ("ESCAPED", "${REGION}"),
        ("KNOWN", "eu-west-1"),
        ("KNOWN_EMPTY_DEFAULTED", "fallback"),
        ("MIXED", "eu-west-1/${UNSET}/${UNSET:-d}"),
        ("UNCLOSED", "a ${REGION"),
        ("UNKNOWN", "${UNSET}"),
        ("UNKNOWN_DEFAULTED", "${UNSET:-fallback}"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(env, expected);
}

#[test]
fn off_reads_every_value_as_written() {
    let env = env_of(VALUES, Interpolation::Off);
    let text_of = |key: &str| {
        let line = VALUES
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key}:")))
            .unwrap();
        line.split_once(": ").unwrap().1.to_owned()
    };
    for (key, value) in env {
        assert_eq!(value, text_of(&key), "{key}");
    }
}

#[test]
fn all_is_what_parse_with_does() {
    let text = "name: demo\nservices:\n  api:\n    command: ./api\n    env:\n      A: ${REGION}\n      B: ${UNSET:-d}\n      C: $${REGION}\n";
    let all = load(text, Interpolation::All(&offered)).unwrap();
    assert_eq!(parse_with(text, "d.yaml", &offered).unwrap(), all);
    let env = &all.spec.services[0].env;
    assert_eq!(env["A"], "eu-west-1");
    assert_eq!(env["B"], "d");
    assert_eq!(env["C"], "${REGION}");
    // What the lookup does not answer, without a default, is an error with `All` only.
    let unset = "name: demo\nservices:\n  api:\n    command: ./api ${UNSET}\n";
    let err = load(unset, Interpolation::All(&offered)).unwrap_err();
    assert_eq!(
        err.items[0].message,
        "environment variable `UNSET` is not set"
    );
    let known = load(unset, Interpolation::Known(&offered)).unwrap();
    assert_eq!(
        format!("{:?}", known.spec.services[0].command),
        r#"Some(Shell("./api ${UNSET}"))"#
    );
    // `parse` reads the process environment, as `All` does.
    let from_process = "name: ${CARGO_PKG_NAME}\nservices:\n  a:\n    command: ./a\n";
    assert_eq!(
        parse(from_process, "e.yaml").unwrap().spec.name,
        "deployd-config"
    );
}

/// Files sent over the network: the deployment's name does not come from the environment.
#[test]
fn names_take_variables_only_when_every_variable_is_expanded() {
    let text = "name: ${NAME}\nservices:\n  api:\n    command: ./api\n";
    assert_eq!(
        load(text, Interpolation::All(&offered)).unwrap().spec.name,
        "from-the-environment"
    );
    for interpolation in [Interpolation::Known(&offered), Interpolation::Off] {
        let err = load(text, interpolation).unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.yaml:1:7: error: `name`: invalid deployment name `${NAME}`: names cannot use \
             variables: a name is a URL path segment and a directory name",
            "{interpolation:?}"
        );
    }
    // Service ids are keys, which never take variables.
    let id = "name: demo\nservices:\n  ${NAME}:\n    command: ./api\n";
    for interpolation in [
        Interpolation::All(&offered),
        Interpolation::Known(&offered),
        Interpolation::Off,
    ] {
        let err = load(id, interpolation).unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.yaml:3:3: error: `services.${NAME}`: invalid service id `${NAME}`: names cannot \
             use variables: a name is a URL path segment and a directory name",
            "{interpolation:?}"
        );
    }
    // `default-service` names a service: read as written too.
    let default = "name: demo\ndefault-service: ${SECRET}\nservices:\n  api:\n    command: ./api\n";
    let loaded = load(default, Interpolation::Known(&offered)).unwrap();
    assert_eq!(loaded.spec.default_service, "api");
    assert_eq!(
        loaded.warnings[0].to_string(),
        "d.yaml:2:18: warning: `default-service`: `default-service` names no service \
         (`${SECRET}`); `api` is used"
    );
}

/// A value the lookup answered is shown as written in every policy that expands it.
#[test]
fn diagnostics_show_the_text_as_written() {
    let text = "name: demo\nservices:\n  api:\n    command: ./api\n    runtime: ${SECRET}\n    health:\n      path: x${SECRET}\n    port: ${REGION}\n";
    let expected = [
        "d.yaml:5:14: error: `services.api.runtime`: `${SECRET}` is not a runtime (use one of `python` or `process`)",
        "d.yaml:7:13: error: `services.api.health.path`: the health path `x${SECRET}` must start with `/` and have no spaces",
        "d.yaml:8:11: error: `services.api.port`: expected an integer, found `${REGION}`",
    ];
    for interpolation in [
        Interpolation::All(&offered),
        Interpolation::Known(&offered),
        Interpolation::Off,
    ] {
        let err = load(text, interpolation).unwrap_err();
        let lines: Vec<String> = err.items.iter().map(ToString::to_string).collect();
        assert_eq!(lines, expected, "{interpolation:?}");
        assert!(!err.render(text).contains("s3cr3t"));
    }
}
