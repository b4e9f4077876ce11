//! Aligned I/O buffers and the per-device buffer pool.
//!
//! Owns: [`AlignedBuf`] (a 4 KiB-aligned buffer with a movable 4 KiB-aligned window, the only
//! buffer type a [`BlockDevice`](super::BlockDevice) accepts) and [`BufferPool`] (one arena
//! allocated when the device opens, cut into size classes; io_uring registers the arena's buffers
//! once). A request that finds its class and every larger class empty waits for a buffer to come
//! back: the pool never grows, so memory stays bounded under any load.
//!
//! Meta pages come from a separate class ([`BufferPool::page`]) so that a request holding a data
//! buffer and waiting for a meta page can never wait on another such request: no deadlock.
//!
//! Pool buffers are not zeroed when handed out; callers fill the window they use.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Alignment of every device offset, length and buffer (O_DIRECT on 4 KiB devices).
pub const ALIGN: usize = 4096;

/// Round `n` up to a multiple of [`ALIGN`] (at least one).
pub(crate) fn round_up(n: usize) -> usize {
    n.max(1).div_ceil(ALIGN) * ALIGN
}

/// Where a buffer's memory came from, so that dropping it gives it back.
enum Origin {
    Heap,
    Pool {
        pool: Arc<PoolShared>,
        class: usize,
        index: u16,
    },
}

/// A 4 KiB-aligned, owned buffer. I/O uses its window `[start, start + len)`, which starts and
/// ends on 4 KiB boundaries inside the allocation.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    start: usize,
    len: usize,
    origin: Origin,
}

// SAFETY: the buffer owns its memory exclusively; moving it between threads is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed heap buffer (not from a pool) of `len` bytes rounded up to [`ALIGN`]. For cold
    /// paths: formatting, loading, tests.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = round_up(len);
        let layout = Layout::from_size_align(cap, ALIGN).expect("4 KiB-aligned layout is valid");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            cap,
            start: 0,
            len: cap,
            origin: Origin::Heap,
        }
    }

    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Length of the window.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the window in the allocation.
    pub fn window_start(&self) -> usize {
        self.start
    }

    /// Move the window. Both values must be multiples of [`ALIGN`] and fit the allocation: a
    /// violation is a programmer error.
    pub fn set_window(&mut self, start: usize, len: usize) {
        assert!(
            start.is_multiple_of(ALIGN)
                && len.is_multiple_of(ALIGN)
                && start.saturating_add(len) <= self.cap,
            "window {start}+{len} is unaligned or outside a buffer of {} bytes",
            self.cap
        );
        self.start = start;
        self.len = len;
    }

    /// The window's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the window lies inside the allocation, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.start), self.len) }
    }

    /// The window's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.start), self.len) }
    }

    /// Pointer to the window, for the device implementations.
    pub(crate) fn io_ptr(&mut self) -> *mut u8 {
        // SAFETY: `start <= cap`, so the result stays inside (or one past) the allocation.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }

    /// The registered-buffer index of this buffer if it belongs to the pool `pool_id`.
    pub(crate) fn fixed_index(&self, pool_id: u64) -> Option<u16> {
        match &self.origin {
            Origin::Pool { pool, index, .. } if pool.id == pool_id => Some(*index),
            _ => None,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.origin, Origin::Heap) {
            Origin::Heap => {
                let layout =
                    Layout::from_size_align(self.cap, ALIGN).expect("layout was valid at alloc");
                // SAFETY: allocated in `zeroed` with exactly this layout.
                unsafe { dealloc(self.ptr.as_ptr(), layout) }
            }
            Origin::Pool { pool, class, index } => pool.give_back(class, index),
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({}+{} of {})", self.start, self.len, self.cap)
    }
}

/// How many buffers of which sizes a pool holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// `(size in bytes, count)` per data class, sizes ascending multiples of [`ALIGN`].
    pub data_classes: Vec<(usize, usize)>,
    /// 4 KiB buffers reserved for metadata pages.
    pub pages: usize,
}

impl Default for PoolConfig {
    /// About 30 MiB per device: enough for a few hundred small requests in flight and sixteen
    /// whole-chunk ones.
    fn default() -> Self {
        PoolConfig {
            data_classes: vec![
                (4 << 10, 256),
                (8 << 10, 64),
                (16 << 10, 64),
                (32 << 10, 32),
                (64 << 10, 32),
                (128 << 10, 16),
                (256 << 10, 8),
                (512 << 10, 8),
                // A whole chunk plus the journal record's header page.
                ((1 << 20) + (4 << 10), 16),
            ],
            pages: 128,
        }
    }
}

