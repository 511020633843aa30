//! Loom model checks of the mailbox protocol, the concurrency core of the bus.
//!
//! Run (release mode, about a minute for all of them on two cores):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test --release --lib loom -- --nocapture
//! ```
//!
//! Each model prints how many interleavings it explored. `LOOM_MAX_PREEMPTIONS=n`
//! overrides every model's preemption bound (deeper = slower); `LOOM_LOG=1` and
//! `LOOM_LOCATION=1` make loom print the failing schedule in detail.
//!
//! Under `--cfg loom`, `crate::sync` gives the mailbox loom's mutex, condvar and
//! atomics, so loom runs the real [`Mailbox`] code under every interleaving of the
//! threads below (up to the preemption bound). The threads replicate the mailbox's
//! callers (`Subscription::offer`, `run_pool_turn`, the dedicated thread,
//! `run_until_idle`, `join`, `wait_handled`, `Topic::deliver_local` /
//! `remove_subscriber`, the pool's run queue) with bookkeeping in place of user
//! callbacks. A failed assertion, or a deadlock (every thread blocked: a lost
//! wake-up), fails the test.
//!
//! What the models prove:
//!
//! 1. `loom_pool_scheduling_*`: the pool state machine (idle -> scheduled -> running,
//!    and the reschedule after a worker's quota of batches, here one batch). Two
//!    producers push; the pusher told `Action::Schedule` puts the mailbox on a run
//!    queue that one or two workers serve. Every item is delivered exactly once, in its
//!    producer's order; at most one thread runs the callback at a time; the mailbox is
//!    never on the run queue twice and is `Scheduled` whenever a worker pops it; no
//!    wake-up is lost: at the end nothing is queued and the state is `Idle`.
//! 2. `loom_final_dedicated`, `loom_final_pool`: the final (unsubscribe) item and join.
//!    A producer races the final push; a dedicated thread (`park_and_take` +
//!    `finish_and_take`) or a pool worker delivers; the main thread joins (peek at the
//!    lock-free `is_done`, then `wait_until(done)`). The final item is delivered once
//!    and last; every push that returned `Queued` is delivered before it, none that
//!    returned `Closed` ever is, and a push after the final one is `Closed`; join
//!    returns only after the callback handled the final item (and sees its effects:
//!    the flag it checks is written `Relaxed`); no deadlock.
//! 3. `loom_unsubscribe_vs_publish`: a topic's subscriber-list swap (a loom mutex
//!    around an `Arc<Vec<..>>` snapshot stands in for the `ArcSwap`). A publisher
//!    publishes twice, each time from the snapshot it loaded, while an unsubscriber
//!    swaps the mailbox out of the list and pushes the final item. Nothing is
//!    delivered after the final item; everything published before the unsubscriber
//!    started is delivered before it; the subscriber left in the list gets everything.
//! 4. `loom_synchronous_handoff`, `loom_synchronous_final`: the synchronous kind. Two
//!    publishers first try to claim an idle, empty mailbox for the message they hold
//!    (`claim_direct`, then `finish_one_and_take`); when it is busy they push with their
//!    thread token and follow the action (`RunHere`: run here, from the queue;
//!    `WaitTurn`: wait for the hand-off, then run; `Nested`: a callback
//!    publishing to its own subscription). Every item is delivered on its publisher's
//!    thread, callbacks never overlap, a publish returns only after its item and any
//!    item its callbacks published were delivered, both publishers return, and the
//!    mailbox ends empty and `Idle`; a DropOldest limit (which the synchronous kind
//!    must ignore) evicts nothing. With an unsubscriber: the final item runs on the
//!    unsubscriber's thread, last, and join waits for it.
//!    `loom_synchronous_deferred`: a publish from inside another subscription's
//!    callback never waits for another thread's run (it runs the subscription when idle
//!    or defers the item to the running thread); nothing is stranded or run twice.
//! 5. `loom_drop_oldest_accounting`: `Overflow::DropOldest` with a limit of one item and
//!    `publish_sync`-style waiters (`wait_until(handled >= seq)`). A waiter returns
//!    only once its item and every earlier one was delivered or evicted (an eviction
//!    must not count as handled while an earlier item is still being delivered), and
//!    never waits forever for an evicted item; the mailbox's first item (the Subscribe
//!    message) is never evicted.
//! 6. `loom_block_overflow*`: `Overflow::Block` with a limit of one item. A producer
//!    blocked on the full queue races the final push and the runner; no batch exceeds
//!    the limit (the final item aside), nothing accepted is lost, nobody hangs. Two
//!    narrower models pin down each wake-up: `_runner_makes_room` (no final push
//!    races the producer, so only the runner's `take_batch` can release it: every
//!    push gets through) and `_final_releases` (the runner starts only after the
//!    others finished, so only the final push can release the producer, whose push is
//!    then refused).
//! 7. The lock-free ring (`crate::ring`, two slots under loom, allocated at the first
//!    take, so every model above also runs its pushes through the ring once a runner
//!    took a batch: ring pushes, a full ring's fallback to the locked queue, the close
//!    before idling or parking, the final item behind ring items).
//!    `loom_ring_dedicated_full_and_final`: a dedicated thread that has not parked (ring
//!    open), a producer pushing more than the ring holds, and the final item racing it:
//!    everything accepted is delivered once, in order, before the final item, join
//!    waits for it, nothing is left in either queue. `loom_ring_pool_idle_vs_push`: a
//!    pool subscription scheduled with its ring open, two producers, a worker that goes
//!    idle only after closing an empty ring: nothing stranded, never scheduled twice,
//!    each producer's order holds. `loom_ring_sync_waiter_seq`: sequence numbers count
//!    both queues, so a `publish_sync`-style waiter returns only after its item.
//!
//! Notes on the harness:
//! - Shared state is held in `std::sync::Arc` (as the library holds subscriptions), not
//!   loom's `Arc`: loom models every clone and drop as a scheduling point, which only
//!   inflates the search, and unwinding a deadlocked model thread that owns a loom
//!   `Arc` aborts the process instead of reporting the deadlock.
//! - The delivery log sits behind a loom mutex, not a std one: loom's partial-order
//!   reduction only tries both orders of operations it sees conflict, so bookkeeping
//!   hidden from it silently hides interleavings (with a std mutex, model 5 missed an
//!   eviction counted too early).
//! - Assertions on the main thread run after the spawned threads are joined: a panic
//!   while spawned threads have not started yet makes loom abort instead of report.

