//! MQTT 3.1.1 and 5.0 codec with full validation of the normative packet rules.
//!
//! We replaced `mqttbytes` here: it accepts invalid flags, reserved bits, topics and protocol levels,
//! lacks AUTH, and loses duplicate properties, so validating on top of it would mean re-parsing.
mod decode;
mod encode;
mod props;
pub mod reason;
pub mod topic;
mod types;

pub use decode::{decode, parse_fixed_header, DecodeError};
pub use encode::{encode, encode_puback, encode_publish, publish_len};
pub use props::Properties;
pub use types::*;
#[cfg(test)]
mod tests;
