//! Wire protocols: bytes in, typed packets or a precise error out. No I/O policy, no state.
pub mod mqtt;
