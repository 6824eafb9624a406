//! Large buffers and the kernel's page size.
//!
//! A model-sized buffer that is freshly mapped is paid for on first write: one page fault and
//! one zeroed page per 4 KiB. For a sum or a staged upload of tens of megabytes that costs more
//! than the fold itself. Where the kernel offers transparent huge pages on request (Linux with
//! THP in `madvise` mode, the common default), asking for them turns those thousands of faults
//! into a handful of 2 MiB ones.

/// Asks the kernel to back `vec`'s whole allocation (its capacity, not only its length) with
/// huge pages where it can. Advisory: on other systems, or when the kernel declines, nothing
/// changes. Call it before the memory is first written, which is when pages get mapped.
pub fn advise_huge_pages<T>(vec: &mut Vec<T>) {
    const HUGE_PAGE: usize = 2 << 20;
    let bytes = vec.capacity() * std::mem::size_of::<T>();
    if bytes < HUGE_PAGE {
        return; // no 2 MiB-aligned stretch can lie inside it
    }
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = vec.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(PAGE);
        let len = (start + bytes).saturating_sub(aligned) / PAGE * PAGE;
        if len > 0 {
            // SAFETY: the range lies within this vector's own allocation, and MADV_HUGEPAGE
            // only changes how the kernel backs it, never its contents.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
}

/// Drops `value`, which holds `bytes` of memory, on a short-lived thread of its own when that is
/// 64 MiB or more: unmapping that much takes milliseconds that a caller holding a lock, or on
/// the path that answers an upload or closes a round, need not wait for. Less is dropped at
/// once, so that its memory is back before it is next needed.
pub fn drop_large<T: Send + 'static>(value: T, bytes: usize) {
    const LARGE: usize = 64 << 20;
    if bytes >= LARGE {
        std::thread::spawn(move || drop(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_leaves_contents_and_capacity_alone() {
        let mut small = vec![7u8; 100];
        advise_huge_pages(&mut small);
        assert_eq!(small, vec![7u8; 100]);

        let mut large: Vec<u32> = Vec::with_capacity(3 << 20);
        large.extend(0..1000);
        let capacity = large.capacity();
        advise_huge_pages(&mut large);
        assert_eq!(large.capacity(), capacity);
        assert!(large.iter().copied().eq(0..1000));
        large.resize(3 << 20, 5);
        assert_eq!(large[(3 << 20) - 1], 5);
    }

    /// The kilobytes of huge pages backing the mapping that holds `address`, from
    /// `/proc/self/smaps`.
    #[cfg(target_os = "linux")]
    fn huge_kib_at(address: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                inside = (start..end).contains(&address);
            } else if inside && let Some(rest) = line.strip_prefix("AnonHugePages:") {
                return rest.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
        None
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn advised_buffers_are_backed_by_huge_pages_where_the_kernel_offers_them() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !mode.contains("[madvise]") && !mode.contains("[always]") {
            eprintln!("transparent huge pages are off here ({mode:?}): nothing to check");
            return;
        }
        let mut advised: Vec<u8> = Vec::with_capacity(64 << 20);
        advise_huge_pages(&mut advised);
        advised.resize(64 << 20, 1);
        let huge = huge_kib_at(advised.as_ptr() as usize + (32 << 20)).expect("mapping found");
        assert!(
            huge >= 2048,
            "THP mode {mode:?}, yet no huge page backs the advised buffer"
        );
    }
}
