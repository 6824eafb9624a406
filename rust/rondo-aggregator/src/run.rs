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
use crate::durable::Durable;
use crate::link::{AggregatorRpcServer, Outbox};
use crate::output::ModelOutput;
use crate::rounds::Grant;
use crate::rounds::RoundBook;
use crate::service::{Aggregator, Commit};
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

/// With a durable store, a restarted aggregator starts from the newest model it stored (not
/// its configured initial model), so that no finished round is lost or run again.
fn resume_model(book: RoundBook, models: &crate::models::ModelStore) -> anyhow::Result<RoundBook> {
    let Some(latest) = models.latest() else {
        return Ok(book);
    };
    if book.model().is_some_and(|m| m.round >= latest.round) {
        return Ok(book);
    }
    let (manifest, bytes) = models
        .read(latest.round)
        .map_err(|e| anyhow::anyhow!("reading the stored model of round {}: {e}", latest.round))?
        .ok_or_else(|| anyhow::anyhow!("the stored model of round {} is gone", latest.round))?;
    let (spec, file) = wire::load_model_file(std::io::Cursor::new(&bytes[..]))
        .map_err(|e| anyhow::anyhow!("the stored model of round {}: {e}", manifest.round))?;
    tracing::info!(
        round = manifest.round,
        sha256 = %manifest.sha256,
        "resuming from the newest stored model"
    );
    Ok(RoundBook::with_model(
        manifest.round,
        spec,
        file,
        book.strategy().clone(),
    ))
}

/// Gives the rule back the state it had after the round of the model the aggregator starts
/// from (a server optimizer's moments), when it was saved.
fn resume_strategy(book: &RoundBook, durable: &Durable) -> anyhow::Result<()> {
    let Some(round) = book.model().map(|m| m.round).filter(|r| *r > 0) else {
        return Ok(());
    };
    // None: a rule without state across rounds, or one whose state was never saved.
    if let Some(state) = durable.strategy_state(round)? {
        book.strategy()
            .restore_state(&state)
            .map_err(|e| anyhow::anyhow!("the rule's saved state after round {round}: {e}"))?;
        tracing::info!(round, bytes = state.len(), "the rule's state resumed");
    }
    Ok(())
}

/// Folds the updates accepted before a crash back into the round they belong to, when that
/// round follows the model this aggregator starts with; forgets them when the round's model
/// was stored already. Updates on disk that the store knows nothing of are refused: the store
/// lost its data while the aggregator was down.
async fn recover(aggregator: &Arc<Aggregator>) -> anyhow::Result<()> {
    let Some(durable) = aggregator.durable.clone() else {
        return Ok(());
    };
    let Some((saved, updates)) = durable.load().await? else {
        if durable.has_update_files() {
            anyhow::bail!(
                "the state store holds no round, but store.data_dir has accepted updates: the \
                 store lost its data while the aggregator was down, and those updates cannot be \
                 recovered. Restore the store, or remove store.data_dir/updates to go on \
                 without them."
            );
        }
        return Ok(());
    };
    let model_round = aggregator.book().model().map(|m| m.round);
    let next = model_round.map_or(0, |r| r + 1);
    if saved.round != next {
        tracing::info!(
            round = saved.round,
            attempt = saved.attempt,
            ?model_round,
            "the saved round does not follow the model this aggregator starts with; its updates are forgotten"
        );
        durable.forget_round(saved.round, saved.attempt).await;
        return Ok(());
    }
    let builder = aggregator.book().sum_builder(saved.round);
    let sum = match builder {
        Some(build) => Some(tokio::task::spawn_blocking(build).await?),
        None => None,
    };
    aggregator
        .book()
        .reopen(saved.round, saved.attempt, saved.grants.clone(), sum)
        .map_err(|e| anyhow::anyhow!("reopening round {}: {e}", saved.round))?;
    let count = updates.len();
    for (update, data) in updates {
        let grant = Grant {
            participant_id: update.participant_id.clone(),
            round: saved.round,
            attempt: saved.attempt,
        };
        let sum = aggregator
            .book()
            .begin_commit(&grant, &update.spec)
            .map_err(|e| anyhow::anyhow!("the saved update of {}: {e}", grant.participant_id))?;
        let commit = Commit {
            grant,
            sum,
            spec: update.spec,
            data,
            n_samples: update.n_samples,
            metrics: update.metrics,
            recovered: Some(update.sha256),
        };
        let committer = aggregator.clone();
        tokio::task::spawn_blocking(move || committer.commit(commit))
            .await?
            .map_err(|e| anyhow::anyhow!("folding a saved update back in: {e}"))?;
    }
    tracing::info!(
        round = saved.round,
        attempt = saved.attempt,
        updates = count,
        "the open round resumed with the updates accepted before the restart"
    );
    Ok(())
}

pub async fn run(config: AggregatorSettings) -> anyhow::Result<()> {
    let book = round_book(&config)?;
    let state = config.store.state.open().await?;
    let durable = Durable::new(&state, config.store.data_dir.as_deref())?;
    if state.is_durable() && durable.is_none() {
        tracing::warn!(
            "store.url is set without store.data_dir: accepted updates are not saved, and a \
             restart loses those of the open round"
        );
    }
    let model_store = crate::models::open_configured(&config.store, &book)?;
    let book = match (&durable, &model_store) {
        (Some(durable), Some(models)) => {
            let book = resume_model(book, models)?;
            resume_strategy(&book, durable)?;
            book
        }
        _ => book,
    };
    let upload_bytes = book.model().map(|m| m.spec.byte_len());
    let api_listener = boot::bind(&config.api.host, config.api.port).await?;
    let rpc_listener = boot::bind(&config.rpc.host, config.rpc.port).await?;
    let api_addr = api_listener.local_addr()?;
    let public_url = if config.api.public_url.is_empty() {
        let scheme = if config.api.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{api_addr}")
    } else {
        config.api.public_url.trim_end_matches('/').to_string()
    };
    let shutdown = Shutdown::new();
    let outbox = Outbox::start(
        config.link.call_timeout,
        config.link_security.clone(),
        &shutdown,
    );
    let aggregator = Aggregator::new(
        book,
        config.aggregation.staging_memory_bytes,
        outbox,
        public_url.clone(),
        config.api.max_body_bytes,
        config.api.upload,
        CLOSE_WAIT,
        shutdown.clone(),
        config.limits,
        (!config.model.output_path.is_empty())
            .then(|| ModelOutput::new(config.model.output_path.clone().into())),
        durable.clone(),
        model_store,
    );
    for collector in config.api.http_limits.metrics.collectors() {
        aggregator
            .metrics
            .registry
            .register(collector)
            .context("registering the connection metrics")?;
    }
    recover(&aggregator).await?;
    if let Some(durable) = durable {
        let stopped = shutdown.signalled();
        tokio::spawn(async move {
            tokio::select! {
                () = durable.watch_store() => {},
                () = stopped => {},
            }
        });
    }
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
        config.link_security.clone()
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
        config.api.http_limits.clone(),
        config.api.tls.clone(),
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
