//! The aggregator's config; `configs/dev-aggregator.toml` documents every key and is compiled in
//! as the defaults, `docs/configuration.md` gives every key's range.
//!
//! [`AggregatorConfig`] is the config as deserialized (unknown keys and wrong types refused);
//! [`AggregatorSettings::from_config`] checks every value and gives what the aggregator runs
//! with.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rondo_core::aggregate::{AccumulationMode, AccumulatorOptions};
use rondo_core::strategy::{self as strategies, Options, Strategy};
use rondo_net::link::LinkSecurity;
use rondo_net::settings::{self, ConfigError, FromConfig};
use serde::Deserialize;

pub const DEFAULTS: &str = include_str!("../../../configs/dev-aggregator.toml");

/// Sizes in bytes (uploads, staging memory): from 1 byte to 1 TiB.
/// More uploads at once than this would run out of file descriptors first.
const MAX_UPLOADS_IN_FLIGHT: usize = 1 << 20;
const MAX_BYTES: u64 = 1 << 40;
/// Calls to the coordinator: from 1 ms to an hour.
const CALL_TIMEOUT_SECS: (f64, f64) = (0.001, 3600.0);
/// Silence allowed during an upload: from 1 ms to a day.
const IDLE_TIMEOUT_SECS: (f64, f64) = (0.001, 86_400.0);
/// A call into a Python aggregator: from 1 ms to a day.
const PYTHON_TIMEOUT_SECS: (f64, f64) = (0.001, 86_400.0);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    pub api: ApiConfig,
    pub rpc: RpcConfig,
    pub model: ModelConfig,
    pub aggregation: AggregationConfig,
    pub link: LinkConfig,
    pub runtime: RuntimeConfig,
    pub limits: crate::wire::UploadLimits,
    pub store: StoreConfig,
    pub log: rondo_net::settings::LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub host: String,
    #[serde(deserialize_with = "settings::integer")]
    pub port: u16,
    pub public_url: String,
    #[serde(deserialize_with = "settings::integer")]
    pub max_body_bytes: u64,
    #[serde(deserialize_with = "settings::number")]
    pub upload_idle_timeout_secs: f64,
    #[serde(deserialize_with = "settings::integer")]
    pub min_upload_bytes_per_sec: u64,
    #[serde(deserialize_with = "settings::integer")]
    pub max_uploads_in_flight: usize,
    #[serde(deserialize_with = "settings::integer")]
    pub max_connections: usize,
    #[serde(deserialize_with = "settings::number")]
    pub header_timeout_secs: f64,
    pub tls: rondo_net::tls::TlsFiles,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcConfig {
    pub host: String,
    #[serde(deserialize_with = "settings::integer")]
    pub port: u16,
    pub key_file: String,
    pub tls: rondo_net::tls::RpcTlsFiles,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub initial_model: String,
    pub output_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationConfig {
    pub strategy: String,
    pub mode: AccumulationMode,
    #[serde(deserialize_with = "settings::boolean")]
    pub deterministic: bool,
    #[serde(deserialize_with = "settings::integer")]
    pub staging_memory_bytes: u64,
    /// The strategy's knobs, each a number (`[aggregation.options]`).
    #[serde(default)]
    pub options: BTreeMap<String, OptionValue>,
    pub python: PythonConfig,
}

/// One `[aggregation.options]` value: a number, nothing else.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(transparent)]
pub struct OptionValue(#[serde(deserialize_with = "settings::number")] pub f64);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonConfig {
    pub module: String,
    pub class: String,
    #[serde(deserialize_with = "settings::number")]
    pub timeout_secs: f64,
    pub venv: String,
}

/// A Python aggregator, as `[aggregation.python]` names it (`strategy = "python"`).
#[derive(Debug, Clone, PartialEq)]
pub struct PythonSettings {
    /// The module to import (e.g. `rondo_aggregators.weighted_average`).
    pub module: String,
    /// The class in it, instantiated once with `[aggregation.options]` as keyword arguments.
    pub class: String,
    /// Longest any one call into it may take; past it, the round fails.
    pub timeout: Duration,
    /// A virtual environment whose packages the interpreter sees (its `site-packages` put in
    /// front of `sys.path`). Empty: `$VIRTUAL_ENV` when set, else the interpreter's own.
    pub venv: String,
    pub options: BTreeMap<String, f64>,
}

/// How the aggregator aggregates: a native rule, or a Python one.
#[derive(Debug, Clone)]
pub enum StrategyChoice {
    Native(Arc<dyn Strategy>),
    Python(PythonSettings),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    #[serde(deserialize_with = "settings::number")]
    pub call_timeout_secs: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub addresses_file: String,
}

/// `[store]`: where state outlives the process: the model store and saved updates
/// (`data_dir`), and the state store (`url`, see [`crate::durable`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    pub namespace: String,
    pub data_dir: String,
    #[serde(deserialize_with = "settings::integer")]
    pub keep_models: u32,
}

