//! The Rondo coordinator: the control plane. Participants join and heartbeat over HTTP; the
//! coordinator selects them for rounds, hands out one-round tokens, and tells the aggregator
//! over tarpc when a round opens and closes.
//!
//! A short tour:
//!
//! - [`config`]: the TOML config (`configs/dev-coordinator.toml` is compiled in as defaults).
//! - [`service`]: the shared [`service::Coordinator`] — the state machine from
//!   `rondo_core::federation` behind a lock, plus metrics.
//! - [`http`]: the participants' HTTP API (axum): join, heartbeat, start_training, evaluation
//!   reports, status, and the round history (JSON, and CSV from [`history`]).
//! - [`status`]: the status endpoint's view of the federation, and the counts the metrics
//!   gauges read.
//! - [`history`]: the round history as CSV.
//! - [`link`]: the tarpc side — notices from the aggregator, and the driver loop that ticks the
//!   state machine and carries its commands to the aggregator, reconnecting as needed.
//! - [`run`]: start-up, used by `main`.

pub mod config;
pub mod history;
pub mod http;
pub mod link;
pub mod run;
pub mod service;
pub mod status;
