//! A worker pool: the threads of one worker group (`worker_group`), which run pool
//! subscriptions and submitted tasks.
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
//!
//! Each group has a pool of its own (its own queue, lock and threads), so a group whose
//! callbacks are slow holds only its own workers. A pool is closed when its group ends
//! (nothing uses the group any more): its workers then exit as soon as its queue is
//! empty, which it is by then (queued work keeps the group alive).

use crate::error::{Error, Result};
use crate::subscription::{releasing, Subscription, Turn};
use crate::sync::std_sync::{Condvar, Mutex, MutexGuard};
use crossbeam_queue::SegQueue;
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
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

/// A pool's limits, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) idle_timeout: Duration,
}

impl Limits {
    /// Checked limits: 1 <= max and min <= max.
    pub(crate) fn new(min: usize, max: usize, idle_timeout: Duration) -> Result<Limits> {
        if max == 0 || min > max {
            return Err(Error::invalid(format!(
                "pool limits need 1 <= max_threads and min_threads <= max_threads (got {min}, {max})"
            )));
        }
        Ok(Limits {
            min,
            max,
            idle_timeout,
        })
    }

    /// The shared pool's defaults: min 1, max = CPUs (at least 2), 20 s.
    pub(crate) fn default_shared() -> Limits {
        let max = thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2);
        Limits {
            min: 1,
            max,
            idle_timeout: Duration::from_secs(20),
        }
    }
}

struct Config {
    limits: Limits,
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
        (8 * self.limits.max).max(64)
    }
    /// A worker may be started: fewer than `max` run callbacks, and the stand-ins are
    /// within their bound.
    fn may_start_worker(&self) -> bool {
        self.threads - self.blocked < self.limits.max
            && self.threads < self.limits.max + self.stand_in_limit()
    }
    /// More workers run callbacks than the maximum allows (stand-ins whose blocked
    /// worker returned, or a lowered maximum).
    fn surplus(&self) -> bool {
        self.threads - self.blocked > self.limits.max
    }
}

/// What a worker takes from the run queue.
pub(crate) enum Work {
    /// A subscription with messages to deliver.
    Subscription(Arc<Subscription>),
    /// A submitted task (`sb_pool_submit`); run once.
    Task(Box<dyn FnOnce() + Send>),
}

pub(crate) struct Pool {
    /// For thread names and log lines.
    name: String,
    queue: SegQueue<Work>,
    sleeping: AtomicUsize,
    /// threads - blocked, readable without the lock.
    active: AtomicUsize,
    /// Mirror of `Limits::max`, readable without the lock.
    max: AtomicUsize,
    /// Workers whose thread has started running its loop (a worker counts in
    /// `Config::threads` from its spawn, before its thread runs).
    started: AtomicUsize,
    /// Its group ended: workers exit once the queue is empty.
    closed: AtomicBool,
    config: Mutex<Config>,
    wake: Condvar,
}

thread_local! {
    /// The pool this thread is a worker of.
    static WORKER_OF: RefCell<Option<Arc<Pool>>> = const { RefCell::new(None) };
}

fn current_pool() -> Option<Arc<Pool>> {
    WORKER_OF.try_with(|w| w.borrow().clone()).ok().flatten()
}

/// The figures of one pool (`sb_stats_json`, `sb_stats_prometheus`).
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
    /// Subscriptions and tasks waiting in the run queue for a worker.
    pub queued: usize,
}

/// Sets the shared pool's limits (`sb_pool_configure`); takes effect at once.
pub fn configure(min_threads: usize, max_threads: usize, idle_timeout: Duration) -> Result<()> {
    crate::worker_group::shared().pool().configure(Limits::new(
        min_threads,
        max_threads,
        idle_timeout,
    )?);
    Ok(())
}

/// Worker threads of the shared pool alive now.
pub fn thread_count() -> usize {
    crate::worker_group::shared().pool().config.lock().threads
}

/// Worker threads of the shared pool that have started running (at most
/// `thread_count`; a freshly spawned worker counts there before its thread runs). Lets
/// leak checkers wait for quiescence.
pub fn started_thread_count() -> usize {
    crate::worker_group::shared()
        .pool()
        .started
        .load(Ordering::SeqCst)
}

/// The shared pool's figures now (without starting it).
pub fn stats() -> PoolStats {
    crate::worker_group::shared().pool().stats()
}