use super::{Action, Claim, Item, Kind, Mailbox, Overflow, Push, RunState};
use crate::message::Message;
use crate::message_type::MessageType;
use crate::sync::{thread_token, ThreadToken};
use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::{Condvar, Mutex};
use loom::thread;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::{Arc, LazyLock};

/// The one message type of all models (created once, outside any model run).
static TY: LazyLock<Arc<MessageType>> =
    LazyLock::new(|| MessageType::create("loom", None).expect("type 'loom' is not declined"));

/// The final (unsubscribe) item's value, and a value pushed after it.
const FINAL: usize = 99;
const AFTER_FINAL: usize = 100;
/// The first item a mailbox ever holds (the Subscribe change message in the library).
const SUBSCRIBE: usize = 98;

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
    let runs = Arc::new(StdAtomicUsize::new(0));
    let counter = Arc::clone(&runs);
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

/// Test bookkeeping, behind a loom mutex: loom must see the bookkeeping as shared
/// state, or its partial-order reduction would treat (say) a callback's recording and
/// another thread's look at the record as independent and never try them in the other
/// order.
struct Log<T>(Mutex<Vec<T>>);

impl<T: Clone> Log<T> {
    fn new() -> Log<T> {
        Log(Mutex::new(Vec::new()))
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

/// A subscription under test: the real mailbox, and a callback that records.
struct Sub {
    mb: Mailbox,
    /// Threads inside the callback right now: never more than one.
    runners: AtomicUsize,
    /// Values delivered, in delivery order.
    log: Log<usize>,
    /// Set (Relaxed) by the callback when it handles the final item: a joiner must see
    /// it, through the mailbox's own synchronization.
    final_handled: AtomicBool,
    /// `Subscription::subscribed`: cleared by unsubscribe, checked by publishers.
    subscribed: AtomicBool,
}

impl Sub {
    fn new() -> Arc<Sub> {
        Arc::new(Sub {
            mb: Mailbox::new(),
            runners: AtomicUsize::new(0),
            log: Log::new(),
            final_handled: AtomicBool::new(false),
            subscribed: AtomicBool::new(true),
        })
    }

    /// `Subscription::deliver`: runs the callback on each item of `batch`; `nested` is
    /// called with each value (a callback publishing). Returns (n, last).
    fn deliver(&self, batch: &mut VecDeque<Item>, nested: &dyn Fn(usize)) -> (usize, bool) {
        let n = batch.len();
        let mut last = false;
        assert_eq!(
            self.runners.fetch_add(1, SeqCst),
            0,
            "two threads run the callback at once"
        );
        for it in batch.drain(..) {
            assert!(!last, "an item follows the final item in its batch");
            let v = value(&it);
            self.log.push(v);
            if it.last {
                last = true;
                self.final_handled.store(true, Relaxed);
            }
            nested(v);
        }
        self.runners.fetch_sub(1, SeqCst);
        (n, last)
    }

    /// `Subscription::join`: a lock-free peek at `done` (the spin), then the wait.
    /// Returns whether the callback's handling of the final item is visible.
    fn join(&self) -> bool {
        if !self.mb.is_done() {
            self.mb.wait_until(|st| st.done);
        }
        self.final_handled.load(Relaxed)
    }

    /// The dedicated thread: park until something is queued, deliver batches, stop
    /// after the final item. `limit`: no batch may hold more non-final items.
    fn dedicated_thread(&self, limit: usize) {
        let me = thread_token();
        loop {
            let mut next = self.mb.park_and_take(me, Kind::Dedicated);
            while let Some(mut batch) = next {
                let regular = batch
                    .iter()
                    .filter(|i| !i.last && value(i) != SUBSCRIBE)
                    .count();
                assert!(
                    regular <= limit,
                    "a batch of {regular} over a limit of {limit}"
                );
                let (n, last) = self.deliver(&mut batch, &|_| {});
                if last {
                    self.mb.finish_batch(batch, n, true);
                    return;
                }
                next = self
                    .mb
                    .finish_and_take(batch, n, false, me, Kind::Dedicated);
            }
        }
    }
}

/// The unsubscriber: pushes the final item (which closes the mailbox), then checks that
/// a later push is refused. `pool`: the run queue to schedule on (pool kind).
fn push_final(sub: &Sub, kind: Kind, pool: Option<&Pool>) {
    let push = match pool {
        Some(pool) => pool.push(sub, item(FINAL, true, None)),
        None => sub.mb.push(item(FINAL, true, None), kind, false),
    };
    assert!(
        matches!(push, Push::Queued { .. }),
        "the final item is never refused"
    );
    assert!(
        matches!(
            sub.mb.push(item(AFTER_FINAL, false, None), kind, false),
            Push::Closed
        ),
        "a push after the final item must be Closed"
    );
}

/// A producer racing the final item: records the values whose push was accepted.
fn produce(sub: &Sub, kind: Kind, pool: Option<&Pool>, values: &[usize], accepted: &Log<usize>) {
    let mut closed = false;
    for &v in values {
        let it = item(v, false, None);
        let push = match pool {
            Some(pool) => pool.push(sub, it),
            None => sub.mb.push(it, kind, true),
        };
        match push {
            Push::Queued { .. } => {
                assert!(!closed, "a push was accepted after one was refused");
                accepted.push(v);
            }
            Push::Closed => closed = true,
            Push::Dropped => panic!("an unbounded mailbox dropped an item"),
        }
    }
}

/// `log` (what was delivered) is exactly the `accepted` items, in order, then the final
/// item, once.
fn check_final_delivery(log: &[usize], accepted: &[usize]) {
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
        accepted,
        "every accepted push is delivered, in order, before the final item"
    );
}

// ---------------------------------------------------------------------------------------
// A stand-in for the worker pool: the run queue of the one mailbox, as a count.

struct RunQueue {
    /// How many times the mailbox is on the run queue (0 or 1).
    queued: usize,
    /// Threads that may still schedule it (producers not finished yet).
    feeders: usize,
}

struct Pool {
    q: Mutex<RunQueue>,
    cv: Condvar,
}

impl Pool {
    fn new(feeders: usize) -> Arc<Pool> {
        Arc::new(Pool {
            q: Mutex::new(RunQueue { queued: 0, feeders }),
            cv: Condvar::new(),
        })
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

    /// Pops the mailbox, waiting while somebody may still schedule it (`forever`: for as
    /// long as it takes). False: nothing queued and nobody left to queue it.
    fn pop(&self, forever: bool) -> bool {
        let mut q = self.q.lock().unwrap();
        while q.queued == 0 && (forever || q.feeders > 0) {
            q = self.cv.wait(q).unwrap();
        }
        let popped = q.queued == 1;
        q.queued = 0;
        popped
    }

    /// A pool-kind push (`Subscription::offer`): schedules when the mailbox asks.
    fn push(&self, sub: &Sub, it: Item) -> Push {
        let push = sub.mb.push(it, Kind::Pool, true);
        match push {
            Push::Queued {
                action: Action::Schedule,
                ..
            } => self.schedule(),
            Push::Queued {
                action: Action::Nothing,
                ..
            }
            | Push::Closed => {}
            Push::Queued { action, .. } => panic!("a pool push asked for {action:?}"),
            Push::Dropped => panic!("an unbounded mailbox dropped an item"),
        }
        push
    }

    /// A worker: pop, check the state, run a turn (`run_pool_turn` with a quota of one
    /// batch, so the reschedule path is taken whenever items remain), requeue if asked.
    /// With `until_final`, it serves until it delivered the final item (a lost
    /// wake-up then leaves it blocked, and loom reports the deadlock).
    fn worker(&self, sub: &Sub, until_final: bool) {
        let me = thread_token();
        while self.pop(until_final) {
            assert_eq!(
                sub.mb.lock().run(),
                RunState::Scheduled,
                "a mailbox on the run queue must be Scheduled"
            );
            let (again, last) = run_pool_turn(sub, me, 1);
            if last && until_final {
                return;
            }
            if again {
                self.schedule();
            }
        }
    }
}

/// `Subscription::run_pool_turn`. Returns (reschedule, delivered the final item).
fn run_pool_turn(sub: &Sub, me: ThreadToken, max_batches: usize) -> (bool, bool) {
    let mut next = sub.mb.take_batch(me, Kind::Pool);
    for turn in 1..=max_batches {
        let Some(mut batch) = next else {
            return (false, false);
        };
        let (n, last) = sub.deliver(&mut batch, &|_| {});
        if last || turn == max_batches {
            sub.mb.finish_batch(batch, n, last);
            if last {
                return (false, true);
            }
            break;
        }
        next = sub.mb.finish_and_take(batch, n, false, me, Kind::Pool);
    }
    sub.mb.reschedule();
    (true, false)
}

// ---------------------------------------------------------------------------------------
// Model 1: pool scheduling.

/// Two producers (0, 1 and 10) push to a pool mailbox; `spawned_workers` worker threads
/// and the main thread serve the run queue.
fn pool_scheduling(name: &str, spawned_workers: usize, preemption_bound: usize) {
    const P0: [usize; 2] = [0, 1];
    const P1: [usize; 1] = [10];
    check(name, preemption_bound, move || {
        let sub = Sub::new();
        let pool = Pool::new(2);

        let producer = |values: &'static [usize]| {
            let (sub, pool) = (Arc::clone(&sub), Arc::clone(&pool));
            thread::spawn(move || {
                for &v in values {
                    let push = pool.push(&sub, item(v, false, None));
                    assert!(matches!(push, Push::Queued { .. }));
                }
                pool.feeder_done();
            })
        };
        let p0 = producer(&P0);
        let p1 = producer(&P1);
        let workers: Vec<_> = (0..spawned_workers)
            .map(|_| {
                let (sub, pool) = (Arc::clone(&sub), Arc::clone(&pool));
                thread::spawn(move || pool.worker(&sub, false))
            })
            .collect();
        pool.worker(&sub, false);
        p0.join().unwrap();
        p1.join().unwrap();
        for w in workers {
            w.join().unwrap();
        }

        let log = sub.log.get();
        let mut sorted = log.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 10], "each item delivered once: {log:?}");
        assert_eq!(in_range(&log, 0..10), P0, "producer 0's order: {log:?}");
        let st = sub.mb.lock();
        assert!(
            st.queue().is_empty(),
            "items stranded in the queue: {log:?}"
        );
        assert_eq!(sub.mb.len(), 0, "items stranded in the ring: {log:?}");
        assert_eq!(st.run(), RunState::Idle, "a lost wake-up / stuck state");
        assert_eq!((sub.mb.pushed(&st), st.handled), (3, 3));
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

/// A producer (1, 2), an unsubscriber and a runner (`runner(sub, pool)`); the main
/// thread joins.
fn final_and_join(kind: Kind, runner: fn(&Sub, Option<&Pool>)) {
    let sub = Sub::new();
    let pool = (kind == Kind::Pool).then(|| Pool::new(0));
    let accepted = Arc::new(Log::new());

    let runner = {
        let (sub, pool) = (Arc::clone(&sub), pool.clone());
        thread::spawn(move || runner(&sub, pool.as_deref()))
    };
    let producer = {
        let (sub, pool, accepted) = (Arc::clone(&sub), pool.clone(), Arc::clone(&accepted));
        thread::spawn(move || produce(&sub, kind, pool.as_deref(), &[1, 2], &accepted))
    };
    let unsubscriber = {
        let (sub, pool) = (Arc::clone(&sub), pool.clone());
        thread::spawn(move || push_final(&sub, kind, pool.as_deref()))
    };

    let handled_at_join = sub.join();

    runner.join().unwrap();
    producer.join().unwrap();
    unsubscriber.join().unwrap();
    assert!(
        handled_at_join,
        "join returned before the final item was handled"
    );
    check_final_delivery(&sub.log.get(), &accepted.get());
    let st = sub.mb.lock();
    assert!(st.done && st.closed && st.queue().is_empty());
    assert_eq!(sub.mb.len(), 0, "items stranded in the ring");
    assert_eq!(st.handled, sub.mb.pushed(&st));
}

#[test]
fn loom_final_dedicated() {
    check("final_dedicated", 3, || {
        final_and_join(Kind::Dedicated, |sub, _| sub.dedicated_thread(usize::MAX));
    });
}

#[test]
fn loom_final_pool() {
    check("final_pool", 3, || {
        final_and_join(Kind::Pool, |sub, pool| {
            pool.expect("pool kind").worker(sub, true);
        });
    });
}

// ---------------------------------------------------------------------------------------
// Model 3: unsubscribe under a concurrent publish. The unsubscriber clears the
// subscription's flag, then either leaves it in the list (a tombstone, which publishers
// skip or find closed) or swaps in a list without it (`small_list::retire` does one or the
// other), then queues the final item.

type SubList = Arc<Vec<Arc<Sub>>>;

#[test]
fn loom_unsubscribe_vs_publish() {
    unsubscribe_vs_publish(true);
}

#[test]
fn loom_unsubscribe_vs_publish_tombstone() {
    unsubscribe_vs_publish(false);
}

fn unsubscribe_vs_publish(rebuild: bool) {
    let name = if rebuild {
        "unsubscribe_vs_publish"
    } else {
        "unsubscribe_vs_publish_tombstone"
    };
    check(name, 4, move || {
        // `leaving` unsubscribes; `staying` stays (no runner: its queue is read at the
        // end).
        let leaving = Sub::new();
        let staying = Sub::new();
        let list: SubList = Arc::new(vec![Arc::clone(&leaving), Arc::clone(&staying)]);
        let subscribers = Arc::new(Mutex::new(list));
        let accepted = Arc::new(Log::new());
        // How many messages the publisher has fully published.
        let published = Arc::new(AtomicUsize::new(0));

        let runner = {
            let sub = Arc::clone(&leaving);
            thread::spawn(move || sub.dedicated_thread(usize::MAX))
        };
        let publisher = {
            let (subs, leaving, accepted, published) = (
                Arc::clone(&subscribers),
                Arc::clone(&leaving),
                Arc::clone(&accepted),
                Arc::clone(&published),
            );
            thread::spawn(move || {
                for v in [1, 2] {
                    // `deliver_local`: load the snapshot, push to each subscriber in it.
                    let snapshot: SubList = Arc::clone(&subs.lock().unwrap());
                    for sub in snapshot.iter() {
                        // `Subscription::is_live_for`.
                        if !sub.subscribed.load(Relaxed) {
                            assert!(Arc::ptr_eq(sub, &leaving));
                            continue;
                        }
                        let push = sub.mb.push(item(v, false, None), Kind::Dedicated, true);
                        let queued = match push {
                            Push::Queued { .. } => true,
                            Push::Closed => false,
                            Push::Dropped => panic!("an unbounded mailbox dropped an item"),
                        };
                        if Arc::ptr_eq(sub, &leaving) {
                            if queued {
                                accepted.push(v);
                            }
                        } else {
                            assert!(queued, "a subscribed mailbox refused a push");
                        }
                    }
                    published.store(v, Release);
                }
            })
        };
        // The unsubscriber: what was published before it started must be delivered
        // before the final item.
        let unsubscriber = {
            let (subs, leaving, published) = (
                Arc::clone(&subscribers),
                Arc::clone(&leaving),
                Arc::clone(&published),
            );
            thread::spawn(move || {
                let before = published.load(Acquire);
                leaving.subscribed.swap(false, AcqRel);
                if rebuild {
                    // `retire_subscriber` rebuilding: swap in a list without it.
                    let mut list = subs.lock().unwrap();
                    let rest: Vec<Arc<Sub>> = list
                        .iter()
                        .filter(|s| !Arc::ptr_eq(s, &leaving))
                        .cloned()
                        .collect();
                    *list = Arc::new(rest);
                }
                push_final(&leaving, Kind::Dedicated, None);
                before
            })
        };

        runner.join().unwrap();
        publisher.join().unwrap();
        let before = unsubscriber.join().unwrap();
        let log = leaving.log.get();
        check_final_delivery(&log, &accepted.get());
        for v in 1..=before {
            assert!(
                log.contains(&v),
                "message {v}, published before the unsubscribe began, was lost: {log:?}"
            );
        }
        let st = leaving.mb.lock();
        assert!(st.done && st.queue().is_empty());
        drop(st);
        let st = staying.mb.lock();
        let got: Vec<usize> = st.queue().iter().map(value).collect();
        assert_eq!(got, [1, 2], "the remaining subscriber gets every message");
    });
}

// ---------------------------------------------------------------------------------------
// Model 4: synchronous hand-off.

/// `Subscription::run_until_idle`: runs batches; when the run was handed away while
/// items this thread's callbacks published wait behind others, waits for it to come
/// back, or, when `in_callback` (this run is nested in another subscription's
/// callback, which must not wait for another thread), hands those items to the runner.
/// Checks that each item runs on its publisher's thread (a deferred one, `from ==
/// None`, on any).
/// `claimed`: the value of a message delivered from the publisher's hands
/// (`Mailbox::claim_direct`).
fn run_until_idle_in(
    sub: &Sub,
    me: ThreadToken,
    nested: &dyn Fn(usize),
    in_callback: bool,
    mut claimed: Option<usize>,
) {
    loop {
        let mut next = match claimed.take() {
            Some(v) => {
                // Never queued: the model's item stands for the message the publisher holds.
                let mut one = VecDeque::from([item(v, false, Some(me))]);
                let (n, last) = sub.deliver(&mut one, nested);
                assert_eq!((n, last), (1, false));
                sub.mb.finish_one_and_take(me)
            }
            None => sub.mb.take_batch(me, Kind::Synchronous),
        };
        while let Some(mut batch) = next {
            for it in &batch {
                assert!(
                    it.from.is_none_or(|t| t == thread_token()),
                    "item {} delivered on another thread than its publisher's",
                    value(it)
                );
            }
            let (n, last) = sub.deliver(&mut batch, nested);
            next = sub
                .mb
                .finish_and_take(batch, n, last, me, Kind::Synchronous);
        }
        if sub.mb.len() == 0 || !sub.mb.has_items_from(me) {
            return;
        }
        if in_callback {
            if sub.mb.reclaim_or_defer(me) {
                continue;
            }
            return;
        }
        if !sub.mb.wait_turn(me) {
            return;
        }
    }
}

fn run_until_idle(sub: &Sub, me: ThreadToken, nested: &dyn Fn(usize)) {
    run_until_idle_in(sub, me, nested, false, None)
}

/// A callback's publish of `v` to its own (synchronous) subscription: always `Nested`,
/// delivered by the running loop after the current callback.
fn publish_nested(sub: &Sub, v: usize) {
    let me = Some(thread_token());
    let push = sub.mb.push(item(v, false, me), Kind::Synchronous, false);
    assert!(
        matches!(
            push,
            Push::Queued {
                action: Action::Nested,
                ..
            }
        ),
        "a callback's publish to its own subscription is Nested"
    );
}

/// One synchronous publish of `v` (`Subscription::offer`, synchronous kind); `last`:
/// the unsubscribe's final item. False when the mailbox was closed.
fn sync_publish(sub: &Sub, v: usize, last: bool, nested: &dyn Fn(usize)) -> bool {
    let me = thread_token();
    if !last {
        // The common case first, as `Subscription::offer` does.
        match sub.mb.claim_direct(me) {
            Claim::Claimed(_) => {
                run_until_idle_in(sub, me, nested, false, Some(v));
                assert!(
                    sub.log.get().contains(&v),
                    "the publish of {v} returned before its callback ran"
                );
                return true;
            }
            Claim::Closed => return false,
            Claim::Busy => {}
        }
    }
    let action = match sub
        .mb
        .push(item(v, last, Some(me)), Kind::Synchronous, true)
    {
        Push::Queued { action, .. } => action,
        Push::Closed => return false,
        Push::Dropped => panic!("an unbounded mailbox dropped an item"),
    };
    match action {
        Action::RunHere => run_until_idle(sub, me, nested),
        Action::WaitTurn => {
            assert!(
                sub.mb.wait_turn(me),
                "wait_turn gave up although this thread's item is queued"
            );
            run_until_idle(sub, me, nested);
        }
        other => panic!("a synchronous push from outside a callback asked for {other:?}"),
    }
    assert!(
        sub.log.get().contains(&v),
        "the publish of {v} returned before its callback ran"
    );
    true
}

#[test]
fn loom_synchronous_handoff() {
    check("synchronous_handoff", 6, || {
        let sub = Sub::new();
        // Overflow policies do not apply to the synchronous kind (an evicted item would
        // leave its publisher waiting for a turn that never comes): this changes nothing.
        sub.mb.set_overflow(Overflow::DropOldest, 1);

        // Publisher a publishes 1 (whose callback publishes 3 to the same subscription:
        // a nested publish), then 2; publisher b publishes 10.
        let a = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || {
                let nested = |v: usize| {
                    if v == 1 {
                        publish_nested(&sub, 3);
                    }
                };
                assert!(sync_publish(&sub, 1, false, &nested));
                assert!(
                    sub.log.get().contains(&3),
                    "the publish returned before the item its callback published ran"
                );
                assert!(sync_publish(&sub, 2, false, &nested));
            })
        };
        let b = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || assert!(sync_publish(&sub, 10, false, &|_| {})))
        };
        a.join().unwrap();
        b.join().unwrap();

