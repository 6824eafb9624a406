//! Checked conversions from a config's raw values to the types a service runs with.
//!
//! Each service deserializes its config into plain serde structs (which refuse unknown keys and
//! wrong types), then turns them, in one `validate`, into settings built from these helpers: a
//! value out of its range is refused at start-up with a message naming the key, rather than
//! panicking later (`Duration::from_secs_f64(inf)`) or misbehaving. `docs/configuration.md`
//! lists every key with its range.

use std::fmt::{self, Display};
use std::time::Duration;

use serde::Deserializer;
use serde::de::{self, Unexpected, Visitor};

/// A config that cannot be used, with the key at fault where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    /// `key` has `value`, which breaks `rule` (e.g. "must be between 1 and 10").
    pub fn invalid(key: &str, value: impl Display, rule: impl Display) -> Self {
        Self(format!("{key} = {value}: {rule}"))
    }

    /// The config could not be read or deserialized (unknown key, wrong type, missing file).
    pub fn unreadable(message: impl Display) -> Self {
        Self(message.to_string())
    }
}

impl Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Settings that a service runs with, made from its raw deserialized config.
pub trait FromConfig: Sized {
    /// The config as deserialized, every section `deny_unknown_fields`.
    type Raw: serde::de::DeserializeOwned;

    fn from_config(raw: Self::Raw) -> Result<Self, ConfigError>;

    /// How the service writes its log (`log.format`).
    fn log_format(&self) -> LogFormat {
        LogFormat::Text
    }
}

/// `log.format`: lines for people (the default), or one JSON object per event for machines,
/// with the spans it happened in (round, attempt, participant).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// For `#[serde(deserialize_with)]` on a number: an integer or a float, nothing else. (The
/// config crate would otherwise read `true` as 1.0.)
pub fn number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    struct Number;
    impl Visitor<'_> for Number {
        type Value = f64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number")
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
    }
    deserializer.deserialize_any(Number)
}

/// For `#[serde(deserialize_with)]` on an unsigned integer: a whole number that fits, nothing
/// else. (The config crate would otherwise round `2.5` to 3 and read `true` as 1.)
pub fn integer<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Integer<T>(std::marker::PhantomData<T>);
    impl<T: TryFrom<u64>> Visitor<'_> for Integer<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "a whole number that fits in {}",
                std::any::type_name::<T>()
            )
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            u64::try_from(v)
                .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
                .and_then(|v| self.visit_u64(v))
        }
    }
    deserializer.deserialize_any(Integer(std::marker::PhantomData))
}

/// For `#[serde(deserialize_with)]` on a flag: `true` or `false`, nothing else. (The config
/// crate would otherwise read `5` or `"on"` as true.)
pub fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    struct Boolean;
    impl Visitor<'_> for Boolean {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
    }
    deserializer.deserialize_any(Boolean)
}

/// The link key in the file `path` (`rpc.key_file`), or `None` when the path is empty.
pub fn link_key(key: &str, path: &str) -> Result<Option<crate::link_key::LinkKey>, ConfigError> {
    if path.is_empty() {
        return Ok(None);
    }
    crate::link_key::LinkKey::from_file(std::path::Path::new(path))
        .map(Some)
        .map_err(|e| ConfigError::invalid(key, format!("{path:?}"), e))
}

/// `value` seconds as a [`Duration`], if finite and within `min..=max` seconds.
pub fn secs(key: &str, value: f64, min: f64, max: f64) -> Result<Duration, ConfigError> {
    if value.is_finite() && (min..=max).contains(&value) {
        // In range, so far below `Duration::MAX`: this cannot fail.
        Duration::try_from_secs_f64(value).map_err(|e| ConfigError::invalid(key, value, e))
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{value:?}"),
            format!("must be a finite number of seconds between {min} and {max}"),
        ))
    }
}

/// `value` if it is within `min..=max` (counts, sizes in bytes).
pub fn int<T: PartialOrd + Display + Copy>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            key,
            value,
            format!("must be an integer between {min} and {max}"),
        ))
    }
}

/// `value` if it is a fraction in (0, 1].
pub fn ratio(key: &str, value: f64) -> Result<f64, ConfigError> {
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{value:?}"),
            "must be a number greater than 0 and at most 1",
        ))
    }
}

/// `value` if it is not empty (host names to bind).
pub fn non_empty(key: &str, value: String) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::invalid(key, "\"\"", "must not be empty"))
    } else {
        Ok(value)
    }
}

/// `value` if it has the form `host:port` (the host may be a name, resolved when it is used).
pub fn host_port(key: &str, value: String) -> Result<String, ConfigError> {
    let well_formed = value.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !port.is_empty() && port.parse::<u16>().is_ok()
    });
    if well_formed {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{value:?}"),
            "must have the form host:port, with a port from 0 to 65535",
        ))
    }
}

/// `value` if it is empty or an `http://` or `https://` URL.
pub fn base_url(key: &str, value: String) -> Result<String, ConfigError> {
    let scheme_ok = value.is_empty()
        || ["http://", "https://"].iter().any(|scheme| {
            value
                .strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty())
        });
    if scheme_ok {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{value:?}"),
            "must be empty or start with http:// or https://",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secs_takes_finite_values_in_range_and_names_the_key_otherwise() {
        assert_eq!(
            secs("a.b", 0.001, 0.001, 10.0),
            Ok(Duration::from_millis(1))
        );
        assert_eq!(secs("a.b", 10.0, 0.001, 10.0), Ok(Duration::from_secs(10)));
        for bad in [
            -1.0,
            0.0,
            0.0009,
            10.001,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let err = secs("a.b", bad, 0.001, 10.0).expect_err("out of range");
            let text = err.to_string();
            assert!(text.starts_with("invalid config: a.b = "), "{text}");
            assert!(
                text.ends_with("must be a finite number of seconds between 0.001 and 10"),
                "{text}"
            );
        }
    }

    #[test]
    fn int_takes_values_in_range() {
        assert_eq!(int("k", 1u64, 1, 5), Ok(1));
        assert_eq!(int("k", 5u64, 1, 5), Ok(5));
        assert_eq!(
            int("k", 0u64, 1, 5).expect_err("zero").to_string(),
            "invalid config: k = 0: must be an integer between 1 and 5"
        );
        assert!(int("k", 6u64, 1, 5).is_err());
    }

    #[test]
    fn ratio_takes_fractions_in_0_excluded_to_1() {
        assert_eq!(ratio("r", 1.0), Ok(1.0));
        assert_eq!(ratio("r", 1e-9), Ok(1e-9));
        for bad in [0.0, -0.5, 1.0001, f64::NAN, f64::INFINITY] {
            assert!(ratio("r", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_and_urls() {
        assert!(host_port("k", "coordinator:8082".into()).is_ok());
        assert!(host_port("k", "[::1]:80".into()).is_ok());
        for bad in ["", "host", "host:", ":80", "host:65536", "host:x"] {
            assert!(host_port("k", bad.into()).is_err(), "{bad}");
        }
        assert!(base_url("k", String::new()).is_ok());
        assert!(base_url("k", "https://agg.example:8091/".into()).is_ok());
        for bad in ["agg:8091", "ftp://x", "http://"] {
            assert!(base_url("k", bad.into()).is_err(), "{bad}");
        }
        assert!(non_empty("k", "0.0.0.0".into()).is_ok());
        assert!(non_empty("k", " ".into()).is_err());
    }
}
