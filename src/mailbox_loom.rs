//! Loom model checks of the mailbox protocol (the concurrency core of the bus).
//!
//! Run them (release mode; well under two minutes for all of them):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test --release --lib loom -- --nocapture
//! ```
//!
//! Under `--cfg loom`, `crate::sync` hands the mailbox loom's mutex, condvar and atomic,
//! so every interleaving of the threads below (up to the preemption bound each model
//! sets) is run against the real [`Mailbox`] code. The threads around the mailbox
//! replicate its callers (`Subscription::offer`, `run_pool_turn`, the dedicated thread,
//! `run_until_idle`, `Topic::deliver_local` / `remove_subscriber`, `join`) with test
//! bookkeeping in place of callbacks. A failed assertion or a deadlock (all threads
//! blocked) fails the test and loom prints the schedule that led to it (`LOOM_LOG=1`
//! and `LOOM_LOCATION=1` give more detail).
//!
//! What each model proves:
//!
//! 1. `loom_pool_scheduling` — the pool state machine (idle -> scheduled -> running,
//!    reschedule after a worker's quota of batches). Two producers push, two workers
//!    serve a pool queue that the `Action::Schedule` pusher feeds. Every item is
//!    delivered exactly once and in each producer's order; at most one worker runs the
//!    mailbox at a time; the mailbox is never in the pool queue twice, and is `Scheduled`
//!    whenever a worker pops it; no wake-up is lost: once producers and workers are
//!    done, nothing is queued and the state is `Idle`.
//! 2. `loom_final_dedicated` / `loom_final_pool` — the final (unsubscribe) item and
//!    `join`. A producer races the final push; a dedicated-style runner
//!    (`park_until_queued` + `take_batch`) or a pool worker delivers; the main thread
//!    joins with `wait_until(done)`. The final item is delivered exactly once and last;
//!    every push that returned `Queued` is delivered before it, every push that
//!    returned `Closed` never is, and pushes after the final one are `Closed`; the join
//!    returns only after the runner handled the final item; no deadlock.
//! 3. `loom_unsubscribe_vs_publish` — the topic's subscriber-list swap (a loom mutex
//!    around an `Arc<Vec<..>>` snapshot stands in for the `ArcSwap`). A publisher
//!    publishes from whatever snapshot it loaded while an unsubscriber swaps the
//!    mailbox out and pushes its final item. Nothing is delivered after the final item,
//!    everything published before the unsubscriber started is delivered before it, and
//!    a subscriber that stays in the list gets every message, in order.
//! 4. `loom_synchronous_handoff` — the synchronous kind. Two publishers push with
//!    their thread token and follow the action (`RunHere`: run here; `WaitTurn`: wait
//!    for the hand-off, then run). Every item is delivered on its publisher's thread,
//!    callbacks never overlap, each publish returns only after its own item was
//!    delivered, both publishers return, and the mailbox ends empty and `Idle`.

use super::{Action, Item, Kind, Mailbox, Push, RunState};
use crate::message::Message;
use crate::message_type::MessageType;
use crate::sync::{thread_token, ThreadToken};
use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::LazyLock;

/// The one message type of all models (created once, outside any model run).
static TY: LazyLock<std::sync::Arc<MessageType>> =
    LazyLock::new(|| MessageType::create("loom", None).expect("type 'loom' is not declined"));

fn item(n: usize, last: bool, from: Option<ThreadToken>) -> Item {
    Item {
        msg: Message::with_value(&TY, n),
        last,
        from,
    }
}

fn value(item: &Item) -> usize {
    *item
        .msg
        .value::<usize>()
        .expect("models only send usize payloads")
}

/// Runs `model` under loom with `preemption_bound` (unless `LOOM_MAX_PREEMPTIONS` is
/// set) and prints how many interleavings were explored.
fn check(name: &str, preemption_bound: usize, model: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(preemption_bound);
    }
    let runs = std::sync::Arc::new(StdAtomicUsize::new(0));
    let counter = runs.clone();
    let start = std::time::Instant::now();
    b.check(move || {
        counter.fetch_add(1, Relaxed);
        model();
    });
    println!(
        "{name}: {} interleavings (preemption bound {:?}) in {:.1?}",
        runs.load(Relaxed),
        b.preemption_bound,
        start.elapsed()
    );
}

