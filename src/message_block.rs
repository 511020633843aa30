//! Where a message's memory comes from and goes back to.
//!
//! Every message is one block (of one of two sizes: a C or byte payload's, and one with
//! room for the library's own small values, see `message_ref`), allocated by the
//! publishing thread and, on the busiest path, freed by another one: the subscriber's
//! thread drops the last reference. Through the system allocator that hand-off costs a
//! cross-thread free (an atomic push onto the publisher's arena) and a malloc that reads
//! a chunk the other core has just written; the profile of a 1 -> 1 stream put that
//! malloc at a third of the publisher's time, paid once more than the bare queue hop it
//! is compared with.
//!
//! So each thread keeps two magazines (stacks of up to `BATCH` free blocks, Bonwick's
//! scheme): a thread that frees fills its magazines and hands a full one to a shared
//! depot, a thread that allocates empties its own and takes a full one from the depot.
//! One depot operation per `BATCH` blocks on either side, and the allocating thread only
//! reads pointers from an array; it writes a block without reading it first.
//!
//! Bounded: the depot holds at most `DEPOT_FULL` magazines; beyond that a freeing thread
//! gives its blocks back to the system allocator, so a drained backlog returns its
//! memory (`test_queue_memory`). A thread's magazines go to the depot (or the system)
//! when the thread ends.
//!
//! Valgrind: when the process runs under valgrind, the cache is off and every block is
//! the system allocator's own, so memcheck tracks each message (a use after free of a
//! cached block would otherwise go unseen) and a process that exits leaves no cached
//! blocks behind as "still reachable". Loom models use the system allocator too.
//!
//! Fork: the depot is an array of single-word slots, each taken and filled with one
//! compare-and-swap, so a fork that interrupts another thread mid-operation leaves the
//! child with a consistent depot (at worst one magazine fewer, leaked in the child).

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;

#[cfg(not(loom))]
use std::cell::RefCell;
#[cfg(not(loom))]
use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::thread::LocalKey;

/// Blocks per magazine.
#[cfg(not(loom))]
const BATCH: usize = 64;
/// Full magazines the depot keeps: 4,096 spare blocks process-wide at most.
#[cfg(not(loom))]
const DEPOT_FULL: usize = 64;
/// Empty magazines the depot keeps for freeing threads.
#[cfg(not(loom))]
const DEPOT_EMPTY: usize = 16;

/// The block cache for blocks of one layout (one per message block size).
pub(crate) struct BlockCache {
    layout: Layout,
    #[cfg(not(loom))]
    magazines: &'static LocalKey<ThreadMagazines>,
    #[cfg(not(loom))]
    full: [AtomicPtr<Magazine>; DEPOT_FULL],
    #[cfg(not(loom))]
    empty: [AtomicPtr<Magazine>; DEPOT_EMPTY],
    /// Full magazines in the depot, give or take one in flight: a thread allocating
    /// while the depot is empty (a subscriber behind its publisher) looks at this word
    /// instead of scanning every slot before each malloc.
    #[cfg(not(loom))]
    full_count: AtomicUsize,
    /// 0 unknown, 1 on, 2 off (under valgrind).
    #[cfg(not(loom))]
    state: AtomicU8,
}

#[cfg(not(loom))]
struct Magazine {
    n: usize,
    blocks: [*mut u8; BATCH],
}

#[cfg(not(loom))]
impl Magazine {
    fn new_boxed() -> Box<Magazine> {
        Box::new(Magazine {
            n: 0,
            blocks: [std::ptr::null_mut(); BATCH],
        })
    }
}

/// A thread's two magazines: `loaded` is used first, `previous` absorbs the turn at a
/// boundary (a thread alternating one free and one alloc at a full magazine does not go
/// to the depot every time).
#[cfg(not(loom))]
pub(crate) struct Magazines {
    cache: Option<&'static BlockCache>,
    loaded: Option<Box<Magazine>>,
    previous: Option<Box<Magazine>>,
}

