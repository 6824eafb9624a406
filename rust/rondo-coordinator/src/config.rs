//! The coordinator's config; `configs/dev-coordinator.toml` documents every key and is compiled
//! in as the defaults, `docs/configuration.md` gives every key's range.
//!
//! [`CoordinatorConfig`] is the config as deserialized (unknown keys and wrong types refused);
//! [`CoordinatorSettings::from_config`] checks every value and gives what the coordinator runs
//! with.

use std::time::Duration;

use rondo_core::federation::FederationSettings;
use rondo_core::federation::{JoinPolicy, SecretHash};
use rondo_net::link::LinkSecurity;
use rondo_net::settings::{self, ConfigError, FromConfig};
use rondo_net::store::StoreSettings;
use serde::Deserialize;

pub const DEFAULTS: &str = include_str!("../../../configs/dev-coordinator.toml");

/// Calls to the aggregator: from 1 ms to an hour.
const CALL_TIMEOUT_SECS: (f64, f64) = (0.001, 3600.0);
/// Heartbeat period and timeout: from 1 ms to a day.
const HEARTBEAT_SECS: (f64, f64) = (0.001, 86_400.0);
/// A round's deadline: from 1 ms to a year.
const ROUND_TIMEOUT_SECS: (f64, f64) = (0.001, 31_536_000.0);
const MAX_ROUNDS: u32 = 1_000_000;
const MAX_MIN_CLIENTS: usize = 1_000_000;
/// Over-selection beyond ten times the target is a typo, not a plan.
const MAX_OVERCOMMIT: f64 = 10.0;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub api: Endpoint,
    pub rpc: RpcEndpoint,
    pub aggregator: AggregatorLink,
    pub federation: FederationConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub runtime: RuntimeConfig,
    pub log: rondo_net::settings::LogConfig,
}

/// `[limits]`: how many participants, and how fast they may join.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(deserialize_with = "settings::integer")]
    pub max_participants: usize,
    #[serde(deserialize_with = "settings::number")]
    pub joins_per_second_per_address: f64,
    #[serde(deserialize_with = "settings::integer")]
    pub join_burst_per_address: u32,
}

/// Joins per source address (`[limits]`): a token bucket of `burst` joins refilled at
/// `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JoinRate {
    pub per_second: f64,
    pub burst: u32,
}

