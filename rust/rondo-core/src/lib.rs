//! Rondo's core: the parts of federated learning that need no network.
//!
//! A short tour:
//!
//! - [`federation`] is the coordinator's round state machine. Participants join and heartbeat;
//!   the machine selects them for rounds, opens and closes rounds, drops the silent ones and
//!   keeps a bounded per-round history that agrees with what the aggregator built. It answers
//!   with [`federation::Command`]s ("open round r with these tokens" — the
//!   [`federation::OpenRound`] message the RPC carries as is — and "close round r") that the
//!   coordinator's edge sends to the aggregator. A round closes at its target of updates, or
//!   once no one selected is still expected (delivered, dropped, or past the training
//!   deadline), provided the quorum of updates arrived; one that cannot reach its quorum fails
//!   and is run again. Its files split it by concern: the participant registry, selection, the
//!   round phases, when a round closes and why, federated evaluation, and the records it shows (the coordinator builds
//!   its status view of them).
//! - [`model`] says what a model is: named tensors with a dtype and a shape, and whether an
//!   update fits the global model.
//! - [`aggregate`] is FedAvg: a running weighted sum that updates are folded into as they are
//!   accepted (blocked group commit, a plain lock, or lock-free Hogwild; optionally
//!   deterministic), and the finalize pass that produces the next global model.
//! - [`strategy`] is the aggregation seam: a [`strategy::Strategy`] makes each round's
//!   [`strategy::RoundAggregation`] (add an update; finalize into the next model, with the
//!   previous one at hand). FedAvg is its first implementation; `model_is_finite` is the check
//!   every finalized model passes before it is published.
//! - [`strategy::robust`] holds the Byzantine-robust rules that need the whole round before they
//!   decide: coordinate-wise median and trimmed mean, Krum, Multi-Krum and Bulyan. They ignore
//!   sample counts, do not depend on arrival order, and hold every update until the round
//!   closes (`n × model`), with a bounded working set on top.
//! - [`strategy::server_opt`] is the server optimizers (fedavgm, fedadam, fedyogi, fedadagrad):
//!   FedAvg's streaming round, then one step from the previous model along the round's average,
//!   with moments kept across rounds (O(model) memory) and left untouched by a failed step.
//! - [`kernels`] are the loops underneath, over raw little-endian bytes, shaped for memory
//!   bandwidth, with the read-only baseline they are measured against.
//! - [`memory`] asks for huge pages for model-sized buffers, so that mapping them in costs a
//!   few page faults rather than one per 4 KiB.
//!
//! Nothing here opens a socket, reads a clock, draws from a hidden random source or parses a
//! wire format: the binaries (`rondo-coordinator`, `rondo-aggregator`) do that at the edge and
//! call in, passing times as [`federation::Timestamp`]s and ids, secrets and an RNG as
//! arguments.

pub mod aggregate;
pub mod federation;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod strategy;
