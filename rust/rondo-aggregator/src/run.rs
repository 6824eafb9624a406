//! Starting the aggregator: read the initial model, bind both listeners, serve until a signal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rondo_core::strategy::Strategy;
use rondo_net::boot;
use rondo_net::link::AggregatorRpc;
use rondo_net::shutdown::Shutdown;

use crate::config::{AggregatorSettings, StrategyChoice};
use crate::link::{AggregatorRpcServer, Outbox};
use crate::output::ModelOutput;
use crate::rounds::RoundBook;
use crate::service::Aggregator;
use crate::wire;

/// The round book, with the configured initial model when there is one.
fn round_book(config: &AggregatorSettings) -> anyhow::Result<RoundBook> {
    let strategy: Arc<dyn Strategy> = match &config.strategy {
        StrategyChoice::Native(strategy) => strategy.clone(),
        StrategyChoice::Python(python) => crate::python::strategy(python)?,
    };
    let path = config.model.initial_model.as_str();
    if path.is_empty() {
        return Ok(RoundBook::new(None, strategy));
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("opening initial model {path}"))?;
    let (spec, file) = wire::load_model_file(std::io::BufReader::new(file))
        .map_err(|e| anyhow::anyhow!("initial model {path}: {e}"))?;
    tracing::info!(
        path,
        bytes = file.as_ref().len(),
        "initial global model loaded"
    );
    Ok(RoundBook::with_initial_model(spec, file, strategy))
}

pub async fn run(config: AggregatorSettings) -> anyhow::Result<()> {
    let book = round_book(&config)?;
    let store = crate::models::open_configured(&config.store, &book)?;
    let upload_bytes = book.model().map(|m| m.spec.byte_len());
    let api_listener = boot::bind(&config.api.host, config.api.port).await?;
    let rpc_listener = boot::bind(&config.rpc.host, config.rpc.port).await?;
    let api_addr = api_listener.local_addr()?;
    let public_url = if config.api.public_url.is_empty() {
        format!("http://{api_addr}")
    } else {
        config.api.public_url.trim_end_matches('/').to_string()
    };
    let shutdown = Shutdown::new();
    let outbox = Outbox::start(config.link.call_timeout, config.link_key.clone(), &shutdown);
    let aggregator = Aggregator::new(
        book,
        config.aggregation.staging_memory_bytes,
        outbox,
        public_url.clone(),
        config.api.max_body_bytes,
        config.api.upload_idle_timeout,
        CLOSE_WAIT,
        shutdown.clone(),
        config.limits,
        (!config.model.output_path.is_empty())
            .then(|| ModelOutput::new(config.model.output_path.clone().into())),
        store,
    );
    if let Some(bytes) = upload_bytes {
        // While participants are still starting up, rather than during the first round.
        let aggregator = aggregator.clone();
        let prepare_sum = aggregator.book().spare_preparer();
        std::thread::spawn(move || {
            if let Some(prepare) = prepare_sum {
                prepare();
            }
            aggregator.staging.prefill(bytes);
        });
    }
    let rpc_addr = rondo_net::serve_rpc!(
        rpc_listener,
        AggregatorRpcServer::new(&aggregator).serve(),
        shutdown.signalled(),
        config.link_key.clone()
    )
    .await?;
    tracing::info!(%api_addr, %rpc_addr, %public_url, "aggregator listening");
    boot::write_addresses(
        &config.runtime.addresses_file,
        &BTreeMap::from([("api", api_addr), ("rpc", rpc_addr)]),
    )?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        boot::shutdown_signal().await;
        tracing::info!("shutting down: no new connections; finishing folds, closes and notices");
        stop.trigger();
    });
    boot::serve_http(
        api_listener,
        crate::http::router(aggregator.clone()),
        boot::HttpLimits::default(),
        shutdown.signalled(),
    )
    .await;
    drop(aggregator);
    shutdown.drain(DRAIN).await;
    Ok(())
}

/// How long a close waits for folds in flight (they take milliseconds) before it fails the
/// round rather than wait for ever.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long shutdown waits for folds, closes and queued notices to finish.
const DRAIN: Duration = Duration::from_secs(10);