/// Test bookkeeping. A std mutex on purpose: loom neither sees nor interleaves it
/// (loom runs one model thread at a time and no loom operation happens while it is
/// held), so it records without growing the state space. The protocol itself is only
/// ever synchronized by the mailbox's (loom) primitives.
struct Log<T>(std::sync::Mutex<Vec<T>>);

impl<T: Clone> Log<T> {
    fn new() -> Log<T> {
        Log(std::sync::Mutex::new(Vec::new()))
    }
    fn push(&self, v: T) {
        self.0.lock().unwrap().push(v);
    }
    fn get(&self) -> Vec<T> {
        self.0.lock().unwrap().clone()
    }
}

/// Values of `log` in `range`, in log order.
fn in_range(log: &[usize], range: std::ops::Range<usize>) -> Vec<usize> {
    log.iter().copied().filter(|v| range.contains(v)).collect()
}

/// Delivers one batch the way `Subscription::deliver` does, with `runners` counting the
/// threads inside a callback (must never exceed one). Returns (n, last).
fn deliver(
    batch: &mut VecDeque<Item>,
    runners: &AtomicUsize,
    log: &Log<usize>,
    final_handled: Option<&AtomicBool>,
) -> (usize, bool) {
    let n = batch.len();
    let mut last = false;
    assert_eq!(
        runners.fetch_add(1, SeqCst),
        0,
        "two threads deliver the same mailbox at once"
    );
    for it in batch.drain(..) {
        assert!(!last, "an item follows the final item in its batch");
        log.push(value(&it));
        if it.last {
            last = true;
            if let Some(f) = final_handled {
                f.store(true, Relaxed); // ordered by the mailbox mutex (finish_batch)
            }
        }
    }
    runners.fetch_sub(1, SeqCst);
    (n, last)
}

// ---------------------------------------------------------------------------------------
// A stand-in for the worker pool: a run queue of this one mailbox, as a count.

struct PoolQueue {
    /// How many times the mailbox sits in the run queue (0 or 1).
    queued: usize,
    /// Threads that may still schedule it (producers that have not finished).
    feeders: usize,
}

struct Pool {
    q: Mutex<PoolQueue>,
    cv: Condvar,
}

impl Pool {
    fn new(feeders: usize) -> Pool {
        Pool {
            q: Mutex::new(PoolQueue { queued: 0, feeders }),
            cv: Condvar::new(),
        }
    }

    /// `Pool::schedule`.
    fn schedule(&self) {
        let mut q = self.q.lock().unwrap();
        assert_eq!(q.queued, 0, "the mailbox was put on the run queue twice");
        q.queued = 1;
        drop(q);
        self.cv.notify_one();
    }

    fn feeder_done(&self) {
        self.q.lock().unwrap().feeders -= 1;
        self.cv.notify_all();
    }

    /// Pops the mailbox, waiting while somebody may still schedule it. None: nothing
    /// queued and nobody left to queue it.
    fn pop(&self) -> Option<()> {
        let mut q = self.q.lock().unwrap();
        while q.queued == 0 && q.feeders > 0 {
            q = self.cv.wait(q).unwrap();
        }
        if q.queued == 0 {
            return None;
        }
        q.queued = 0;
        Some(())
    }

    /// Pops the mailbox, waiting for as long as it takes.
    fn pop_blocking(&self) {
        let mut q = self.q.lock().unwrap();
        while q.queued == 0 {
            q = self.cv.wait(q).unwrap();
        }
        q.queued = 0;
    }
}

/// `Subscription::run_pool_turn`. Returns (reschedule, delivered the final item).
fn run_pool_turn(
    mb: &Mailbox,
    me: ThreadToken,
    max_batches: usize,
    runners: &AtomicUsize,
    log: &Log<usize>,
    final_handled: Option<&AtomicBool>,
) -> (bool, bool) {
    for _ in 0..max_batches {
        match mb.take_batch(me, Kind::Pool) {
            None => return (false, false),
            Some(mut batch) => {
                let (n, last) = deliver(&mut batch, runners, log, final_handled);
                mb.finish_batch(batch, n, last);
                if last {
                    return (false, true);
                }
            }
        }
    }
    mb.reschedule();
    (true, false)
}