        let log = sub.log.get();
        assert_eq!(
            in_range(&log, 0..10),
            [1, 3, 2],
            "publisher a's order: {log:?}"
        );
        assert_eq!(in_range(&log, 10..20), [10], "publisher b: {log:?}");
        assert_eq!(log.len(), 4, "each item delivered once: {log:?}");
        let st = sub.mb.lock();
        assert!(st.queue().is_empty());
        assert_eq!(st.run(), RunState::Idle);
        assert_eq!((sub.mb.pushed(&st), st.handled), (4, 4));
    });
}

/// The synchronous kind's unsubscribe: the final item runs on the unsubscriber's thread,
/// after every accepted publish, and join waits for it.
#[test]
fn loom_synchronous_final() {
    check("synchronous_final", 3, || {
        let sub = Sub::new();
        let accepted = Arc::new(Log::new());

        let publisher = {
            let (sub, accepted) = (Arc::clone(&sub), Arc::clone(&accepted));
            thread::spawn(move || {
                let mut closed = false;
                for v in [1, 2] {
                    if sync_publish(&sub, v, false, &|_| {}) {
                        assert!(!closed, "a push was accepted after one was refused");
                        accepted.push(v);
                    } else {
                        closed = true;
                    }
                }
            })
        };
        let unsubscriber = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || {
                assert!(
                    sync_publish(&sub, FINAL, true, &|_| {}),
                    "the final item is never refused"
                );
                let me = Some(thread_token());
                let push = sub
                    .mb
                    .push(item(AFTER_FINAL, false, me), Kind::Synchronous, true);
                assert!(
                    matches!(push, Push::Closed),
                    "a push after the final item must be Closed"
                );
            })
        };

        let handled_at_join = sub.join();
        publisher.join().unwrap();
        unsubscriber.join().unwrap();
        assert!(
            handled_at_join,
            "join returned before the final item was handled"
        );
        check_final_delivery(&sub.log.get(), &accepted.get());
        let st = sub.mb.lock();
        assert!(st.done && st.queue().is_empty());
        assert_eq!(st.run(), RunState::Idle);
        assert_eq!(st.handled, sub.mb.pushed(&st));
    });
}