#[cfg(not(loom))]
impl Drop for Magazines {
    fn drop(&mut self) {
        if let Some(cache) = self.cache {
            for m in [self.loaded.take(), self.previous.take()]
                .into_iter()
                .flatten()
            {
                cache.give_back(m);
            }
        }
    }
}

/// A thread's magazines for one cache (`block_cache!` declares one per cache).
#[cfg(not(loom))]
pub(crate) type ThreadMagazines = RefCell<Magazines>;

#[cfg(not(loom))]
impl Magazines {
    pub(crate) const NONE: Magazines = Magazines {
        cache: None,
        loaded: None,
        previous: None,
    };
}

/// Declares `static $name: BlockCache` for blocks of `$ty`'s layout, with thread-local
/// magazines of its own (a thread's magazines hold one cache's blocks only).
macro_rules! block_cache {
    ($vis:vis static $name:ident: $ty:ty;) => {
        #[cfg(not(loom))]
        $vis static $name: $crate::message_block::BlockCache = {
            thread_local! {
                static MAGAZINES: $crate::message_block::ThreadMagazines =
                    const { std::cell::RefCell::new($crate::message_block::Magazines::NONE) };
            }
            $crate::message_block::BlockCache::new(std::alloc::Layout::new::<$ty>(), &MAGAZINES)
        };
        #[cfg(loom)]
        $vis static $name: $crate::message_block::BlockCache =
            $crate::message_block::BlockCache::new(std::alloc::Layout::new::<$ty>());
    };
}
pub(crate) use block_cache;

#[cfg(not(loom))]
#[allow(clippy::declare_interior_mutable_const)]
const NO_MAGAZINE: AtomicPtr<Magazine> = AtomicPtr::new(std::ptr::null_mut());

impl BlockCache {
    /// A cache of `layout`'s blocks whose threads keep their magazines in `magazines`
    /// (declare both with `block_cache!`).
    #[cfg(not(loom))]
    pub(crate) const fn new(
        layout: Layout,
        magazines: &'static LocalKey<ThreadMagazines>,
    ) -> BlockCache {
        BlockCache {
            layout,
            magazines,
            full: [NO_MAGAZINE; DEPOT_FULL],
            empty: [NO_MAGAZINE; DEPOT_EMPTY],
            full_count: AtomicUsize::new(0),
            state: AtomicU8::new(0),
        }
    }

    /// Loom models: the system allocator, no cache.
    #[cfg(loom)]
    pub(crate) const fn new(layout: Layout) -> BlockCache {
        BlockCache {
            layout,
            #[cfg(not(loom))]
            full: [NO_MAGAZINE; DEPOT_FULL],
            #[cfg(not(loom))]
            empty: [NO_MAGAZINE; DEPOT_EMPTY],
            #[cfg(not(loom))]
            full_count: AtomicUsize::new(0),
            #[cfg(not(loom))]
            state: AtomicU8::new(0),
        }
    }

    /// A block of the cache's layout, or None when memory is exhausted.
    pub(crate) fn alloc(&'static self) -> Option<NonNull<u8>> {
        #[cfg(not(loom))]
        if self.enabled() {
            let cached = self
                .magazines
                .try_with(|m| m.try_borrow_mut().ok().and_then(|mut m| self.take(&mut m)))
                .ok()
                .flatten();
            if cached.is_some() {
                return cached;
            }
        }
        // SAFETY: the layout has a non-zero size (a message block).
        NonNull::new(unsafe { alloc(self.layout) })
    }

    /// Gives back a block `alloc` returned, whose contents were dropped.
    ///
    /// # Safety
    /// `block` came from this cache's `alloc` and is not used after this call.
    pub(crate) unsafe fn free(&'static self, block: NonNull<u8>) {
        #[cfg(not(loom))]
        if self.enabled() {
            let kept = self
                .magazines
                .try_with(|m| match m.try_borrow_mut() {
                    Ok(mut m) => {
                        self.keep(&mut m, block);
                        true
                    }
                    // Re-entered (a payload's dtor freeing a message while this thread's
                    // magazines are in use cannot happen: they are never held across
                    // a call out; kept for safety) or torn down: the system's.
                    Err(_) => false,
                })
                .unwrap_or(false);
            if kept {
                return;
            }
        }
        // SAFETY: the caller's promise: allocated with this layout, unused from now on.
        unsafe { dealloc(block.as_ptr(), self.layout) }
    }

