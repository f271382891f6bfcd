//! Actors: every piece of mutable broker state has exactly one owner here.
pub mod inspect;
pub mod load;
pub mod pending;
pub mod registry;
pub mod retained;
pub mod router;
pub mod session;
pub mod shard;
pub mod supervisor;
pub mod sys;
pub mod trace;