/// A publish from inside another subscription's callback (`may_wait == false`) never
/// waits for another thread's run: it runs the subscription itself when idle, or leaves
/// the item to the running thread (`Deferred`). Publisher a publishes 1 from outside any
/// callback; publisher b, inside a callback of some other subscription, publishes 10.
/// Whoever delivers 10 publishes 11 from that callback (nested). Every item is delivered
/// exactly once, 11 after 10, callbacks never overlap, b never blocks (loom reports a
/// deadlock if the model hangs), and no item is stranded: the mailbox ends empty and
/// idle. Covers the hand-off away from a nested runner too (`reclaim_or_defer`).
#[test]
fn loom_synchronous_deferred() {
    check("synchronous_deferred", 6, || {
        let sub = Sub::new();
        let nested = {
            let sub = Arc::clone(&sub);
            move |v: usize| {
                if v == 10 {
                    publish_nested(&sub, 11);
                }
            }
        };
        let nested = Arc::new(nested);
        let a = {
            let (sub, nested) = (Arc::clone(&sub), Arc::clone(&nested));
            thread::spawn(move || assert!(sync_publish(&sub, 1, false, &*nested)))
        };
        let b = {
            let (sub, nested) = (Arc::clone(&sub), Arc::clone(&nested));
            thread::spawn(move || {
                let me = thread_token();
                // As `Subscription::offer`: the direct claim first, whatever the context.
                match sub.mb.claim_direct(me) {
                    Claim::Claimed(_) => {
                        return run_until_idle_in(&sub, me, &*nested, true, Some(10));
                    }
                    Claim::Closed => panic!("an open mailbox refused a claim"),
                    Claim::Busy => {}
                }
                match sub
                    .mb
                    .push(item(10, false, Some(me)), Kind::Synchronous, false)
                {
                    Push::Queued {
                        action: Action::RunHere,
                        ..
                    } => run_until_idle_in(&sub, me, &*nested, true, None),
                    Push::Queued {
                        action: Action::Deferred,
                        ..
                    } => {}
                    Push::Queued { action, .. } => {
                        panic!("a publish from inside a callback asked for {action:?}")
                    }
                    _ => panic!("an open, unbounded mailbox refused an item"),
                }
            })
        };
        a.join().unwrap();
        b.join().unwrap();

        let log = sub.log.get();
        let mut sorted = log.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [1, 10, 11], "each item delivered once: {log:?}");
        assert_eq!(
            in_range(&log, 10..20),
            [10, 11],
            "nested after its cause: {log:?}"
        );
        let st = sub.mb.lock();
        assert!(st.queue().is_empty(), "an item was stranded: {log:?}");
        assert_eq!(st.run(), RunState::Idle);
        assert_eq!((sub.mb.pushed(&st), st.handled), (3, 3));
    });
}

