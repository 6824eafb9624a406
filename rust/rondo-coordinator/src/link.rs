//! The coordinator's side of the tarpc link.
//!
//! - [`CoordinatorRpcServer`] takes the aggregator's notices (update accepted or rejected,
//!   round aggregated) and feeds them to the state machine.
//! - [`drive`] is the loop that keeps the link up (connect, attach, reconnect after a restart),
//!   ticks the state machine and carries out its commands, resending each until acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rondo_core::federation::{AggregationResult, Command, OpenRound, Outcome};
use rondo_net::link::LinkSecurity;
use rondo_net::link::{
    AggregatorRpcClient, CoordinatorRpc, Notice, connect_aggregator, deadline, link_is_broken,
};
use rondo_net::retry::Backoff;
use tarpc::context::Context;

use crate::service::{Coordinator, os_rng};

#[derive(Clone)]
pub struct CoordinatorRpcServer {
    pub coordinator: Arc<Coordinator>,
}

impl CoordinatorRpc for CoordinatorRpcServer {
    async fn notify(self, _: Context, notice: Notice) {
        self.apply(notice);
        // Answered only once saved: an answered notice is not sent again. If the store does
        // not confirm in time the aggregator's call times out and it resends (notices are
        // idempotent here).
        if let Err(err) = self.coordinator.durable().await {
            tracing::warn!(%err, "a notice from the aggregator is not saved yet");
        }
    }
}

impl CoordinatorRpcServer {
    fn apply(&self, notice: Notice) {
        let _span = match &notice {
            Notice::Accepted {
                round,
                attempt,
                participant_id,
                ..
            }
            | Notice::Rejected {
                round,
                attempt,
                participant_id,
                ..
            } => tracing::info_span!("notice", round, attempt, participant = %participant_id),
            Notice::RoundAggregated { round, attempt, .. } => {
                tracing::info_span!("notice", round, attempt)
            }
        }
        .entered();
        match notice {
            Notice::Accepted {
                round,
                attempt,
                participant_id,
                n_samples,
                metrics,
            } => self.update_accepted(round, attempt, participant_id, n_samples, metrics),
            Notice::Rejected {
                round,
                attempt,
                participant_id,
                reason,
            } => self.update_rejected(round, attempt, participant_id, reason),
            Notice::RoundAggregated {
                round,
                attempt,
                result,
            } => self.round_aggregated(round, attempt, result),
        }
    }

    fn update_accepted(
        &self,
        round: u32,
        attempt: u32,
        participant_id: String,
        n_samples: u64,
        metrics: BTreeMap<String, f64>,
    ) {
        self.coordinator.federation().update_accepted(
            round,
            attempt,
            &participant_id,
            n_samples,
            metrics,
        );
        self.coordinator.wake.notify_one();
    }

    fn update_rejected(&self, round: u32, attempt: u32, participant_id: String, reason: String) {
        tracing::info!(round, %participant_id, %reason, "update rejected");
        self.coordinator
            .federation()
            .update_rejected(round, attempt, &participant_id, reason);
    }

    fn round_aggregated(&self, round: u32, attempt: u32, result: AggregationResult) {
        // The contributors can be many: the log gets the counts.
        let summary = match &result {
            AggregationResult::Aggregated {
                updates,
                total_samples,
                ..
            } => format!("aggregated {updates} updates of {total_samples} samples"),
            AggregationResult::Failed { reason } => format!("failed: {reason}"),
        };
        // A notice is the aggregator alive, and "aggregated" says which model it now holds
        // (busy rounds leave no quiet second for a status probe to learn it).
        let aggregated = matches!(result, AggregationResult::Aggregated { .. });
        self.coordinator
            .aggregator_answered(aggregated.then_some(Some(round)));
        let now = self.coordinator.now();
        let (closed, summary_of_close) = {
            let mut federation = self.coordinator.federation();
            let closed = federation.round_aggregated(round, attempt, result, now);
            // The attempt just closed is the newest summary.
            let last = closed
                .as_ref()
                .and_then(|_| federation.round_summaries().last())
                .map(|s| (s.outcome, s.duration_secs));
            self.coordinator
                .metrics
                .observe_phase(federation.phase_name());
            (closed, last)
        };
        if let Some((outcome, duration_secs)) = summary_of_close {
            let outcome = match outcome {
                Some(Outcome::Failed) => "failed",
                _ => "aggregated",
            };
            self.coordinator
                .metrics
                .observe_round_closed(outcome, duration_secs);
        }
        if let Some(closed) = closed {
            tracing::info!(round, attempt, %summary, "round closed");
            for discrepancy in &closed.discrepancies {
                tracing::warn!(round, attempt, %discrepancy, "the round's record follows the aggregator");
            }
        }
        self.coordinator.changed();
        self.coordinator.wake.notify_one();
    }
}

