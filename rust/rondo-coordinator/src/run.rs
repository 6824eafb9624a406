//! Starting the coordinator: bind both listeners, start the driver, serve until a signal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rondo_core::federation::Federation;
use rondo_net::boot;
use rondo_net::link::CoordinatorRpc;
use rondo_net::shutdown::Shutdown;

use crate::config::CoordinatorSettings;
use crate::link::{CoordinatorRpcServer, drive};
use crate::service::Coordinator;

pub async fn run(config: CoordinatorSettings) -> anyhow::Result<()> {
    let coordinator = Arc::new(Coordinator::new(
        Federation::new(config.federation.clone()),
        config.heartbeat_period.as_secs_f64(),
    ));
    let api_listener = boot::bind(&config.api.host, config.api.port).await?;
    let rpc_listener = boot::bind(&config.rpc.host, config.rpc.port).await?;
    let api_addr = api_listener.local_addr()?;
    let shutdown = Shutdown::new();
    let rpc_addr = rondo_net::serve_rpc!(
        rpc_listener,
        CoordinatorRpcServer {
            coordinator: coordinator.clone()
        }
        .serve(),
        shutdown.signalled(),
        config.link_key.clone()
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
        config.link_key.clone(),
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
        crate::http::router(coordinator),
        boot::HttpLimits::default(),
        shutdown.signalled(),
    )
    .await;
    shutdown.drain(Duration::from_secs(10)).await;
    Ok(())
}
