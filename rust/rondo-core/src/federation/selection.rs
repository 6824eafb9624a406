//! Which participants a round takes, and the tokens they get. The randomness is the caller's:
//! nothing here draws from a hidden source.

use rand::Rng;
use rand::seq::IteratorRandom;

use super::{FederationSettings, ParticipantId};

/// 256 bits from `rng`, hex-encoded: a one-round token (or, from the edge, a secret).
pub fn token_from<R: Rng + ?Sized>(rng: &mut R) -> String {
    let bytes: [u8; 32] = rng.random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How many of `available` participants round `round` selects, or `None` when too few are
/// available to start it.
pub(super) fn selection_size(
    settings: &FederationSettings,
    round: u32,
    available: usize,
) -> Option<usize> {
    let needed = settings.min_clients.max(1);
    if available < needed {
        return None;
    }
    // Round 0 only establishes the initial model: one participant's weights are enough.
    if round == 0 {
        return Some(1);
    }
    let by_ratio = (settings.participants_ratio * available as f64).ceil() as usize;
    Some(by_ratio.max(needed).min(available))
}

/// What a round takes: its `target` (the updates it closes at) and how many it `selects`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Selection {
    pub(super) target: usize,
    pub(super) selects: usize,
}

/// The target (what [`selection_size`] gives) and, over-selecting by
/// `selection_overcommit`, how many participants are selected: `ceil(target × overcommit)`,
/// no more than are available. Round 0, which takes one participant's weights as the initial
/// model, never over-selects: two initial models would be averaged into neither.
pub(super) fn selection(
    settings: &FederationSettings,
    round: u32,
    available: usize,
) -> Option<Selection> {
    let target = selection_size(settings, round, available)?;
    if round == 0 {
        return Some(Selection { target, selects: 1 });
    }
    // The cast saturates (and a NaN becomes 0, which `max` lifts back to the target).
    let over = (target as f64 * settings.selection_overcommit).ceil() as usize;
    Some(Selection {
        target,
        selects: over.max(target).min(available),
    })
}

/// `count` of `candidates` drawn uniformly with `rng`, in the candidates' order.
pub(super) fn choose<'a, R: Rng + ?Sized>(
    candidates: impl Iterator<Item = &'a ParticipantId>,
    count: usize,
    rng: &mut R,
) -> Vec<ParticipantId> {
    let mut chosen = candidates.enumerate().choose_multiple(rng, count);
    chosen.sort_unstable_by_key(|(position, _)| *position);
    chosen.into_iter().map(|(_, id)| id.clone()).collect()
}