/// `[store]`, checked: `data_dir` exists (created at start-up) and is writable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The state store's URL (`None`: in memory), namespace and `data_dir`.
    pub state: rondo_net::store::StoreSettings,
    /// `None`: no model store (`store.data_dir` empty).
    pub data_dir: Option<std::path::PathBuf>,
    /// How many rounds to keep, the newest; 0: all.
    pub keep_models: u32,
}

/// What the aggregator runs with: every value checked.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    pub api: ApiSettings,
    pub rpc: RpcConfig,
    pub model: ModelConfig,
    pub aggregation: AggregationConfig,
    pub strategy: StrategyChoice,
    /// What both RPC directions prove and how they are protected (`rpc.key_file`, `[rpc.tls]`).
    pub link_security: LinkSecurity,
    pub link: LinkSettings,
    pub runtime: RuntimeConfig,
    pub limits: crate::wire::UploadLimits,
    pub store: StoreSettings,
    /// `log.format`.
    pub log_format: rondo_net::settings::LogFormat,
}

#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// `[api.tls]`, loaded: the API serves HTTPS only; `None`: plain HTTP.
    pub tls: Option<rondo_net::tls::ServerTls>,
    pub host: String,
    pub port: u16,
    /// Empty, or an http(s) URL.
    pub public_url: String,
    pub max_body_bytes: u64,
    pub upload: UploadPace,
    /// `api.max_connections` and `api.header_timeout_secs`.
    pub http_limits: rondo_net::boot::HttpLimits,
}

/// How uploads must arrive (`[api]`): what keeps a slow or stalled participant from holding a
/// task, a connection and its staging memory for long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadPace {
    /// No byte for this long: dropped (408 `upload_stalled`).
    pub idle_timeout: Duration,
    /// Past `idle_timeout` from its first byte, an upload slower than this on average is
    /// dropped (408 `upload_too_slow`); 0: no minimum.
    pub min_bytes_per_sec: u64,
    /// Uploads being received at once; one more gets 503 `too_many_uploads`.
    pub max_in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub call_timeout: Duration,
}

impl FromConfig for AggregatorSettings {
    type Raw = AggregatorConfig;

    fn log_format(&self) -> rondo_net::settings::LogFormat {
        self.log_format
    }

