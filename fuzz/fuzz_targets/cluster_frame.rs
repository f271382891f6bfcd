//! Feed arbitrary bytes to the cluster wire decoder (what a peer, or a stranger that learnt the
//! cookie, can send). It must never panic, and whatever it accepts must re-encode to a frame
//! that decodes again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use thingsd::cluster::wire::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok((from, body)) = decode(data) {
        let again = encode(&from, &body);
        decode(&again).expect("a re-encoded frame decodes");
    }
});
