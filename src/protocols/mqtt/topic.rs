//! Topic names, topic filters and matching, written to the MQTT rules (our own, not mqttbytes').

/// A topic name a client may publish to: non-empty, no wildcards.
pub fn valid_topic_name(t: &str) -> bool {
    !t.is_empty() && valid_topic_name_or_empty(t)
}

/// As `valid_topic_name`, but empty is allowed (5.0 PUBLISH that uses a topic alias).
pub fn valid_topic_name_or_empty(t: &str) -> bool {
    t.len() <= 65_535 && !t.bytes().any(|b| b == b'+' || b == b'#' || b == 0)
}

/// Split `$share/{group}/{filter}` into (group, filter).
pub fn parse_shared(f: &str) -> Option<(&str, &str)> {
    let rest = f.strip_prefix("$share/")?;
    let (group, filter) = rest.split_once('/')?;
    Some((group, filter))
}

/// A topic filter a client may subscribe to, including shared subscriptions.
pub fn valid_filter(f: &str) -> bool {
    if let Some(rest) = f.strip_prefix("$share/") {
        return match rest.split_once('/') {
            Some((group, filter)) => !group.is_empty() && !group.contains(['+', '#']) && valid_plain_filter(filter),
            None => false,
        };
    }
    if f == "$share" {
        return false;
    }
    valid_plain_filter(f)
}

fn valid_plain_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > 65_535 || f.contains('\0') {
        return false;
    }
    let mut levels = f.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Whether `filter` contains a wildcard.
pub fn has_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// The deepest topic or filter any trie of the node holds, whatever `mqtt.max_topic_levels`
/// says: the tries walk levels recursively, so this bounds their depth for messages from
/// peers and from disk too (a hostile entry is refused, never walked).
pub const MAX_LEVELS: usize = 1024;

/// Number of levels in a topic or filter.
pub fn levels(t: &str) -> usize {
    t.split('/').count()
}

/// Does a (non-shared, valid) `filter` match `topic`? Topics starting with `$` never match a
/// filter whose first level is a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A level of a topic-filter trie (filters split at `/`, wildcards as their own levels).
pub trait FilterTrie: Sized {
    fn child(&self, level: &str) -> Option<&Self>;
}

/// Visit every trie node whose filter matches the topic `levels` (start with `first = true`;
/// `dollar`: the topic starts with `$`, which a leading wildcard does not match).
pub fn visit_matches<'a, T: FilterTrie>(node: &'a T, levels: &[&str], first: bool, dollar: bool, f: &mut impl FnMut(&'a T)) {
    let Some((lvl, rest)) = levels.split_first() else {
        f(node);
        if let Some(h) = node.child("#") {
            f(h); // `a/#` also matches `a`
        }
        return;
    };
    if !(first && dollar) {
        if let Some(h) = node.child("#") {
            f(h);
        }
        if let Some(p) = node.child("+") {
            visit_matches(p, rest, false, dollar, f);
        }
    }
    if let Some(c) = node.child(lvl) {
        visit_matches(c, rest, false, dollar, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deliberately naive reference: recursive over level vectors, straight from the spec text.
    fn reference(filter: &str, topic: &str) -> bool {
        fn go(f: &[&str], t: &[&str], first: bool, dollar: bool) -> bool {
            match (f.first(), t.first()) {
                (Some(&"#"), _) => !(first && dollar),
                (Some(&"+"), Some(_)) => !(first && dollar) && go(&f[1..], &t[1..], false, dollar),
                (Some(a), Some(b)) => a == b && go(&f[1..], &t[1..], false, dollar),
                (None, None) => true,
                _ => false,
            }
        }
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        go(&f, &t, true, topic.starts_with('$'))
    }

    #[test]
    fn spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+", ""));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("ü/+/ñ", "ü/日本/ñ"));
    }

    #[test]
    fn filter_validation() {
        for ok in ["#", "+", "a/#", "+/+/#", "a//b", "/", "$share/g/a/+", "$SYS/#", "a/+/b"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+/b", "#/a", "$share/g", "$share//a", "$share/g+/a", "$share/g/", "a\0b"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        assert!(valid_topic_name("a/b"));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name(""));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("".to_string()),
            Just("$x".to_string()),
            Just("ü".to_string()),
            "[a-c$日]{0,3}"
        ]
    }

    fn topic_s() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..6).prop_map(|v| v.join("/")).prop_filter("topics are non-empty", |t| !t.is_empty())
    }

    fn filter_s() -> impl Strategy<Value = String> {
        let lvl = prop_oneof![3 => level(), 1 => Just("+".to_string())];
        (proptest::collection::vec(lvl, 1..6), any::<bool>())
            .prop_map(|(mut v, hash)| {
                if hash {
                    v.push("#".into());
                }
                v.join("/")
            })
            .prop_filter("filters are non-empty", |f| !f.is_empty())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        #[test]
        fn matcher_agrees_with_reference(f in filter_s(), t in topic_s()) {
            prop_assert!(valid_filter(&f));
            prop_assert_eq!(matches(&f, &t), reference(&f, &t), "filter {:?} topic {:?}", f, t);
        }

        #[test]
        fn exact_filter_matches_itself(t in topic_s()) {
            prop_assert!(matches(&t, &t));
        }

        #[test]
        fn never_panics_on_arbitrary_strings(f in "\\PC{0,20}", t in "\\PC{0,20}") {
            let _ = valid_filter(&f);
            if valid_filter(&f) && valid_topic_name(&t) && parse_shared(&f).is_none() {
                prop_assert_eq!(matches(&f, &t), reference(&f, &t));
            }
        }
    }
}
