//! The shared worker pool that runs pool subscriptions.
//!
//! Scheduling unit: a subscription, not a message. A subscription enters the run queue
//! when its mailbox goes idle -> scheduled, and a worker then delivers whole batches, so
//! a burst of messages costs one queue push and at most one wake-up. Workers spin briefly
//! before they sleep and publishers wake one only when one sleeps, so a busy pool makes no
//! futex calls. A worker that takes a subscription and sees more queued wakes or starts
//! the next worker, so a burst reaches `max_threads` workers even when it finds the pool
//! asleep. A worker that blocks in a join or a synchronous wait does not count
//! against `max_threads`, so a pool callback that joins another pool subscription cannot
//! starve it; once it returns, the surplus worker retires at its next turn boundary.

use crate::error::{Error, Result};
use crate::subscription::{releasing, Subscription, Turn};
use crate::sync::std_sync::{Condvar, Mutex, MutexGuard};
use crossbeam_queue::SegQueue;
use std::cell::Cell;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::Duration;

/// Batches a worker delivers for one subscription before it lets others run.
const BATCHES_PER_TURN: usize = 4;
/// Polls of the run queue before a worker goes to sleep: busy polls (a few
/// microseconds), then a few `sched_yield`s (each gives the core away, so only a few).
/// Short, because a spinning worker holds a core the threads that will give it work may
/// need: with 1,000 polls W9 (a publisher and a churning subscriber on two cores) ran at
/// two thirds of its rate with 200, and the fan-out workloads gained nothing from them.
const SPINS_BEFORE_SLEEP: u32 = 200;
const YIELDS_BEFORE_SLEEP: u32 = 16;

struct Config {
    min: usize,
    max: usize,
    idle_timeout: Duration,
    /// Worker threads alive.
    threads: usize,
    /// Workers blocked in a join or synchronous wait.
    blocked: usize,
}

impl Config {
    /// Workers beyond `max` are stand-ins for blocked ones; their number is bounded, so
    /// that a stalled consumer (say, a full `SB_OVERFLOW_BLOCK` queue every pool
    /// callback pushes to) cannot turn each callback into a thread of its own (1,500
    /// blocked callbacks made 1,413 threads before the bound). Past it, blocked
    /// callbacks keep their workers and queued work waits for one to return.
    fn stand_in_limit(&self) -> usize {
        (8 * self.max).max(64)
    }
    /// A worker may be started: fewer than `max` run callbacks, and the stand-ins are
    /// within their bound.
    fn may_start_worker(&self) -> bool {
        self.threads - self.blocked < self.max && self.threads < self.max + self.stand_in_limit()
    }
}

pub(crate) struct Pool {
    queue: SegQueue<Arc<Subscription>>,
    sleeping: AtomicUsize,
    /// threads - blocked, readable without the lock.
    active: AtomicUsize,
    /// Mirror of `Config::max`, readable without the lock.
    max: AtomicUsize,
    /// Workers whose thread has started running its loop (a worker counts in
    /// `Config::threads` from its spawn, before its thread runs).
    started: AtomicUsize,
    config: Mutex<Config>,
    wake: Condvar,
}

thread_local! {
    static IS_WORKER: Cell<bool> = const { Cell::new(false) };
}

fn default_max() -> usize {
    thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2)
}

static POOL: LazyLock<Pool> = LazyLock::new(|| {
    crate::fork::install();
    Pool {
        queue: SegQueue::new(),
        sleeping: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        max: AtomicUsize::new(default_max()),
        started: AtomicUsize::new(0),
        config: Mutex::new(Config {
            min: 1,
            max: default_max(),
            idle_timeout: Duration::from_secs(20),
            threads: 0,
            blocked: 0,
        }),
        wake: Condvar::new(),
    }
});

pub(crate) fn global() -> &'static Pool {
    &POOL
}

/// Sets the pool's limits; takes effect at once (extra workers retire when idle).
pub fn configure(min_threads: usize, max_threads: usize, idle_timeout: Duration) -> Result<()> {
    if max_threads == 0 || min_threads > max_threads {
        return Err(Error::invalid(format!(
            "pool limits need 1 <= max_threads and min_threads <= max_threads (got {min_threads}, {max_threads})"
        )));
    }
    let pool = global();
    let mut cfg = pool.config.lock();
    cfg.min = min_threads;
    cfg.max = max_threads;
    pool.max.store(max_threads, Ordering::SeqCst);
    cfg.idle_timeout = idle_timeout;
    drop(cfg);
    pool.wake.notify_all();
    // A raised maximum: work already queued gets the workers it may now have (each
    // worker that takes some passes the wake-up on).
    if !pool.queue.is_empty() {
        pool.wake_or_spawn();
    }
    Ok(())
}

