//! Who may publish and subscribe where. Devices get default-deny rules built from their
//! identity: publish only on the uplink topics (the device is the authenticated session, never
//! a topic or payload field), subscribe only to downlink topics carrying their own
//! `device_number` (a gateway also its sub-devices'). Services get the rules configured for
//! them; anonymous clients on a listener that allows them are unrestricted (a trusted network).
use crate::protocols::mqtt::topic;

/// Uplink topics of a directly connected device (ThingsPanel and ThingsBoard styles; the
/// latter after `me` was replaced by the device number).
const DEVICE_PUBLISH: &[&str] =
    &["devices/telemetry", "devices/attributes/+", "devices/event/+", "devices/command/response/+", "devices/attributes/set/response/+"];
const GATEWAY_PUBLISH: &[&str] =
    &["gateway/telemetry", "gateway/attributes/+", "gateway/event/+", "gateway/command/response/+", "gateway/attributes/set/response/+"];
/// Downlink filters; `{}` is the device number.
const DEVICE_SUBSCRIBE: &[&str] = &[
    "devices/telemetry/control/{}",
    "devices/attributes/set/{}/+",
    "devices/attributes/get/{}",
    "devices/command/{}/+",
    "devices/attributes/response/{}/+",
    "devices/event/response/{}/+",
    "v1/devices/{}/attributes",
    "v1/devices/{}/attributes/response/+",
    "v1/devices/{}/rpc/request/+",
    "v1/devices/{}/rpc/response/+",
    "v1/devices/{}/v2/+/response/#",
];
const TB_PUBLISH: &[&str] = &[
    "v1/devices/{}/telemetry",
    "v1/devices/{}/attributes",
    "v1/devices/{}/attributes/request/+",
    "v1/devices/{}/rpc/response/+",
    "v1/devices/{}/rpc/request/+",
    "v1/devices/{}/v2/+/request/+/chunk/+",
    "v1/devices/{}/claim",
];

/// Publish and subscribe rules of one principal.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// Topic filters a PUBLISH topic must match.
    pub publish: Vec<String>,
    /// Templates a SUBSCRIBE filter must be covered by (every topic it matches matches one).
    pub subscribe: Vec<String>,
    /// A device's number: the device templates above apply with `{}` standing for it. They are
    /// shared, not copied with the number filled in for every connected device (~1.5 KiB each).
    device: Option<Box<str>>,
}

impl Acl {
    /// A service's configured rules.
    pub fn rules(publish: Vec<String>, subscribe: Vec<String>) -> Acl {
        Acl { publish, subscribe, device: None }
    }

    /// Rules of device `number`; `gateway`: it has sub-devices, whose numbers are `subs`.
    pub fn device(number: &str, gateway: bool, subs: &[String]) -> Acl {
        let fill = |t: &&str, n: &str| t.replace("{}", n);
        let (mut publish, mut subscribe) = (Vec::new(), Vec::new());
        if gateway {
            publish.extend(GATEWAY_PUBLISH.iter().map(|t| t.to_string()));
            subscribe.extend(
                DEVICE_SUBSCRIBE
                    .iter()
                    .filter(|t| t.starts_with("devices/"))
                    .map(|t| format!("gateway/{}", &fill(t, number)["devices/".len()..])),
            );
            for s in subs {
                subscribe.extend(DEVICE_SUBSCRIBE.iter().map(|t| fill(t, s)));
            }
        }
        Acl { publish, subscribe, device: Some(number.into()) }
    }

    pub fn may_publish(&self, t: &str) -> bool {
        if let Some(n) = self.device.as_deref() {
            // A topic (no wildcards) is matched by a template exactly when it is covered by it.
            if DEVICE_PUBLISH.iter().chain(TB_PUBLISH).any(|f| covered_as(t, f, Some(n))) {
                return true;
            }
        }
        self.publish.iter().any(|f| topic::matches(f, t))
    }

    pub fn may_subscribe(&self, filter: &str) -> bool {
        let inner = topic::parse_shared(filter).map_or(filter, |(_, f)| f);
        if let Some(n) = self.device.as_deref() {
            if DEVICE_SUBSCRIBE.iter().any(|t| covered_as(inner, t, Some(n))) {
                return true;
            }
        }
        self.subscribe.iter().any(|t| covered(inner, t))
    }
}

/// Whether every topic matched by `filter` is matched by `template` (both valid filters).
pub fn covered(filter: &str, template: &str) -> bool {
    covered_as(filter, template, None)
}

/// `covered`, where a device template's `{}` level (with `number`) is exactly that level.
fn covered_as(filter: &str, template: &str, number: Option<&str>) -> bool {
    let mut f = filter.split('/');
    let mut t = template.split('/');
    loop {
        match (f.next(), t.next()) {
            (_, Some("#")) => return true,
            (Some("#"), _) => return false,
            (Some(fl), Some("{}")) if number.is_some() => {
                if Some(fl) != number {
                    return false;
                }
            }
            (Some("+"), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(_), Some("+")) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage() {
        assert!(covered("a/b", "a/+"));
        assert!(covered("a/+", "a/+"));
        assert!(!covered("a/#", "a/+"));
        assert!(covered("a/#", "a/#"));
        assert!(covered("a", "a/#"));
        assert!(covered("a/b/c", "#"));
        assert!(!covered("+/b", "a/b"));
        assert!(!covered("a/b/c", "a/+"));
        assert!(!covered("a", "a/+"));
    }

    #[test]
    fn device_rules() {
        let a = Acl::device("d1", false, &[]);
        assert!(a.may_publish("devices/telemetry"));
        assert!(a.may_publish("devices/attributes/42"));
        assert!(a.may_publish("v1/devices/d1/telemetry"));
        assert!(!a.may_publish("v1/devices/d2/telemetry"));
        assert!(!a.may_publish("devices/command/d2/1"));
        assert!(!a.may_publish("gateway/telemetry"));
        assert!(a.may_subscribe("devices/command/d1/+"));
        assert!(a.may_subscribe("devices/command/d1/77"));
        assert!(!a.may_subscribe("devices/command/+/+"));
        assert!(!a.may_subscribe("devices/command/d2/+"));
        assert!(!a.may_subscribe("devices/#"));
        assert!(!a.may_subscribe("#"));
        assert!(!a.may_subscribe("devices/telemetry"));
        assert!(!a.may_subscribe("$share/g/devices/command/+/+"));
        // The templates' placeholder is never a topic level of its own.
        assert!(!a.may_publish("v1/devices/{}/telemetry"));
        assert!(!a.may_subscribe("devices/command/{}/+"));
        assert!(!a.may_subscribe("devices/command/d1x/+"));
        assert!(a.may_subscribe("v1/devices/d1/v2/fw/response/#"));
        assert!(a.may_publish("v1/devices/d1/v2/fw/request/1/chunk/0"));
        let g = Acl::device("gw", true, &["s1".into()]);
        assert!(g.may_publish("gateway/telemetry"));
        assert!(g.may_subscribe("gateway/command/gw/+"));
        assert!(g.may_subscribe("devices/command/s1/+"));
        assert!(!g.may_subscribe("devices/command/s2/+"));
        assert!(g.may_publish("devices/telemetry") && g.may_subscribe("devices/command/gw/1"), "its own rules too");
        // A service's rules have no placeholder: `{}` is a level like any other there.
        let svc = Acl::rules(vec!["x/{}/y".into()], vec!["x/{}/#".into()]);
        assert!(svc.may_publish("x/{}/y") && svc.may_subscribe("x/{}/z"));
        assert!(!svc.may_publish("x/d1/y"));
    }
}
