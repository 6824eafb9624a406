//! The edge that both Rondo services share.
//!
//! A short tour:
//!
//! - [`link`] is the tarpc link between the coordinator and the aggregator: the two service
//!   traits (one per direction), the messages they carry, and helpers to serve and to connect
//!   with explicit deadlines.
//! - [`link_key`] is the proof of a shared key that every RPC connection starts with (when
//!   `rpc.key_file` is set), so that a stranger cannot drive either service.
//! - [`api`] is what every HTTP API of Rondo answers the same way: the JSON error body (also
//!   for unknown paths and methods), bearer tokens, `/openapi.json`, `/healthz`, and the
//!   Prometheus registry and `/metrics` rendering.
//! - [`boot`] starts a service: the TOML config (embedded defaults, `-c FILE`, `RONDO__…`
//!   environment overrides), logging, binding listeners (port 0 allowed), writing the bound
//!   addresses where scripts and tests can read them, and serving an axum router over HTTP/1.1
//!   (`serve_http`: bounded read buffers, a header timeout, no Nagle delay).
//! - [`shutdown`] is the one shutdown signal and completion guard of a process: accept loops
//!   stop on it, and work that must finish (folds, queued notices, closes) is tracked by it
//!   and drained, within a bound, before exit.
//! - [`retry`] is the one backoff policy (exponential, jittered) of every retried call.
//! - [`store`] is the state store behind one seam (in memory by default, Redis with
//!   `[store] url`), and [`store::Snapshot`], the group-committing writer of a record that
//!   changes often.
//! - [`tls`] loads a listener's certificate and key (`[api.tls]`) into a rustls acceptor;
//!   `boot::serve_http` then serves HTTPS, with the handshake bounded on the connection's task.
//! - [`settings`] turns a config's raw values into checked settings (durations, counts, ratios,
//!   addresses), refusing bad ones with a message that names the key.

pub mod api;
pub mod boot;
pub mod link;
pub mod link_key;
pub mod retry;
pub mod settings;
pub mod shutdown;
pub mod store;
pub mod tls;
