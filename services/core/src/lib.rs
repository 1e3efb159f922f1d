//! smartfarm-core owns what every smartfarm process shares and nothing that talks to a database or the network:
//! the server configuration, the one error type and its mapping to gRPC and HTTP, the caller principal with its
//! authorisation checks, secrets (API keys, device credentials), field validation, pagination, time conversions, the stored photo formats,
//! the alert rules with the evaluator the cloud and the edge agent share, commands' statuses and receipts, the key of a committed edge batch, roles,
//! logging and metrics set-up, and the shutdown signal. The edge agent depends on it, so it must stay small.

#![forbid(unsafe_code)]

pub mod batch;
pub mod commands;
pub mod config;
pub mod credential;
pub mod error;
pub mod media;
pub mod observability;
pub mod paging;
pub mod principal;
pub mod role;
pub mod rules;
pub mod shutdown;
pub mod time;
pub mod validate;

pub use error::{Error, Result};
pub use principal::Principal;
pub use role::{Role, Target};
