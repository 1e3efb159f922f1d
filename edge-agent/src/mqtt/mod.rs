//! The farm's MQTT broker.

pub mod broker;
pub mod codec;
