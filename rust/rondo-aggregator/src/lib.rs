//! The Rondo aggregator: the data plane. It serves the global model, takes one update per
//! selected participant per round, folds each into a running weighted sum as it is accepted,
//! and turns the sum into the next global model when the coordinator closes the round.
//!
//! A short tour:
//!
//! - [`config`]: the TOML config (`configs/dev-aggregator.toml` is compiled in as defaults).
//! - [`wire`]: safetensors on the wire — reading an upload off the socket into a staging
//!   buffer, validating it, and laying out the global model file.
//! - [`staging`]: the staging budget and the pool of upload buffers reused within it.
//! - [`rounds`]: the round book — global model, open round, tokens, the round's aggregation,
//!   and the commit and close brackets around it; plain data.
//! - [`durable`]: with a durable store, the open round and every accepted update saved before
//!   it is acknowledged, and read back into the round after a restart.
//! - [`spare`]: model-sized memory recycled from a replaced model into the next round's sum.
//! - [`service`]: the shared [`service::Aggregator`] (book + staging pool + outbox + metrics).
//! - [`http`]: the participants' HTTP API (axum).
//! - [`link`]: the tarpc side — serving the coordinator's calls, and the outbox of notices back.
//! - [`output`]: each new global model written to `model.output_path`, atomically.
//! - [`models`]: the model store (`store.data_dir`): every global model kept durably with its
//!   manifest, written before the round is reported, read back checked against its SHA-256.
//! - [`run`]: start-up, used by `main`.

pub mod config;
pub mod durable;
pub mod http;
pub mod link;
pub mod models;
pub mod output;
pub mod python;
pub mod rounds;
pub mod run;
pub mod service;
pub mod spare;
pub mod staging;
pub mod wire;