impl PoolConfig {
    /// A small pool (about 3 MiB) for tests.
    pub fn small() -> PoolConfig {
        PoolConfig {
            data_classes: vec![(4 << 10, 32), (64 << 10, 8), (1 << 20, 2)],
            pages: 16,
        }
    }
}

struct Class {
    size: usize,
    count: usize,
    /// Global indexes of the free buffers. Invariant: `available` has as many permits as
    /// `free` has entries (a permit is taken before popping and added after pushing).
    free: Mutex<Vec<u16>>,
    available: Semaphore,
}

struct PoolShared {
    id: u64,
    arena: NonNull<u8>,
    layout: Layout,
    classes: Vec<Class>,
    /// `(offset in arena, size)` by global index.
    bufs: Vec<(usize, usize)>,
}

// SAFETY: the arena is only reached through `AlignedBuf`s, each owning a disjoint part.
unsafe impl Send for PoolShared {}
// SAFETY: as above; the bookkeeping is behind mutexes and semaphores.
unsafe impl Sync for PoolShared {}

impl Drop for PoolShared {
    fn drop(&mut self) {
        // SAFETY: allocated in `BufferPool::new` with this layout; every buffer holds an `Arc`
        // to us, so none is alive any more.
        unsafe { dealloc(self.arena.as_ptr(), self.layout) }
    }
}

impl PoolShared {
    fn give_back(&self, class: usize, index: u16) {
        let Some(c) = self.classes.get(class) else {
            return;
        };
        if let Ok(mut free) = c.free.lock() {
            free.push(index);
            drop(free);
            c.available.add_permits(1);
        }
    }

    /// Take a buffer of `class` whose permit the caller already holds (and forgot).
    fn take(self: &Arc<Self>, class: usize, len: usize) -> Option<AlignedBuf> {
        let c = self.classes.get(class)?;
        let index = c.free.lock().ok()?.pop()?;
        let (offset, size) = *self.bufs.get(usize::from(index))?;
        // SAFETY: `offset + size` lies inside the arena.
        let ptr = unsafe { NonNull::new_unchecked(self.arena.as_ptr().add(offset)) };
        Some(AlignedBuf {
            ptr,
            cap: size,
            start: 0,
            len: len.min(size),
            origin: Origin::Pool {
                pool: self.clone(),
                class,
                index,
            },
        })
    }

    fn try_take(self: &Arc<Self>, class: usize, len: usize) -> Option<AlignedBuf> {
        let permit = self.classes.get(class)?.available.try_acquire().ok()?;
        permit.forget();
        self.take(class, len)
    }
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// A fixed set of aligned buffers, allocated once. Cheap to clone.
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
    /// Number of data classes; the page class comes after them.
    data_classes: usize,
}

impl BufferPool {
    /// Allocate the arena. Sizes are rounded up to [`ALIGN`]; at most 65535 buffers.
    pub fn new(cfg: &PoolConfig) -> BufferPool {
        let mut classes: Vec<(usize, usize)> = cfg
            .data_classes
            .iter()
            .map(|(size, count)| (round_up(*size), *count))
            .collect();
        classes.sort_by_key(|c| c.0);
        let data_classes = classes.len();
        classes.push((ALIGN, cfg.pages));
        let total_bufs: usize = classes.iter().map(|c| c.1).sum();
        assert!(total_bufs < usize::from(u16::MAX), "too many pool buffers");
        let total_bytes: usize = classes.iter().map(|(s, n)| s * n).sum::<usize>().max(ALIGN);
        let layout = Layout::from_size_align(total_bytes, ALIGN).expect("valid arena layout");
        // SAFETY: non-zero size.
        let arena = unsafe { alloc_zeroed(layout) };
        let Some(arena) = NonNull::new(arena) else {
            std::alloc::handle_alloc_error(layout)
        };
        let mut bufs = Vec::with_capacity(total_bufs);
        let mut pool_classes = Vec::with_capacity(classes.len());
        let mut offset = 0;
        for (size, count) in classes {
            let mut free = Vec::with_capacity(count);
            for _ in 0..count {
                free.push(bufs.len() as u16);
                bufs.push((offset, size));
                offset += size;
            }
            free.reverse();
            pool_classes.push(Class {
                size,
                count,
                free: Mutex::new(free),
                available: Semaphore::new(count),
            });
        }
        BufferPool {
            shared: Arc::new(PoolShared {
                id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
                arena,
                layout,
                classes: pool_classes,
                bufs,
            }),
            data_classes,
        }
    }

