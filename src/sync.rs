//! The synchronization primitives of the concurrency core (mailbox, pool), in one place
//! so the loom model checks (`RUSTFLAGS="--cfg loom" cargo test --release --lib loom`)
//! can swap in loom's instrumented versions with the same API.
//!
//! Threads sleep on these (idle workers, parked dedicated threads, joiners), so they are
//! std's futex-based primitives, whose waiters live in the kernel: after fork() the dead
//! parent threads simply are not there. parking_lot keeps its waiters in a process-wide
//! table, which a child inherits with entries for threads it does not have; a notify
//! would then wake one of those ghosts instead of the live waiter.

#[cfg(not(loom))]
pub(crate) use self::std_sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize};

/// std's Mutex and Condvar with parking_lot's API (no poisoning: a panic while holding
/// the lock cannot leave our state half-updated in a way later users must see).
#[cfg_attr(loom, allow(dead_code))]
pub(crate) mod std_sync {
    use std::time::Duration;

    pub(crate) struct Mutex<T>(std::sync::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) const fn new(value: T) -> Mutex<T> {
            Mutex(std::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    pub(crate) struct Condvar(std::sync::Condvar);

    impl Condvar {
        pub(crate) const fn new() -> Condvar {
            Condvar(std::sync::Condvar::new())
        }
        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            // SAFETY: the guard is moved out, handed to std's wait, and the re-acquired
            // guard written back before the slot can be observed; std's wait does not
            // panic (poisoning is mapped to the inner guard).
            unsafe {
                let owned = std::ptr::read(guard);
                let back = self.0.wait(owned).unwrap_or_else(|e| e.into_inner());
                std::ptr::write(guard, back);
            }
        }
        /// Waits at most `timeout`; true when it timed out.
        pub(crate) fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, timeout: Duration) -> bool {
            // SAFETY: as in `wait`.
            unsafe {
                let owned = std::ptr::read(guard);
                let (back, result) = self
                    .0
                    .wait_timeout(owned, timeout)
                    .unwrap_or_else(|e| e.into_inner());
                std::ptr::write(guard, back);
                result.timed_out()
            }
        }
    }
}

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize};

/// A spinning waiter's pause (loom must see it, or it explores the spin forever).
pub(crate) fn spin_pause() {
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
}
#[cfg(loom)]
pub(crate) use loom_shim::{Condvar, Mutex, MutexGuard};

use std::num::NonZeroU64;

/// Identifies a thread; cheaper to get than a `ThreadId` (one TLS read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThreadToken(NonZeroU64);

impl ThreadToken {
    /// The token's number (a mailbox's run state keeps it in a word of its own).
    pub(crate) fn number(self) -> NonZeroU64 {
        self.0
    }
    pub(crate) fn from_number(n: NonZeroU64) -> ThreadToken {
        ThreadToken(n)
    }
}

#[cfg(not(loom))]
pub(crate) fn thread_token() -> ThreadToken {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: Cell<u64> = const { Cell::new(0) };
    }
    let mut t = TOKEN.with(Cell::get);
    if t == 0 {
        t = NEXT.fetch_add(1, Ordering::Relaxed);
        TOKEN.with(|c| c.set(t));
    }
    ThreadToken(NonZeroU64::new(t).expect("tokens start at 1"))
}

#[cfg(loom)]
pub(crate) fn thread_token() -> ThreadToken {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    loom::thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ThreadToken(NonZeroU64::new(TOKEN.with(|t| *t)).expect("tokens start at 1"))
}

#[cfg(loom)]
mod loom_shim {
    /// loom's Mutex with parking_lot's infallible `lock`.
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Mutex<T> {
            Mutex(loom::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().expect("no poisoning in models")
        }
    }

    /// loom's Condvar with parking_lot's `wait(&mut guard)`.
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Condvar {
            Condvar(loom::sync::Condvar::new())
        }
        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            // SAFETY: the guard is moved out, handed to loom's wait, and the re-acquired
            // guard written back before anyone can observe the slot. A panic in between
            // aborts the model run, which never resumes this frame.
            unsafe {
                let owned = std::ptr::read(guard);
                let back = self.0.wait(owned).expect("no poisoning in models");
                std::ptr::write(guard, back);
            }
        }
    }
}