    fn from_config(raw: AggregatorConfig) -> Result<Self, ConfigError> {
        let aggregation = raw.aggregation;
        if aggregation.deterministic && aggregation.mode == AccumulationMode::Hogwild {
            return Err(ConfigError::invalid(
                "aggregation.deterministic",
                true,
                "cannot be combined with aggregation.mode = \"hogwild\"",
            ));
        }
        settings::int(
            "aggregation.staging_memory_bytes",
            aggregation.staging_memory_bytes,
            1,
            MAX_BYTES,
        )?;
        let strategy = strategy_choice(&aggregation)?;
        let link_security = LinkSecurity {
            key: settings::link_key("rpc.key_file", &raw.rpc.key_file)?,
            tls: rondo_net::tls::rpc(&raw.rpc.tls)?,
        };
        Ok(Self {
            log_format: raw.log.format,
            strategy,
            link_security,
            api: ApiSettings {
                tls: rondo_net::tls::server("api.tls", &raw.api.tls)?,
                host: settings::non_empty("api.host", raw.api.host)?,
                port: raw.api.port,
                public_url: settings::base_url("api.public_url", raw.api.public_url)?,
                max_body_bytes: settings::int(
                    "api.max_body_bytes",
                    raw.api.max_body_bytes,
                    1,
                    MAX_BYTES,
                )?,
                upload: UploadPace {
                    idle_timeout: settings::secs(
                        "api.upload_idle_timeout_secs",
                        raw.api.upload_idle_timeout_secs,
                        IDLE_TIMEOUT_SECS.0,
                        IDLE_TIMEOUT_SECS.1,
                    )?,
                    min_bytes_per_sec: settings::int(
                        "api.min_upload_bytes_per_sec",
                        raw.api.min_upload_bytes_per_sec,
                        0,
                        MAX_BYTES,
                    )?,
                    max_in_flight: settings::int(
                        "api.max_uploads_in_flight",
                        raw.api.max_uploads_in_flight,
                        1,
                        MAX_UPLOADS_IN_FLIGHT,
                    )?,
                },
                http_limits: rondo_net::boot::HttpLimits::from_config(
                    raw.api.max_connections,
                    raw.api.header_timeout_secs,
                )?,
            },
            rpc: RpcConfig {
                host: settings::non_empty("rpc.host", raw.rpc.host)?,
                ..raw.rpc
            },
            model: ModelConfig {
                output_path: output_path("model.output_path", raw.model.output_path)?,
                ..raw.model
            },
            aggregation,
            link: LinkSettings {
                call_timeout: settings::secs(
                    "link.call_timeout_secs",
                    raw.link.call_timeout_secs,
                    CALL_TIMEOUT_SECS.0,
                    CALL_TIMEOUT_SECS.1,
                )?,
            },
            runtime: raw.runtime,
            limits: {
                raw.limits.validate().map_err(ConfigError::unreadable)?;
                raw.limits
            },
            store: store_settings(raw.store)?,
        })
    }
}

/// The most rounds `store.keep_models` can name (0 keeps all anyway).
const MAX_KEEP_MODELS: u32 = 1_000_000;

fn store_settings(raw: StoreConfig) -> Result<StoreSettings, ConfigError> {
    let keep_models = settings::int("store.keep_models", raw.keep_models, 0, MAX_KEEP_MODELS)?;
    if raw.data_dir.is_empty() {
        return Ok(StoreSettings {
            state: rondo_net::store::StoreSettings::new(&raw.url, &raw.namespace, "")?,
            data_dir: None,
            keep_models,
        });
    }
    let dir = std::path::PathBuf::from(&raw.data_dir);
    crate::models::check_data_dir(&dir).map_err(|problem| {
        ConfigError::invalid(
            "store.data_dir",
            format!("{:?}", raw.data_dir),
            format!("must be a writable directory (created if missing): {problem}"),
        )
    })?;
    Ok(StoreSettings {
        state: rondo_net::store::StoreSettings::new(&raw.url, &raw.namespace, &raw.data_dir)?,
        data_dir: Some(dir),
        keep_models,
    })
}

/// Empty, or a file path whose directory exists (the file itself is written later).
fn output_path(key: &str, value: String) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Ok(value);
    }
    let path = std::path::Path::new(&value);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    if path.file_name().is_none() || value.ends_with('/') || path.is_dir() || !dir.is_dir() {
        return Err(ConfigError::invalid(
            key,
            format!("{value:?}"),
            "must name a file in an existing directory",
        ));
    }
    Ok(value)
}

/// The rule `[aggregation]` names, with its options checked (a native rule is built here, so
/// that a bad option stops the aggregator at start-up).
fn strategy_choice(aggregation: &AggregationConfig) -> Result<StrategyChoice, ConfigError> {
    let options: BTreeMap<String, f64> = aggregation
        .options
        .iter()
        .map(|(name, value)| (name.clone(), value.0))
        .collect();
    if aggregation.strategy != "python" {
        return strategies::build(
            &aggregation.strategy,
            Options::new(options),
            aggregation.accumulator_options(),
        )
        .map(StrategyChoice::Native)
        .map_err(|e| ConfigError::unreadable(e.to_string()));
    }
    let python = &aggregation.python;
    for (key, value) in [
        ("aggregation.python.module", &python.module),
        ("aggregation.python.class", &python.class),
    ] {
        let dotted = value.split('.').all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_alphanumeric() || c == '_')
        });
        if !dotted || (key.ends_with("class") && value.contains('.')) {
            return Err(ConfigError::invalid(
                key,
                format!("{value:?}"),
                "must be a Python name (a dotted module path for the module)",
            ));
        }
    }
    if let Some((name, value)) = options.iter().find(|(_, v)| !v.is_finite()) {
        return Err(ConfigError::invalid(
            &format!("aggregation.options.{name}"),
            value,
            "must be a finite number",
        ));
    }
    Ok(StrategyChoice::Python(PythonSettings {
        module: python.module.clone(),
        class: python.class.clone(),
        timeout: settings::secs(
            "aggregation.python.timeout_secs",
            python.timeout_secs,
            PYTHON_TIMEOUT_SECS.0,
            PYTHON_TIMEOUT_SECS.1,
        )?,
        venv: python.venv.clone(),
        options,
    }))
}

