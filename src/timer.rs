//! Timed publishing: `publish_after(topic, msg, delay)` publishes `msg` to `topic` once
//! `delay` milliseconds have passed, unless the timer is cancelled first.
//!
//! One timing wheel (`timer_wheel`) holds every pending timer of the process, and one
//! library thread (the timer thread, started by the first timer) fires them: it sleeps
//! until the wheel's next deadline (indefinitely while nothing is pending), takes the
//! due timers out under the wheel's lock, and publishes them with no lock held, in due
//! order (creation order among equal due ticks), as `sb_publish` does.
//!
//! Exactly one outcome per timer: the timer thread and `cancel` race on the handle's
//! state (pending -> fired or pending -> cancelled, one compare-and-swap each), so a
//! timer is published once or cancel returns true, never both or neither. Cancel also
//! takes the entry out of the wheel (O(1)), so cancelled timers do not hold memory until
//! their due time.
//!
//! Ticks are milliseconds on the monotonic clock. A timer is due at the first tick
//! boundary at or after creation + delay, so it never fires early; it fires late by
//! less than a tick plus the thread's wake-up (see README, "Timed publishing").
//!
//! Locks: `SERVICE` is a leaf: no user code (publish, message dtors) runs under it, so
//! callbacks and dtors may schedule and cancel timers.
//!
//! fork(): a child starts with no pending timers. Its parent's pending timers fire in the
//! parent only (once in the process tree, not once per child); the child releases its
//! copies at its first timer call, and cancelling one of them there returns false.

use crate::error::{Error, ErrorKind, Result};
use crate::message::MessageRef;
use crate::message_type::DEAD_MAGIC;
use crate::sync::std_sync::{Condvar, Mutex, MutexGuard};
use crate::timer_wheel::{Key, Wheel};
use crate::topic::Topic;
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub(crate) const TIMER_MAGIC: u32 = 0x5342_544d; // "SBTM"

/// Nanoseconds per wheel tick.
const TICK_NS: u64 = 1_000_000;
/// Timers the thread takes out of the wheel per lock hold: schedules and cancels wait
/// for at most one batch's worth of wheel work.
const FIRE_BATCH: usize = 256;
/// The longest the timer thread sleeps at once (a far-future timer's deadline may not
/// fit an `Instant`; waking once an hour costs nothing).
const MAX_SLEEP: Duration = Duration::from_secs(3600);

const PENDING: u8 = 0;
const FIRED: u8 = 1;
const CANCELLED: u8 = 2;

/// A timer handle (`sb_timer`).
pub struct Timer {
    magic: u32,
    state: AtomicU8,
    /// The fork generation it was created in: a child's wheel does not hold it.
    generation: u64,
    key: Key,
}

