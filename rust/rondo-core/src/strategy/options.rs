//! A strategy's knobs, as the config's `[aggregation.options]` table gives them: a name and a
//! number each. Every strategy takes the ones it knows (with its default where one is left
//! out, refusing a value out of range) and [`Options::finish`] refuses any it did not take,
//! so that a typo or a knob of another strategy stops the aggregator at start-up rather than
//! being silently ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The config's `[aggregation.options]`: option name → value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    values: BTreeMap<String, f64>,
    taken: BTreeSet<String>,
}

/// A strategy setting that cannot be used: its config key (`aggregation.options.<name>`, or
/// `aggregation.strategy`), its value when it has one, and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}{}: {rule}", value.as_ref().map(|v| format!(" = {v}")).unwrap_or_default())]
pub struct OptionError {
    pub key: String,
    pub value: Option<String>,
    pub rule: String,
}

impl OptionError {
    /// The option `name` of `[aggregation.options]`.
    pub fn new(name: &str, value: Option<f64>, rule: impl fmt::Display) -> Self {
        Self {
            key: format!("aggregation.options.{name}"),
            value: value.map(|v| v.to_string()),
            rule: rule.to_string(),
        }
    }

    /// `aggregation.strategy` names no strategy that can be made.
    pub fn strategy(name: &str, rule: impl fmt::Display) -> Self {
        Self {
            key: "aggregation.strategy".into(),
            value: Some(format!("{name:?}")),
            rule: rule.to_string(),
        }
    }
}

impl Options {
    pub fn new(values: BTreeMap<String, f64>) -> Self {
        Self {
            values,
            taken: BTreeSet::new(),
        }
    }

    /// No options: every strategy's defaults.
    pub fn none() -> Self {
        Self::default()
    }

    /// A number within `min..=max` (finite), `default` when it is not given.
    pub fn number(
        &mut self,
        name: &str,
        default: f64,
        min: f64,
        max: f64,
    ) -> Result<f64, OptionError> {
        let Some(value) = self.take(name) else {
            return Ok(default);
        };
        if !value.is_finite() || value < min || value > max {
            return Err(OptionError::new(
                name,
                Some(value),
                format!("must be a finite number from {min} to {max}"),
            ));
        }
        Ok(value)
    }

    /// A number above `min` (exclusive) and at most `max`, `default` when not given: for
    /// rates and constants that must be positive.
    pub fn positive(&mut self, name: &str, default: f64, max: f64) -> Result<f64, OptionError> {
        let Some(value) = self.take(name) else {
            return Ok(default);
        };
        if !value.is_finite() || value <= 0.0 || value > max {
            return Err(OptionError::new(
                name,
                Some(value),
                format!("must be a finite number above 0 and at most {max}"),
            ));
        }
        Ok(value)
    }

    /// A whole number within `min..=max`, `default` when not given (`None`: the strategy
    /// derives one, e.g. from the round's number of updates).
    pub fn count(
        &mut self,
        name: &str,
        default: Option<u64>,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, OptionError> {
        let Some(value) = self.take(name) else {
            return Ok(default);
        };
        if value.fract() != 0.0 || !(min as f64..=max as f64).contains(&value) {
            return Err(OptionError::new(
                name,
                Some(value),
                format!("must be a whole number from {min} to {max}"),
            ));
        }
        Ok(Some(value as u64))
    }

    /// Refuses every option `strategy` did not take.
    pub fn finish(self, strategy: &str) -> Result<(), OptionError> {
        match self.values.keys().find(|k| !self.taken.contains(*k)) {
            None => Ok(()),
            Some(name) => Err(OptionError::new(
                name,
                None,
                format!("is not an option of strategy \"{strategy}\""),
            )),
        }
    }

    fn take(&mut self, name: &str) -> Option<f64> {
        self.taken.insert(name.to_string());
        self.values.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, f64)]) -> Options {
        Options::new(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn defaults_apply_and_values_out_of_range_are_refused_by_name() {
        let mut o = options(&[("beta", 0.5)]);
        assert_eq!(
            o.number("beta", 0.1, 0.0, 0.49),
            Err(OptionError::new(
                "beta",
                Some(0.5),
                "must be a finite number from 0 to 0.49"
            ))
        );
        assert_eq!(o.number("tau", 1e-3, 0.0, 1.0), Ok(1e-3));
        let mut o = options(&[("f", 1.5), ("eta", 0.0)]);
        assert!(
            o.count("f", Some(1), 0, 100)
                .unwrap_err()
                .to_string()
                .contains("aggregation.options.f = 1.5")
        );
        assert!(o.positive("eta", 0.1, 10.0).is_err());
        assert_eq!(options(&[("f", 3.0)]).count("f", None, 0, 10), Ok(Some(3)));
        assert!(
            options(&[("x", f64::NAN)])
                .number("x", 0.0, -1.0, 1.0)
                .is_err()
        );
    }

    #[test]
    fn an_option_no_strategy_took_is_refused() {
        let mut o = options(&[("beta", 0.2), ("typo", 1.0)]);
        o.number("beta", 0.1, 0.0, 0.49).unwrap();
        let error = o.finish("trimmed_mean").unwrap_err();
        assert_eq!(
            error.to_string(),
            "aggregation.options.typo: is not an option of strategy \"trimmed_mean\""
        );
        assert_eq!(Options::none().finish("fedavg"), Ok(()));
    }
}
