//! A subscription's mailbox: its queue of pending deliveries and the scheduling state
//! machine that makes its callbacks run one at a time.
//!
//! The state lives under one small mutex. A runner holds it to take the whole queue as
//! one batch (a swap: two buffers ping-pong between producer and runner, no allocation at
//! steady state), so it touches the lock once per batch, not once per message, and the
//! state machine (idle / scheduled / running) is trivially consistent with the queue it
//! describes.
//!
//! A publisher pushes without the lock while a runner is active: into the subscription's
//! lock-free ring (`ring`), allocated on the first burst, open only while the runner is
//! committed to look again, so such a push never has to wake or schedule anybody. Every
//! other push (an idle or parked runner, a full ring, the final message, an overflow
//! policy or congestion limits in force, the synchronous kind) takes the lock, closes
//! the ring and uses the locked queue as before. The runner drains the ring before the
//! locked queue and reopens the ring only once the locked queue is empty, so each
//! publishing thread's items keep their order across the two.

use crate::message::MessageRef;
use crate::ring::{Rest, Ring, RING_SLOTS};
use crate::subscription::releasing;
use crate::sync::{
    spin_pause, thread_token, AtomicPtr, AtomicU32, Condvar, Mutex, MutexGuard, ThreadToken,
};
use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::atomic::Ordering;

/// One pending delivery.
pub(crate) struct Item {
    pub(crate) msg: MessageRef,
    /// The Unsubscribe change message: always the last item a mailbox ever holds.
    pub(crate) last: bool,
    /// Synchronous kind only: the publishing thread, which must run the callback. None:
    /// whichever thread runs the subscription delivers it (a deferred publish, see
    /// `Action::Deferred`).
    pub(crate) from: Option<ThreadToken>,
}

/// Who runs the callbacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A thread of the subscription's own.
    Dedicated,
    /// The shared worker pool.
    Pool,
    /// The publisher's thread, inside `publish`.
    Synchronous,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunState {
    /// Nothing queued and nobody running.
    Idle,
    /// Handed to the pool; a worker will run it.
    Scheduled,
    /// A thread is delivering a batch.
    Running(ThreadToken),
}

/// A `RunState` in one word, as `State` keeps it (the enum takes two: its tag beside the
/// token): 0 idle, `u64::MAX` scheduled, `u64::MAX - 1` idle with the dedicated thread
/// parked on `wake` (a flag of its own took a byte the state had no room for), else
/// the running thread's token (tokens count up from 1 and never get near those).
#[derive(Clone, Copy)]
struct RunWord(u64);

const RUN_SCHEDULED: u64 = u64::MAX;
const RUN_PARKED: u64 = u64::MAX - 1;

impl RunWord {
    fn new(run: RunState) -> RunWord {
        RunWord(match run {
            RunState::Idle => 0,
            RunState::Scheduled => RUN_SCHEDULED,
            RunState::Running(t) => t.number().get(),
        })
    }

    fn get(self) -> RunState {
        match NonZeroU64::new(self.0) {
            None => RunState::Idle,
            Some(t) if t.get() == RUN_SCHEDULED => RunState::Scheduled,
            Some(t) if t.get() == RUN_PARKED => RunState::Idle,
            Some(t) => RunState::Running(ThreadToken::from_number(t)),
        }
    }
}

/// What the pusher must do once it has released the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Somebody already runs or will run the queue.
    Nothing,
    /// Hand the subscription to the pool (it went idle -> scheduled).
    Schedule,
    /// Wake the dedicated thread, which is parked.
    Wake,
    /// Synchronous kind, idle: run on this thread now, starting with the queue (where
    /// the item is). The common synchronous publish does not get here: it claims the
    /// idle mailbox for the message it holds (`claim_direct`); the final message and a
    /// claim that lost a race do.
    RunHere,
    /// Synchronous kind, running on another thread: wait until the run is handed to
    /// this thread (its item reached the head of the queue), then run.
    WaitTurn,
    /// Synchronous kind, running on this very thread (a callback published): the
    /// running loop delivers it after the current callback returns.
    Nested,
    /// Synchronous kind, running on another thread, and the caller may not wait (it is
    /// inside a callback: the thread it would wait for might be waiting for it). The
    /// item was queued for any runner; the running thread delivers it.
    Deferred,
}

/// What a subscription does with a message when its queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// No limit (the default, as in Stasis).
    Unbounded,
    /// Drop the oldest queued message to make room.
    DropOldest,
    /// Drop the new message.
    DropNewest,
    /// The publisher waits for room (except a publisher that is this subscription's own
    /// runner, which could never see room and is let through).
    Block,
}

/// What `take_locked` found.
enum Take {
    Batch(VecDeque<Item>),
    /// Nothing queued: the runner is idle now.
    Empty,
    /// Synchronous kind: the run was handed to the thread whose item is at the head.
    HandedOff,
    /// Nothing taken, but a producer is writing the ring's next slot: try again.
    Pending,
}