/// Worker threads alive now.
pub fn thread_count() -> usize {
    global().config.lock().threads
}

/// Worker threads that have started running (at most `thread_count`; a freshly spawned
/// worker counts there before its thread runs). Lets leak checkers wait for quiescence.
pub fn started_thread_count() -> usize {
    global().started.load(Ordering::SeqCst)
}

/// The shared pool's figures (`sb_stats_json`, `sb_stats_prometheus`).
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolStats {
    pub min_threads: usize,
    pub max_threads: usize,
    /// Worker threads alive, blocked ones included.
    pub threads: usize,
    /// Workers blocked in a library wait (a join, `sb_publish_sync`, a full queue).
    pub blocked: usize,
    /// Workers asleep, waiting for work.
    pub sleeping: usize,
    /// Subscriptions waiting in the run queue for a worker.
    pub queued: usize,
}

/// The shared pool's figures now (without starting it).
pub fn stats() -> PoolStats {
    let pool = global();
    let cfg = pool.config.lock();
    PoolStats {
        min_threads: cfg.min,
        max_threads: cfg.max,
        threads: cfg.threads,
        blocked: cfg.blocked,
        sleeping: pool.sleeping.load(Ordering::Relaxed),
        queued: pool.queue.len(),
    }
}

/// Subscriptions wait in the run queue for a worker.
pub(crate) fn has_queued_work() -> bool {
    !global().queue.is_empty()
}

/// Runs `f`, a blocking wait; on a pool worker, lets the pool replace this worker meanwhile.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    if !IS_WORKER.with(Cell::get) {
        return f();
    }
    let pool = global();
    let spawned = {
        let mut cfg = pool.config.lock();
        cfg.blocked += 1;
        pool.active.fetch_sub(1, Ordering::SeqCst);
        (!pool.queue.is_empty()
            && pool.sleeping.load(Ordering::SeqCst) == 0
            && cfg.may_start_worker())
        .then(|| pool.spawn_locked(&mut cfg))
    };
    warn_if_not_spawned(spawned);
    let r = f();
    let mut cfg = pool.config.lock();
    cfg.blocked -= 1;
    pool.active.fetch_add(1, Ordering::SeqCst);
    r
}

/// Logs a failed worker start (never with the pool lock held); None: no start was tried.
///
/// Once per streak of failures: when the system refuses threads (RLIMIT_NPROC, memory),
/// every schedule retries the start, and a warning per attempt would flood the host's log
/// (20,000 lines in a tenth of a second were measured). The next successful start ends
/// the streak, and the next failure is reported again.
fn warn_if_not_spawned(spawned: Option<std::io::Result<()>>) {
    static FAILING: AtomicBool = AtomicBool::new(false);
    match spawned {
        None => {}
        Some(Ok(())) => FAILING.store(false, Ordering::Relaxed),
        Some(Err(e)) if !FAILING.swap(true, Ordering::Relaxed) => {
            crate::log::warn(&format!(
                "cannot start a pool worker: {e} (retried as work arrives; not \
                 reported again until a start succeeds)"
            ));
        }
        Some(Err(_)) => {}
    }
}

impl Pool {
    pub(crate) fn schedule(&'static self, sub: Arc<Subscription>) {
        self.queue.push(sub);
        // Pairs with the fence in `worker`: either we see its sleeping count, or it sees
        // our push before it sleeps.
        fence(Ordering::SeqCst);
        self.wake_or_spawn();
    }

    /// Work is queued: wake a sleeping worker, or start one if the pool is below its
    /// maximum and nobody sleeps.
    ///
    /// `schedule` alone cannot grow the pool in every case: the sleeping count drops only
    /// when a woken worker runs, so a burst of subscriptions scheduled while one worker
    /// sleeps wakes that one and starts nobody. Hence a worker that takes a subscription
    /// and sees more queued calls this too (each taker passes the wake-up on), so a burst
    /// gets up to `max_threads` workers even when its callbacks block for long.
    fn wake_or_spawn(&'static self) {
        if self.sleeping.load(Ordering::SeqCst) > 0 {
            let _cfg = self.config.lock();
            self.wake.notify_one();
        } else if self.active.load(Ordering::SeqCst) < self.max.load(Ordering::Relaxed) {
            let mut cfg = self.config.lock();
            let spawned = cfg.may_start_worker().then(|| self.spawn_locked(&mut cfg));
            drop(cfg);
            warn_if_not_spawned(spawned);
        }
    }

