//! The one retry policy of the link: exponential backoff with full jitter.
//!
//! Every loop that retries a call to the other service (the aggregator's outbox, the
//! coordinator's driver) waits through a [`Backoff`], so that two services restarted together
//! do not retry in lock-step, and a long outage costs one attempt every `max`.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Delays that start at `initial` and double up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The link's policy: 50 ms doubling to 2 s.
    pub fn link() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(2))
    }

    /// The next delay: uniform in `[current / 2, current]`, after which `current` doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let floor = ceiling / 2;
        floor + rand::rng().random_range(Duration::ZERO..=ceiling - floor)
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to `initial`, after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let mut ceilings = Vec::new();
        for _ in 0..5 {
            let delay = backoff.next_delay();
            ceilings.push(delay);
        }
        for (delay, ceiling) in ceilings.iter().zip([100u64, 200, 400, 400, 400]) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *delay <= ceiling && *delay >= ceiling / 2,
                "{delay:?} vs {ceiling:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
        // Jitter: many draws are not all the same.
        let draws: std::collections::HashSet<_> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay())
            .collect();
        assert!(draws.len() > 1);
    }
}
