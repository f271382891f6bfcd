//! Feed arbitrary bytes to the cluster wire decoder (what a peer, or a stranger that learnt the
//! cookie, can send). It must never panic, and whatever it accepts must re-encode, in the
//! version its header named, to a frame that decodes again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thingsd::cluster::wire::{decode, encode, VERSION};

fuzz_target!(|data: &[u8]| {
    if let Ok((from, body)) = decode(data, VERSION) {
        let version = u16::from_le_bytes([data[2], data[3]]);
        let again = encode(version, &from, &body);
        decode(&again, VERSION).expect("a re-encoded frame decodes");
    }
});