impl Timer {
    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == TIMER_MAGIC
    }

    /// Cancels the timer: true if it was pending (it will never be published), false if
    /// it was already fired or cancelled (or belongs to the parent of this forked
    /// process).
    pub fn cancel(&self) -> bool {
        reap_stale();
        if self.generation != crate::fork::generation() {
            return false;
        }
        if self
            .state
            .compare_exchange(PENDING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        CANCELLED_COUNT.fetch_add(1, Ordering::Relaxed);
        // The timer thread may have taken it out already (it then sees the state and
        // drops it); otherwise free its entry now. Its topic and message are released
        // after the lock (a message dtor is user code).
        let entry = SERVICE.lock().wheel.remove(self.key);
        drop(entry);
        true
    }

    /// Fired (its publish is made or under way).
    pub fn fired(&self) -> bool {
        self.state.load(Ordering::Acquire) == FIRED
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

/// What the wheel holds for a pending timer: what to publish, and when exactly.
struct Pending {
    timer: Arc<Timer>,
    topic: Arc<Topic>,
    msg: MessageRef,
    due_ns: u64,
}

struct Service {
    wheel: Wheel<Pending>,
    /// The timer thread of this process runs (or is being started).
    thread: bool,
    /// The tick the timer thread sleeps until (u64::MAX: nothing pending), or 0 while it
    /// is awake: a new timer due earlier must wake it.
    sleeping_until: u64,
    /// The wheels a forked child inherited, released at its next timer call.
    stale: Vec<Wheel<Pending>>,
}

static SERVICE: Mutex<Service> = Mutex::new(Service {
    wheel: Wheel::new(),
    thread: false,
    sleeping_until: 0,
    stale: Vec::new(),
});
/// The timer thread sleeps on it (std's: a forked child has no ghost waiters).
static WAKE: Condvar = Condvar::new();
/// A forked child has inherited wheels to release.
static STALE: AtomicBool = AtomicBool::new(false);

static SCHEDULED: AtomicU64 = AtomicU64::new(0);
static FIRED_COUNT: AtomicU64 = AtomicU64::new(0);
static CANCELLED_COUNT: AtomicU64 = AtomicU64::new(0);
static LATENESS_TOTAL_NS: AtomicU64 = AtomicU64::new(0);
static LATENESS_MAX_NS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static FORK_GUARD: RefCell<Option<MutexGuard<'static, Service>>> = const { RefCell::new(None) };
}

/// The clock's origin: the first timer call of the process.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds on the monotonic clock since `origin`.
fn now_ns() -> u64 {
    u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Schedules `msg` to be published to `topic` after `delay_ms` milliseconds. The timer
/// keeps its own references to both until it fires or is cancelled.
pub fn publish_after(topic: &Arc<Topic>, msg: &MessageRef, delay_ms: u64) -> Result<Arc<Timer>> {
    crate::fork::install();
    reap_stale();
    let due_ns = now_ns().saturating_add(delay_ms.saturating_mul(1_000_000));
    // The first tick boundary at or after the due time: never early.
    let due_tick = due_ns.div_ceil(TICK_NS);
    let generation = crate::fork::generation();
    let mut s = SERVICE.lock();
    let inserted = s.wheel.insert_with(due_tick, |key| Pending {
        timer: Arc::new(Timer {
            magic: TIMER_MAGIC,
            state: AtomicU8::new(PENDING),
            generation,
            key,
        }),
        topic: Arc::clone(topic),
        msg: MessageRef::clone(msg),
        due_ns,
    });
    let Some((key, pending)) = inserted else {
        return Err(Error::new(ErrorKind::NoMemory, "too many pending timers"));
    };
    let timer = Arc::clone(&pending.timer);
    // Counted under the lock: the timer cannot have fired yet.
    SCHEDULED.fetch_add(1, Ordering::Relaxed);
    let start = !s.thread;
    if start {
        s.thread = true;
    } else if due_tick < s.sleeping_until {
        WAKE.notify_one();
    }
    drop(s);
    if start && !spawn_thread() {
        // Without its thread the timer would never fire: refuse it. (Timers others
        // scheduled meanwhile stay pending; the next schedule tries to start the thread.)
        let entry = {
            let mut s = SERVICE.lock();
            s.thread = false;
            s.wheel.remove(key)
        };
        SCHEDULED.fetch_sub(1, Ordering::Relaxed);
        drop(entry);
        return Err(Error::new(
            ErrorKind::NoMemory,
            "could not start the timer thread",
        ));
    }
    Ok(timer)
}

/// Releases what a forked child inherited (outside the lock: message dtors run).
fn reap_stale() {
    if STALE.load(Ordering::Acquire) {
        let stale = {
            let mut s = SERVICE.lock();
            STALE.store(false, Ordering::Release);
            std::mem::take(&mut s.stale)
        };
        drop(stale);
    }
}

fn spawn_thread() -> bool {
    std::thread::Builder::new()
        .name("sb-timer".into())
        .spawn(timer_thread)
        .is_ok()
}

/// The timer thread: sleep until the next deadline, take what is due, publish it.
fn timer_thread() {
    loop {
        let due = take_due();
        for p in due {
            // A panic inside a publish loses that publish, not the timer thread.
            let _ = catch_unwind(AssertUnwindSafe(|| fire(p)));
        }
    }
}

/// Waits until timers are due and takes up to a batch of them out of the wheel.
fn take_due() -> Vec<Pending> {
    let mut due = Vec::new();
    let mut s = SERVICE.lock();
    s.sleeping_until = 0;
    loop {
        let now = now_ns() / TICK_NS;
        s.wheel.advance(now, &mut due, FIRE_BATCH);
        if !due.is_empty() {
            return due;
        }
        let wait = match s.wheel.next_deadline() {
            None => {
                s.sleeping_until = u64::MAX;
                MAX_SLEEP
            }
            Some(deadline) => {
                s.sleeping_until = deadline;
                let at = deadline.saturating_mul(TICK_NS);
                Duration::from_nanos(at.saturating_sub(now_ns())).min(MAX_SLEEP)
            }
        };
        WAKE.wait_for(&mut s, wait);
        s.sleeping_until = 0;
    }
}

/// Publishes a due timer unless it was cancelled; releases its references (no lock held).
fn fire(p: Pending) {
    if p.timer
        .state
        .compare_exchange(PENDING, FIRED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let late = now_ns().saturating_sub(p.due_ns);
    LATENESS_TOTAL_NS.fetch_add(late, Ordering::Relaxed);
    LATENESS_MAX_NS.fetch_max(late, Ordering::Relaxed);
    FIRED_COUNT.fetch_add(1, Ordering::Relaxed);
    p.topic.publish(&p.msg);
}

/// The timer figures for the statistics listings.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimerStats {
    /// Timers neither fired nor cancelled yet.
    pub pending: u64,
    pub scheduled: u64,
    pub fired: u64,
    pub cancelled: u64,
    /// Fired timers' lateness past their due time: the total (for a mean) and the most.
    pub lateness_total_ns: u64,
    pub lateness_max_ns: u64,
}

pub fn stats() -> TimerStats {
    reap_stale();
    let pending = SERVICE.lock().wheel.len() as u64;
    TimerStats {
        pending,
        scheduled: SCHEDULED.load(Ordering::Relaxed),
        fired: FIRED_COUNT.load(Ordering::Relaxed),
        cancelled: CANCELLED_COUNT.load(Ordering::Relaxed),
        lateness_total_ns: LATENESS_TOTAL_NS.load(Ordering::Relaxed),
        lateness_max_ns: LATENESS_MAX_NS.load(Ordering::Relaxed),
    }
}

/// Before a fork: no wheel operation may be in progress.
pub(crate) fn fork_lock() {
    let guard = SERVICE.lock();
    FORK_GUARD.with(|g| *g.borrow_mut() = Some(guard));
}

/// After a fork, in the parent.
pub(crate) fn fork_unlock() {
    FORK_GUARD.with(|g| drop(g.borrow_mut().take()));
}

/// After a fork, in the child: the timer thread did not survive, and the parent's
/// pending timers are the parent's to fire. They are set aside (no user code may run
/// here) and released at the child's next timer call.
pub(crate) fn fork_reset_and_unlock() {
    FORK_GUARD.with(|g| {
        if let Some(s) = g.borrow_mut().as_mut() {
            s.thread = false;
            s.sleeping_until = 0;
            if s.wheel.len() > 0 {
                let inherited = std::mem::take(&mut s.wheel);
                s.stale.push(inherited);
                STALE.store(true, Ordering::Release);
            }
        }
    });
    fork_unlock();
}
