//! Feed arbitrary datagrams to the CoAP decoding the node does before it authenticates anyone:
//! the message, its path, query and Observe options. It must never panic, and an accepted
//! message must re-encode.
#![no_main]
use coap_lite::{CoapOption, Packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Packet::from_bytes(data) else { return };
    for o in [CoapOption::UriPath, CoapOption::UriQuery] {
        if let Some(l) = p.get_option(o) {
            let _: Vec<String> = l.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        }
    }
    let _ = p.get_observe_value();
    let _ = p.get_content_format();
    let _ = p.to_bytes();
});