impl AggregationConfig {
    pub fn accumulator_options(&self) -> AccumulatorOptions {
        AccumulatorOptions {
            mode: self.mode,
            deterministic: self.deterministic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults with `overrides` (TOML) laid over them, as the binary would read them.
    fn load(overrides: &str) -> Result<AggregatorSettings, ConfigError> {
        rondo_net::boot::load_settings_with(DEFAULTS, overrides)
    }

    fn error(overrides: &str) -> String {
        load(overrides)
            .expect_err(&format!("{overrides} is refused"))
            .to_string()
    }

    #[test]
    fn the_defaults_are_valid() {
        let settings = load("").expect("the defaults are valid");
        assert_eq!(settings.link.call_timeout, Duration::from_secs(5));
        assert_eq!(settings.api.upload.idle_timeout, Duration::from_secs(30));
        assert_eq!(settings.api.max_body_bytes, 4 << 30);
    }

    #[test]
    fn the_output_path_must_be_in_an_existing_directory() {
        let text = error("[model]\noutput_path = \"/no/such/dir/model.safetensors\"\n");
        assert!(text.contains("model.output_path"), "{text}");
        assert!(text.contains("existing directory"), "{text}");
        let dir = std::env::temp_dir().display().to_string();
        let ok = load(&format!(
            "[model]\noutput_path = \"{dir}/model.safetensors\"\n"
        ));
        assert!(ok.is_ok(), "{ok:?}");
        assert!(error(&format!("[model]\noutput_path = \"{dir}/\"\n")).contains("a file"));
    }

    #[test]
    fn the_store_is_off_by_default_and_its_data_dir_must_be_a_writable_directory() {
        assert_eq!(
            load("").expect("the defaults are valid").store,
            StoreSettings {
                state: rondo_net::store::StoreSettings {
                    url: None,
                    namespace: "default".to_string(),
                    data_dir: None,
                },
                data_dir: None,
                keep_models: 0
            }
        );
        let tmp = tempfile::tempdir().expect("a temp dir");
        let dir = tmp.path().join("new/store");
        let settings = load(&format!(
            "[store]\ndata_dir = \"{}\"\nkeep_models = 3\n",
            dir.display()
        ))
        .expect("a missing directory is created");
        assert_eq!(settings.store.data_dir.as_deref(), Some(dir.as_path()));
        assert_eq!(settings.store.keep_models, 3);
        assert!(dir.join("models").is_dir());
        let file = tmp.path().join("a-file");
        std::fs::write(&file, b"x").expect("a file");
        for bad in [file.clone(), file.join("below")] {
            let text = error(&format!("[store]\ndata_dir = \"{}\"\n", bad.display()));
            assert!(
                text.starts_with("invalid config: store.data_dir = "),
                "{text}"
            );
            assert!(text.contains("must be a writable directory"), "{text}");
        }
        for (bad, key) in [
            ("keep_models = -1", "`store.keep_models`"),
            ("keep_models = 1.5", "`store.keep_models`"),
            ("keep_models = 1000001", "store.keep_models = 1000001"),
        ] {
            let text = error(&format!("[store]\n{bad}\n"));
            assert!(text.contains(key), "{bad}: {text}");
        }
    }

    #[test]
    fn the_strategy_and_its_options_are_checked_at_start_up() {
        let settings = load("").expect("the defaults are valid");
        assert!(matches!(&settings.strategy, StrategyChoice::Native(s) if s.name() == "fedavg"));
        assert_eq!(
            error("[aggregation]\nstrategy = \"fedsgd\"\n"),
            "invalid config: aggregation.strategy = \"fedsgd\": is not a native strategy (one of fedavg, \
             fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed_mean, krum, multi_krum, bulyan)"
        );
        assert_eq!(
            error("[aggregation.options]\nbeta = 0.2\n"),
            "invalid config: aggregation.options.beta: is not an option of strategy \"fedavg\""
        );
        assert!(error("[aggregation.options]\nbeta = \"high\"\n").contains("a number"));
        let python = load(
            "[aggregation]\nstrategy = \"python\"\n[aggregation.options]\nlr = 0.5\n\
             [aggregation.python]\ntimeout_secs = 2.5\n",
        )
        .expect("a python strategy");
        let StrategyChoice::Python(python) = python.strategy else {
            panic!("python strategy expected");
        };
        assert_eq!(python.module, "rondo_aggregators.weighted_average");
        assert_eq!(python.timeout, Duration::from_millis(2500));
        assert_eq!(python.options, BTreeMap::from([("lr".to_string(), 0.5)]));
        for (key, bad) in [
            ("module", "\"os; import x\""),
            ("module", "\"\""),
            ("class", "\"a.B\""),
            ("timeout_secs", "0"),
        ] {
            let text = error(&format!(
                "[aggregation]\nstrategy = \"python\"\n[aggregation.python]\n{key} = {bad}\n"
            ));
            assert!(
                text.contains(&format!("aggregation.python.{key}")),
                "{text}"
            );
        }
    }

    #[test]
    fn every_duration_refuses_negative_zero_nan_infinite_and_huge_values() {
        for key in ["link.call_timeout_secs", "api.upload_idle_timeout_secs"] {
            let (section, name) = key.split_once('.').expect("section.key");
            for bad in ["-1.0", "0", "nan", "inf", "-inf", "1e300"] {
                let text = error(&format!("[{section}]\n{name} = {bad}\n"));
                assert!(
                    text.starts_with(&format!("invalid config: {key} = ")),
                    "{key} = {bad}: {text}"
                );
                assert!(
                    text.contains("must be a finite number of seconds"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn byte_sizes_must_be_positive_and_at_most_1_tib() {
        for key in ["api.max_body_bytes", "aggregation.staging_memory_bytes"] {
            let (section, name) = key.split_once('.').expect("section.key");
            for bad in ["0", "1099511627777"] {
                let text = error(&format!("[{section}]\n{name} = {bad}\n"));
                assert!(
                    text.starts_with(&format!("invalid config: {key} = {bad}: must be")),
                    "{text}"
                );
            }
            for bad in ["-1", "1.5", "\"big\"", "true"] {
                let text = error(&format!("[{section}]\n{name} = {bad}\n"));
                assert!(text.contains(&format!("`{key}`")), "{key} = {bad}: {text}");
            }
            for good in ["1", "1099511627776"] {
                load(&format!("[{section}]\n{name} = {good}\n")).expect("an edge value");
            }
        }
    }

    #[test]
    fn edge_values_are_accepted() {
        let settings = load(
            "[api]\nport = 65535\nupload_idle_timeout_secs = 86400\n\
             public_url = \"https://agg.example/\"\n[link]\ncall_timeout_secs = 0.001\n",
        )
        .expect("edge values are valid");
        assert_eq!(settings.api.port, 65535);
        assert_eq!(
            settings.api.upload.idle_timeout,
            Duration::from_secs(86_400)
        );
        assert_eq!(settings.link.call_timeout, Duration::from_millis(1));
    }

    #[test]
    fn other_bad_values_are_refused_by_name() {
        for (overrides, key) in [
            ("[api]\nport = 65536", "`api.port`"),
            ("[api]\nhost = \"\"", "api.host"),
            ("[api]\npublic_url = \"agg:8091\"", "api.public_url"),
            ("[aggregation]\nmode = \"fast\"", "`aggregation.mode`"),
            (
                "[aggregation]\ndeterministic = 1",
                "`aggregation.deterministic`",
            ),
            (
                "[aggregation]\ndeterministic = true\nmode = \"hogwild\"",
                "aggregation.deterministic",
            ),
            (
                "[link]\ncall_timeout_secs = \"soon\"",
                "`link.call_timeout_secs`",
            ),
            ("[link]\ncall_timeout = 5", "call_timeout"),
            ("[limitz]\nx = 1", "limitz"),
        ] {
            let text = error(overrides);
            assert!(text.starts_with("invalid config: "), "{text}");
            assert!(text.contains(key), "{overrides}: {text}");
        }
    }
}