/// What `claim_direct` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The caller runs the mailbox now, with its message as a batch of one numbered so.
    Claimed(u64),
    /// Somebody runs it or items wait: the caller takes the general path (`push`).
    Busy,
    /// The final message was queued: nothing is delivered after it.
    Closed,
}

pub(crate) enum Push {
    /// The mailbox is closed (final message queued): nothing is delivered after it.
    Closed,
    /// The queue was full and the policy dropped this message.
    Dropped,
    Queued {
        /// Sequence number of this item: `handled() >= seq` once it was delivered.
        seq: u64,
        action: Action,
        /// The queue just crossed its high-water mark.
        congested: Option<usize>,
    },
}

/// The locked queue and the runner's spare buffer (see `State::bufs`).
#[derive(Default)]
struct Buffers {
    queue: VecDeque<Item>,
    /// The runner's empty buffer, swapped in when it takes a batch.
    spare: VecDeque<Item>,
}

pub(crate) struct State {
    /// None while the queue and the spare buffer are both unallocated: a subscription
    /// that is idle and was never busy holds 8 bytes here, not the two deques' 64 (see
    /// `release_small_buffers`; 100,000 such subscriptions are W8's case).
    bufs: Option<Box<Buffers>>,
    run: RunWord,
    closed: bool,
    pub(crate) done: bool,
    /// Items queued through the locked queue (the ring counts its own).
    pushed: u64,
    handled: u64,
    /// Threads blocked in join or in a synchronous wait.
    waiters: u32,
    congested: bool,
    /// Congestion limits, overflow policy and what they counted: None (no allocation)
    /// while the limits are the defaults and nothing was dropped or warned about, as for
    /// almost every subscription.
    policy: Option<Box<Policy>>,
    /// Size of the batch being delivered (saturating: 4 bytes fit the state in 56).
    in_flight: u32,
    /// The queue's front item is the first one ever pushed (the Subscribe change
    /// message) and has not been taken yet: DropOldest never evicts it.
    first_pending: bool,
    /// The longest the queue has been (saturating; it sits in what was padding).
    queued_max: u32,
}

/// A subscription's queue figures (`Subscription::stats`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct QueueStats {
    pub(crate) delivered: u64,
    pub(crate) dropped: u64,
    pub(crate) congestion_warnings: u64,
    pub(crate) queued: u64,
    pub(crate) queued_max: u64,
    /// Above its high-water mark now (and not yet back under its low-water mark).
    pub(crate) congested: bool,
}

/// A subscription's queue limits and what they counted (allocated once either is not
/// the default).
#[derive(Clone)]
pub(crate) struct Policy {
    low_water: usize,
    high_water: usize,
    overflow: Overflow,
    limit: usize,
    dropped: u64,
    /// High-water warnings so far.
    congestion_warnings: u64,
    /// Publishers waiting for room (Overflow::Block).
    blocked: u32,
    /// Items evicted while a batch ran: counted as handled when that batch is.
    evicted_pending: u64,
    /// Items evicted so far (DropOldest): counted as handled, never delivered.
    evicted: u64,
}

static DEFAULT_POLICY: Policy = Policy {
    // Half, not nine tenths: a subscriber keeping up with bursts of a few thousand saw
    // its backlog swing between 6,000 and 12,000, and with the low mark at 9,000 was
    // warned at every burst (644 lines in 8 s).
    low_water: DEFAULT_HIGH_WATER / 2,
    high_water: DEFAULT_HIGH_WATER,
    overflow: Overflow::Unbounded,
    limit: usize::MAX,
    dropped: 0,
    congestion_warnings: 0,
    blocked: 0,
    evicted_pending: 0,
    evicted: 0,
};

/// `repr(C)`: the fields written rarely come first, so that they (not the lock and the
/// length, written per message) sit next to the subscription's read-mostly fields.
#[repr(C)]
pub(crate) struct Mailbox {
    /// The lock-free ring (see the module comment): null until the first burst, then
    /// set once (under the lock) and freed with the mailbox.
    ring: AtomicPtr<Ring>,
    /// Wakes a parked dedicated thread.
    wake: Condvar,
    /// Wakes joiners and synchronous waiters when items are handled, and publishers
    /// blocked on a full queue when there is room. One condvar for both (notified with
    /// `notify_all` only, every waiter re-checking its own condition): the two kinds of
    /// waiters are rare, together rarer still, and a second condvar cost 4 bytes of
    /// every subscription.
    progress: Condvar,
    /// Mirror of `State::done` (`DONE`), for lock-free peeks (a joiner spins before it
    /// sleeps); and `ALERT_CHANGED`: the queue fell back under its low-water mark (or
    /// the subscription ended congested), and the runner has not told the alert
    /// registry yet (`take_alert_changed`).
    done: AtomicU32,
    /// Locked queue length, published for lock-free peeks (spin-before-park).
    len: AtomicU32,
    state: Mutex<State>,
}

pub(crate) const DEFAULT_HIGH_WATER: usize = 10_000;
const DONE: u32 = 1;
const ALERT_CHANGED: u32 = 2;

