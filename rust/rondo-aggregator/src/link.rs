//! The aggregator's side of the tarpc link: serving [`AggregatorRpc`] and the outbox that
//! delivers notices to the coordinator, in order, retrying until each is acknowledged.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rondo_core::federation::{AggregationResult, OpenRound};
use rondo_net::link::{
    AggregatorInfo, AggregatorRpc, AggregatorStatus, CoordinatorRpcClient, connect_coordinator,
    deadline,
};
use tarpc::context::Context;
use tokio::sync::{mpsc, watch};

use crate::service::Aggregator;

/// Something the coordinator must hear about.
#[derive(Debug, Clone)]
pub enum Notice {
    Accepted {
        round: u32,
        attempt: u32,
        participant_id: String,
        n_samples: u64,
        metrics: BTreeMap<String, f64>,
    },
    Rejected {
        round: u32,
        attempt: u32,
        participant_id: String,
        reason: String,
    },
    RoundAggregated {
        round: u32,
        attempt: u32,
        result: AggregationResult,
    },
}

/// Queue of notices for the coordinator. Sending never blocks; a background task delivers.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Notice>,
    coordinator: watch::Sender<Option<String>>,
}

impl Outbox {
    /// Starts the delivery task.
    pub fn start(call_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (coordinator, address) = watch::channel(None);
        tokio::spawn(deliver(rx, address, call_timeout));
        Self { tx, coordinator }
    }

    pub fn send(&self, notice: Notice) {
        // The receiver lives as long as the runtime; a failed send means we are shutting down.
        let _ = self.tx.send(notice);
    }

    /// Where the coordinator listens; notices wait until this is known.
    pub fn set_coordinator(&self, address: String) {
        self.coordinator.send_if_modified(|current| {
            let changed = current.as_deref() != Some(address.as_str());
            *current = Some(address);
            changed
        });
    }
}

async fn deliver(
    mut rx: mpsc::UnboundedReceiver<Notice>,
    mut address: watch::Receiver<Option<String>>,
    call_timeout: Duration,
) {
    let mut client: Option<(String, CoordinatorRpcClient)> = None;
    while let Some(notice) = rx.recv().await {
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(addr) = address.borrow_and_update().clone() else {
                let _ = address.changed().await;
                continue;
            };
            if client.as_ref().is_none_or(|(a, _)| *a != addr) {
                match connect_coordinator(&addr).await {
                    Ok(c) => client = Some((addr.clone(), c)),
                    Err(err) => {
                        tracing::warn!(%addr, %err, "coordinator unreachable; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let Some((_, c)) = client.as_ref() else {
                continue;
            };
            let ctx = deadline(call_timeout);
            let sent = match notice.clone() {
                Notice::Accepted {
                    round,
                    attempt,
                    participant_id,
                    n_samples,
                    metrics,
                } => {
                    c.update_accepted(ctx, round, attempt, participant_id, n_samples, metrics)
                        .await
                }
                Notice::Rejected {
                    round,
                    attempt,
                    participant_id,
                    reason,
                } => {
                    c.update_rejected(ctx, round, attempt, participant_id, reason)
                        .await
                }
                Notice::RoundAggregated {
                    round,
                    attempt,
                    result,
                } => c.round_aggregated(ctx, round, attempt, result).await,
            };
            match sent {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(%err, "notice to the coordinator failed; reconnecting");
                    client = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// [`AggregatorRpc`] served over the link. Holds a weak reference so that the RPC tasks do not
/// keep the service alive after shutdown.
#[derive(Clone)]
pub struct AggregatorRpcServer {
    pub aggregator: Weak<Aggregator>,
}

impl AggregatorRpcServer {
    pub fn new(aggregator: &Arc<Aggregator>) -> Self {
        Self {
            aggregator: Arc::downgrade(aggregator),
        }
    }

    fn get(&self) -> Result<Arc<Aggregator>, String> {
        self.aggregator
            .upgrade()
            .ok_or_else(|| "the aggregator is shutting down".to_string())
    }
}

impl AggregatorRpc for AggregatorRpcServer {
    async fn attach(self, _: Context, coordinator_rpc_addr: String) -> AggregatorInfo {
        let Ok(aggregator) = self.get() else {
            return AggregatorInfo {
                public_url: String::new(),
                model_round: None,
            };
        };
        tracing::info!(%coordinator_rpc_addr, "coordinator attached");
        aggregator.outbox.set_coordinator(coordinator_rpc_addr);
        let model_round = aggregator.book().model().map(|m| m.round);
        AggregatorInfo {
            public_url: aggregator.public_url.clone(),
            model_round,
        }
    }

    async fn open_round(self, _: Context, opening: OpenRound) -> Result<(), String> {
        let aggregator = self.get()?;
        // Allocating a large sum takes a while: done outside the book's lock.
        let builder = {
            let book = aggregator.book();
            let already = book.open_round_id() == Some((opening.round, opening.attempt));
            if already {
                None
            } else {
                book.sum_builder(opening.round)
            }
        };
        let sum = match builder {
            Some(build) => Some(
                tokio::task::spawn_blocking(build)
                    .await
                    .map_err(|e| format!("allocating the round's sum failed: {e}"))?,
            ),
            None => None,
        };
        let result = aggregator.book().open_round(&opening, sum);
        if result.is_ok() {
            tracing::debug!(
                round = opening.round,
                attempt = opening.attempt,
                participants = opening.grants.len(),
                "round open"
            );
        }
        result
    }

    async fn close_round(self, _: Context, round: u32, attempt: u32) -> Result<(), String> {
        let aggregator = self.get()?;
        tokio::task::spawn_blocking(move || aggregator.close_round_blocking(round, attempt))
            .await
            .map_err(|e| format!("closing the round failed: {e}"))?
    }

    async fn status(self, _: Context) -> AggregatorStatus {
        let Ok(aggregator) = self.get() else {
            return AggregatorStatus {
                model_round: None,
                open_round: None,
                accepted: Vec::new(),
            };
        };
        let book = aggregator.book();
        AggregatorStatus {
            model_round: book.model().map(|m| m.round),
            open_round: book.open_round_id(),
            accepted: book.accepted(),
        }
    }
}