// ---------------------------------------------------------------------------------------
// Model 5: DropOldest and publish_sync's wait on the handled count.

/// Pushes each value (dedicated kind, may not block), then waits like
/// `Subscription::wait_handled` for the last one. Returns the (value, seq) pairs and
/// what had been delivered when the wait returned.
fn publish_then_wait(sub: &Sub, values: &[usize]) -> (Vec<(usize, u64)>, u64, Vec<usize>) {
    let mut seqs = Vec::new();
    for &v in values {
        match sub.mb.push(item(v, false, None), Kind::Dedicated, false) {
            Push::Queued { seq, .. } => seqs.push((v, seq)),
            Push::Closed => panic!("an open mailbox refused a push"),
            Push::Dropped => panic!("DropOldest dropped the new item"),
        }
    }
    let waited = seqs.last().expect("values is not empty").1;
    sub.mb.wait_until(|st| st.handled() >= waited || st.done);
    (seqs, waited, sub.log.get())
}

#[test]
fn loom_drop_oldest_accounting() {
    check("drop_oldest_accounting", 3, || {
        let sub = Sub::new();
        // As in the library, the first item is the Subscribe message: never evicted.
        let first = sub
            .mb
            .push(item(SUBSCRIBE, false, None), Kind::Dedicated, false);
        assert!(matches!(first, Push::Queued { .. }));
        sub.mb.set_overflow(Overflow::DropOldest, 1);

        let runner = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || sub.dedicated_thread(1))
        };
        let a = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || publish_then_wait(&sub, &[1]))
        };
        let b = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || publish_then_wait(&sub, &[10, 11]))
        };
        let a = a.join().unwrap();
        let b = b.join().unwrap();
        // Both waits returned without an unsubscribe: now stop the runner.
        let final_push = sub.mb.push(item(FINAL, true, None), Kind::Dedicated, false);
        runner.join().unwrap();
        assert!(matches!(final_push, Push::Queued { .. }));

        let log = sub.log.get();
        assert_eq!(
            log.first(),
            Some(&SUBSCRIBE),
            "the first item was evicted: {log:?}"
        );
        assert_eq!(log.last(), Some(&FINAL), "{log:?}");
        let all: Vec<(usize, u64)> = a.0.iter().chain(&b.0).copied().collect();
        for (seqs, waited, seen) in [&a, &b] {
            // Everything up to the awaited item was delivered before the wait returned,
            // or was evicted (and never delivered).
            for &(v, seq) in &all {
                if seq <= *waited {
                    assert!(
                        seen.contains(&v) || !log.contains(&v),
                        "waited for seq {waited} (values {seqs:?}): item {v} (seq {seq}) \
                         was delivered after the wait returned; seen {seen:?}, log {log:?}"
                    );
                }
            }
        }
        let mut by_seq = all.clone();
        by_seq.sort_by_key(|&(_, seq)| seq);
        let delivered: Vec<usize> = by_seq
            .iter()
            .map(|&(v, _)| v)
            .filter(|v| log.contains(v))
            .collect();
        assert_eq!(&log[1..log.len() - 1], delivered, "delivered in seq order");
        let st = sub.mb.lock();
        assert_eq!(
            st.handled,
            sub.mb.pushed(&st),
            "every item counted as handled"
        );
        assert_eq!(
            st.dropped() as usize + log.len(),
            all.len() + 2,
            "every item delivered or dropped"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Model 6: Overflow::Block.

/// A producer blocked on the full queue races the final push and the runner.
#[test]
fn loom_block_overflow() {
    check("block_overflow", 3, || {
        let sub = Sub::new();
        sub.mb.set_overflow(Overflow::Block, 1);
        let accepted = Arc::new(Log::new());

        let runner = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || sub.dedicated_thread(1))
        };
        let producer = {
            let (sub, accepted) = (Arc::clone(&sub), Arc::clone(&accepted));
            thread::spawn(move || produce(&sub, Kind::Dedicated, None, &[1, 2, 3], &accepted))
        };
        let unsubscriber = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || push_final(&sub, Kind::Dedicated, None))
        };
        runner.join().unwrap();
        producer.join().unwrap();
        unsubscriber.join().unwrap();

        check_final_delivery(&sub.log.get(), &accepted.get());
        let st = sub.mb.lock();
        assert!(st.done && st.queue().is_empty());
        assert_eq!(st.policy().blocked, 0);
        assert_eq!(st.dropped(), 0);
    });
}

