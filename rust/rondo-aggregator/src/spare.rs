//! Spare model-sized memory: the memory of the global model a round replaced, once its last
//! download is done, kept to become a later round's sum instead of being unmapped and mapped in
//! again.

use std::sync::Weak;

use parking_lot::{Condvar, Mutex, MutexGuard};
use rondo_core::aggregate::ModelBuffer;

/// One model-sized piece of memory kept for the next round's sum: that of the model a round
/// replaced, once its last download is done (or, at start-up, one prepared in advance).
/// Mapping a fresh model-sized sum in took 8-13 ms for 10 MB here, between two rounds, while
/// every participant waited; zeroing memory already mapped takes about one.
///
/// It never adds to the memory bound (model file + sum + staging): memory arriving while a
/// round has its sum is let go at once, and a round about to build its sum waits for one being
/// prepared rather than allocating a second.
#[derive(Debug, Default)]
pub struct SpareSum {
    state: Mutex<SpareState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct SpareState {
    spare: Spare,
    /// The open round has its sum: no spare is needed until it closes.
    sum_in_use: bool,
}

#[derive(Debug, Default)]
enum Spare {
    #[default]
    Empty,
    Preparing,
    Ready(Vec<u64>),
}

impl SpareSum {
    fn lock(&self) -> MutexGuard<'_, SpareState> {
        self.state.lock()
    }

    /// Keeps `words` for the next sum; what is let go instead is returned, for the caller to
    /// drop outside the lock (unmapping a large buffer takes a while).
    pub(crate) fn put(&self, words: Vec<u64>) -> Option<Vec<u64>> {
        let mut state = self.lock();
        let released = if state.sum_in_use {
            if matches!(state.spare, Spare::Preparing) {
                state.spare = Spare::Empty;
            }
            Some(words)
        } else {
            match std::mem::replace(&mut state.spare, Spare::Ready(words)) {
                Spare::Ready(older) => Some(older),
                Spare::Empty | Spare::Preparing => None,
            }
        };
        self.changed.notify_all();
        released
    }

    /// Claims the right to prepare the spare; `false` when there is one, or one is being
    /// prepared, or a round has its sum.
    pub(crate) fn begin_preparing(&self) -> bool {
        let mut state = self.lock();
        if state.sum_in_use || !matches!(state.spare, Spare::Empty) {
            return false;
        }
        state.spare = Spare::Preparing;
        true
    }

    /// The spare, waiting for one being prepared.
    pub(crate) fn take(&self) -> Option<Vec<u64>> {
        let mut state = self.lock();
        while matches!(state.spare, Spare::Preparing) {
            self.changed.wait(&mut state);
        }
        match std::mem::take(&mut state.spare) {
            Spare::Ready(words) => Some(words),
            Spare::Empty | Spare::Preparing => None,
        }
    }

    /// Whether the open round has its sum; a spare kept meanwhile is let go (returned).
    pub(crate) fn set_sum_in_use(&self, in_use: bool) -> Option<Vec<u64>> {
        let mut state = self.lock();
        state.sum_in_use = in_use;
        if !in_use {
            return None;
        }
        match std::mem::take(&mut state.spare) {
            Spare::Ready(words) => Some(words),
            preparing_or_empty => {
                state.spare = preparing_or_empty;
                None
            }
        }
    }
}

/// Lets spare memory go (the callers hold the book's lock: a large spare goes on a thread).
pub(crate) fn release(words: Option<Vec<u64>>) {
    if let Some(words) = words {
        let bytes = words.len() * 8;
        rondo_core::memory::drop_large(words, bytes);
    }
}

/// A served model file that gives its memory to the [`SpareSum`] when the last `Bytes` of it
/// goes (it was replaced, and every download of it is done), instead of to the system.
pub(crate) struct Recycled {
    pub(crate) buffer: Option<ModelBuffer>,
    pub(crate) spare: Weak<SpareSum>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref().map_or(&[], |b| b.as_ref())
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let (Some(buffer), Some(spare)) = (self.buffer.take(), self.spare.upgrade()) {
            drop(spare.put(buffer.into_words()));
        }
    }
}

impl SpareSum {
    #[cfg(test)]
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.lock().spare, Spare::Ready(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_spare_never_sits_beside_a_sum() {
        let spare = SpareSum::default();
        assert_eq!(
            spare.put(vec![1; 4]),
            None,
            "kept while no round has its sum"
        );
        assert_eq!(
            spare.set_sum_in_use(true),
            Some(vec![1; 4]),
            "let go once one has"
        );
        assert_eq!(
            spare.put(vec![2; 4]),
            Some(vec![2; 4]),
            "refused while it has"
        );
        assert!(!spare.begin_preparing(), "nothing is prepared while it has");
        assert_eq!(spare.take(), None);
        assert_eq!(spare.set_sum_in_use(false), None);
        assert_eq!(spare.put(vec![3; 4]), None);
        assert_eq!(spare.take(), Some(vec![3; 4]));
    }

    #[test]
    fn a_round_waits_for_the_spare_being_prepared() {
        let spare = Arc::new(SpareSum::default());
        assert!(spare.begin_preparing());
        assert!(!spare.begin_preparing(), "one preparation at a time");
        let preparer = std::thread::spawn({
            let spare = spare.clone();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                spare.put(vec![7; 4])
            }
        });
        assert_eq!(
            spare.take(),
            Some(vec![7; 4]),
            "waited rather than allocating anew"
        );
        assert_eq!(preparer.join().unwrap(), None);
    }
}