/// How often the driver ticks when nothing wakes it.
const TICK: Duration = Duration::from_millis(200);
/// How often an otherwise silent link is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long an acknowledged command is not resent.
const RESEND_AFTER: Duration = Duration::from_secs(2);

/// Runs forever: keeps the link to the aggregator up and carries out the federation's commands.
pub async fn drive(
    coordinator: Arc<Coordinator>,
    aggregator_rpc: String,
    own_rpc: String,
    call_timeout: Duration,
    security: LinkSecurity,
) {
    let mut client: Option<AggregatorRpcClient> = None;
    let mut acked: Option<(Command, Instant)> = None;
    let mut last_heard = Instant::now();
    let mut backoff = Backoff::link();
    loop {
        if client.is_none() {
            match attach(
                &coordinator,
                &aggregator_rpc,
                &own_rpc,
                call_timeout,
                &security,
            )
            .await
            {
                Ok(c) => {
                    client = Some(c);
                    acked = None;
                    backoff.reset();
                }
                Err(err) => {
                    tracing::warn!(%aggregator_rpc, %err, "aggregator unreachable; retrying");
                    coordinator.aggregator_failed(format!("unreachable: {err}"), true);
                    backoff.wait().await;
                    continue;
                }
            }
        }
        let now = coordinator.now();
        let (commands, failed_here) = {
            let mut federation = coordinator.federation();
            let closed_before = federation.round_summaries().len();
            let commands = federation.tick(now, &mut os_rng());
            coordinator.metrics.observe_phase(federation.phase_name());
            // A tick closes an attempt only by failing it (no quorum): there is no aggregator
            // notice to count it on.
            let failed_here: Vec<_> = federation.round_summaries()[closed_before..]
                .iter()
                .map(|s| (s.round, s.attempt, s.duration_secs, s.reason.clone()))
                .collect();
            (commands, failed_here)
        };
        coordinator.touch();
        for (round, attempt, duration_secs, reason) in &failed_here {
            tracing::warn!(
                round,
                attempt,
                reason = reason.as_deref().unwrap_or(""),
                "round failed"
            );
            coordinator
                .metrics
                .observe_round_closed("failed", *duration_secs);
        }
        if !failed_here.is_empty() {
            coordinator.changed();
        }
        for command in commands {
            if acked
                .as_ref()
                .is_some_and(|(c, at)| *c == command && at.elapsed() < RESEND_AFTER)
            {
                continue;
            }
            let Some(c) = client.as_ref() else { break };
            // The selection and its tokens are saved before anyone outside learns them, so a
            // restarted coordinator opens the same round with the same grants, which the
            // aggregator recognizes (it keeps what it accepted).
            if matches!(command, Command::OpenRound(_))
                && let Err(err) = coordinator.durable().await
            {
                tracing::warn!(%err, "the round's selection is not saved yet; opening it later");
                continue;
            }
            match execute(c, &command, call_timeout).await {
                Ok(Ok(())) => {
                    if let Command::OpenRound(OpenRound {
                        round,
                        attempt,
                        grants,
                    }) = &command
                    {
                        tracing::info!(round, attempt, selected = grants.len(), "round open");
                        coordinator
                            .federation()
                            .round_opened(*round, *attempt, coordinator.now());
                        coordinator.touch();
                        coordinator.observe_phase();
                        coordinator.changed();
                    }
                    acked = Some((command, Instant::now()));
                    last_heard = Instant::now();
                    coordinator.aggregator_answered(None);
                }
                Ok(Err(refused)) => {
                    tracing::warn!(?command, %refused, "aggregator refused");
                    coordinator.aggregator_answered(None);
                }
                // A call past its deadline (a busy aggregator) is resent on the next tick;
                // only a broken connection is reconnected.
                Err(err) if !link_is_broken(&err) => {
                    tracing::warn!(%err, ?command, "the aggregator did not answer in time; resending");
                    coordinator.aggregator_failed(format!("call timed out: {err}"), false);
                }
                Err(err) => {
                    tracing::warn!(%err, "link to the aggregator broke; reconnecting");
                    coordinator.aggregator_failed(format!("link broke: {err}"), true);
                    client = None;
                }
            }
        }
        // Nothing to say for a while: ask for the aggregator's status anyway, so that a restart
        // is noticed (and the round re-opened, or rounds it lost run again) within a second
        // rather than at the round's close.
        if last_heard.elapsed() >= PROBE_EVERY
            && let Some(c) = client.as_ref()
        {
            match c.status(deadline(call_timeout)).await {
                Ok(status) => {
                    last_heard = Instant::now();
                    coordinator.aggregator_answered(Some(status.model_round));
                }
                // A restart breaks the connection; a slow answer does not mean one.
                Err(err) if !link_is_broken(&err) => {
                    tracing::warn!(%err, "the aggregator's status came too late");
                    coordinator.aggregator_failed(format!("status timed out: {err}"), false);
                    last_heard = Instant::now();
                }
                Err(err) => {
                    tracing::warn!(%err, "the aggregator stopped answering; reconnecting");
                    coordinator.aggregator_failed(format!("stopped answering: {err}"), true);
                    client = None;
                    continue;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {},
            () = coordinator.wake.notified() => {},
        }
    }
}

async fn attach(
    coordinator: &Coordinator,
    aggregator_rpc: &str,
    own_rpc: &str,
    call_timeout: Duration,
    security: &LinkSecurity,
) -> anyhow::Result<AggregatorRpcClient> {
    let client = connect_aggregator(aggregator_rpc, security).await?;
    let info = client
        .attach(deadline(call_timeout), own_rpc.to_string())
        .await?;
    tracing::info!(public_url = %info.public_url, model_round = ?info.model_round, "attached to the aggregator");
    coordinator.set_aggregator_url(info.public_url);
    coordinator.aggregator_attached(info.model_round);
    let resend = {
        let mut federation = coordinator.federation();
        if let Some(round) = federation.aggregator_attached(info.model_round, coordinator.now()) {
            tracing::error!(
                model_round = ?info.model_round,
                resume_at = round,
                "the aggregator lost rounds (restarted without them); running them again"
            );
            coordinator.changed();
        }
        federation.open_round_command()
    };
    // After an aggregator restart the round it had open is gone: open it again (idempotent
    // when it survived).
    if let Some(command) = resend
        && let Err(refused) = execute(&client, &command, call_timeout).await?
    {
        tracing::warn!(%refused, "the aggregator refused to re-open the current round");
    }
    Ok(client)
}

async fn execute(
    client: &AggregatorRpcClient,
    command: &Command,
    call_timeout: Duration,
) -> Result<Result<(), String>, tarpc::client::RpcError> {
    use tracing::Instrument;
    let ctx = deadline(call_timeout);
    match command {
        Command::OpenRound(open) => {
            let span = tracing::info_span!("round", round = open.round, attempt = open.attempt);
            client.open_round(ctx, open.clone()).instrument(span).await
        }
        Command::CloseRound { round, attempt } => {
            let span = tracing::info_span!("round", round, attempt);
            client
                .close_round(ctx, *round, *attempt)
                .instrument(span)
                .await
        }
    }
}
