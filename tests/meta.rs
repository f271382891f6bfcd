//! The meta store's repositories, run against both backends: SQLite (a file) and a real
//! PostgreSQL (started by scripts/test; required in CI).
use crate::common;

use serde_json::json;
use thingsd::storage::meta::*;

async fn exercise(store: &MetaStore) {
    // Migrations are recorded: opening again is a no-op (checked by the callers reopening).
    let tenants = store.list_tenants().await.unwrap();
    assert_eq!(tenants[0].name, "default");
    let t = store.create_tenant("acme").await.unwrap();
    assert!(matches!(store.create_tenant("acme").await, Err(MetaError::Conflict(_))));
    assert!(matches!(store.create_tenant(" ").await, Err(MetaError::Invalid(_))));

    // Products with a thing model.
    let model: ThingModel = serde_json::from_value(json!({
        "telemetry": [{"key": "temp", "type": "number", "unit": "°C", "min": -40.0, "max": 85.0}, {"key": "on", "type": "boolean"}],
        "attributes": [{"key": "fw", "type": "string"}],
        "events": [{"identifier": "alarm", "params": [{"key": "level", "type": "integer"}]}],
        "commands": [{"identifier": "reboot", "params": []}]
    }))
    .unwrap();
    let p = store
        .create_product(&NewProduct { tenant_id: Some(t.id), name: "sensor".into(), strict: true, model: model.clone() })
        .await
        .unwrap();
    assert_eq!(store.product(p.id).await.unwrap().model, model);
    assert!(matches!(
        store
            .create_product(&NewProduct { tenant_id: Some(t.id), name: "sensor".into(), strict: false, model: ThingModel::default() })
            .await,
        Err(MetaError::Conflict(_))
    ));
    let bad = ThingModel {
        telemetry: vec![Field { key: "x".into(), data_type: DataType::Number, name: None, unit: None, min: Some(2.0), max: Some(1.0) }],
        ..Default::default()
    };
    assert!(matches!(
        store.create_product(&NewProduct { tenant_id: Some(1), name: "bad".into(), strict: false, model: bad }).await,
        Err(MetaError::Invalid(_))
    ));
    assert!(ThingModel::check(&model.telemetry, json!({"temp": 21.5}).as_object().unwrap()).is_ok());
    assert!(ThingModel::check(&model.telemetry, json!({"temp": 120}).as_object().unwrap()).is_err());
    assert!(ThingModel::check(&model.telemetry, json!({"temp": "hot"}).as_object().unwrap()).is_err());
    assert!(ThingModel::check(&model.telemetry, json!({"humidity": 3}).as_object().unwrap()).is_err());

    // Groups and devices.
    let g = store.create_group(t.id, "floor-1", None).await.unwrap();
    let new = |n: &str| NewDevice {
        tenant_id: Some(t.id),
        device_number: n.into(),
        name: String::new(),
        product_id: Some(p.id),
        group_id: Some(g.id),
        labels: [("site".to_string(), "berlin".to_string())].into(),
        gateway_id: None,
        sub_address: None,
    };
    let d1 = store.create_device(&new("dev-1")).await.unwrap();
    assert_eq!(d1.name, "dev-1");
    assert!(d1.enabled);
    assert_eq!(d1.labels["site"], "berlin");
    assert!(matches!(store.create_device(&new("dev-1")).await, Err(MetaError::Conflict(_))));
    assert!(matches!(store.create_device(&new("bad number/with slash")).await, Err(MetaError::Invalid(_))));
    assert!(matches!(store.create_device(&NewDevice { product_id: Some(9999), ..new("dev-x") }).await, Err(MetaError::Invalid(_))));
    let gw = store.create_device(&new("gw-1")).await.unwrap();
    let sub =
        store.create_device(&NewDevice { gateway_id: Some(gw.id), sub_address: Some("modbus-3".into()), ..new("sub-1") }).await.unwrap();
    assert!(matches!(
        store.create_device(&NewDevice { gateway_id: Some(gw.id), sub_address: Some("modbus-3".into()), ..new("sub-2") }).await,
        Err(MetaError::Conflict(_))
    ));
    assert!(matches!(
        store.create_device(&NewDevice { gateway_id: Some(sub.id), sub_address: Some("x".into()), ..new("sub-3") }).await,
        Err(MetaError::Invalid(_))
    ));
    assert_eq!(store.sub_devices(gw.id).await.unwrap().iter().map(|d| d.device_number.as_str()).collect::<Vec<_>>(), ["sub-1"]);
    let page = store.list_devices(0, 2, None, None).await.unwrap();
    assert_eq!(page.len(), 2);
    let rest = store.list_devices(page[1].id, 100, None, None).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(store.list_devices(0, 100, Some(g.id), Some(p.id)).await.unwrap().len(), 3);
    let u = store
        .update_device("dev-1", &DeviceUpdate { enabled: Some(false), name: Some("Dev One".into()), ..Default::default() })
        .await
        .unwrap();
    assert!(!u.enabled);
    assert_eq!(u.name, "Dev One");
    assert_eq!(u.labels["site"], "berlin");
    assert!(matches!(store.update_device("nope", &DeviceUpdate::default()).await, Err(MetaError::NotFound(_))));

    // Credentials.
    let c = store.add_credential(d1.id, CredentialKind::Token, "tok-1", None).await.unwrap();
    assert!(matches!(store.add_credential(gw.id, CredentialKind::Token, "tok-1", None).await, Err(MetaError::Conflict(_))));
    store.add_credential(d1.id, CredentialKind::Password, "user-1", Some("$argon2id$...")).await.unwrap();
    let (found, dev) = store.find_credential(CredentialKind::Token, "tok-1").await.unwrap().unwrap();
    assert_eq!((found.id, dev.id), (c.id, d1.id));
    assert_eq!(
        store.find_credential(CredentialKind::Password, "user-1").await.unwrap().unwrap().0.secret.as_deref(),
        Some("$argon2id$...")
    );
    assert!(store.find_credential(CredentialKind::Token, "nope").await.unwrap().is_none());
    assert_eq!(store.credentials(d1.id).await.unwrap().len(), 2);
    store.delete_credential(d1.id, c.id).await.unwrap();
    assert!(matches!(store.delete_credential(d1.id, c.id).await, Err(MetaError::NotFound(_))));

    // Attributes: upsert per scope.
    store.set_attributes(d1.id, AttributeScope::Client, json!({"fw": "1.0", "n": 3}).as_object().unwrap()).await.unwrap();
    store.set_attributes(d1.id, AttributeScope::Client, json!({"fw": "1.1"}).as_object().unwrap()).await.unwrap();
    store.set_attributes(d1.id, AttributeScope::Shared, json!({"interval": 10}).as_object().unwrap()).await.unwrap();
    assert_eq!(
        serde_json::Value::Object(store.attributes(d1.id, AttributeScope::Client, &[]).await.unwrap()),
        json!({"fw": "1.1", "n": 3})
    );
    assert_eq!(serde_json::Value::Object(store.attributes(d1.id, AttributeScope::Client, &["n".into()]).await.unwrap()), json!({"n": 3}));
    assert_eq!(serde_json::Value::Object(store.attributes(d1.id, AttributeScope::Shared, &[]).await.unwrap()), json!({"interval": 10}));

    // Commands: pending → sent → acknowledged; expiry.
    let now = thingsd::storage::meta::now_ms();
    let cmd = store
        .create_command(&NewCommand {
            device_id: d1.id,
            message_id: "m1".into(),
            kind: CommandKind::Command,
            method: Some("reboot".into()),
            payload: json!({"delay": 1}),
            expires_ms: now + 60_000,
        })
        .await
        .unwrap();
    assert_eq!(cmd.status, CommandStatus::Pending);
    assert_eq!(store.pending_commands(d1.id).await.unwrap().len(), 1);
    let pending = |numbers: &'static [&'static str]| {
        let store = store.clone();
        async move {
            let mut v: Vec<String> = store.pending_among(numbers).await.unwrap().into_iter().collect();
            v.sort();
            v
        }
    };
    const ALL: &[&str] = &["dev-1", "gw-1", "sub-1", "no-such-device"];
    assert_eq!(pending(ALL).await, ["dev-1"]);
    assert!(store.mark_sent(cmd.id).await.unwrap());
    assert!(!store.mark_sent(cmd.id).await.unwrap(), "only once");
    let done = store.complete_command(d1.id, "m1", true, &json!({"result": 0})).await.unwrap().unwrap();
    assert_eq!(done.status, CommandStatus::Acknowledged);
    assert_eq!(done.response, Some(json!({"result": 0})));
    assert!(store.complete_command(d1.id, "m1", false, &json!({})).await.unwrap().is_none(), "a finished command stays finished");
    store
        .create_command(&NewCommand {
            device_id: d1.id,
            message_id: "m2".into(),
            kind: CommandKind::AttributeSet,
            method: None,
            payload: json!({"a": 1}),
            expires_ms: now - 1,
        })
        .await
        .unwrap();
    assert!(store.pending_commands(d1.id).await.unwrap().is_empty(), "expired ones are not pending");
    assert!(pending(ALL).await.is_empty(), "sent, finished and expired ones are not pending");
    // A pending command of a sub-device is pending for its gateway too (its flush sends it).
    let sub = store.device("sub-1").await.unwrap();
    let queued = NewCommand {
        device_id: sub.id,
        message_id: "s1".into(),
        kind: CommandKind::Command,
        method: Some("read".into()),
        payload: json!({}),
        expires_ms: now + 60_000,
    };
    let s1 = store.create_command(&queued).await.unwrap();
    assert_eq!(pending(ALL).await, ["gw-1", "sub-1"]);
    assert_eq!(pending(&["gw-1"]).await, ["gw-1"], "asked alone");
    assert!(pending(&[]).await.is_empty());
    assert!(store.mark_sent(s1.id).await.unwrap());
    assert!(pending(ALL).await.is_empty());
    assert_eq!(store.expire_commands().await.unwrap(), 1);
    assert_eq!(store.command_by_message(d1.id, "m2").await.unwrap().unwrap().status, CommandStatus::Expired);
    let page = store.device_commands(d1.id, 10, 0).await.unwrap();
    assert_eq!((page.items.len(), page.total), (2, 2));
    let page = store.device_commands(d1.id, 1, 1).await.unwrap();
    assert_eq!((page.items.len(), page.total, page.items[0].id), (1, 2, store.device_commands(d1.id, 10, 0).await.unwrap().items[1].id));

    // API keys are stored as hashes.
    assert_eq!(store.api_key_count().await.unwrap(), 0);
    store.add_api_key("k", "abc").await.unwrap();
    assert!(store.api_key_exists("abc").await.unwrap());
    assert!(!store.api_key_exists("abd").await.unwrap());

    // Deleting a device takes its credentials, attributes and commands; its sub-devices stay.
    store.delete_device("gw-1").await.unwrap();
    assert_eq!(store.device("sub-1").await.unwrap().gateway_id, None);
    store.delete_device("dev-1").await.unwrap();
    assert!(store.find_credential(CredentialKind::Password, "user-1").await.unwrap().is_none());
    assert!(matches!(store.device("dev-1").await, Err(MetaError::NotFound(_))));
    store.delete_product(p.id).await.unwrap();
    assert_eq!(store.device("sub-1").await.unwrap().product_id, None);

    // The enabled alert rules' fingerprint moves with every create, change, disable and delete.
    let spec = serde_json::json!({"target": {"device": "x"}, "condition": {"key": "t", "op": ">", "value": 1}});
    let f0 = store.enabled_rules_fingerprint().await.unwrap();
    let r = store.create_rule(1, "fp-rule", true, &spec).await.unwrap();
    let f1 = store.enabled_rules_fingerprint().await.unwrap();
    assert_ne!(f0, f1);
    assert_eq!(f1.0, f0.0 + 1);
    store.update_rule(r.id, "fp-rule", false, &spec).await.unwrap();
    assert_eq!(store.enabled_rules_fingerprint().await.unwrap(), f0, "disabled: as before it existed");
    store.update_rule(r.id, "fp-rule", true, &spec).await.unwrap();
    assert_ne!(store.enabled_rules_fingerprint().await.unwrap(), f0);
}

#[tokio::test]
async fn repositories_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = MetaStore::sqlite_url(dir.path());
    let store = MetaStore::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    exercise(&store).await;
    store.close().await;
    let again = MetaStore::open(&url).await.expect("reopen runs no migration twice");
    assert_eq!(again.list_tenants().await.unwrap().len(), 2);
}

#[tokio::test]
async fn repositories_on_postgres() {
    let Some(url) = common::backends::postgres().await else { return };
    let store = MetaStore::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    exercise(&store).await;
    // Two nodes starting at once migrate once (advisory lock).
    let (a, b) = tokio::join!(MetaStore::open(&url), MetaStore::open(&url));
    a.unwrap();
    b.unwrap();
    assert_eq!(store.list_tenants().await.unwrap().len(), 2);
}

#[tokio::test]
async fn unreachable_database_is_a_clear_error() {
    let err = MetaStore::open("postgres://nobody@127.0.0.1:1/none").await.err().expect("fails");
    assert!(err.to_string().contains("unavailable"), "{err}");
    let err = MetaStore::open("mysql://x").await.err().expect("fails");
    assert!(err.to_string().contains("sqlite: or postgres://"), "{err}");
}