    /// Starts a worker. The caller logs a failure after releasing the lock: the log
    /// handler is the host's code, which may publish (and so schedule, which takes this
    /// lock) or take locks of its own. A failed start is retried by the next
    /// `wake_or_spawn` (the next subscription made runnable, or the next worker to block).
    fn spawn_locked(&'static self, cfg: &mut Config) -> std::io::Result<()> {
        thread::Builder::new()
            .name("sb-pool".into())
            .spawn(move || self.worker())?;
        cfg.threads += 1;
        self.active.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Under the lock, a worker about to retire: leaves the counts, then looks at the
    /// queue once more. A publisher that pushed meanwhile may have read `active` before
    /// the decrement and left the work to us (`wake_or_spawn` starts nobody when the pool
    /// looks full); the fence pairs with the one in `schedule`, so either we see its push
    /// here and stay, or it sees the lower count and starts a worker (it takes the lock,
    /// so after we are gone). Returns whether the worker may exit.
    fn leave_unless_work(&self, cfg: &mut Config) -> bool {
        cfg.threads -= 1;
        self.active.fetch_sub(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.queue.is_empty() {
            self.started.fetch_sub(1, Ordering::SeqCst);
            return true;
        }
        cfg.threads += 1;
        self.active.fetch_add(1, Ordering::SeqCst);
        false
    }

    fn worker(&'static self) {
        IS_WORKER.with(|w| w.set(true));
        self.started.fetch_add(1, Ordering::SeqCst);
        let me = crate::sync::thread_token();
        loop {
            // Workers started to stand in for blocked ones are surplus once those return
            // (or after the maximum was lowered): retire between turns, not after an idle
            // timeout, so at most `max` workers run callbacks.
            if self.active.load(Ordering::SeqCst) > self.max.load(Ordering::Relaxed) {
                let mut cfg = self.config.lock();
                if cfg.threads - cfg.blocked > cfg.max {
                    cfg.threads -= 1;
                    self.active.fetch_sub(1, Ordering::SeqCst);
                    self.started.fetch_sub(1, Ordering::SeqCst);
                    // This worker may have just put a subscription back on the queue (its
                    // turn ended with work left): make sure a sleeping one takes it.
                    if !self.queue.is_empty() {
                        self.wake.notify_one();
                    }
                    return;
                }
            }
            if let Some(sub) = self.queue.pop() {
                if !self.queue.is_empty() {
                    self.wake_or_spawn();
                }
                match sub.run_pool_turn(me, BATCHES_PER_TURN) {
                    Turn::More => self.queue.push(sub),
                    Turn::Idle => {}
                    Turn::Final => {
                        drop(sub);
                        releasing::leave();
                    }
                }
                continue;
            }
            let mut spins = 0;
            while self.queue.is_empty() && spins < SPINS_BEFORE_SLEEP + YIELDS_BEFORE_SLEEP {
                if spins < SPINS_BEFORE_SLEEP {
                    std::hint::spin_loop();
                } else {
                    thread::yield_now();
                }
                spins += 1;
            }
            if !self.queue.is_empty() {
                continue;
            }
            let mut cfg = self.config.lock();
            self.sleeping.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let mut timed_out = false;
            if self.queue.is_empty() {
                let timeout = cfg.idle_timeout;
                timed_out = self.wake.wait_for(&mut cfg, timeout);
            }
            self.sleeping.fetch_sub(1, Ordering::SeqCst);
            let surplus = cfg.threads - cfg.blocked > cfg.max;
            if ((timed_out && cfg.threads > cfg.min) || surplus) && self.leave_unless_work(&mut cfg)
            {
                return;
            }
        }
    }
}

thread_local! {
    /// The pool lock held across fork() by the forking thread (see `fork`).
    static FORK_GUARD: std::cell::RefCell<Option<MutexGuard<'static, Config>>> =
        const { std::cell::RefCell::new(None) };
}

/// Takes the pool lock for fork() (see `fork`).
pub(crate) fn fork_lock() {
    let guard = global().config.lock();
    FORK_GUARD.with(|g| *g.borrow_mut() = Some(guard));
}

/// Releases the lock `fork_lock` took (in the parent, or in a child: the forking thread
/// is the child's thread, with its thread-locals).
pub(crate) fn fork_unlock() {
    FORK_GUARD.with(|g| drop(g.borrow_mut().take()));
}

/// In a forked child: no worker survived, so forget them all, then release the lock.
pub(crate) fn fork_reset_and_unlock() {
    let pool = global();
    FORK_GUARD.with(|g| {
        if let Some(cfg) = g.borrow_mut().as_mut() {
            cfg.threads = 0;
            cfg.blocked = 0;
        }
    });
    pool.active.store(0, Ordering::SeqCst);
    pool.sleeping.store(0, Ordering::SeqCst);
    pool.started.store(0, Ordering::SeqCst);
    fork_unlock();
}
