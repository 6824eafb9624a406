//! The aggregator's side of the tarpc link: serving [`AggregatorRpc`] and the outbox that
//! delivers notices to the coordinator, in order, retrying until each is acknowledged.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rondo_core::federation::OpenRound;
use rondo_net::link::LinkSecurity;
use rondo_net::link::{
    AggregatorInfo, AggregatorRpc, AggregatorStatus, CoordinatorRpcClient, Notice,
    connect_coordinator, deadline, link_is_broken,
};
use rondo_net::retry::Backoff;
use rondo_net::shutdown::Shutdown;
use tarpc::context::Context;
use tokio::sync::{mpsc, watch};

use crate::durable::SavedRound;
use crate::service::Aggregator;

/// The most bytes of metrics one notice carries. Uploads' metrics are bounded far below this
/// at parse time; this is the link's own guard, so that no notice can outgrow the RPC frame
/// limit and be retried for ever in front of the ones queued after it.
const NOTICE_METRICS_MAX_BYTES: usize = 256 << 10;
/// The longest rejection reason a notice carries.
const NOTICE_REASON_MAX_BYTES: usize = 1024;

/// The notice as it is sent: anything participant-supplied cut to a size the link always
/// carries.
fn bounded(notice: Notice) -> Notice {
    {
        match notice {
            Notice::Accepted {
                round,
                attempt,
                participant_id,
                n_samples,
                metrics,
            } => {
                let size: usize = metrics.keys().map(|k| k.len() + 24).sum();
                let metrics = if size > NOTICE_METRICS_MAX_BYTES {
                    tracing::warn!(
                        round,
                        %participant_id,
                        keys = metrics.len(),
                        "metrics too large for a notice; sent without them"
                    );
                    BTreeMap::new()
                } else {
                    metrics
                };
                Notice::Accepted {
                    round,
                    attempt,
                    participant_id,
                    n_samples,
                    metrics,
                }
            }
            Notice::Rejected {
                round,
                attempt,
                participant_id,
                mut reason,
            } => {
                if reason.len() > NOTICE_REASON_MAX_BYTES {
                    let mut end = NOTICE_REASON_MAX_BYTES;
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    reason.truncate(end);
                    reason.push('…');
                }
                Notice::Rejected {
                    round,
                    attempt,
                    participant_id,
                    reason,
                }
            }
            aggregated @ Notice::RoundAggregated { .. } => aggregated,
        }
    }
}

/// Queue of notices for the coordinator. Sending never blocks; a background task delivers,
/// and on shutdown delivers what is queued before it ends (within the drain bound).
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Notice>,
    coordinator: watch::Sender<Option<String>>,
}

impl Outbox {
    /// Starts the delivery task, tracked by `shutdown`.
    pub fn start(call_timeout: Duration, security: LinkSecurity, shutdown: &Shutdown) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (coordinator, address) = watch::channel(None);
        shutdown.spawn(deliver(
            rx,
            address,
            call_timeout,
            security,
            shutdown.signalled(),
        ));
        Self { tx, coordinator }
    }

    pub fn send(&self, notice: Notice) {
        // The receiver lives until shutdown has drained the queue; a failed send means the
        // process is exiting.
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
    security: LinkSecurity,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut client: Option<(String, CoordinatorRpcClient)> = None;
    tokio::pin!(shutdown);
    let mut draining = false;
    loop {
        let notice = if draining {
            match rx.try_recv() {
                Ok(notice) => notice,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                notice = rx.recv() => match notice {
                    Some(notice) => notice,
                    None => return,
                },
                () = &mut shutdown => {
                    draining = true;
                    continue;
                }
            }
        };
        let notice = bounded(notice);
        let mut backoff = Backoff::link();
        loop {
            let Some(addr) = address.borrow_and_update().clone() else {
                if address.changed().await.is_err() {
                    return;
                }
                continue;
            };
            if client.as_ref().is_none_or(|(a, _)| *a != addr) {
                match connect_coordinator(&addr, &security).await {
                    Ok(c) => client = Some((addr.clone(), c)),
                    Err(err) => {
                        tracing::warn!(%addr, %err, "coordinator unreachable; retrying");
                        backoff.wait().await;
                        continue;
                    }
                }
            }
            let Some((_, c)) = client.as_ref() else {
                continue;
            };
            let ctx = deadline(call_timeout);
            let sent = c.notify(ctx, notice.clone()).await;
            match sent {
                Ok(()) => break,
                Err(err) => {
                    if link_is_broken(&err) {
                        tracing::warn!(%err, "notice to the coordinator failed; reconnecting");
                        client = None;
                    } else {
                        tracing::warn!(%err, "notice to the coordinator not answered; resending");
                    }
                    backoff.wait().await;
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
        // Saved before it is acknowledged: the coordinator hands out the tokens only then, so
        // no update of this round can be accepted before a restart would find the round.
        if result.is_ok()
            && let Some(durable) = &aggregator.durable
        {
            let grants = aggregator.book().open_grants().unwrap_or_default();
            let saved = SavedRound {
                round: opening.round,
                attempt: opening.attempt,
                grants,
            };
            durable
                .save_round(&saved)
                .await
                .map_err(|e| format!("saving the round failed: {e}"))?;
        }
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
        if !aggregator.book().knows_round(round, attempt) {
            return Err(format!("round {round} attempt {attempt} is not open"));
        }
        // The close runs on its own, tracked by shutdown, and reports through the outbox: the
        // call returns at once, so the coordinator's deadline never cuts a close short, and a
        // repeated call while one is closing the round is a no-op.
        let closer = aggregator.clone();
        aggregator.shutdown.spawn_blocking(move || {
            if let Err(err) = closer.close_round_blocking(round, attempt) {
                tracing::warn!(round, attempt, %err, "closing the round failed");
            }
        });
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// tarpc's default frame limit, which every notice must fit.
    const FRAME_LIMIT: usize = 8 << 20;

    #[test]
    fn no_notice_outgrows_the_frame_limit_whatever_the_participant_sent() {
        let metrics: BTreeMap<String, f64> = (0..700_000)
            .map(|i| (format!("metric-{i:012}"), i as f64))
            .collect();
        let huge = Notice::Accepted {
            round: 1,
            attempt: 0,
            participant_id: "p".into(),
            n_samples: 5,
            metrics,
        };
        assert!(serde_json::to_vec(&huge).unwrap().len() > FRAME_LIMIT);
        let sent = bounded(huge);
        assert!(serde_json::to_vec(&sent).unwrap().len() < FRAME_LIMIT);
        assert!(
            matches!(sent, Notice::Accepted { n_samples: 5, ref metrics, .. } if metrics.is_empty()),
            "the update still counts, without its metrics"
        );

        let small: BTreeMap<String, f64> = BTreeMap::from([("loss".into(), 0.5)]);
        let kept = bounded(Notice::Accepted {
            round: 1,
            attempt: 0,
            participant_id: "p".into(),
            n_samples: 5,
            metrics: small.clone(),
        });
        assert!(matches!(kept, Notice::Accepted { ref metrics, .. } if *metrics == small));

        let long = bounded(Notice::Rejected {
            round: 1,
            attempt: 0,
            participant_id: "p".into(),
            reason: "é".repeat(1 << 20),
        });
        assert!(serde_json::to_vec(&long).unwrap().len() < 4 * NOTICE_REASON_MAX_BYTES);
    }
}
