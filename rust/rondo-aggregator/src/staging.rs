//! Staging memory: the buffers uploads are read into before they are folded, within a fixed
//! budget (`aggregation.staging_memory_bytes`).
//!
//! The budget is a semaphore of [`STAGING_UNIT`]-sized permits. A [`StagingBuffer`] carries the
//! permits that cover its capacity wherever it goes: through [`crate::wire::read_update`], into
//! the `Bytes` of a `rondo_core::aggregate::Update`, and into whichever thread folds and drops
//! it. On drop it goes back to the [`StagingPool`] *with* its permits, as an idle buffer that
//! the next upload reuses: its pages are already mapped, so staging an upload costs no page
//! fault and no kernel zeroing, and no unmapping when the update is done with. (`main` pins
//! glibc's mmap threshold, so a fresh model-sized buffer is always a fresh mapping.)
//!
//! Bound: staging buffers in flight and idle buffers together never hold more than the budget,
//! because every one of them holds the permits for its capacity. When permits are short, idle
//! buffers are freed to release theirs. The one exception: an upload larger than the whole
//! budget is let through alone with every permit; such a buffer is never pooled. Idle buffers
//! stay between rounds, for the next round's uploads: with reuse, the staging budget is memory
//! the aggregator keeps, not only memory it may use at its busiest.
//!
//! A waiter must also wake when a buffer comes back to the pool, not only when permits are
//! released: an idle buffer keeps its permits, so otherwise an upload could sleep for ever
//! while idle buffers hold what it waits for. [`StagingPool::take`] waits on both.
//!
//! Without reuse (deterministic aggregation, which holds every update until the round closes)
//! nothing is pooled and [`StagingBuffer::into_bytes`] separates the bytes from their permits,
//! so that held updates do not hold the budget and uploads keep flowing.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use prometheus::IntGauge;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Staging memory is handed out in units of this many bytes.
pub const STAGING_UNIT: u64 = 1 << 20;

/// The staging budget and the idle buffers kept for reuse within it.
pub struct StagingPool {
    inner: Arc<Inner>,
}

struct Inner {
    semaphore: Arc<Semaphore>,
    units: u32,
    reuse: bool,
    idle: Mutex<Vec<Idle>>,
    /// Signalled whenever a buffer is added to `idle`.
    returned: Notify,
    idle_bytes: IntGauge,
}

/// A pooled buffer (empty, capacity kept) and the permits that cover its capacity.
struct Idle {
    buffer: Vec<u8>,
    permit: OwnedSemaphorePermit,
}

/// Memory to stage one upload in: a `Vec<u8>` that starts empty, with the staging permits that
/// cover its capacity. Goes back to its pool when dropped.
pub struct StagingBuffer {
    buffer: Vec<u8>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Weak<Inner>,
}

/// Staging permits separated from their bytes by [`StagingBuffer::into_bytes`]: released when
/// dropped.
#[must_use = "dropping it releases the staging memory at once"]
pub struct StagingPermit {
    _permit: Option<OwnedSemaphorePermit>,
}

/// An empty buffer for `len` bytes, backed by huge pages where the kernel can.
fn model_sized(len: usize) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(len);
    rondo_core::memory::advise_huge_pages(&mut buffer);
    buffer
}

fn units_for(bytes: u64, total: u32) -> u32 {
    u32::try_from(bytes.div_ceil(STAGING_UNIT))
        .unwrap_or(u32::MAX)
        .clamp(1, total)
}

impl StagingPool {
    /// A pool for `budget_bytes` of staging memory. With `reuse` false nothing is ever pooled.
    /// `idle_bytes` follows the capacity of the idle buffers.
    pub fn new(budget_bytes: u64, reuse: bool, idle_bytes: IntGauge) -> Self {
        let units = u32::try_from(budget_bytes / STAGING_UNIT)
            .unwrap_or(u32::MAX)
            .clamp(1, Semaphore::MAX_PERMITS as u32);
        idle_bytes.set(0);
        Self {
            inner: Arc::new(Inner {
                semaphore: Arc::new(Semaphore::new(units as usize)),
                units,
                reuse,
                idle: Mutex::new(Vec::new()),
                returned: Notify::new(),
                idle_bytes,
            }),
        }
    }

