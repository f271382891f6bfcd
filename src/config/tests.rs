//! The configuration's own tests: the shipped file, environment overrides, validation.
use super::*;

/// The shipped cluster.toml parses and documents the built-in defaults (every key it sets
/// has its default value), so the README's first command runs with it.
#[test]
fn shipped_cluster_toml_is_the_defaults() {
    let text = include_str!("../../cluster.toml");
    let c = Config::from_sources(text, "cluster.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
    let as_toml = |c: &Config| toml::to_string(c).unwrap();
    assert_eq!(as_toml(&c), as_toml(&Config::default()));
}

#[test]
fn defaults_without_file() {
    let c = Config::from_sources("", "x", &[]).unwrap();
    assert_eq!(c.mqtt.max_inflight, 128);
    assert_eq!(c.listeners.tcp[0].bind.port(), 1883);
}

#[test]
fn unknown_key_names_key_and_line() {
    let err = Config::from_sources("[mqtt]\nmax_inflight = 10\nmax_bogus = 3\n", "cluster.toml", &[]).unwrap_err().to_string();
    assert!(err.contains("max_bogus"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("cluster.toml"), "{err}");
}

#[test]
fn bad_value_names_line() {
    let err = Config::from_sources("[mqtt]\n\nmax_inflight = \"lots\"\n", "c.toml", &[]).unwrap_err().to_string();
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn printed_config_masks_secrets() {
    let env = vec![
        ("THINGSD_DEVICES__ADMIN_KEY".to_string(), "super-secret-admin-key".to_string()),
        ("THINGSD_META__URL".into(), "postgres://things:pw123@db/things".into()),
    ];
    let t = Config::from_sources("", "c", &env).unwrap().to_toml();
    assert!(!t.contains("super-secret-admin-key") && !t.contains("pw123") && !t.contains("thingsd-change-me"), "{t}");
    assert!(t.contains("postgres://things:***@db/things"), "{t}");
}

#[test]
fn env_overrides() {
    let env = vec![("THINGSD_MQTT__MAX_INFLIGHT".to_string(), "7".to_string()), ("THINGSD_NODE__NAME".into(), "n9".into())];
    let c = Config::from_sources("[mqtt]\nmax_inflight = 10\n", "c", &env).unwrap();
    assert_eq!(c.mqtt.max_inflight, 7);
    assert_eq!(c.node.name, "n9");
    let bad = vec![("THINGSD_MQTT__NOPE".to_string(), "1".to_string())];
    let err = Config::from_sources("", "c", &bad).unwrap_err().to_string();
    assert!(err.contains("THINGSD_MQTT__NOPE") && err.contains("mqtt.nope"), "{err}");
}