/// Only the runner taking a batch can release the blocked producer (the final item
/// comes from the producer itself, afterwards): every item gets through.
#[test]
fn loom_block_overflow_runner_makes_room() {
    check("block_overflow_runner_makes_room", 4, || {
        let sub = Sub::new();
        sub.mb.set_overflow(Overflow::Block, 1);
        let accepted = Arc::new(Log::new());

        let runner = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || sub.dedicated_thread(1))
        };
        let producer = {
            let (sub, accepted) = (Arc::clone(&sub), Arc::clone(&accepted));
            thread::spawn(move || {
                produce(&sub, Kind::Dedicated, None, &[1, 2, 3], &accepted);
                push_final(&sub, Kind::Dedicated, None);
            })
        };
        runner.join().unwrap();
        producer.join().unwrap();

        assert_eq!(accepted.get(), [1, 2, 3], "a blocking push was refused");
        check_final_delivery(&sub.log.get(), &accepted.get());
    });
}

/// The runner is stalled (it starts only after the others finished): only the final
/// push can release the blocked producer, whose push is then refused.
#[test]
fn loom_block_overflow_final_releases() {
    check("block_overflow_final_releases", 4, || {
        let sub = Sub::new();
        sub.mb.set_overflow(Overflow::Block, 1);
        let accepted = Arc::new(Log::new());

        let producer = {
            let (sub, accepted) = (Arc::clone(&sub), Arc::clone(&accepted));
            thread::spawn(move || produce(&sub, Kind::Dedicated, None, &[1, 2], &accepted))
        };
        let unsubscriber = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || push_final(&sub, Kind::Dedicated, None))
        };
        let unsubscribed = unsubscriber.join();
        let produced = producer.join();
        let runner = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || sub.dedicated_thread(1))
        };
        runner.join().unwrap();
        unsubscribed.unwrap();
        produced.unwrap();

        check_final_delivery(&sub.log.get(), &accepted.get());
        assert!(accepted.get().len() <= 1, "the limit was exceeded");
    });
}