    /// This pool's identity (registered-buffer indexes are only valid for their own pool).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// A buffer whose window is `len` bytes rounded up to [`ALIGN`]. Takes the smallest class
    /// that fits, else a larger free one, else waits for the smallest fitting class. A request
    /// larger than every class gets a heap buffer. Contents are unspecified.
    pub async fn get(&self, len: usize) -> AlignedBuf {
        let len = round_up(len);
        let data = &self.shared.classes[..self.data_classes];
        let Some(first) = data.iter().position(|c| c.size >= len) else {
            return AlignedBuf::zeroed(len);
        };
        for class in first..self.data_classes {
            if let Some(b) = self.shared.try_take(class, len) {
                return b;
            }
        }
        self.wait_take(first, len).await
    }

    /// A 4 KiB buffer for a metadata page, from the reserved page class.
    pub async fn page(&self) -> AlignedBuf {
        let class = self.data_classes;
        if let Some(b) = self.shared.try_take(class, ALIGN) {
            return b;
        }
        self.wait_take(class, ALIGN).await
    }

    async fn wait_take(&self, class: usize, len: usize) -> AlignedBuf {
        let Some(c) = self.shared.classes.get(class) else {
            return AlignedBuf::zeroed(len);
        };
        if c.count == 0 {
            // An empty class would wait forever.
            return AlignedBuf::zeroed(len);
        }
        match c.available.acquire().await {
            Ok(permit) => {
                permit.forget();
                self.shared
                    .take(class, len)
                    .unwrap_or_else(|| AlignedBuf::zeroed(len))
            }
            Err(_) => AlignedBuf::zeroed(len),
        }
    }

    /// Free buffers per class, data classes first then pages (for metrics and tests).
    pub fn free_counts(&self) -> Vec<usize> {
        self.shared
            .classes
            .iter()
            .map(|c| c.available.available_permits())
            .collect()
    }

    /// One iovec per buffer, by global index: what io_uring registers.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        self.shared
            .bufs
            .iter()
            .map(|(offset, size)| libc::iovec {
                // SAFETY: inside the arena.
                iov_base: unsafe { self.shared.arena.as_ptr().add(*offset) }.cast(),
                iov_len: *size,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn heap_buffers_are_aligned_and_windowed() {
        let mut b = AlignedBuf::zeroed(5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        b.set_window(4096, 4096);
        b.as_mut_slice().fill(7);
        b.set_window(0, 8192);
        assert_eq!(b.as_slice()[4095], 0);
        assert_eq!(b.as_slice()[4096], 7);
    }

    #[test]
    #[should_panic(expected = "unaligned")]
    fn unaligned_window_is_a_programmer_error() {
        AlignedBuf::zeroed(8192).set_window(100, 4096);
    }

    #[tokio::test]
    async fn pool_borrows_larger_classes_then_waits() {
        let pool = BufferPool::new(&PoolConfig {
            data_classes: vec![(4096, 1), (8192, 1)],
            pages: 1,
        });
        let a = pool.get(100).await;
        assert_eq!((a.len(), a.capacity()), (4096, 4096));
        assert_eq!(a.as_slice().as_ptr() as usize % ALIGN, 0);
        let b = pool.get(4096).await;
        assert_eq!(
            (b.len(), b.capacity()),
            (4096, 8192),
            "borrowed from the larger class"
        );
        let p = pool.page().await;
        assert_eq!(p.len(), 4096);
        assert_eq!(pool.free_counts(), vec![0, 0, 0]);

        let pool2 = pool.clone();
        let waiter = tokio::spawn(async move { pool2.get(4096).await.capacity() });
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "an exhausted pool makes requests wait"
        );
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter gets the returned buffer")
            .expect("join");
        assert_eq!(got, 4096);
        drop((b, p));
        assert_eq!(pool.free_counts(), vec![1, 1, 1]);
        // Larger than every class: a heap buffer.
        assert_eq!(pool.get(3 << 20).await.len(), 3 << 20);
    }
}
