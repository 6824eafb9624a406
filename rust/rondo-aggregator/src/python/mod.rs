//! Python aggregators (`strategy = "python"`), embedded with pyo3.
//!
//! [`strategy`] starts the interpreter (once per process), imports `[aggregation.python]
//! module`, checks that `class` subclasses `rondo_aggregators.Aggregator` and instantiates it
//! with `[aggregation.options]` as keyword arguments; any failure there stops the aggregator
//! at start-up. Each training round is then a [`PythonRound`]: its first update calls
//! `start_round` (so a round that is built but never used, or built twice by a retried open,
//! never reaches Python), every update `add_update` with read-only numpy views over the
//! upload's own bytes, and finalize `finish_round`, whose result is checked against the model
//! and copied into the next model file.
//!
//! - `worker`: the one OS thread Python runs on, the calls sent to it and their timeouts,
//!   and the interrupt of a call that runs past its timeout.
//! - `interpreter`: which Python, and which packages it sees.
//! - `convert`: numpy views over `Bytes`, and the check and copy of a returned model.
//!
//! A rule that fails fails the round, never the process: an exception, a wrong result, a
//! non-finite model or a call past the timeout makes `finalize` return the reason; the next
//! round calls `start_round` afresh.

#[cfg(feature = "python")]
mod convert;
#[cfg(feature = "python")]
mod embedded;
#[cfg(feature = "python")]
mod interpreter;
#[cfg(feature = "python")]
mod worker;

#[cfg(feature = "python")]
pub use embedded::{PythonRound, PythonStrategy, strategy};

/// Without the `python` feature, `strategy = "python"` is refused at start-up.
#[cfg(not(feature = "python"))]
pub fn strategy(
    settings: &crate::config::PythonSettings,
) -> anyhow::Result<std::sync::Arc<dyn rondo_core::strategy::Strategy>> {
    Err(rondo_net::settings::ConfigError::invalid(
        "aggregation.strategy",
        "\"python\"",
        format!(
            "{}.{}: this aggregator was built without Python support (cargo feature `python`)",
            settings.module, settings.class
        ),
    )
    .into())
}

#[cfg(all(test, feature = "python"))]
mod tests;