impl Mailbox {
    /// Offset of the first field written on every push or batch.
    #[cfg(not(loom))]
    pub(crate) const FIRST_HOT_OFFSET: usize = std::mem::offset_of!(Mailbox, len);

    pub(crate) fn new() -> Mailbox {
        Mailbox {
            state: Mutex::new(State {
                bufs: None,
                run: RunWord::new(RunState::Idle),
                closed: false,
                done: false,
                pushed: 0,
                handled: 0,
                waiters: 0,
                congested: false,
                policy: None,
                in_flight: 0,
                first_pending: false,
                queued_max: 0,
            }),
            ring: AtomicPtr::new(std::ptr::null_mut()),
            wake: Condvar::new(),
            progress: Condvar::new(),
            len: AtomicU32::new(0),
            done: AtomicU32::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn ring(&self) -> Option<&Ring> {
        let ring = self.ring.load(Ordering::Acquire);
        // SAFETY: a non-null pointer is a `Box<Ring>` leaked by `ring_for_burst` (the
        // acquire load saw its release store), freed only by `Drop`, which has `&mut self`.
        unsafe { ring.as_ref() }
    }

    /// Publishes the locked queue's length (saturating: it is only a peek).
    fn store_len(&self, len: usize) {
        self.len
            .store(u32::try_from(len).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    /// Items in the ring (exact under the lock once the ring is closed).
    fn ring_len(&self) -> usize {
        self.ring().map_or(0, Ring::len)
    }

    /// Items ever queued, locked and ring (the models' accounting checks).
    #[cfg(all(loom, test))]
    pub(crate) fn pushed(&self, st: &State) -> u64 {
        st.pushed + self.ring_claimed()
    }

    /// Items the ring ever took (exact under the lock while it is closed).
    fn ring_claimed(&self) -> u64 {
        self.ring().map_or(0, |r| r.claimed() as u64)
    }

    /// The final message was handled (lock-free peek).
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire) & DONE != 0
    }

    /// The congestion state changed to "not congested" since the last call (one relaxed
    /// load when it did not: runners call this after their batches).
    pub(crate) fn take_alert_changed(&self) -> bool {
        self.done.load(Ordering::Relaxed) & ALERT_CHANGED != 0
            && self.done.fetch_and(!ALERT_CHANGED, Ordering::AcqRel) & ALERT_CHANGED != 0
    }

    /// Above the high-water mark now (not yet back under the low-water mark).
    pub(crate) fn is_congested(&self) -> bool {
        let st = self.state.lock();
        st.congested && !st.done
    }

    pub(crate) fn stats(&self) -> QueueStats {
        let st = self.state.lock();
        let p = st.policy();
        QueueStats {
            // `handled` counts evictions once the batch ahead of them is done.
            delivered: st.handled - (p.evicted - p.evicted_pending),
            dropped: p.dropped,
            congestion_warnings: p.congestion_warnings,
            queued: (st.queue().len() + self.ring_len()) as u64,
            queued_max: u64::from(st.queued_max),
            congested: st.congested && !st.done,
        }
    }

    /// The runner's look, without the lock, at whether anything waits: the locked
    /// queue's length and the ring's next slot. Unlike `len` it leaves the ring's tail
    /// alone (see `Ring::rest`); a claim not yet written reads as nothing yet.
    pub(crate) fn runner_sees_items(&self) -> bool {
        self.len.load(Ordering::Relaxed) > 0 || self.ring().is_some_and(|r| r.peek(0))
    }

    /// The runner's look at whether at least `n` (> 0) items wait, as `runner_sees_items`
    /// does: the ring's part by the `n`th slot from its head.
    pub(crate) fn runner_sees_at_least(&self, n: usize) -> bool {
        let locked = self.len.load(Ordering::Relaxed) as usize;
        locked >= n || self.ring().is_some_and(|r| r.peek(n - locked - 1))
    }

    /// Queued and not taken yet: the locked queue and the ring (a racy snapshot).
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed) as usize + self.ring_len()
    }

    /// High-water warnings so far.
    pub(crate) fn congestion_warnings(&self) -> u64 {
        self.state.lock().policy().congestion_warnings
    }