    #[cfg(not(loom))]
    fn enabled(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = !crate::valgrind::running_on_valgrind();
                self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
                on
            }
        }
    }

    /// A block from the thread's magazines, refilled from the depot when both are empty.
    #[cfg(not(loom))]
    fn take(&'static self, m: &mut Magazines) -> Option<NonNull<u8>> {
        m.cache.get_or_insert(self);
        if m.loaded.as_ref().is_none_or(|l| l.n == 0) {
            if m.previous.as_ref().is_some_and(|p| p.n > 0) {
                std::mem::swap(&mut m.loaded, &mut m.previous);
            } else {
                if self.full_count.load(Ordering::Relaxed) == 0 {
                    return None;
                }
                let full = self.pop(&self.full)?;
                self.full_count.fetch_sub(1, Ordering::Relaxed);
                // Both of ours are empty (or absent): keep one, offer the other.
                if let Some(spare) = m.previous.take() {
                    self.push_empty(spare);
                }
                m.previous = m.loaded.take();
                m.loaded = Some(full);
            }
        }
        let l = m.loaded.as_mut()?;
        l.n -= 1;
        NonNull::new(l.blocks[l.n])
    }

    /// Puts a freed block in the thread's magazines, handing a full one to the depot
    /// when both are full.
    #[cfg(not(loom))]
    fn keep(&'static self, m: &mut Magazines, block: NonNull<u8>) {
        m.cache.get_or_insert(self);
        if m.loaded.as_ref().is_none_or(|l| l.n == BATCH) {
            if m.previous.as_ref().is_none_or(|p| p.n < BATCH) {
                std::mem::swap(&mut m.loaded, &mut m.previous);
            } else {
                // Both full: the older one goes to the depot, a fresh one takes its place.
                if let Some(full) = m.previous.take() {
                    self.give_back(full);
                }
                m.previous = m.loaded.take();
            }
            if m.loaded.is_none() {
                m.loaded = Some(self.pop(&self.empty).unwrap_or_else(Magazine::new_boxed));
            }
        }
        if let Some(l) = m.loaded.as_mut() {
            l.blocks[l.n] = block.as_ptr();
            l.n += 1;
        }
    }

    /// Hands a magazine to the depot: as a full one when it has blocks and there is
    /// room, its blocks to the system otherwise.
    #[cfg(not(loom))]
    fn give_back(&self, mut mag: Box<Magazine>) {
        if mag.n > 0 {
            match self.push(&self.full, mag) {
                Ok(()) => {
                    self.full_count.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(back) => mag = back,
            }
            for &b in &mag.blocks[..mag.n] {
                // SAFETY: every block in a magazine came from `alloc` with this layout
                // and is free.
                unsafe { dealloc(b, self.layout) };
            }
            mag.n = 0;
        }
        self.push_empty(mag);
    }

    #[cfg(not(loom))]
    fn push_empty(&self, mag: Box<Magazine>) {
        debug_assert_eq!(mag.n, 0);
        // No room: the magazine itself goes (dropped here).
        let _ = self.push(&self.empty, mag);
    }

    /// Stores `mag` in a free slot of `slots`; gives it back when every slot is taken.
    #[cfg(not(loom))]
    fn push(&self, slots: &[AtomicPtr<Magazine>], mag: Box<Magazine>) -> Result<(), Box<Magazine>> {
        let p = Box::into_raw(mag);
        for s in slots {
            if s.load(Ordering::Relaxed).is_null()
                && s.compare_exchange(
                    std::ptr::null_mut(),
                    p,
                    Ordering::Release,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                return Ok(());
            }
        }
        // SAFETY: `p` came from Box::into_raw above and was not published.
        Err(unsafe { Box::from_raw(p) })
    }

    /// Takes a magazine out of `slots`, if any. A slot holds its magazine's ownership
    /// alone (no link to another slot), so taking whatever pointer the slot holds is safe
    /// even if it was taken and stored again in between.
    #[cfg(not(loom))]
    fn pop(&self, slots: &[AtomicPtr<Magazine>]) -> Option<Box<Magazine>> {
        for s in slots {
            let p = s.load(Ordering::Relaxed);
            if !p.is_null()
                && s.compare_exchange(
                    p,
                    std::ptr::null_mut(),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                // SAFETY: the slot owned `p` (a Box::into_raw from `push`); the successful
                // exchange moved that ownership here, and Acquire pairs with the
                // pusher's Release so the magazine's contents are visible.
                return Some(unsafe { Box::from_raw(p) });
            }
        }
        None
    }

    /// Blocks held by the depot (tests).
    #[cfg(all(test, not(loom)))]
    fn depot_blocks(&self) -> usize {
        self.full
            .iter()
            .map(|s| {
                let p = s.load(Ordering::Acquire);
                // SAFETY: tests only, with no concurrent taker of this cache.
                if p.is_null() {
                    0
                } else {
                    unsafe { (*p).n }
                }
            })
            .sum()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashSet;

    // One cache per test: tests run in parallel.
    block_cache!(
        static HANDOFF: [u64; 8];
    );
    block_cache!(
        static BOUNDED: [u64; 8];
    );

    fn block(cache: &'static BlockCache) -> NonNull<u8> {
        let b = cache.alloc().expect("memory");
        // The block is writable over its whole layout.
        // SAFETY: a fresh block of 64 bytes, 8-aligned.
        unsafe { b.as_ptr().cast::<[u64; 8]>().write([7; 8]) };
        b
    }

    #[test]
    fn blocks_freed_by_one_thread_serve_another_through_the_depot() {
        if !HANDOFF.enabled() {
            return; // under valgrind: every block is the system's
        }
        // A freeing thread fills magazines and hands the full ones to the depot...
        let made: Vec<usize> = (0..BATCH * 4)
            .map(|_| block(&HANDOFF).as_ptr() as usize)
            .collect();
        std::thread::spawn(move || {
            for &b in &made {
                // SAFETY: each block came from HANDOFF.alloc and is used no more.
                unsafe { HANDOFF.free(NonNull::new(b as *mut u8).unwrap()) };
            }
        })
        .join()
        .unwrap();
        // ...(the thread's end gave back what was left in its own two)...
        assert!(
            HANDOFF.depot_blocks() >= BATCH * 4,
            "{}",
            HANDOFF.depot_blocks()
        );
        // ...and an allocating thread gets them back, each once.
        let again: HashSet<usize> = std::thread::spawn(|| {
            let v: Vec<usize> = (0..BATCH * 4)
                .map(|_| block(&HANDOFF).as_ptr() as usize)
                .collect();
            let set: HashSet<usize> = v.iter().copied().collect();
            for &b in &v {
                // SAFETY: as above.
                unsafe { HANDOFF.free(NonNull::new(b as *mut u8).unwrap()) };
            }
            set
        })
        .join()
        .unwrap();
        assert_eq!(again.len(), BATCH * 4, "a block was handed out twice");
    }

    #[test]
    fn the_depot_is_bounded() {
        if !BOUNDED.enabled() {
            return;
        }
        let n = BATCH * (DEPOT_FULL + 8);
        let made: Vec<usize> = (0..n).map(|_| block(&BOUNDED).as_ptr() as usize).collect();
        std::thread::spawn(move || {
            for &b in &made {
                // SAFETY: as above.
                unsafe { BOUNDED.free(NonNull::new(b as *mut u8).unwrap()) };
            }
        })
        .join()
        .unwrap();
        assert!(BOUNDED.depot_blocks() <= BATCH * DEPOT_FULL);
    }
}
