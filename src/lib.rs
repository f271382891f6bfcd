//! thingsd: a clustered IoT device platform. This crate holds the node: MQTT broker core,
//! actors, storage and (as the platform grows) the HTTP API.
pub mod actors;
pub mod alerts;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod dev;
pub mod devices;
pub mod faults;
pub mod http;
pub mod live;
pub mod message;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod protocols;
pub mod queue;
pub mod secrets;
pub mod server;
pub mod services;
pub mod storage;
pub mod telemetry;
pub mod users;
pub mod webhooks;