    /// Queues `item`; a `last` item closes the mailbox and is never refused or dropped.
    /// For the synchronous kind, `item.from` is the calling thread. `may_wait`: the
    /// caller may block, for room in a full queue or for another thread's synchronous
    /// run (it is not this mailbox's runner, nor inside any callback).
    pub(crate) fn push(&self, item: Item, kind: Kind, may_wait: bool) -> Push {
        let item = match self.ring() {
            // The lock-free path (synchronous items carry their thread: never in the ring).
            Some(ring) if !item.last && item.from.is_none() => match ring.try_push(item.msg) {
                Ok(seq) => {
                    return Push::Queued {
                        seq,
                        action: Action::Nothing,
                        congested: None,
                    }
                }
                Err(msg) => Item { msg, ..item },
            },
            _ => item,
        };
        let me = item.from;
        let mut st = self.state.lock();
        // Everything queued from now on goes after what the ring holds.
        if let Some(ring) = self.ring() {
            if ring.is_open() {
                ring.close();
            }
        }
        let mut evicted = None;
        // Synchronous queues only ever hold the items of publishers waiting for their
        // turn; dropping one would leave its publisher waiting forever.
        if !item.last
            && kind != Kind::Synchronous
            && st.queue().len() >= st.policy().limit
            && !st.closed
        {
            match st.policy().overflow {
                Overflow::Unbounded => {}
                Overflow::DropNewest => {
                    st.policy_mut().dropped += 1;
                    drop(st);
                    drop(item); // may run a dtor: outside the lock
                    return Push::Dropped;
                }
                // The subscription's first message (its Subscribe change) is never
                // dropped, like its final one: evict the oldest after it, if any.
                Overflow::DropOldest if st.first_pending && st.queue().len() < 2 => {}
                Overflow::DropOldest => {
                    evicted = if st.first_pending {
                        st.queue_mut().remove(1)
                    } else {
                        st.queue_mut().pop_front()
                    };
                    st.policy_mut().dropped += 1;
                    st.policy_mut().evicted += 1;
                    // An evicted item counts as handled (publish_sync waiters wait on the
                    // count), but not before the batch ahead of it is.
                    if matches!(st.run(), RunState::Running(_)) {
                        st.policy_mut().evicted_pending += 1;
                    } else {
                        st.handled += 1;
                        if st.waiters > 0 {
                            self.progress.notify_all();
                        }
                    }
                }
                Overflow::Block if may_wait => {
                    st.policy_mut().blocked += 1;
                    while st.queue().len() >= st.policy().limit
                        && !st.closed
                        && st.policy().overflow == Overflow::Block
                    {
                        self.progress.wait(&mut st);
                    }
                    st.policy_mut().blocked -= 1;
                }
                Overflow::Block => {}
            }
        }
        if st.closed {
            drop(st);
            drop(item);
            return Push::Closed;
        }
        if item.last {
            st.closed = true;
            if st.policy().blocked > 0 {
                self.progress.notify_all();
            }
        }
        st.queue_mut().push_back(item);
        let ring_claimed = self.ring_claimed();
        if st.pushed == 0 && ring_claimed == 0 {
            st.first_pending = true;
        }
        st.pushed += 1;
        let seq = st.pushed + ring_claimed;
        let len = st.queue().len();
        self.store_len(len);
        let queued = len + self.ring_len();
        st.note_queued(queued);
        // Congestion counts the whole backlog: queued plus the batch being delivered.
        let backlog = queued + st.in_flight as usize;
        let congested = if backlog > st.policy().high_water && !st.congested {
            st.congested = true;
            // Allocates the policy on the first warning: the counter lives there so that
            // the mailbox of a subscription that never congests is 8 bytes smaller.
            st.policy_mut().congestion_warnings += 1;
            Some(backlog)
        } else {
            None
        };
        let action = match kind {
            Kind::Dedicated if st.parked() => Action::Wake,
            Kind::Dedicated => Action::Nothing,
            Kind::Pool => match st.run() {
                RunState::Idle => {
                    st.set_run(RunState::Scheduled);
                    Action::Schedule
                }
                _ => Action::Nothing,
            },
            Kind::Synchronous => match st.run() {
                RunState::Idle => {
                    let me = me.unwrap_or_else(thread_token);
                    st.set_run(RunState::Running(me));
                    Action::RunHere
                }
                RunState::Running(t) if Some(t) == me => Action::Nested,
                _ if may_wait => Action::WaitTurn,
                _ => Action::Deferred,
            },
        };
        if action == Action::Deferred {
            st.queue_mut().back_mut().expect("just pushed").from = None;
        }
        drop(st);
        drop(evicted); // may run a dtor: outside the lock
        if action == Action::Wake {
            self.wake.notify_one();
        }
        Push::Queued {
            seq,
            action,
            congested,
        }
    }

    /// Synchronous kind, an item that is not the final one: when nobody runs the
    /// mailbox and nothing is queued, marks it running on `me` with a batch of one that
    /// never enters the queue, as `push` does for such an item, but without an `Item`:
    /// the caller delivers the message it holds (no count taken on it) and then calls
    /// `finish_one_and_take`. The common synchronous publish is this and that, one
    /// acquisition of the lock each.
    pub(crate) fn claim_direct(&self, me: ThreadToken) -> Claim {
        let mut st = self.state.lock();
        if st.closed {
            return Claim::Closed;
        }
        if st.run() != RunState::Idle || !st.queue().is_empty() {
            return Claim::Busy;
        }
        st.pushed += 1;
        st.start_batch(me, 1);
        Claim::Claimed(st.pushed)
    }

    /// After the delivery of a `claim_direct` batch (never the final message): counts it
    /// handled and takes the next batch as `finish_and_take` does.
    pub(crate) fn finish_one_and_take(&self, me: ThreadToken) -> Option<VecDeque<Item>> {
        let mut st = self.state.lock();
        let notify = self.count_finished(&mut st, 1, false);
        let (next, handed_off) = self.take_retrying(st, me, Kind::Synchronous);
        if notify || handed_off {
            self.progress.notify_all();
        }
        next
    }