    /// A buffer for an upload of `bytes` (capacity at least `bytes`), waiting while other
    /// uploads hold the budget. With `None` (size not known yet) it holds the whole budget and
    /// no memory until [`StagingBuffer::fit`] sizes it. Larger than the budget: it waits for
    /// the whole budget and is then let through.
    pub async fn take(&self, bytes: Option<usize>) -> StagingBuffer {
        let inner = &self.inner;
        let wanted = bytes.map_or(inner.units, |b| units_for(b as u64, inner.units));
        loop {
            // Registered before looking at the pool, so that a buffer returned after the look
            // still wakes this waiter.
            let returned = inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();

            if let Some(buffer) = bytes.and_then(|b| inner.reuse_idle(b)) {
                return self.buffer(buffer.buffer, buffer.permit);
            }
            match Arc::clone(&inner.semaphore).try_acquire_many_owned(wanted) {
                Ok(permit) => return self.fresh(bytes, permit),
                Err(TryAcquireError::NoPermits) => {}
                Err(TryAcquireError::Closed) => unreachable!("the pool never closes its semaphore"),
            }
            if inner.evict_idle(wanted) {
                continue;
            }
            tokio::select! {
                permit = Arc::clone(&inner.semaphore).acquire_many_owned(wanted) => {
                    let Ok(permit) = permit else {
                        unreachable!("the pool never closes its semaphore")
                    };
                    return self.fresh(bytes, permit);
                }
                () = &mut returned => {}
            }
        }
    }

    fn fresh(&self, bytes: Option<usize>, permit: OwnedSemaphorePermit) -> StagingBuffer {
        self.buffer(model_sized(bytes.unwrap_or(0)), permit)
    }

    fn buffer(&self, buffer: Vec<u8>, permit: OwnedSemaphorePermit) -> StagingBuffer {
        StagingBuffer {
            buffer,
            permit: Some(permit),
            pool: Arc::downgrade(&self.inner),
        }
    }

    /// Fills the pool with buffers for uploads of `bytes`, as many as the budget holds, their
    /// pages already mapped: the first round's uploads then find them ready instead of paying
    /// the page faults while participants wait. Blocking (it writes every page); run it on a
    /// thread of its own. Does nothing without reuse, or for uploads larger than the budget.
    pub fn prefill(&self, bytes: usize) {
        let inner = &self.inner;
        let units = units_for(bytes as u64, inner.units);
        if !inner.reuse || bytes == 0 || bytes as u64 > u64::from(units) * STAGING_UNIT {
            return;
        }
        while let Ok(permit) = Arc::clone(&inner.semaphore).try_acquire_many_owned(units) {
            let mut buffer = model_sized(bytes);
            buffer.resize(bytes, 0); // the write maps the pages in
            inner.give_back(buffer, permit);
        }
    }

    /// Bytes held by idle buffers.
    #[cfg(test)]
    pub(crate) fn idle_bytes(&self) -> u64 {
        self.inner
            .lock_idle()
            .iter()
            .map(|i| i.buffer.capacity() as u64)
            .sum()
    }

    /// The budget in units of [`STAGING_UNIT`].
    pub fn budget_units(&self) -> u32 {
        self.inner.units
    }

    /// Units not held by any buffer, in flight or idle (the metrics read it when scraped).
    pub fn available_units(&self) -> usize {
        self.inner.semaphore.available_permits()
    }
}

