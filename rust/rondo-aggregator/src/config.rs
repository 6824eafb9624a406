//! The aggregator's config; `configs/dev-aggregator.toml` documents every key and is compiled in
//! as the defaults.

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
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiConfig {
    pub host: String,
    pub port: u16,
    pub public_url: String,
    pub max_body_bytes: u64,
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
    pub max_concurrent_uploads: usize,
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
            self.aggregation.max_concurrent_uploads >= 1,
            "aggregation.max_concurrent_uploads must be at least 1"
        );
        anyhow::ensure!(
            self.link.call_timeout_secs > 0.0,
            "link.call_timeout_secs must be positive"
        );
        Ok(())
    }
}