    /// Takes everything queued as one batch and marks the mailbox running on `me`; when
    /// the queue is empty, marks it idle and returns None.
    ///
    /// Synchronous kind: a callback runs on its publisher's thread, so the batch is only
    /// the leading items `me` published. When the head belongs to another thread, the run
    /// is handed to that thread (waiting in `wait_turn`) and this runner stops.
    pub(crate) fn take_batch(&self, me: ThreadToken, kind: Kind) -> Option<VecDeque<Item>> {
        let st = self.state.lock();
        let (batch, handed_off) = self.take_retrying(st, me, kind);
        if handed_off {
            self.progress.notify_all();
        }
        batch
    }

    /// `finish_batch`, then `take_batch`, under one acquisition of the lock: a runner
    /// that keeps up with its publisher (batches of one) takes the lock twice per message
    /// instead of four times, and the lock's cache line moves between cores less.
    pub(crate) fn finish_and_take(
        &self,
        batch: VecDeque<Item>,
        n: usize,
        last: bool,
        me: ThreadToken,
        kind: Kind,
    ) -> Option<VecDeque<Item>> {
        let mut st = self.state.lock();
        let finished = self.finish_locked(&mut st, batch, n, last);
        let (next, handed_off) = self.take_retrying(st, me, kind);
        if finished || handed_off {
            self.progress.notify_all();
        }
        next
    }