/// On a pool worker: its pool has subscriptions or tasks waiting for a worker.
pub(crate) fn has_queued_work() -> bool {
    WORKER_OF
        .try_with(|w| w.borrow().as_ref().is_some_and(|p| !p.queue.is_empty()))
        .unwrap_or(false)
}

/// Runs `f`, a blocking wait; on a pool worker, lets its pool replace this worker
/// meanwhile.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let Some(pool) = current_pool() else {
        return f();
    };
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
/// the streak, and the next failure is reported again. One streak for all groups: the
/// system refuses threads to all of them alike.
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
    /// A pool with no thread yet (workers start as work arrives).
    pub(crate) fn new(name: &str, limits: Limits) -> Arc<Pool> {
        Arc::new(Pool {
            name: name.to_owned(),
            queue: SegQueue::new(),
            sleeping: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max: AtomicUsize::new(limits.max),
            started: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            config: Mutex::new(Config {
                limits,
                threads: 0,
                blocked: 0,
            }),
            wake: Condvar::new(),
        })
    }

    /// "sb-pool" for the shared pool (what tools that count its threads look for),
    /// "sb-grp-<name>" for the others (the system keeps the first 15 bytes).
    fn thread_name(&self) -> String {
        if self.name == crate::worker_group::SHARED_NAME {
            "sb-pool".into()
        } else {
            format!("sb-grp-{}", self.name)
        }
    }

    pub(crate) fn limits(&self) -> Limits {
        self.config.lock().limits
    }

    /// New limits; take effect at once (extra workers retire when idle).
    pub(crate) fn configure(self: &Arc<Self>, limits: Limits) {
        let mut cfg = self.config.lock();
        cfg.limits = limits;
        self.max.store(limits.max, Ordering::SeqCst);
        drop(cfg);
        self.wake.notify_all();
        // A raised maximum: work already queued gets the workers it may now have (each
        // worker that takes some passes the wake-up on).
        if !self.queue.is_empty() {
            self.wake_or_spawn();
        }
    }

    /// This pool's figures now.
    pub(crate) fn stats(&self) -> PoolStats {
        let cfg = self.config.lock();
        PoolStats {
            min_threads: cfg.limits.min,
            max_threads: cfg.limits.max,
            threads: cfg.threads,
            blocked: cfg.blocked,
            sleeping: self.sleeping.load(Ordering::Relaxed),
            queued: self.queue.len(),
        }
    }

    /// Worker threads that have started and not yet exited.
    pub(crate) fn started_threads(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub(crate) fn schedule(self: &Arc<Self>, sub: Arc<Subscription>) {
        self.push(Work::Subscription(sub));
    }

    /// Queues a task for a worker of this pool.
    pub(crate) fn submit(self: &Arc<Self>, task: Box<dyn FnOnce() + Send>) {
        self.push(Work::Task(task));
    }

    fn push(self: &Arc<Self>, work: Work) {
        self.queue.push(work);
        // Pairs with the fence in `worker`: either we see its sleeping count, or it sees
        // our push before it sleeps.
        fence(Ordering::SeqCst);
        self.wake_or_spawn();
    }

    /// Its group ended: every worker exits once the queue is empty (at once, since
    /// queued work keeps the group alive). Under the lock, so that a worker about to
    /// sleep sees the flag or gets the wake-up.
    pub(crate) fn close(&self) {
        let cfg = self.config.lock();
        self.closed.store(true, Ordering::SeqCst);
        drop(cfg);
        self.wake.notify_all();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Work is queued: wake a sleeping worker, or start one if the pool is below its
    /// maximum and nobody sleeps.
    ///
    /// `schedule` alone cannot grow the pool in every case: the sleeping count drops only
    /// when a woken worker runs, so a burst of subscriptions scheduled while one worker
    /// sleeps wakes that one and starts nobody. Hence a worker that takes a subscription
    /// and sees more queued calls this too (each taker passes the wake-up on), so a burst
    /// gets up to `max_threads` workers even when its callbacks block for long.
    fn wake_or_spawn(self: &Arc<Self>) {
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
    fn spawn_locked(self: &Arc<Self>, cfg: &mut Config) -> std::io::Result<()> {
        let pool = Arc::clone(self);
        thread::Builder::new()
            .name(self.thread_name())
            .spawn(move || pool.worker())?;
        cfg.threads += 1;
        self.active.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Under the lock, a worker about to retire: leaves the counts, then looks at the
    /// queue once more. A publisher that pushed meanwhile may have read `active` before
    /// the decrement and left the work to us (`wake_or_spawn` starts nobody when the pool
    /// looks full); the fence pairs with the one in `push`, so either we see its push
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

    fn worker(self: Arc<Self>) {
        let _ = WORKER_OF.try_with(|w| *w.borrow_mut() = Some(Arc::clone(&self)));
        self.started.fetch_add(1, Ordering::SeqCst);
        self.work_until_retired();
        // The pool may end here (its group gone and this the last worker).
        let _ = WORKER_OF.try_with(|w| w.borrow_mut().take());
    }

    fn work_until_retired(self: &Arc<Self>) {
        let me = crate::sync::thread_token();
        loop {
            // Workers started to stand in for blocked ones are surplus once those return
            // (or after the maximum was lowered): retire between turns, not after an idle
            // timeout, so at most `max` workers run callbacks.
            if self.active.load(Ordering::SeqCst) > self.max.load(Ordering::Relaxed) {
                let mut cfg = self.config.lock();
                if cfg.surplus() {
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
            if let Some(work) = self.queue.pop() {
                if !self.queue.is_empty() {
                    self.wake_or_spawn();
                }
                self.run(work, me);
                continue;
            }
            if self.closed.load(Ordering::SeqCst) {
                let mut cfg = self.config.lock();
                if self.leave_unless_work(&mut cfg) {
                    return;
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
            if self.queue.is_empty() && !self.closed.load(Ordering::SeqCst) {
                let timeout = cfg.limits.idle_timeout;
                timed_out = self.wake.wait_for(&mut cfg, timeout);
            }
            self.sleeping.fetch_sub(1, Ordering::SeqCst);
            let closed = self.closed.load(Ordering::SeqCst);
            let idle_surplus = timed_out && cfg.threads > cfg.limits.min;
            if (idle_surplus || cfg.surplus() || closed) && self.leave_unless_work(&mut cfg) {
                return;
            }
        }
    }

    fn run(&self, work: Work, me: crate::sync::ThreadToken) {
        match work {
            Work::Subscription(sub) => match sub.run_pool_turn(me, BATCHES_PER_TURN) {
                Turn::More => self.queue.push(Work::Subscription(sub)),
                // Either way the turn entered the releasing window (see `Turn`): leave
                // it once the reference is gone.
                Turn::Idle | Turn::Final => {
                    let key = sub.releasing_key();
                    drop(sub);
                    releasing::leave(key);
                }
            },
            Work::Task(task) => {
                // A task is a C function (which cannot unwind) or a library closure; a
                // panic in the latter must not take the worker down.
                if catch_unwind(AssertUnwindSafe(task)).is_err() {
                    crate::log::log(
                        crate::log::Level::Error,
                        &format!("pool '{}': a task panicked", self.name),
                    );
                }
            }
        }
    }
}

/// A pool's lock held across fork() by the forking thread, with the pool it belongs to.
pub(crate) struct ForkHold {
    // Declared first, so dropped before the pool it borrows from.
    guard: MutexGuard<'static, Config>,
    pool: Arc<Pool>,
}

impl ForkHold {
    /// Takes `pool`'s lock for fork() (see `fork`).
    pub(crate) fn lock(pool: Arc<Pool>) -> ForkHold {
        let guard = pool.config.lock();
        // SAFETY: the guard borrows from the pool's allocation, which `pool` (stored in
        // the same struct, and dropped after the guard: field order) keeps alive and
        // never moves; the 'static lifetime is never observed beyond this struct.
        let guard = unsafe {
            std::mem::transmute::<MutexGuard<'_, Config>, MutexGuard<'static, Config>>(guard)
        };
        ForkHold { guard, pool }
    }

    /// In a forked child: no worker survived, so forget them all (the lock is released
    /// when the hold is dropped).
    pub(crate) fn reset_in_child(&mut self) {
        self.guard.threads = 0;
        self.guard.blocked = 0;
        self.pool.active.store(0, Ordering::SeqCst);
        self.pool.sleeping.store(0, Ordering::SeqCst);
        self.pool.started.store(0, Ordering::SeqCst);
    }
}
