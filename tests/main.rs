//! All integration tests in one binary: one link instead of one per file (each test binary
//! carries the whole crate, so separate binaries cost minutes of linking and gigabytes of disk).
//! cargo-nextest still runs every test in its own process, so process-global state (ractor's
//! registry, listeners) never leaks between tests.

mod common;

mod alerts;
mod api;
mod bad_input;
mod claim;
mod cli;
mod clients;
mod cluster;
mod cluster_tls;
mod crash;
mod device_http_coap;
mod devices;
mod devices_cluster;
mod failover;
mod haproxy;
mod http;
mod logging;
mod meta;
mod monitoring;
mod mqtt5;
mod ops;
mod ota;
mod package;
mod partition;
mod persistence;
mod redis_topologies;
mod security;
mod supervision;
mod telemetry;
mod timeseries;
mod transports;
mod web;
mod webhooks;
