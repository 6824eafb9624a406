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
}
