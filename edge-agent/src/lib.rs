//! smartfarm-edge owns the farm side of smartfarm: the agent that runs on each farm's Raspberry Pi (an MQTT broker
//! for the farm's sensors with per-device authentication and topic ACL, a registry cache for working offline,
//! aggregation, a durable spool, and the exactly-once uplink to the cloud; the farm's alert rules evaluated on every
//! reading, the urgent lane and the command book that runs each command at most once; the camera service with its image area
//! and resumable photo uploads) and the sensor simulator. It depends on
//! smartfarm-proto and smartfarm-core only, so it builds small for a Pi; it must never reach into cloud crates.

#![forbid(unsafe_code)]

pub mod agent;
pub mod camera;
pub mod commands;
pub mod config;
#[cfg(feature = "ai")]
pub mod diagnose;
pub mod image_spool;
pub mod image_uplink;
pub mod ingest;
pub mod mqtt;
pub mod payload;
pub mod registry;
pub mod rules;
pub mod sim;
pub mod spool;
pub mod uplink;
pub mod urgent;
