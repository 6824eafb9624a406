//! Starting the coordinator: bind both listeners, start the driver, serve until a signal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rondo_core::federation::Federation;
use rondo_net::boot;
use rondo_net::link::CoordinatorRpc;
use rondo_net::shutdown::Shutdown;
use rondo_net::store::Store;

use crate::config::CoordinatorSettings;
use crate::link::{CoordinatorRpcServer, drive};
use crate::service::{Clock, Coordinator, FEDERATION_KEY};

/// The file in `store.data_dir` that says a federation ran here with a durable store.
const MARKER: &str = "coordinator.marker.json";

/// The federation to run: the one saved in the store when there is one, else a new one. A
/// marker in `store.data_dir` says that a federation ran here before: finding it with an empty
/// store means the store lost its data while the coordinator was down, which is refused
/// rather than silently started over.
async fn federation(config: &CoordinatorSettings, store: &Store) -> anyhow::Result<Federation> {
    let saved = store
        .get(FEDERATION_KEY)
        .await
        .context("reading the saved federation")?;
    let marker = config.store.data_dir.as_ref().map(|dir| dir.join(MARKER));
    let Some(bytes) = saved else {
        if let Some(marker) = marker.as_ref().filter(|m| m.exists()) {
            return Err(anyhow::anyhow!(
                "the state store {} holds no federation (namespace {:?}), but {} says one ran \
                 here: the store lost its data while the coordinator was down, and the \
                 federation cannot be recovered. Restore the store, or remove {} to begin a \
                 new federation.",
                store.description(),
                config.store.namespace,
                marker.display(),
                marker.display(),
            ));
        }
        if store.is_durable()
            && let Some(marker) = &marker
        {
            let note = serde_json::json!({
                "store": store.description(),
                "namespace": config.store.namespace,
            });
            std::fs::write(marker, note.to_string())
                .with_context(|| format!("writing {}", marker.display()))?;
        }
        return Ok(Federation::new(config.federation.clone()));
    };
    let mut federation: Federation = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "the federation saved in {} (namespace {:?}) cannot be read ({e}); it was saved by \
             an incompatible version, or the key was changed by hand",
            store.description(),
            config.store.namespace
        )
    })?;
    let now = Clock::wall_now();
    if federation.resume(config.federation.clone(), now) {
        tracing::warn!(
            "the federation resumes with the settings configured now, which differ from those it was saved with"
        );
    }
    let (round, attempt) = federation.current_round();
    tracing::info!(
        round,
        attempt,
        phase = ?federation.phase_name(),
        participants = federation.participants().count(),
        store = %store.description(),
        "federation resumed from the store"
    );
    Ok(federation)
}

pub async fn run(config: CoordinatorSettings) -> anyhow::Result<()> {
    let store = config.store.open().await?;
    let coordinator = Arc::new(Coordinator::new(
        federation(&config, &store).await?,
        config.heartbeat_period.as_secs_f64(),
    ));
    for collector in config.http_limits.metrics.collectors() {
        coordinator
            .metrics
            .registry
            .register(collector)
            .context("registering the connection metrics")?;
    }
    let api_listener = boot::bind(&config.api.host, config.api.port).await?;
    let rpc_listener = boot::bind(&config.rpc.host, config.rpc.port).await?;
    let api_addr = api_listener.local_addr()?;
    let shutdown = Shutdown::new();
    coordinator.persist_to(store, &shutdown);
    let rpc_addr = rondo_net::serve_rpc!(
        rpc_listener,
        CoordinatorRpcServer {
            coordinator: coordinator.clone()
        }
        .serve(),
        shutdown.signalled(),
        config.link_security.clone()
    )
    .await?;
    tracing::info!(%api_addr, %rpc_addr, aggregator = %config.aggregator.rpc_address, "coordinator listening");
    boot::write_addresses(
        &config.runtime.addresses_file,
        &BTreeMap::from([("api", api_addr), ("rpc", rpc_addr)]),
    )?;
    let advertised = match config.rpc.advertise_address.as_str() {
        "" => rpc_addr.to_string(),
        address => address.to_string(),
    };
    let driver = drive(
        coordinator.clone(),
        config.aggregator.rpc_address.clone(),
        advertised,
        config.aggregator.call_timeout,
        config.link_security.clone(),
    );
    // The driver keeps no work of its own (every command is resent from the state machine),
    // so it simply stops at shutdown, between two of its steps.
    let stopped = shutdown.signalled();
    shutdown.spawn(async move {
        tokio::select! {
            () = driver => {},
            () = stopped => {},
        }
    });
    let stop = shutdown.clone();
    tokio::spawn(async move {
        boot::shutdown_signal().await;
        tracing::info!("shutting down");
        stop.trigger();
    });
    boot::serve_http(
        api_listener,
        crate::http::router(
            coordinator,
            crate::http::ApiLimits {
                join_rate: config.join_rate,
                request_timeout: config.http_limits.header_read_timeout,
            },
        ),
        config.http_limits.clone(),
        config.api_tls.clone(),
        shutdown.signalled(),
    )
    .await;
    shutdown.drain(Duration::from_secs(10)).await;
    Ok(())
}
