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

/// A test build's global allocator (issue 13): the system allocator, counting the blocks and
/// bytes allocated and freed, on the current thread while [`counting::on_this_thread`] runs
/// and everywhere in [`counting::live`], so tests can check what a structure costs per entry.
#[cfg(test)]
pub mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicIsize, Ordering};

    pub struct Counting;

    thread_local! {
        /// Blocks allocated and freed on this thread while counting (None: not counting).
        static THIS_THREAD: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
    }

    /// Blocks and bytes live in the whole process (allocated less freed since start).
    static LIVE_BLOCKS: AtomicIsize = AtomicIsize::new(0);
    static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

    fn counted(allocated: bool, size: usize) {
        let size = isize::try_from(size).unwrap_or(isize::MAX);
        if allocated {
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(size, Ordering::Relaxed);
        } else {
            LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(size, Ordering::Relaxed);
        }
        // A thread being torn down has no locals left: it is not counting.
        let _ = THIS_THREAD.try_with(|c| {
            if let Some((allocs, frees)) = c.get() {
                c.set(Some(if allocated {
                    (allocs + 1, frees)
                } else {
                    (allocs, frees + 1)
                }));
            }
        });
    }

    // SAFETY: every call goes to the system allocator unchanged; counting allocates nothing.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller's contract, passed on.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                counted(true, layout.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller's contract, passed on.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                counted(true, layout.size());
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.dealloc(ptr, layout) };
            counted(false, layout.size());
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller's contract, passed on.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                // One block all the same; its size changed.
                let grown = isize::try_from(new_size).unwrap_or(isize::MAX)
                    - isize::try_from(layout.size()).unwrap_or(isize::MAX);
                LIVE_BYTES.fetch_add(grown, Ordering::Relaxed);
            }
            p
        }
    }

    /// Runs `work` and returns what it gave with the blocks it allocated and freed on this
    /// thread (a block grown by realloc is not counted again).
    pub fn on_this_thread<R>(work: impl FnOnce() -> R) -> (R, usize, usize) {
        THIS_THREAD.with(|c| c.set(Some((0, 0))));
        let result = work();
        let (allocs, frees) = THIS_THREAD.with(|c| c.take()).unwrap_or((0, 0));
        (result, allocs, frees)
    }

    /// Blocks and bytes live in the whole process now (meaningful with one test running).
    pub fn live() -> (isize, isize) {
        (
            LIVE_BLOCKS.load(Ordering::Relaxed),
            LIVE_BYTES.load(Ordering::Relaxed),
        )
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