impl Inner {
    fn lock_idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock()
    }

    /// The smallest idle buffer of at least `bytes`, so that large ones stay for large uploads.
    fn reuse_idle(&self, bytes: usize) -> Option<Idle> {
        let mut idle = self.lock_idle();
        let (index, _) = idle
            .iter()
            .enumerate()
            .filter(|(_, i)| i.buffer.capacity() >= bytes)
            .min_by_key(|(_, i)| i.buffer.capacity())?;
        let taken = idle.swap_remove(index);
        self.idle_bytes.sub(taken.buffer.capacity() as i64);
        Some(taken)
    }

    /// Frees idle buffers, largest first, until `wanted` units could be free. Whether any was
    /// freed.
    fn evict_idle(&self, wanted: u32) -> bool {
        let mut evicted = Vec::new();
        {
            let mut idle = self.lock_idle();
            let mut available = self.semaphore.available_permits();
            while available < wanted as usize {
                let Some((index, _)) = idle
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, i)| i.buffer.capacity())
                else {
                    break;
                };
                let victim = idle.swap_remove(index);
                self.idle_bytes.sub(victim.buffer.capacity() as i64);
                available += victim.permit.num_permits();
                evicted.push(victim);
            }
        }
        // Unmapping takes a while: not under the lock. Memory first, then its permits.
        let any = !evicted.is_empty();
        for Idle { buffer, permit } in evicted {
            drop(buffer);
            drop(permit);
        }
        any
    }

    fn give_back(&self, mut buffer: Vec<u8>, permit: OwnedSemaphorePermit) {
        let covered = permit.num_permits() as u64 * STAGING_UNIT;
        let capacity = buffer.capacity();
        // An oversized buffer (let through with the whole budget, which does not cover it) is
        // never pooled; neither is one that holds no memory.
        if !self.reuse || capacity == 0 || capacity as u64 > covered {
            drop(buffer);
            drop(permit);
            return;
        }
        buffer.clear();
        {
            let mut idle = self.lock_idle();
            idle.push(Idle { buffer, permit });
            self.idle_bytes.add(capacity as i64);
        }
        self.returned.notify_waiters();
    }
}

impl StagingBuffer {
    /// A buffer outside any pool and budget, for tests.
    #[cfg(test)]
    pub(crate) fn unpooled(buffer: Vec<u8>) -> Self {
        Self {
            buffer,
            permit: None,
            pool: Weak::new(),
        }
    }

    /// Makes room for `len` bytes. A buffer taken for a known size already has it; one taken
    /// with the size unknown holds the whole budget, and now allocates `len` bytes and gives
    /// back the permits it does not need.
    pub fn fit(&mut self, len: usize) {
        if self.buffer.capacity() >= len {
            return;
        }
        if let (Some(permit), Some(pool)) = (self.permit.as_mut(), self.pool.upgrade()) {
            let needed = units_for(len as u64, pool.units) as usize;
            let held = permit.num_permits();
            if held > needed {
                drop(permit.split(held - needed));
            }
        }
        self.buffer = model_sized(len);
    }

    /// Appends bytes. Callers [`fit`](Self::fit) the buffer first and stay within that size,
    /// so this never reallocates (a larger buffer than its permits cover is simply not pooled).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        debug_assert!(self.buffer.len() + bytes.len() <= self.buffer.capacity());
        self.buffer.extend_from_slice(bytes);
    }

    pub fn capacity(&self) -> usize {
        self.buffer.capacity()
    }

    /// The staged bytes, to be folded. When the pool reuses buffers, the buffer and its
    /// permits travel inside the `Bytes` and return to the pool when the last reference is
    /// dropped; the returned permit is empty. Without reuse the bytes are a plain allocation
    /// and the permits come back separately, for the caller to hold as long as it works on
    /// the upload (the bytes may then be kept, as deterministic mode keeps them, off budget).
    pub fn into_bytes(mut self) -> (Bytes, StagingPermit) {
        if self.pool.upgrade().is_some_and(|pool| pool.reuse) {
            return (Bytes::from_owner(self), StagingPermit { _permit: None });
        }
        let buffer = std::mem::take(&mut self.buffer);
        let permit = self.permit.take();
        (Bytes::from(buffer), StagingPermit { _permit: permit })
    }
}

impl std::ops::Deref for StagingBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buffer
    }
}

