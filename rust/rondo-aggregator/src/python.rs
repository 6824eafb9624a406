//! Python aggregators (`strategy = "python"`), embedded with pyo3.

use std::sync::Arc;

use rondo_core::strategy::Strategy;

use crate::config::PythonSettings;

/// The Python aggregator `settings` names, loaded and instantiated.
pub fn strategy(settings: &PythonSettings) -> anyhow::Result<Arc<dyn Strategy>> {
    anyhow::bail!(
        "aggregation.strategy = \"python\" ({}.{}): this aggregator was built without Python support",
        settings.module,
        settings.class
    )
}
