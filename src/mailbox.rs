//! A subscription's mailbox: its queue of pending deliveries and the scheduling state
//! machine that makes its callbacks run one at a time.
//!
//! Everything lives under one small mutex. A publisher holds it for a push (no allocation
//! at steady state: two buffers ping-pong between producer and runner), a runner for a
//! swap that takes the whole queue as one batch. So the runner touches the lock once per
//! batch, not once per message, and the state machine (idle / scheduled / running) is
//! trivially consistent with the queue it describes.

use crate::message::Message;
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;

/// One pending delivery.
pub(crate) struct Item {
    pub(crate) msg: Arc<Message>,
    /// The Unsubscribe change message: always the last item a mailbox ever holds.
    pub(crate) last: bool,
    /// Synchronous kind only: the publishing thread, which must run the callback.
    pub(crate) from: Option<ThreadId>,
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
    Running(ThreadId),
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
    /// Synchronous kind, idle: run the queue on this thread now.
    RunHere,
    /// Synchronous kind, running on another thread: wait until the run is handed to
    /// this thread (its item reached the head of the queue), then run.
    WaitTurn,
    /// Synchronous kind, running on this very thread (a callback published): the
    /// running loop delivers it after the current callback returns.
    Nested,
}

pub(crate) enum Push {
    /// The mailbox is closed (final message queued): nothing is delivered after it.
    Closed,
    Queued {
        /// Sequence number of this item: `handled() >= seq` once it was delivered.
        seq: u64,
        action: Action,
        /// The queue just crossed its high-water mark.
        congested: Option<usize>,
    },
}

pub(crate) struct State {
    queue: VecDeque<Item>,
    /// The runner's empty buffer, swapped in when it takes a batch.
    spare: VecDeque<Item>,
    pub(crate) run: RunState,
    closed: bool,
    pub(crate) done: bool,
    pushed: u64,
    handled: u64,
    /// Threads blocked in join or in a synchronous wait.
    waiters: u32,
    /// The dedicated thread is blocked on `wake`.
    parked: bool,
    low_water: usize,
    high_water: usize,
    congested: bool,
}

pub(crate) struct Mailbox {
    state: Mutex<State>,
    /// Wakes a parked dedicated thread.
    wake: Condvar,
    /// Wakes joiners and synchronous waiters when items are handled.
    progress: Condvar,
    /// Queue length, published for lock-free peeks (spin-before-park).
    len: AtomicUsize,
}

pub(crate) const DEFAULT_HIGH_WATER: usize = 10_000;

impl Mailbox {
    pub(crate) fn new() -> Mailbox {
        Mailbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                spare: VecDeque::new(),
                run: RunState::Idle,
                closed: false,
                done: false,
                pushed: 0,
                handled: 0,
                waiters: 0,
                parked: false,
                low_water: DEFAULT_HIGH_WATER * 9 / 10,
                high_water: DEFAULT_HIGH_WATER,
                congested: false,
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
            len: AtomicUsize::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Queues `item`; a `last` item closes the mailbox. For the synchronous kind,
    /// `item.from` is the calling thread.
    pub(crate) fn push(&self, item: Item, kind: Kind) -> Push {
        let me = item.from;
        let mut st = self.state.lock();
        if st.closed {
            return Push::Closed;
        }
        if item.last {
            st.closed = true;
        }
        st.queue.push_back(item);
        st.pushed += 1;
        let seq = st.pushed;
        let len = st.queue.len();
        self.len.store(len, Ordering::Relaxed);
        let congested = if len > st.high_water && !st.congested {
            st.congested = true;
            Some(len)
        } else {
            None
        };
        let action = match kind {
            Kind::Dedicated if st.parked => Action::Wake,
            Kind::Dedicated => Action::Nothing,
            Kind::Pool => match st.run {
                RunState::Idle => {
                    st.run = RunState::Scheduled;
                    Action::Schedule
                }
                _ => Action::Nothing,
            },
            Kind::Synchronous => match st.run {
                RunState::Idle => {
                    let me = me.unwrap_or_else(|| std::thread::current().id());
                    st.run = RunState::Running(me);
                    Action::RunHere
                }
                RunState::Running(t) if Some(t) == me => Action::Nested,
                _ => Action::WaitTurn,
            },
        };
        drop(st);
        if action == Action::Wake {
            self.wake.notify_one();
        }
        Push::Queued {
            seq,
            action,
            congested,
        }
    }

    /// Takes everything queued as one batch and marks the mailbox running on `me`; when
    /// the queue is empty, marks it idle and returns None.
    ///
    /// Synchronous kind: a callback runs on its publisher's thread, so the batch is only
    /// the leading items `me` published. When the head belongs to another thread, the run
    /// is handed to that thread (waiting in `wait_turn`) and this runner stops.
    pub(crate) fn take_batch(&self, me: ThreadId, kind: Kind) -> Option<VecDeque<Item>> {
        let mut st = self.state.lock();
        let Some(head_from) = st.queue.front().map(|i| i.from) else {
            st.run = RunState::Idle;
            return None;
        };
        if kind == Kind::Synchronous {
            if let Some(owner) = head_from.filter(|t| *t != me) {
                st.run = RunState::Running(owner);
                drop(st);
                self.progress.notify_all();
                return None;
            }
        }
        let mut batch = std::mem::take(&mut st.spare);
        if kind == Kind::Synchronous {
            while st
                .queue
                .front()
                .is_some_and(|i| i.from.is_none_or(|t| t == me))
            {
                batch.extend(st.queue.pop_front());
            }
        } else {
            std::mem::swap(&mut batch, &mut st.queue);
        }
        self.len.store(st.queue.len(), Ordering::Relaxed);
        if st.congested && st.queue.len() < st.low_water {
            st.congested = false;
        }
        st.run = RunState::Running(me);
        Some(batch)
    }

    /// Returns the drained batch buffer for reuse and records `n` deliveries; `last`
    /// says the final message was among them.
    pub(crate) fn finish_batch(&self, batch: VecDeque<Item>, n: usize, last: bool) {
        let mut st = self.state.lock();
        if st.spare.capacity() < batch.capacity() {
            st.spare = batch;
        }
        st.handled += n as u64;
        if last {
            st.done = true;
            st.queue = VecDeque::new();
            st.spare = VecDeque::new();
        }
        let notify = st.waiters > 0;
        drop(st);
        if notify {
            self.progress.notify_all();
        }
    }

    /// Marks a pool subscription scheduled again (the worker yields it for fairness).
    pub(crate) fn reschedule(&self) {
        self.state.lock().run = RunState::Scheduled;
    }

    /// Dedicated thread: blocks until something is queued. Returns at once if so.
    pub(crate) fn park_until_queued(&self) {
        let mut st = self.state.lock();
        while st.queue.is_empty() {
            st.parked = true;
            self.wake.wait(&mut st);
            st.parked = false;
        }
    }

    /// Synchronous kind: blocks until the run is handed to `me` (true) or the mailbox is
    /// done (false).
    pub(crate) fn wait_turn(&self, me: ThreadId) -> bool {
        let mut st = self.state.lock();
        st.waiters += 1;
        while st.run != RunState::Running(me) && !st.done {
            self.progress.wait(&mut st);
        }
        st.waiters -= 1;
        st.run == RunState::Running(me)
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

    pub(crate) fn set_limits(&self, low: usize, high: usize) {
        let mut st = self.state.lock();
        st.low_water = low;
        st.high_water = high;
        st.congested = st.queue.len() > high;
    }
}

impl State {
    pub(crate) fn handled(&self) -> u64 {
        self.handled
    }
}