impl AsRef<[u8]> for StagingBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl std::fmt::Debug for StagingBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingBuffer")
            .field("len", &self.buffer.len())
            .field("capacity", &self.buffer.capacity())
            .field("units", &self.permit.as_ref().map(|p| p.num_permits()))
            .finish()
    }
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.buffer);
        match (self.permit.take(), self.pool.upgrade()) {
            (Some(permit), Some(pool)) => pool.give_back(buffer, permit),
            (permit, _) => {
                drop(buffer);
                drop(permit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: usize = STAGING_UNIT as usize;

    fn pool(units: u64, reuse: bool) -> StagingPool {
        let gauge = IntGauge::new("idle", "idle bytes").expect("valid metric");
        StagingPool::new(units * STAGING_UNIT, reuse, gauge)
    }

    /// Memory held by staging (idle plus `in_flight`) is covered by the permits handed out,
    /// and those never exceed the budget.
    fn assert_within_budget(pool: &StagingPool, in_flight: &[&StagingBuffer]) {
        let held_units = pool.budget_units() as usize - pool.available_units();
        let held_bytes =
            pool.idle_bytes() as usize + in_flight.iter().map(|b| b.capacity()).sum::<usize>();
        assert!(
            held_bytes <= held_units * MIB,
            "{held_bytes} bytes held on {held_units} units"
        );
        assert!(held_bytes <= pool.budget_units() as usize * MIB);
        assert_eq!(
            pool.inner.idle_bytes.get() as u64,
            pool.idle_bytes(),
            "the gauge follows the pool"
        );
    }

    #[tokio::test]
    async fn reuse_hands_back_the_same_allocation() {
        let pool = pool(32, true);
        let size = 10_000_000;
        let mut first = pool.take(Some(size)).await;
        first.fit(size);
        first.extend_from_slice(&[7; 100]);
        let ptr = first.as_ptr();
        drop(first);
        assert_eq!(pool.idle_bytes(), size as u64);

        let second = pool.take(Some(size)).await;
        assert_eq!(second.as_ptr(), ptr, "the idle buffer is reused");
        assert!(second.is_empty(), "a reused buffer starts empty");
        assert_eq!(pool.idle_bytes(), 0);

        // Through `Bytes`, as an update travels into the accumulator and is dropped there.
        let (bytes, permit) = second.into_bytes();
        drop(permit);
        assert_eq!(
            pool.available_units(),
            32 - 10,
            "the bytes keep their permits"
        );
        drop(bytes);
        let third = pool.take(Some(size)).await;
        assert_eq!(third.as_ptr(), ptr);
    }

    #[tokio::test]
    async fn the_smallest_idle_buffer_that_fits_is_reused() {
        let pool = pool(32, true);
        let small = pool.take(Some(2 * MIB)).await;
        let large = pool.take(Some(8 * MIB)).await;
        let (small_ptr, large_ptr) = (small.as_ptr(), large.as_ptr());
        drop((small, large));
        assert_eq!(pool.take(Some(MIB)).await.as_ptr(), small_ptr);
        assert_eq!(pool.take(Some(3 * MIB)).await.as_ptr(), large_ptr);
    }

    #[tokio::test]
    async fn prefill_fills_the_budget_with_buffers_the_uploads_then_take() {
        let staging = pool(5, true);
        staging.prefill(2 * MIB);
        assert_eq!(
            staging.idle_bytes(),
            4 * MIB as u64,
            "two 2 MiB buffers fit in 5 MiB"
        );
        assert_eq!(staging.available_units(), 1);
        let a = staging.take(Some(2 * MIB)).await;
        let b = staging.take(Some(2 * MIB)).await;
        assert_eq!(
            staging.idle_bytes(),
            0,
            "both uploads got a prefilled buffer"
        );
        assert_eq!(staging.available_units(), 1, "no new memory was taken");
        drop((a, b));

        let oversized = pool(2, true);
        oversized.prefill(3 * MIB);
        assert_eq!(
            oversized.idle_bytes(),
            0,
            "a buffer over the budget is never kept"
        );
        let no_reuse = pool(4, false);
        no_reuse.prefill(MIB);
        assert_eq!(no_reuse.idle_bytes(), 0);
        assert_eq!(no_reuse.available_units(), 4);
    }

    #[tokio::test]
    async fn idle_and_in_flight_never_exceed_the_budget() {
        let pool = Arc::new(pool(4, true));
        let a = pool.take(Some(MIB)).await;
        let b = pool.take(Some(MIB)).await;
        let c = pool.take(Some(2 * MIB)).await;
        assert_within_budget(&pool, &[&a, &b, &c]);
        drop((a, b));
        assert_eq!(pool.idle_bytes(), 2 * MIB as u64);
        assert_within_budget(&pool, &[&c]);

        // 3 MiB does not fit any idle buffer: both are freed for their permits, and the rest
        // is only there once `c` is back too.
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move {
                let d = pool.take(Some(3 * MIB)).await;
                assert_within_budget(&pool, &[&d]);
                d.capacity()
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "4 units are taken or idle");
        assert_eq!(
            pool.idle_bytes(),
            0,
            "idle buffers were freed for the waiter"
        );
        assert_within_budget(&pool, &[&c]);
        drop(c);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter is served")
            .expect("the waiter's checks pass");
        assert_eq!(got, 3 * MIB);
        assert_within_budget(&pool, &[]);
        assert_eq!(pool.idle_bytes(), 3 * MIB as u64);
        assert_eq!(
            pool.available_units(),
            1,
            "3 units stay with the idle 3 MiB buffer"
        );
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_a_buffer_returns_to_the_pool() {
        let pool = Arc::new(pool(2, true));
        let holder = pool.take(Some(2 * MIB)).await;
        let ptr = holder.as_ptr();
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.take(Some(2 * MIB)).await.as_ptr() as usize }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the budget is taken");
        // Back to the pool with its permits: the semaphore alone would never wake the waiter.
        drop(holder);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes")
            .expect("no panic");
        assert_eq!(got, ptr as usize, "and reuses the returned buffer");
    }

    #[tokio::test]
    async fn a_waiter_for_a_larger_buffer_frees_returned_ones() {
        let pool = Arc::new(pool(3, true));
        let one = pool.take(Some(MIB)).await;
        let two = pool.take(Some(2 * MIB)).await;
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.take(Some(3 * MIB)).await.capacity() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(one);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(two);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes")
            .expect("no panic");
        assert_eq!(got, 3 * MIB);
    }

    #[tokio::test]
    async fn oversized_buffers_are_let_through_and_not_pooled() {
        let pool = pool(2, true);
        let mut big = pool.take(Some(5 * MIB)).await;
        big.fit(5 * MIB);
        assert_eq!(pool.available_units(), 0, "it holds the whole budget");
        drop(big);
        assert_eq!(pool.idle_bytes(), 0);
        assert_eq!(pool.available_units(), 2);
    }

    #[tokio::test]
    async fn an_unknown_size_holds_the_budget_until_fitted() {
        let pool = pool(8, true);
        let mut buffer = pool.take(None).await;
        assert_eq!(pool.available_units(), 0);
        assert_eq!(buffer.capacity(), 0);
        buffer.fit(MIB + 1);
        assert_eq!(pool.available_units(), 6, "2 units kept for 1 MiB + 1 byte");
        assert!(buffer.capacity() > MIB);
        drop(buffer);
        assert_eq!(pool.idle_bytes(), (MIB + 1) as u64);

        // An unknown size needs the whole budget: idle buffers are freed for it.
        let whole = pool.take(None).await;
        assert_eq!(pool.idle_bytes(), 0);
        drop(whole);
        assert_eq!(pool.available_units(), 8, "an empty buffer is not pooled");
    }

    #[tokio::test]
    async fn without_reuse_held_bytes_hold_no_permit() {
        // Deterministic mode: the handler keeps the permit until it ends, the accumulator keeps
        // the bytes until the round closes.
        let pool = pool(4, false);
        let mut buffer = pool.take(Some(3 * MIB)).await;
        buffer.fit(3 * MIB);
        buffer.extend_from_slice(&[1, 2, 3]);
        let (bytes, handler_permit) = buffer.into_bytes();
        assert_eq!(pool.available_units(), 1, "held while the handler runs");
        drop(handler_permit);
        assert_eq!(pool.available_units(), 4, "none once the handler is done");
        assert_eq!(&bytes[..], &[1, 2, 3]);
        drop(bytes);
        assert_eq!(pool.idle_bytes(), 0, "nothing is pooled");

        let rejected = pool.take(Some(MIB)).await;
        drop(rejected);
        assert_eq!(pool.idle_bytes(), 0);
        assert_eq!(pool.available_units(), 4);
    }
}
