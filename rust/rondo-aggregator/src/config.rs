//! The aggregator's config; `configs/dev-aggregator.toml` documents every key and is compiled in
//! as the defaults.

use rondo_core::aggregate::{AccumulationMode, AccumulatorOptions};
use serde::Deserialize;

pub const DEFAULTS: &str = include_str!("../../../configs/dev-aggregator.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct AggregatorConfig {
    pub api: ApiConfig,
    pub rpc: RpcConfig,
    pub model: ModelConfig,
    pub aggregation: AggregationConfig,
    pub link: LinkConfig,
    pub runtime: RuntimeConfig,
    pub limits: crate::wire::UploadLimits,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiConfig {
    pub host: String,
    pub port: u16,
    pub public_url: String,
    pub max_body_bytes: u64,
    pub upload_idle_timeout_secs: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RpcConfig {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    pub initial_model: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AggregationConfig {
    pub mode: AccumulationMode,
    pub deterministic: bool,
    pub staging_memory_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LinkConfig {
    pub call_timeout_secs: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeConfig {
    pub addresses_file: String,
}

impl AggregatorConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !(self.aggregation.deterministic && self.aggregation.mode == AccumulationMode::Hogwild),
            "aggregation.deterministic cannot be combined with mode = \"hogwild\""
        );
        anyhow::ensure!(
            self.api.upload_idle_timeout_secs.is_finite()
                && self.api.upload_idle_timeout_secs > 0.0,
            "api.upload_idle_timeout_secs must be a positive number of seconds"
        );
        anyhow::ensure!(
            self.link.call_timeout_secs > 0.0,
            "link.call_timeout_secs must be positive"
        );
        Ok(())
    }
}

impl AggregationConfig {
    pub fn accumulator_options(&self) -> AccumulatorOptions {
        AccumulatorOptions {
            mode: self.mode,
            deterministic: self.deterministic,
        }
    }
}