/// `[store]`: where the federation's state is kept (see [`rondo_net::store`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    pub namespace: String,
    pub data_dir: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub host: String,
    #[serde(deserialize_with = "settings::integer")]
    pub port: u16,
    #[serde(deserialize_with = "settings::integer")]
    pub max_connections: usize,
    #[serde(deserialize_with = "settings::number")]
    pub header_timeout_secs: f64,
    pub tls: rondo_net::tls::TlsFiles,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcEndpoint {
    pub host: String,
    #[serde(deserialize_with = "settings::integer")]
    pub port: u16,
    pub advertise_address: String,
    pub key_file: String,
    pub tls: rondo_net::tls::RpcTlsFiles,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorLink {
    pub rpc_address: String,
    #[serde(deserialize_with = "settings::number")]
    pub call_timeout_secs: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    #[serde(deserialize_with = "settings::integer")]
    pub rounds: u32,
    #[serde(deserialize_with = "settings::integer")]
    pub min_clients: usize,
    #[serde(deserialize_with = "settings::number")]
    pub participants_ratio: f64,
    #[serde(deserialize_with = "settings::number")]
    pub heartbeat_period_secs: f64,
    #[serde(deserialize_with = "settings::number")]
    pub heartbeat_timeout_secs: f64,
    #[serde(deserialize_with = "settings::number")]
    pub round_timeout_secs: f64,
    /// Unset (the built-in default): the same as `round_timeout_secs`.
    #[serde(default, deserialize_with = "optional_number")]
    pub training_timeout_secs: Option<f64>,
    #[serde(deserialize_with = "settings::integer")]
    pub min_updates: usize,
    #[serde(deserialize_with = "settings::number")]
    pub selection_overcommit: f64,
    #[serde(deserialize_with = "settings::integer")]
    pub evaluate_every: u32,
    #[serde(deserialize_with = "settings::number")]
    pub evaluate_fraction: f64,
    pub join_secret: String,
    pub join_secret_file: String,
    #[serde(deserialize_with = "names")]
    pub allowed_participants: Vec<String>,
}

/// A number that may be left out ([`settings::number`] when it is there).
fn optional_number<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<f64>, D::Error> {
    settings::number(deserializer).map(Some)
}

/// A list of names: a TOML array of strings, or (from an environment variable) one string of
/// comma-separated names.
fn names<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Names::deserialize(deserializer)? {
        Names::List(list) => list,
        Names::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// The join secret, from `federation.join_secret` or the file `federation.join_secret_file`
/// (not both), at least 16 bytes; `None` when neither is set.
fn join_secret(inline: &str, file: &str) -> Result<Option<SecretHash>, ConfigError> {
    let (key, secret) = match (inline.is_empty(), file.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {
            return Err(ConfigError::invalid(
                "federation.join_secret_file",
                format!("{file:?}"),
                "cannot be combined with federation.join_secret",
            ));
        }
        (false, true) => ("federation.join_secret", inline.to_string()),
        (true, false) => (
            "federation.join_secret_file",
            std::fs::read_to_string(file)
                .map_err(|e| {
                    ConfigError::invalid("federation.join_secret_file", format!("{file:?}"), e)
                })?
                .trim()
                .to_string(),
        ),
    };
    if secret.len() < MIN_JOIN_SECRET_BYTES {
        // The secret itself is never echoed: only where it came from.
        return Err(ConfigError::invalid(
            key,
            "(hidden)",
            format!("must be at least {MIN_JOIN_SECRET_BYTES} bytes"),
        ));
    }
    Ok(Some(SecretHash::of(&secret)))
}

/// `federation.training_timeout_secs`: unset, the round timeout; else more than 0 and at
/// most `federation.round_timeout_secs` (already checked), since the round's own deadline would
/// cut a longer one short.
fn training_timeout(
    secs: Option<f64>,
    round_timeout_secs: f64,
) -> Result<Option<Duration>, ConfigError> {
    let Some(secs) = secs else {
        return Ok(None);
    };
    const KEY: &str = "federation.training_timeout_secs";
    let timeout = settings::secs(KEY, secs, ROUND_TIMEOUT_SECS.0, ROUND_TIMEOUT_SECS.1)?;
    if secs > round_timeout_secs {
        return Err(ConfigError::invalid(
            KEY,
            secs,
            format!("must be at most federation.round_timeout_secs ({round_timeout_secs})"),
        ));
    }
    Ok(Some(timeout))
}

const MAX_PARTICIPANTS: usize = 100_000_000;
/// Joins per second per address: from one a thousand seconds to a million a second (or 0, no
/// limit).
const MIN_JOIN_RATE: f64 = 0.001;
const MAX_JOIN_RATE: f64 = 1_000_000.0;
const MAX_JOIN_BURST: u32 = 1_000_000;

/// `[limits]`'s joins per source address: `None` when `joins_per_second_per_address` is 0.
fn join_rate(limits: &LimitsConfig) -> Result<Option<JoinRate>, ConfigError> {
    let per_second = limits.joins_per_second_per_address;
    if per_second == 0.0 {
        return Ok(None);
    }
    if !(MIN_JOIN_RATE..=MAX_JOIN_RATE).contains(&per_second) {
        return Err(ConfigError::invalid(
            "limits.joins_per_second_per_address",
            format!("{per_second:?}"),
            format!("must be 0 (no limit) or a number between {MIN_JOIN_RATE} and {MAX_JOIN_RATE}"),
        ));
    }
    let burst = settings::int(
        "limits.join_burst_per_address",
        limits.join_burst_per_address,
        1,
        MAX_JOIN_BURST,
    )?;
    Ok(Some(JoinRate { per_second, burst }))
}

/// A join secret shorter than this could be guessed.
const MIN_JOIN_SECRET_BYTES: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub addresses_file: String,
}

/// What the coordinator runs with: every value checked.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub api: Endpoint,
    pub rpc: RpcEndpoint,
    pub aggregator: AggregatorSettings,
    pub federation: FederationSettings,
    pub heartbeat_period: Duration,
    pub store: StoreSettings,
    pub runtime: RuntimeConfig,
    /// `[api.tls]`, loaded: the API serves HTTPS only; `None`: plain HTTP.
    pub api_tls: Option<rondo_net::tls::ServerTls>,
    /// What both RPC directions prove and how they are protected (`rpc.key_file`,
    /// `[rpc.tls]`).
    pub link_security: LinkSecurity,
    /// `log.format`.
    pub log_format: rondo_net::settings::LogFormat,
    /// `api.max_connections` and `api.header_timeout_secs`.
    pub http_limits: rondo_net::boot::HttpLimits,
    /// `[limits]`'s joins per source address; `None`: no limit.
    pub join_rate: Option<JoinRate>,
}

#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    pub rpc_address: String,
    pub call_timeout: Duration,
}