// ---------------------------------------------------------------------------------------
// Model 7: the lock-free ring in front of the locked queue (two slots under loom).

/// Main takes the Subscribe item as the runner's first batch, which opens the ring (as a
/// runner that keeps going leaves it); returns the runner's token.
fn open_ring_with_first_batch(sub: &Sub, kind: Kind) -> ThreadToken {
    let me = thread_token();
    assert!(matches!(
        sub.mb.push(item(SUBSCRIBE, false, None), kind, true),
        Push::Queued { .. }
    ));
    let mut batch = sub.mb.take_batch(me, kind).expect("the Subscribe item");
    let (n, last) = sub.deliver(&mut batch, &|_| {});
    sub.mb.finish_batch(batch, n, last);
    me
}

/// A dedicated thread that has not parked (ring open) and a producer pushing more than
/// the ring holds: pushes go to the ring, then (full) to the locked queue, closing the
/// ring, then to the ring again once the runner reopened it; the final item races them
/// and the thread parks (closing the ring) and is woken. Everything accepted is
/// delivered once, in order, before the final item; join waits for it; nothing is left
/// in either queue.
#[test]
fn loom_ring_dedicated_full_and_final() {
    check("ring_dedicated_full_and_final", 2, || {
        let sub = Sub::new();
        open_ring_with_first_batch(&sub, Kind::Dedicated);
        let accepted = Arc::new(Log::new());
        let runner = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || sub.dedicated_thread(usize::MAX))
        };
        let producer = {
            let (sub, accepted) = (Arc::clone(&sub), Arc::clone(&accepted));
            thread::spawn(move || produce(&sub, Kind::Dedicated, None, &[1, 2, 3], &accepted))
        };
        let unsubscriber = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || push_final(&sub, Kind::Dedicated, None))
        };
        let handled_at_join = sub.join();
        runner.join().unwrap();
        producer.join().unwrap();
        unsubscriber.join().unwrap();
        assert!(handled_at_join, "join returned before the final item");
        let log = sub.log.get();
        assert_eq!(log.first(), Some(&SUBSCRIBE));
        check_final_delivery(&log[1..], &accepted.get());
        let st = sub.mb.lock();
        assert!(st.done && st.queue().is_empty());
        assert_eq!(sub.mb.len(), 0, "items stranded in the ring: {log:?}");
        assert_eq!(st.handled, sub.mb.pushed(&st));
    });
}