    /// `take_locked`, waiting out a producer that claimed a ring slot and has not
    /// written it yet (the lock released meanwhile); releases the lock.
    fn take_retrying<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        me: ThreadToken,
        kind: Kind,
    ) -> (Option<VecDeque<Item>>, bool) {
        loop {
            match self.take_locked(&mut st, me, kind, kind == Kind::Pool) {
                Take::Batch(batch) => return (Some(batch), false),
                Take::Empty if kind == Kind::Pool => {
                    // The subscription just went idle, and its worker still holds a
                    // reference, which it drops after this returns. From now on a publish
                    // can schedule it on another worker, which may deliver the final
                    // message before this one has let go: the releasing window starts
                    // here, under the lock, so that a join of that final message waits
                    // for this reference too (the worker leaves the window once it
                    // dropped it; `Turn::Idle`).
                    releasing::enter(releasing::Key::of(self));
                    return (None, false);
                }
                Take::Empty => return (None, false),
                Take::HandedOff => return (None, true),
                Take::Pending => {
                    drop(st);
                    spin_pause();
                    st = self.state.lock();
                }
            }
        }
    }

    /// Dedicated kind: blocks until something is queued, then takes it as a batch
    /// (waiting for a push and `take_batch` under one acquisition of the lock). The ring
    /// is closed before the thread parks, so every later push takes the lock and sees
    /// `parked`.
    pub(crate) fn park_and_take(&self, me: ThreadToken, kind: Kind) -> Option<VecDeque<Item>> {
        let mut st = self.state.lock();
        loop {
            match self.take_locked(&mut st, me, kind, true) {
                Take::Batch(batch) => return Some(batch),
                Take::HandedOff => {
                    drop(st);
                    self.progress.notify_all();
                    return None;
                }
                Take::Pending => {
                    drop(st);
                    spin_pause();
                    st = self.state.lock();
                }
                Take::Empty => {
                    st.set_parked(true);
                    self.wake.wait(&mut st);
                    st.set_parked(false);
                }
            }
        }
    }

    /// `take_batch` with the lock held. `close_when_empty`: when nothing is queued,
    /// close the ring too (the runner goes idle or parks; a dedicated thread that will
    /// spin first leaves it open).
    fn take_locked(
        &self,
        st: &mut State,
        me: ThreadToken,
        kind: Kind,
        close_when_empty: bool,
    ) -> Take {
        if kind == Kind::Synchronous {
            return self.take_synchronous(st, me);
        }
        let ring = self.ring();
        let mut batch = st.take_spare();
        loop {
            if let Some(r) = ring {
                r.drain(|msg| {
                    batch.push_back(Item {
                        msg,
                        last: false,
                        from: None,
                    })
                });
            }
            // Whether a claimed slot is still being written matters only when nothing
            // was taken or the locked queue waits: `Ring::rest` reads the tail.
            let rest = match ring {
                Some(r) if batch.is_empty() || !st.queue().is_empty() => r.rest(),
                _ => Rest::Empty,
            };
            // The locked queue only holds items queued after all the ring's.
            if rest == Rest::Empty && !st.queue().is_empty() {
                if batch.is_empty() {
                    std::mem::swap(&mut batch, st.queue_mut());
                } else {
                    batch.extend(st.queue_mut().drain(..));
                }
            }
            if !batch.is_empty() {
                break;
            }
            st.set_spare(batch);
            if rest == Rest::Pending {
                return Take::Pending;
            }
            if close_when_empty && !ring.is_none_or(Ring::close_if_empty) {
                // A producer claimed a slot since the drain: take it.
                batch = st.take_spare();
                continue;
            }
            st.set_run(RunState::Idle);
            st.release_small_buffers();
            return Take::Empty;
        }
        // What waited when the runner came: the batch, and what stays behind a claim
        // still being written.
        st.note_queued(batch.len() + st.queue().len());
        self.store_len(st.queue().len());
        st.start_batch(me, batch.len());
        if st.policy().blocked > 0 {
            self.progress.notify_all();
        }
        self.open_ring(st, batch.len());
        Take::Batch(batch)
    }

    /// The synchronous kind's `take_locked` (no ring): the batch is only the leading
    /// items `me` published; when the head belongs to another thread, the run is handed
    /// to that thread.
    fn take_synchronous(&self, st: &mut State, me: ThreadToken) -> Take {
        let Some(head_from) = st.queue().front().map(|i| i.from) else {
            st.set_run(RunState::Idle);
            st.release_small_buffers();
            return Take::Empty;
        };
        if let Some(owner) = head_from.filter(|t| *t != me) {
            st.set_run(RunState::Running(owner));
            return Take::HandedOff;
        }
        let mut batch = st.take_spare();
        while st
            .queue()
            .front()
            .is_some_and(|i| i.from.is_none_or(|t| t == me))
        {
            batch.extend(st.queue_mut().pop_front());
        }
        self.store_len(st.queue().len());
        st.start_batch(me, batch.len());
        Take::Batch(batch)
    }

    /// After a take (lock held, `n` items taken): opens the ring for lock-free pushes
    /// when nothing forces the locked path. It stays closed while an overflow policy is
    /// in force, and while a full ring on top of the batch could cross the high-water
    /// mark unseen (the locked push is where congestion is counted).
    fn open_ring(&self, st: &State, n: usize) {
        let p = st.policy();
        if st.closed
            || !st.queue().is_empty()
            || p.overflow != Overflow::Unbounded
            || n + RING_SLOTS > p.high_water
        {
            return;
        }
        let Some(ring) = self.ring().or_else(|| self.ring_for_burst(st, n)) else {
            return;
        };
        if !ring.is_open() {
            ring.open(st.pushed);
        }
    }

    /// Allocates the ring once the subscription sees a burst (a batch of
    /// `RING_AFTER_BATCH` or more): an idle or lightly used subscription carries none.
    fn ring_for_burst(&self, st: &State, n: usize) -> Option<&Ring> {
        if n < RING_AFTER_BATCH || st.closed {
            return None;
        }
        let ring = Box::into_raw(Box::new(Ring::new()));
        self.ring.store(ring, Ordering::Release);
        self.ring()
    }

    /// Returns the drained batch buffer for reuse and records `n` deliveries; `last`
    /// says the final message was among them.
    pub(crate) fn finish_batch(&self, batch: VecDeque<Item>, n: usize, last: bool) {
        let mut st = self.state.lock();
        let notify = self.finish_locked(&mut st, batch, n, last);
        drop(st);
        if notify {
            self.progress.notify_all();
        }
    }

    /// `finish_batch` with the lock held; says whether waiters must be woken.
    fn finish_locked(&self, st: &mut State, batch: VecDeque<Item>, n: usize, last: bool) -> bool {
        // A buffer that grew with a backlog is given back once drained, not kept as the
        // spare: a backlog of a million messages left 24 MB behind.
        let spare_capacity = st.bufs.as_ref().map_or(0, |b| b.spare.capacity());
        if spare_capacity < batch.capacity() && batch.capacity() <= KEEP_BUFFER_MAX {
            st.set_spare(batch);
        } else {
            drop(batch);
        }
        if let Some(b) = st.bufs.as_deref_mut() {
            if b.queue.is_empty() && b.queue.capacity() > KEEP_BUFFER_MAX {
                b.queue = VecDeque::new();
            }
        }
        self.count_finished(st, n, last)
    }

    /// Records `n` deliveries (lock held); `last`: the final message was among them.
    /// Says whether waiters must be woken.
    fn count_finished(&self, st: &mut State, n: usize, last: bool) -> bool {
        let evicted =
            (st.policy.as_deref_mut()).map_or(0, |p| std::mem::take(&mut p.evicted_pending));
        st.handled += n as u64 + evicted;
        st.in_flight = 0;
        if st.congested && (last || st.queue().len() < st.policy().low_water) {
            st.congested = false;
            self.done.fetch_or(ALERT_CHANGED, Ordering::Release);
        }
        if last {
            st.done = true;
            self.done.fetch_or(DONE, Ordering::Release);
            st.bufs = None;
        }
        st.waiters > 0
    }

    /// Marks a pool subscription scheduled again (the worker yields it for fairness).
    pub(crate) fn reschedule(&self) {
        self.state.lock().set_run(RunState::Scheduled);
    }

    /// The thread delivering a batch now, if any.
    pub(crate) fn runner(&self) -> Option<ThreadToken> {
        match self.state.lock().run() {
            RunState::Running(t) => Some(t),
            _ => None,
        }
    }

    /// Synchronous kind, after the run was handed to another thread: if it came back to
    /// `me`, true (run again); else marks the items `me` published as any runner's and
    /// returns false, so `me` need not wait for the run to come back.
    pub(crate) fn reclaim_or_defer(&self, me: ThreadToken) -> bool {
        let mut st = self.state.lock();
        if st.run() == RunState::Running(me) {
            return true;
        }
        let queue = st.bufs.iter_mut().flat_map(|b| b.queue.iter_mut());
        for item in queue.filter(|i| i.from == Some(me)) {
            item.from = None;
        }
        false
    }

    /// Synchronous kind: are items published by `me` still queued?
    pub(crate) fn has_items_from(&self, me: ThreadToken) -> bool {
        self.state.lock().queue().iter().any(|i| i.from == Some(me))
    }

    /// Synchronous kind: blocks until the run is handed to `me` (true) or the mailbox is
    /// done (false).
    pub(crate) fn wait_turn(&self, me: ThreadToken) -> bool {
        let mut st = self.state.lock();
        st.waiters += 1;
        while st.run() != RunState::Running(me) && !st.done {
            self.progress.wait(&mut st);
        }
        st.waiters -= 1;
        st.run() == RunState::Running(me)
    }

    /// Blocks until `cond(state)` holds.
    pub(crate) fn wait_until(&self, cond: impl Fn(&State) -> bool) {
        let mut st = self.state.lock();
        if cond(&st) {
            return;
        }
        st.waiters += 1;
        while !cond(&st) {
            self.progress.wait(&mut st);
        }
        st.waiters -= 1;
    }

    pub(crate) fn set_overflow(&self, policy: Overflow, limit: usize) {
        let mut st = self.state.lock();
        self.absorb_ring(&mut st);
        let p = st.policy_mut();
        p.overflow = policy;
        p.limit = if policy == Overflow::Unbounded {
            usize::MAX
        } else {
            limit
        };
        if p.blocked > 0 {
            self.progress.notify_all();
        }
    }

    pub(crate) fn set_limits(&self, low: usize, high: usize) {
        let mut st = self.state.lock();
        self.absorb_ring(&mut st);
        let p = st.policy_mut();
        p.low_water = low;
        p.high_water = high;
        st.congested = st.queue().len() + st.in_flight as usize > high;
    }
}