impl FromConfig for CoordinatorSettings {
    type Raw = CoordinatorConfig;

    fn log_format(&self) -> rondo_net::settings::LogFormat {
        self.log_format
    }

    fn from_config(raw: CoordinatorConfig) -> Result<Self, ConfigError> {
        let f = raw.federation;
        let link_security = LinkSecurity {
            key: settings::link_key("rpc.key_file", &raw.rpc.key_file)?,
            tls: rondo_net::tls::rpc(&raw.rpc.tls)?,
        };
        let heartbeat_period = settings::secs(
            "federation.heartbeat_period_secs",
            f.heartbeat_period_secs,
            HEARTBEAT_SECS.0,
            HEARTBEAT_SECS.1,
        )?;
        let heartbeat_timeout = settings::secs(
            "federation.heartbeat_timeout_secs",
            f.heartbeat_timeout_secs,
            HEARTBEAT_SECS.0,
            HEARTBEAT_SECS.1,
        )?;
        if heartbeat_timeout <= heartbeat_period {
            return Err(ConfigError::invalid(
                "federation.heartbeat_timeout_secs",
                f.heartbeat_timeout_secs,
                format!(
                    "must exceed federation.heartbeat_period_secs ({})",
                    f.heartbeat_period_secs
                ),
            ));
        }
        let min_clients =
            settings::int("federation.min_clients", f.min_clients, 1, MAX_MIN_CLIENTS)?;
        let round_timeout = settings::secs(
            "federation.round_timeout_secs",
            f.round_timeout_secs,
            ROUND_TIMEOUT_SECS.0,
            ROUND_TIMEOUT_SECS.1,
        )?;
        let training_timeout = training_timeout(f.training_timeout_secs, f.round_timeout_secs)?;
        // Every round selects at least min_clients: a larger quorum could never be reached.
        if !(1..=min_clients).contains(&f.min_updates) {
            return Err(ConfigError::invalid(
                "federation.min_updates",
                f.min_updates,
                format!(
                    "must be an integer between 1 and federation.min_clients ({min_clients}): \
                     a round selects at least min_clients participants, so a larger quorum \
                     could be out of reach"
                ),
            ));
        }
        let selection_overcommit = f.selection_overcommit;
        if !(1.0..=MAX_OVERCOMMIT).contains(&selection_overcommit) {
            return Err(ConfigError::invalid(
                "federation.selection_overcommit",
                format!("{selection_overcommit:?}"),
                format!("must be a number between 1 and {MAX_OVERCOMMIT}"),
            ));
        }
        let advertise_address = match raw.rpc.advertise_address {
            empty if empty.is_empty() => empty,
            address => settings::host_port("rpc.advertise_address", address)?,
        };
        let join_rate = join_rate(&raw.limits)?;
        Ok(Self {
            log_format: raw.log.format,
            api_tls: rondo_net::tls::server("api.tls", &raw.api.tls)?,
            http_limits: rondo_net::boot::HttpLimits::from_config(
                raw.api.max_connections,
                raw.api.header_timeout_secs,
            )?,
            join_rate,
            api: Endpoint {
                host: settings::non_empty("api.host", raw.api.host)?,
                port: raw.api.port,
                max_connections: raw.api.max_connections,
                header_timeout_secs: raw.api.header_timeout_secs,
                tls: raw.api.tls,
            },
            rpc: RpcEndpoint {
                host: settings::non_empty("rpc.host", raw.rpc.host)?,
                port: raw.rpc.port,
                advertise_address,
                key_file: raw.rpc.key_file,
                tls: raw.rpc.tls,
            },
            aggregator: AggregatorSettings {
                rpc_address: settings::host_port(
                    "aggregator.rpc_address",
                    raw.aggregator.rpc_address,
                )?,
                call_timeout: settings::secs(
                    "aggregator.call_timeout_secs",
                    raw.aggregator.call_timeout_secs,
                    CALL_TIMEOUT_SECS.0,
                    CALL_TIMEOUT_SECS.1,
                )?,
            },
            federation: FederationSettings {
                rounds: settings::int("federation.rounds", f.rounds, 0, MAX_ROUNDS)?,
                min_clients,
                participants_ratio: settings::ratio(
                    "federation.participants_ratio",
                    f.participants_ratio,
                )?,
                heartbeat_timeout,
                round_timeout,
                training_timeout,
                min_updates: f.min_updates,
                selection_overcommit,
                evaluate_every: settings::int(
                    "federation.evaluate_every",
                    f.evaluate_every,
                    0,
                    MAX_ROUNDS,
                )?,
                evaluate_fraction: settings::ratio(
                    "federation.evaluate_fraction",
                    f.evaluate_fraction,
                )?,
                join: JoinPolicy {
                    secret_hash: join_secret(&f.join_secret, &f.join_secret_file)?,
                    allowed_names: f.allowed_participants.iter().cloned().collect(),
                    max_participants: Some(settings::int(
                        "limits.max_participants",
                        raw.limits.max_participants,
                        1,
                        MAX_PARTICIPANTS,
                    )?),
                },
            },
            heartbeat_period,
            store: StoreSettings::new(&raw.store.url, &raw.store.namespace, &raw.store.data_dir)?,
            runtime: raw.runtime,
            link_security,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults with `overrides` (TOML) laid over them, as the binary would read them.
    fn load(overrides: &str) -> Result<CoordinatorSettings, ConfigError> {
        rondo_net::boot::load_settings_with(DEFAULTS, overrides)
    }

    fn error(overrides: &str) -> String {
        load(overrides)
            .expect_err(&format!("{overrides} is refused"))
            .to_string()
    }

    #[test]
    fn the_join_secret_and_allowed_names_are_read_and_checked() {
        let settings = load(
            "[federation]\njoin_secret = \"0123456789abcdef\"\nallowed_participants = [\"a\", \"b\"]\n",
        )
        .expect("valid");
        let join = settings.federation.join;
        assert_eq!(join.secret_hash, Some(SecretHash::of("0123456789abcdef")));
        assert_eq!(join.allowed_names.len(), 2);
        let short = error("[federation]\njoin_secret = \"short-one\"\n");
        assert!(
            short.contains("federation.join_secret = (hidden): must be at least 16"),
            "{short}"
        );
        assert!(!short.contains("short-one"), "the secret is never echoed");
        let both =
            error("[federation]\njoin_secret = \"0123456789abcdef\"\njoin_secret_file = \"/x\"\n");
        assert!(both.contains("cannot be combined"), "{both}");
        let missing = error("[federation]\njoin_secret_file = \"/no/such/file\"\n");
        assert!(missing.contains("federation.join_secret_file"), "{missing}");
        let text = load("[federation]\nallowed_participants = \"x, y ,,z\"\n").expect("valid");
        let names: Vec<_> = text.federation.join.allowed_names.into_iter().collect();
        assert_eq!(names, ["x", "y", "z"]);
    }

    #[test]
    fn the_defaults_are_valid() {
        let settings = load("").expect("the defaults are valid");
        assert_eq!(settings.federation.round_timeout, Duration::from_secs(120));
        assert_eq!(settings.aggregator.call_timeout, Duration::from_secs(5));
        assert_eq!(settings.heartbeat_period, Duration::from_secs(1));
    }

    #[test]
    fn every_duration_refuses_negative_zero_nan_infinite_and_huge_values() {
        for key in [
            "federation.heartbeat_period_secs",
            "federation.heartbeat_timeout_secs",
            "federation.round_timeout_secs",
            "federation.training_timeout_secs",
            "aggregator.call_timeout_secs",
        ] {
            let (section, name) = key.split_once('.').expect("section.key");
            for bad in ["-1.0", "0.0", "nan", "inf", "-inf", "1e300"] {
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
    fn the_training_deadline_quorum_and_overcommit_are_read_and_checked() {
        let defaults = load("").expect("valid").federation;
        assert_eq!(defaults.training_timeout, None);
        assert_eq!(defaults.training_timeout(), defaults.round_timeout);
        assert_eq!(defaults.min_updates, 1);
        assert_eq!(defaults.selection_overcommit, 1.0);
        let set = load(
            "[federation]\nround_timeout_secs = 10\ntraining_timeout_secs = 10\nmin_clients = 5\n\
             min_updates = 5\nselection_overcommit = 1.3\n",
        )
        .expect("valid")
        .federation;
        assert_eq!(set.training_timeout, Some(Duration::from_secs(10)));
        assert_eq!((set.min_updates, set.selection_overcommit), (5, 1.3));
        for (overrides, wanted) in [
            (
                "round_timeout_secs = 10\ntraining_timeout_secs = 10.5",
                "federation.training_timeout_secs = 10.5: must be at most \
                 federation.round_timeout_secs (10)",
            ),
            (
                "training_timeout_secs = 0",
                "federation.training_timeout_secs = 0.0: must be a finite number of seconds",
            ),
            (
                "training_timeout_secs = -3",
                "federation.training_timeout_secs = -3.0: must be a finite number of seconds",
            ),
            (
                "min_updates = 0",
                "federation.min_updates = 0: must be an integer between 1 and \
                 federation.min_clients (2)",
            ),
            (
                "min_clients = 3\nmin_updates = 4",
                "federation.min_updates = 4: must be an integer between 1 and \
                 federation.min_clients (3)",
            ),
            (
                "selection_overcommit = 0.9",
                "federation.selection_overcommit = 0.9: must be a number between 1 and 10",
            ),
            (
                "selection_overcommit = nan",
                "federation.selection_overcommit = NaN: must be a number between 1 and 10",
            ),
            (
                "selection_overcommit = inf",
                "federation.selection_overcommit = inf: must be a number between 1 and 10",
            ),
            (
                "selection_overcommit = 10.5",
                "federation.selection_overcommit = 10.5: must be a number between 1 and 10",
            ),
        ] {
            let text = error(&format!("[federation]\n{overrides}\n"));
            assert!(
                text.starts_with(&format!("invalid config: {wanted}")),
                "{overrides}: {text}"
            );
        }
        for (overrides, key) in [
            ("training_timeout_secs = \"soon\"", "training_timeout_secs"),
            ("min_updates = 1.5", "min_updates"),
            ("selection_overcommit = true", "selection_overcommit"),
        ] {
            let text = error(&format!("[federation]\n{overrides}\n"));
            assert!(text.contains(key), "{overrides}: {text}");
        }
    }

    #[test]
    fn edge_values_are_accepted() {
        let settings = load(
            "[federation]\nround_timeout_secs = 31536000\nheartbeat_period_secs = 0.001\n\
             participants_ratio = 1.0\nmin_clients = 1\nrounds = 0\n\
             [aggregator]\ncall_timeout_secs = 0.001\n[api]\nport = 65535\n",
        )
        .expect("edge values are valid");
        assert_eq!(
            settings.federation.round_timeout,
            Duration::from_secs(31_536_000)
        );
        assert_eq!(settings.heartbeat_period, Duration::from_millis(1));
        assert_eq!(settings.aggregator.call_timeout, Duration::from_millis(1));
        assert_eq!(settings.api.port, 65535);
        assert_eq!(settings.federation.min_clients, 1);
    }

    #[test]
    fn counts_and_ratios_out_of_range_are_refused() {
        for (overrides, key) in [
            (
                "[federation]\nmin_clients = 0",
                "federation.min_clients = 0",
            ),
            (
                "[federation]\nparticipants_ratio = 0.0",
                "federation.participants_ratio = 0",
            ),
            (
                "[federation]\nparticipants_ratio = 1.5",
                "federation.participants_ratio = 1.5",
            ),
            (
                "[federation]\nparticipants_ratio = nan",
                "federation.participants_ratio = NaN",
            ),
            (
                "[federation]\nrounds = 1000001",
                "federation.rounds = 1000001",
            ),
            (
                "[federation]\nheartbeat_timeout_secs = 1.0",
                "federation.heartbeat_timeout_secs = 1",
            ),
            ("[api]\nhost = \"\"", "api.host"),
            (
                "[aggregator]\nrpc_address = \"nohost\"",
                "aggregator.rpc_address",
            ),
            (
                "[rpc]\nadvertise_address = \"coordinator\"",
                "rpc.advertise_address",
            ),
        ] {
            let text = error(overrides);
            assert!(
                text.starts_with(&format!("invalid config: {key}")),
                "{overrides}: {text}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_sections_are_refused_by_name() {
        let text = error("[federation]\nroundz = 3\n");
        assert!(text.contains("roundz"), "{text}");
        let text = error("[federations]\nrounds = 3\n");
        assert!(text.contains("federations"), "{text}");
    }

    #[test]
    fn wrong_types_and_out_of_range_ports_are_refused_by_name() {
        for (overrides, key) in [
            (
                "[federation]\nround_timeout_secs = \"soon\"",
                "round_timeout_secs",
            ),
            ("[federation]\nrounds = -1", "rounds"),
            ("[federation]\nrounds = 2.5", "rounds"),
            ("[federation]\nmin_clients = true", "min_clients"),
            (
                "[federation]\nheartbeat_period_secs = true",
                "heartbeat_period_secs",
            ),
            (
                "[federation]\nparticipants_ratio = \"all\"",
                "participants_ratio",
            ),
            ("[api]\nport = 65536", "port"),
            ("[api]\nport = -1", "port"),
        ] {
            let text = error(overrides);
            assert!(text.starts_with("invalid config: "), "{text}");
            assert!(text.contains(key), "{overrides}: {text}");
        }
    }
}