/// A producer's push: `Subscription::offer` for the pool kind.
fn pool_push(mb: &Mailbox, pool: &Pool, it: Item) -> Push {
    let push = mb.push(it, Kind::Pool, false);
    match push {
        Push::Queued {
            action: Action::Schedule,
            ..
        } => pool.schedule(),
        Push::Queued {
            action: Action::Nothing,
            ..
        }
        | Push::Closed => {}
        Push::Queued { action, .. } => panic!("pool push asked for {action:?}"),
        Push::Dropped => panic!("unbounded mailbox dropped an item"),
    }
    push
}

// ---------------------------------------------------------------------------------------
// Model 1: pool scheduling.

/// Pool worker: pop, check the state, run a turn of `max_batches`, requeue if asked.
fn pool_worker(mb: &Mailbox, pool: &Pool, runners: &AtomicUsize, log: &Log<usize>) {
    let me = thread_token();
    while pool.pop().is_some() {
        assert_eq!(
            mb.lock().run,
            RunState::Scheduled,
            "a mailbox on the run queue must be Scheduled"
        );
        // One batch per turn, so the reschedule path is taken whenever items remain.
        let (again, _) = run_pool_turn(mb, me, 1, runners, log, None);
        if again {
            pool.schedule();
        }
    }
}

/// Two producers (0, 1 and 10) push to a pool mailbox; `spawned_workers` worker threads
/// plus the main thread serve the run queue.
fn pool_scheduling(name: &str, spawned_workers: usize, preemption_bound: usize) {
    const P0: [usize; 2] = [0, 1];
    const P1: [usize; 1] = [10];
    check(name, preemption_bound, move || {
        let mb = Arc::new(Mailbox::new());
        let pool = Arc::new(Pool::new(2));
        let runners = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Log::new());

        let producer = |values: &'static [usize]| {
            let (mb, pool) = (mb.clone(), pool.clone());
            thread::spawn(move || {
                for &v in values {
                    assert!(matches!(
                        pool_push(&mb, &pool, item(v, false, None)),
                        Push::Queued { .. }
                    ));
                }
                pool.feeder_done();
            })
        };
        let p0 = producer(&P0);
        let p1 = producer(&P1);
        let workers: Vec<_> = (0..spawned_workers)
            .map(|_| {
                let (mb, pool, runners, log) =
                    (mb.clone(), pool.clone(), runners.clone(), log.clone());
                thread::spawn(move || pool_worker(&mb, &pool, &runners, &log))
            })
            .collect();
        pool_worker(&mb, &pool, &runners, &log);
        p0.join().unwrap();
        p1.join().unwrap();
        for w in workers {
            w.join().unwrap();
        }

        let log = log.get();
        let mut sorted = log.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [0, 1, 10],
            "each item delivered exactly once: {log:?}"
        );
        assert_eq!(in_range(&log, 0..10), P0, "producer 0's order: {log:?}");
        let st = mb.lock();
        assert!(st.queue.is_empty(), "items stranded in the queue: {log:?}");
        assert_eq!(st.run, RunState::Idle, "lost wake-up / stuck state");
        assert_eq!((st.pushed, st.handled), (3, 3));
        drop(st);
        assert_eq!(pool.q.lock().unwrap().queued, 0);
    });
}

/// Two workers (a spawned one and the main thread): at most one runner at a time.
#[test]
fn loom_pool_scheduling_two_workers() {
    pool_scheduling("pool_scheduling_two_workers", 1, 2);
}

/// One worker (the main thread), deeper preemption: lost wake-ups, reschedule, order.
#[test]
fn loom_pool_scheduling_one_worker() {
    pool_scheduling("pool_scheduling_one_worker", 0, 4);
}

// ---------------------------------------------------------------------------------------
// Model 2: the final item and join.

const FINAL: usize = 99;
const AFTER_FINAL: usize = 100;

/// The unsubscriber: pushes the final item (it closes the mailbox), then checks that a
/// later push is refused.
fn push_final(mb: &Mailbox, kind: Kind, pool: Option<&Pool>) {
    let push = match pool {
        Some(pool) => pool_push(mb, pool, item(FINAL, true, None)),
        None => mb.push(item(FINAL, true, None), kind, false),
    };
    assert!(
        matches!(push, Push::Queued { .. }),
        "the final item is never refused"
    );
    assert!(
        matches!(
            mb.push(item(AFTER_FINAL, false, None), kind, false),
            Push::Closed
        ),
        "a push after the final item must be Closed"
    );
}