impl Mailbox {
    /// Closes the ring and moves what it holds to the locked queue (lock held), before
    /// an overflow policy or congestion limits take effect: they are enforced on the
    /// locked queue, and the ring stays closed while they are not the defaults. The ring
    /// is open only while the locked queue is empty, so its items go first.
    fn absorb_ring(&self, st: &mut MutexGuard<'_, State>) {
        let Some(ring) = self.ring() else {
            return;
        };
        ring.close();
        let mut moved = VecDeque::new();
        // A producer that claimed a slot before the close is a few instructions from
        // writing it; it needs no lock to finish.
        while {
            ring.drain(|msg| {
                moved.push_back(Item {
                    msg,
                    last: false,
                    from: None,
                })
            });
            ring.rest() == Rest::Pending
        } {
            spin_pause();
        }
        if !moved.is_empty() {
            // The ring's items were counted when claimed: the locked count takes them
            // over, so sequence numbers stay what the pushes returned.
            let queue = st.queue_mut();
            moved.append(queue);
            *queue = moved;
            let len = queue.len();
            self.store_len(len);
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let ring = self.ring.load(Ordering::Acquire);
        if !ring.is_null() {
            // SAFETY: set once from `Box::into_raw` (`ring_for_burst`); nobody else holds
            // the mailbox any more.
            drop(unsafe { Box::from_raw(ring) });
        }
    }
}

/// A batch buffer that grew past this many items is freed once drained (24 bytes an
/// item: 96 KB), so a backlog's queue memory goes back to the allocator.
const KEEP_BUFFER_MAX: usize = 4096;

/// A batch of this many items is a burst: the subscription gets its ring.
#[cfg(not(loom))]
const RING_AFTER_BATCH: usize = 4;
/// Every batch: the models exercise the ring from the first take.
#[cfg(loom)]
const RING_AFTER_BATCH: usize = 1;

/// Buffers up to this many items are freed when the mailbox goes idle, until it has
/// delivered `KEEP_BUFFERS_AFTER` messages: a hundred thousand subscriptions that saw a
/// message or two (one per call, say) then hold no queue memory, while a busy one keeps
/// its buffers and allocates nothing at steady state, even when its runner keeps up
/// and every message makes it go idle (batches of one).
const SMALL_BUFFER: usize = 16;
const KEEP_BUFFERS_AFTER: u64 = 64;

impl State {
    /// `me` runs a batch of `n` items just taken (or claimed: `Mailbox::claim_direct`).
    fn start_batch(&mut self, me: ThreadToken, n: usize) {
        self.first_pending = false;
        self.set_run(RunState::Running(me));
        self.in_flight = u32::try_from(n).unwrap_or(u32::MAX);
    }