/// A pool subscription scheduled with its ring open; two producers push (one more than
/// the ring holds), a worker serves the run queue until nothing is left. The worker goes
/// idle only after closing an empty ring, so a push either lands in the ring before
/// that (and is taken) or takes the lock and schedules: nothing is stranded, the
/// mailbox is never scheduled twice, each producer's order holds.
#[test]
fn loom_ring_pool_idle_vs_push() {
    check("ring_pool_idle_vs_push", 2, || {
        let sub = Sub::new();
        let pool = Pool::new(2);
        // As `run_pool_turn` with a quota of one batch: the mailbox goes back on the run
        // queue, ring open.
        open_ring_with_first_batch(&sub, Kind::Pool);
        sub.mb.reschedule();
        pool.schedule();
        let producer = |values: &'static [usize]| {
            let (sub, pool) = (Arc::clone(&sub), Arc::clone(&pool));
            thread::spawn(move || {
                for &v in values {
                    assert!(matches!(
                        pool.push(&sub, item(v, false, None)),
                        Push::Queued { .. }
                    ));
                }
                pool.feeder_done();
            })
        };
        let p0 = producer(&[0, 1]);
        let p1 = producer(&[10]);
        pool.worker(&sub, false);
        p0.join().unwrap();
        p1.join().unwrap();
        let log = sub.log.get();
        assert_eq!(log.first(), Some(&SUBSCRIBE));
        let mut sorted = log[1..].to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 10], "each item delivered once: {log:?}");
        assert_eq!(in_range(&log, 0..10), [0, 1], "producer 0's order: {log:?}");
        let st = sub.mb.lock();
        assert!(st.queue().is_empty());
        assert_eq!(sub.mb.len(), 0, "items stranded in the ring: {log:?}");
        assert_eq!(st.run(), RunState::Idle, "a lost wake-up / stuck state");
        assert_eq!((sub.mb.pushed(&st), st.handled), (4, 4));
    });
}

/// `publish_sync` through the ring: a waiter for the item it pushed returns once that
/// item and every earlier one was delivered, whichever queue each went through.
#[test]
fn loom_ring_sync_waiter_seq() {
    check("ring_sync_waiter_seq", 2, || {
        let sub = Sub::new();
        open_ring_with_first_batch(&sub, Kind::Dedicated);
        let runner = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || sub.dedicated_thread(usize::MAX))
        };
        let waiter = {
            let sub = Arc::clone(&sub);
            thread::spawn(move || {
                let mut seqs = Vec::new();
                for v in [1, 2, 3] {
                    match sub.mb.push(item(v, false, None), Kind::Dedicated, true) {
                        Push::Queued { seq, .. } => seqs.push(seq),
                        _ => panic!("refused"),
                    }
                }
                assert_eq!(seqs, [2, 3, 4], "sequence numbers count both queues");
                sub.mb.wait_until(|st| st.handled() >= 4 || st.done);
                let log = sub.log.get();
                assert_eq!(
                    log,
                    [SUBSCRIBE, 1, 2, 3],
                    "returned before its item was handled"
                );
            })
        };
        waiter.join().unwrap();
        push_final(&sub, Kind::Dedicated, None);
        runner.join().unwrap();
    });
}