/// A producer racing the final item: records what it pushed and what was refused.
fn produce(mb: &Mailbox, kind: Kind, pool: Option<&Pool>, values: &[usize], queued: &Log<usize>) {
    let mut closed = false;
    for &v in values {
        let it = item(v, false, None);
        let push = match pool {
            Some(pool) => pool_push(mb, pool, it),
            None => mb.push(it, kind, false),
        };
        match push {
            Push::Queued { .. } => {
                assert!(!closed, "a push succeeded after one was refused");
                queued.push(v);
            }
            Push::Closed => closed = true,
            Push::Dropped => panic!("unbounded mailbox dropped an item"),
        }
    }
}

/// The dedicated thread: park until something is queued, deliver batches, stop after
/// the final item.
fn dedicated_runner(
    mb: &Mailbox,
    runners: &AtomicUsize,
    log: &Log<usize>,
    final_handled: Option<&AtomicBool>,
) {
    let me = thread_token();
    loop {
        mb.park_until_queued();
        while let Some(mut batch) = mb.take_batch(me, Kind::Dedicated) {
            let (n, last) = deliver(&mut batch, runners, log, final_handled);
            mb.finish_batch(batch, n, last);
            if last {
                return;
            }
        }
    }
}

/// Checks shared by the final-item models: `log` (what was delivered) is exactly the
/// producer's `Queued` items, in order, then the final item.
fn check_final_delivery(log: &[usize], queued: &[usize]) {
    assert_eq!(
        log.last(),
        Some(&FINAL),
        "the final item is delivered last: {log:?}"
    );
    assert_eq!(
        log.iter().filter(|&&v| v == FINAL).count(),
        1,
        "the final item is delivered once: {log:?}"
    );
    assert!(
        !log.contains(&AFTER_FINAL),
        "a refused push was delivered: {log:?}"
    );
    assert_eq!(
        &log[..log.len() - 1],
        queued,
        "every accepted push is delivered, in order, before the final item"
    );
}

#[test]
fn loom_final_dedicated() {
    check("final_dedicated", 3, || {
        let mb = Arc::new(Mailbox::new());
        let runners = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Log::new());
        let queued = Arc::new(Log::new());
        let final_handled = Arc::new(AtomicBool::new(false));

        let runner = {
            let (mb, runners, log, fh) = (
                mb.clone(),
                runners.clone(),
                log.clone(),
                final_handled.clone(),
            );
            thread::spawn(move || dedicated_runner(&mb, &runners, &log, Some(&fh)))
        };
        let producer = {
            let (mb, queued) = (mb.clone(), queued.clone());
            thread::spawn(move || produce(&mb, Kind::Dedicated, None, &[1, 2], &queued))
        };
        let unsubscriber = {
            let mb = mb.clone();
            thread::spawn(move || push_final(&mb, Kind::Dedicated, None))
        };

        // The joiner (`Subscription::join`).
        mb.wait_until(|st| st.done);
        assert!(
            final_handled.load(Relaxed),
            "join returned before the final item was handled"
        );

        runner.join().unwrap();
        producer.join().unwrap();
        unsubscriber.join().unwrap();
        check_final_delivery(&log.get(), &queued.get());
        let st = mb.lock();
        assert!(st.done && st.closed && st.queue.is_empty());
        assert_eq!(st.handled, st.pushed);
    });
}

#[test]
fn loom_final_pool() {
    check("final_pool", 3, || {
        let mb = Arc::new(Mailbox::new());
        let pool = Arc::new(Pool::new(0));
        let runners = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Log::new());
        let queued = Arc::new(Log::new());
        let final_handled = Arc::new(AtomicBool::new(false));

        // One worker that keeps serving the mailbox until it delivered the final item
        // (a lost wake-up leaves it blocked: loom reports the deadlock).
        let worker = {
            let (mb, pool, runners, log, fh) = (
                mb.clone(),
                pool.clone(),
                runners.clone(),
                log.clone(),
                final_handled.clone(),
            );
            thread::spawn(move || {
                let me = thread_token();
                loop {
                    pool.pop_blocking();
                    let (again, last) = run_pool_turn(&mb, me, 1, &runners, &log, Some(&fh));
                    if last {
                        return;
                    }
                    if again {
                        pool.schedule();
                    }
                }
            })
        };
        let producer = {
            let (mb, pool, queued) = (mb.clone(), pool.clone(), queued.clone());
            thread::spawn(move || produce(&mb, Kind::Pool, Some(&pool), &[1, 2], &queued))
        };
        let unsubscriber = {
            let (mb, pool) = (mb.clone(), pool.clone());
            thread::spawn(move || push_final(&mb, Kind::Pool, Some(&pool)))
        };

        mb.wait_until(|st| st.done);
        assert!(
            final_handled.load(Relaxed),
            "join returned before the final item was handled"
        );

        worker.join().unwrap();
        producer.join().unwrap();
        unsubscriber.join().unwrap();
        check_final_delivery(&log.get(), &queued.get());
        let st = mb.lock();
        assert!(st.done && st.closed && st.queue.is_empty());
        assert_eq!(st.handled, st.pushed);
    });
}