    /// The queue (locked and ring) held `n` items: the longest so far? Only the runner
    /// shortens the queue, so its length just before a take is a local maximum.
    fn note_queued(&mut self, n: usize) {
        #[cfg(not(feature = "no-stats"))]
        if n > self.queued_max as usize {
            self.queued_max = u32::try_from(n).unwrap_or(u32::MAX);
        }
        #[cfg(feature = "no-stats")]
        let _ = n;
    }

    fn release_small_buffers(&mut self) {
        if self.handled >= KEEP_BUFFERS_AFTER {
            return;
        }
        let Some(b) = self.bufs.as_deref_mut() else {
            return;
        };
        if b.queue.is_empty() && b.queue.capacity() <= SMALL_BUFFER {
            b.queue = VecDeque::new();
        }
        if b.spare.capacity() <= SMALL_BUFFER {
            b.spare = VecDeque::new();
        }
        if b.queue.capacity() == 0 && b.spare.capacity() == 0 {
            self.bufs = None;
        }
    }

    /// The locked queue (items queued after all the ring's).
    pub(crate) fn queue(&self) -> &VecDeque<Item> {
        const EMPTY: &VecDeque<Item> = &VecDeque::new();
        self.bufs.as_deref().map_or(EMPTY, |b| &b.queue)
    }
    /// The locked queue, to change: allocates the buffers' box if there is none.
    fn queue_mut(&mut self) -> &mut VecDeque<Item> {
        &mut self.bufs.get_or_insert_with(Box::default).queue
    }
    /// The spare buffer (empty, perhaps with capacity), to take a batch into.
    fn take_spare(&mut self) -> VecDeque<Item> {
        self.bufs
            .as_deref_mut()
            .map_or_else(VecDeque::new, |b| std::mem::take(&mut b.spare))
    }
    /// Keeps `spare` (empty) for the next batch; one without capacity needs no box.
    fn set_spare(&mut self, spare: VecDeque<Item>) {
        if spare.capacity() > 0 || self.bufs.is_some() {
            self.bufs.get_or_insert_with(Box::default).spare = spare;
        }
    }

    pub(crate) fn run(&self) -> RunState {
        self.run.get()
    }
    fn set_run(&mut self, run: RunState) {
        self.run = RunWord::new(run);
    }
    /// The dedicated thread is blocked on `wake` (the run state is idle meanwhile).
    fn parked(&self) -> bool {
        self.run.0 == RUN_PARKED
    }
    /// The dedicated thread, idle, parks (true) or woke up (false): nobody else changes
    /// a dedicated mailbox's run state.
    fn set_parked(&mut self, on: bool) {
        debug_assert_eq!(self.run(), RunState::Idle);
        self.run = if on {
            RunWord(RUN_PARKED)
        } else {
            RunWord::new(RunState::Idle)
        };
    }

    fn policy(&self) -> &Policy {
        self.policy.as_deref().unwrap_or(&DEFAULT_POLICY)
    }
    fn policy_mut(&mut self) -> &mut Policy {
        self.policy
            .get_or_insert_with(|| Box::new(DEFAULT_POLICY.clone()))
    }
    pub(crate) fn dropped(&self) -> u64 {
        self.policy().dropped
    }
    pub(crate) fn overflow(&self) -> Overflow {
        self.policy().overflow
    }
    pub(crate) fn handled(&self) -> u64 {
        self.handled
    }
}

#[cfg(all(test, loom))]
#[path = "mailbox_loom.rs"]
mod loom_tests;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::message_type::MessageType;

    fn item(n: usize) -> Item {
        let ty = MessageType::create("mailbox/test", None).unwrap();
        Item {
            msg: Message::with_value(&ty, n),
            last: false,
            from: None,
        }
    }

    /// The runner's lock-free looks count the locked queue and the ring's written slots.
    #[test]
    fn runner_sees_what_waits_in_either_queue() {
        let mb = Mailbox::new();
        let me = crate::sync::thread_token();
        assert!(!mb.runner_sees_items());
        // No ring yet: the locked queue.
        for n in 0..RING_AFTER_BATCH {
            assert!(matches!(
                mb.push(item(n), Kind::Pool, false),
                Push::Queued { .. }
            ));
        }
        assert!(mb.runner_sees_items());
        assert!(mb.runner_sees_at_least(RING_AFTER_BATCH));
        assert!(!mb.runner_sees_at_least(RING_AFTER_BATCH + 1));
        // A batch that big gives the mailbox its ring, open for the next pushes.
        let mut batch = mb.take_batch(me, Kind::Pool).unwrap();
        assert_eq!(batch.len(), RING_AFTER_BATCH);
        assert!(mb.ring().is_some_and(Ring::is_open));
        assert!(!mb.runner_sees_items());
        for n in 0..3 {
            mb.push(item(n), Kind::Pool, false);
        }
        assert!(mb.runner_sees_items());
        assert!(mb.runner_sees_at_least(3));
        assert!(!mb.runner_sees_at_least(4));
        batch.clear(); // delivered
        let next = mb.finish_and_take(batch, RING_AFTER_BATCH, false, me, Kind::Pool);
        assert_eq!(next.map(|b| b.len()), Some(3));
        assert!(!mb.runner_sees_items());
    }
}
