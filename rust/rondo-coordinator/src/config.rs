//! The coordinator's config; `configs/dev-coordinator.toml` documents every key and is compiled
//! in as the defaults.

use std::time::Duration;

use rondo_core::federation::FederationSettings;
use serde::Deserialize;

pub const DEFAULTS: &str = include_str!("../../../configs/dev-coordinator.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct CoordinatorConfig {
    pub api: Endpoint,
    pub rpc: RpcEndpoint,
    pub aggregator: AggregatorLink,
    pub federation: FederationConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RpcEndpoint {
    pub host: String,
    pub port: u16,
    pub advertise_address: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AggregatorLink {
    pub rpc_address: String,
    pub call_timeout_secs: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FederationConfig {
    pub rounds: u32,
    pub min_clients: usize,
    pub participants_ratio: f64,
    pub heartbeat_period_secs: f64,
    pub heartbeat_timeout_secs: f64,
    pub round_timeout_secs: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeConfig {
    pub addresses_file: String,
}

impl CoordinatorConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        let f = &self.federation;
        anyhow::ensure!(
            (0.0..=1.0).contains(&f.participants_ratio),
            "federation.participants_ratio must be between 0 and 1, got {}",
            f.participants_ratio
        );
        for (key, value) in [
            ("federation.heartbeat_period_secs", f.heartbeat_period_secs),
            (
                "federation.heartbeat_timeout_secs",
                f.heartbeat_timeout_secs,
            ),
            ("federation.round_timeout_secs", f.round_timeout_secs),
            (
                "aggregator.call_timeout_secs",
                self.aggregator.call_timeout_secs,
            ),
        ] {
            anyhow::ensure!(
                value.is_finite() && value > 0.0,
                "{key} must be a positive number of seconds, got {value}"
            );
        }
        anyhow::ensure!(
            f.heartbeat_timeout_secs > f.heartbeat_period_secs,
            "federation.heartbeat_timeout_secs ({}) must exceed heartbeat_period_secs ({})",
            f.heartbeat_timeout_secs,
            f.heartbeat_period_secs
        );
        Ok(())
    }

    pub fn federation_settings(&self) -> FederationSettings {
        let f = &self.federation;
        FederationSettings {
            rounds: f.rounds,
            min_clients: f.min_clients,
            participants_ratio: f.participants_ratio,
            heartbeat_timeout: Duration::from_secs_f64(f.heartbeat_timeout_secs),
            round_timeout: Duration::from_secs_f64(f.round_timeout_secs),
        }
    }
}