// ---------------------------------------------------------------------------------------
// Model 3: subscriber-list swap under a concurrent publish.

type SubList = std::sync::Arc<Vec<Arc<Mailbox>>>;

#[test]
fn loom_unsubscribe_vs_publish() {
    check("unsubscribe_vs_publish", 4, || {
        // `leaving` unsubscribes; `staying` stays subscribed (no runner: its queue is
        // read at the end).
        let leaving = Arc::new(Mailbox::new());
        let staying = Arc::new(Mailbox::new());
        let subscribers: Arc<Mutex<SubList>> = Arc::new(Mutex::new(std::sync::Arc::new(vec![
            leaving.clone(),
            staying.clone(),
        ])));
        let runners = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Log::new());
        let queued = Arc::new(Log::new());
        // How many messages the publisher has fully published.
        let published = Arc::new(AtomicUsize::new(0));

        let runner = {
            let (mb, runners, log) = (leaving.clone(), runners.clone(), log.clone());
            thread::spawn(move || dedicated_runner(&mb, &runners, &log, None))
        };
        let publisher = {
            let (subs, leaving, queued, published) = (
                subscribers.clone(),
                leaving.clone(),
                queued.clone(),
                published.clone(),
            );
            thread::spawn(move || {
                for v in [1, 2] {
                    // `deliver_local`: load the snapshot, push to each subscriber in it.
                    let snapshot: SubList = subs.lock().unwrap().clone();
                    for mb in snapshot.iter() {
                        let push = mb.push(item(v, false, None), Kind::Dedicated, false);
                        if Arc::ptr_eq(mb, &leaving) {
                            match push {
                                Push::Queued { .. } => queued.push(v),
                                Push::Closed => {}
                                Push::Dropped => panic!("unbounded mailbox dropped an item"),
                            }
                        } else {
                            assert!(matches!(push, Push::Queued { .. }));
                        }
                    }
                    published.store(v, Release);
                }
            })
        };

        // The unsubscriber (main thread): what was published before it started must be
        // delivered before the final item.
        let before = published.load(Acquire);
        {
            // `remove_subscriber`: swap in a list without the mailbox.
            let mut list = subscribers.lock().unwrap();
            let rest: Vec<Arc<Mailbox>> = list
                .iter()
                .filter(|m| !Arc::ptr_eq(m, &leaving))
                .cloned()
                .collect();
            *list = std::sync::Arc::new(rest);
        }
        push_final(&leaving, Kind::Dedicated, None);

        runner.join().unwrap();
        publisher.join().unwrap();
        let log = log.get();
        check_final_delivery(&log, &queued.get());
        for v in 1..=before {
            assert!(
                log.contains(&v),
                "message {v}, published before the unsubscribe began, was lost: {log:?}"
            );
        }
        let st = leaving.lock();
        assert!(st.done && st.queue.is_empty());
        drop(st);
        let st = staying.lock();
        let got: Vec<usize> = st.queue.iter().map(value).collect();
        assert_eq!(
            got,
            [1, 2],
            "the remaining subscriber gets every message in order"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Model 4: synchronous hand-off.

/// `Subscription::run_until_idle`, checking that each item runs on its publisher's
/// thread.
fn run_until_idle(
    mb: &Mailbox,
    me: ThreadToken,
    runners: &AtomicUsize,
    log: &Log<usize>,
    final_handled: Option<&AtomicBool>,
) {
    while let Some(mut batch) = mb.take_batch(me, Kind::Synchronous) {
        for it in &batch {
            assert_eq!(
                it.from,
                Some(thread_token()),
                "item {} delivered on another thread than its publisher's",
                value(it)
            );
        }
        let (n, last) = deliver(&mut batch, runners, log, final_handled);
        mb.finish_batch(batch, n, last);
    }
}

/// One synchronous publish of `v` (`Subscription::offer`, synchronous kind); `last`:
/// the unsubscribe's final item. Returns false when the mailbox was closed.
fn sync_publish(
    mb: &Mailbox,
    v: usize,
    last: bool,
    runners: &AtomicUsize,
    log: &Log<usize>,
    final_handled: Option<&AtomicBool>,
) -> bool {
    let me = thread_token();
    let action = match mb.push(item(v, last, Some(me)), Kind::Synchronous, false) {
        Push::Queued { action, .. } => action,
        Push::Closed => return false,
        Push::Dropped => panic!("unbounded mailbox dropped an item"),
    };
    match action {
        Action::RunHere => run_until_idle(mb, me, runners, log, final_handled),
        Action::WaitTurn => {
            assert!(
                mb.wait_turn(me),
                "wait_turn gave up although this thread's item is queued"
            );
            run_until_idle(mb, me, runners, log, final_handled);
        }
        other => panic!("synchronous push from outside a callback asked for {other:?}"),
    }
    assert!(
        log.get().contains(&v),
        "publish of {v} returned before its callback ran"
    );
    true
}

#[test]
fn loom_synchronous_handoff() {
    check("synchronous_handoff", 5, || {
        let mb = Arc::new(Mailbox::new());
        let runners = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Log::new());

        let publisher = |values: &'static [usize]| {
            let (mb, runners, log) = (mb.clone(), runners.clone(), log.clone());
            thread::spawn(move || {
                for &v in values {
                    assert!(sync_publish(&mb, v, false, &runners, &log, None));
                }
            })
        };
        let a = publisher(&[1, 2]);
        let b = publisher(&[10, 11]);
        a.join().unwrap();
        b.join().unwrap();

        let log = log.get();
        assert_eq!(
            in_range(&log, 0..10),
            [1, 2],
            "publisher a's order: {log:?}"
        );
        assert_eq!(
            in_range(&log, 10..20),
            [10, 11],
            "publisher b's order: {log:?}"
        );
        assert_eq!(log.len(), 4, "each item delivered once: {log:?}");
        let st = mb.lock();
        assert!(st.queue.is_empty());
        assert_eq!(st.run, RunState::Idle);
        assert_eq!((st.pushed, st.handled), (4, 4));
    });
}

/// The synchronous kind's unsubscribe: the final item runs on the unsubscriber's thread,
/// after every accepted publish, and join waits for it.
#[test]
fn loom_synchronous_final() {
    check("synchronous_final", 3, || {
        let mb = Arc::new(Mailbox::new());
        let runners = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Log::new());
        let queued = Arc::new(Log::new());
        let final_handled = Arc::new(AtomicBool::new(false));

        let publisher = {
            let (mb, runners, log, queued) =
                (mb.clone(), runners.clone(), log.clone(), queued.clone());
            thread::spawn(move || {
                let mut closed = false;
                for v in [1, 2] {
                    if sync_publish(&mb, v, false, &runners, &log, None) {
                        assert!(!closed, "a push succeeded after one was refused");
                        queued.push(v);
                    } else {
                        closed = true;
                    }
                }
            })
        };
        let unsubscriber = {
            let (mb, runners, log, fh) = (
                mb.clone(),
                runners.clone(),
                log.clone(),
                final_handled.clone(),
            );
            thread::spawn(move || {
                assert!(
                    sync_publish(&mb, FINAL, true, &runners, &log, Some(&fh)),
                    "the final item is never refused"
                );
                assert!(
                    matches!(
                        mb.push(
                            item(AFTER_FINAL, false, Some(thread_token())),
                            Kind::Synchronous,
                            false
                        ),
                        Push::Closed
                    ),
                    "a push after the final item must be Closed"
                );
            })
        };

        mb.wait_until(|st| st.done);
        assert!(
            final_handled.load(Relaxed),
            "join returned before the final item was handled"
        );
        publisher.join().unwrap();
        unsubscriber.join().unwrap();
        check_final_delivery(&log.get(), &queued.get());
        let st = mb.lock();
        assert!(st.done && st.queue.is_empty());
        assert_eq!(st.run, RunState::Idle);
        assert_eq!(st.handled, st.pushed);
    });
}
