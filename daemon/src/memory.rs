//! glibc malloc settings for a long-lived daemon with bursts (issue 13: RSS with 10,000
//! records). By default glibc gives each thread that allocates an arena of its own (up to 8
//! per core), keeps freed memory in them, and raises its mmap threshold after each large
//! block is freed, so that a listing's multi-MB reply buffers end up in the heap and stay
//! there. Fewer arenas and fixed thresholds keep large buffers in mmap (returned on free) and
//! let the heap shrink; `trim` hands back what a burst (the start-up load) left free.

/// At most this many malloc arenas (the main one and one more for the async workers and the
/// operation threads to share).
const ARENA_MAX: libc::c_int = 2;
/// Blocks from this size on are mmapped and returned to the system when freed.
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;
/// Free memory at the top of the heap beyond this is returned to the system.
const TRIM_THRESHOLD: libc::c_int = 1024 * 1024;

/// Sets the arena count and the fixed thresholds; called first thing, before any thread is
/// started. A setting glibc refuses is left at its default (it only costs memory).
pub fn tune_malloc() {
    for (param, value) in [
        (libc::M_ARENA_MAX, ARENA_MAX),
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        // SAFETY: mallopt only changes allocator parameters; it is called before other
        // threads exist, and every value is in the documented range.
        let ok = unsafe { libc::mallopt(param, value) };
        if ok != 1 {
            tracing::debug!(param, value, "mallopt refused a setting");
        }
    }
}

/// Returns the free memory of every arena to the system (the start-up load's transients).
pub fn trim() {
    // SAFETY: malloc_trim is thread-safe and takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tuning_and_trimming_leave_allocation_working() {
        super::tune_malloc();
        let big = vec![7u8; 4 * 1024 * 1024];
        assert_eq!(
            big.iter().map(|&b| u64::from(b)).sum::<u64>(),
            7 * 4 * 1024 * 1024
        );
        drop(big);
        super::trim();
        let again = vec![1u8; 1024];
        assert_eq!(again.len(), 1024);
    }
}
