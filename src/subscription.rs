//! Subscriptions: a callback, a filter and a mailbox, attached to one topic.
//!
//! Lifecycle rules (API.md, "Subscriptions"):
//! - the Subscribe change message is queued into the new mailbox *before* the
//!   subscription becomes visible to publishers, so it is always the first delivery;
//! - unsubscribing removes the subscription from its topic, then queues the Unsubscribe
//!   change message as `Item::Final`, which closes the mailbox: a publisher that still
//!   holds the old subscriber list and pushes late finds it closed, so nothing is ever
//!   delivered after the final message.

use crate::error::{Error, ErrorKind, Result};
use crate::filter::Filter;
use crate::fork;
use crate::log;
use crate::mailbox::{Action, Claim, Item, Kind, Mailbox, Overflow, Push};
use crate::message::{Message, MessageRef};
use crate::message_type::{MessageType, TypeRef, DEAD_MAGIC};
use crate::pool;
use crate::sync::ThreadToken;
use crate::tick_clock;
use crate::topic::Topic;
use crate::waits;
use crate::worker_group::{self, Group};
use arc_swap::ArcSwapOption;
use once_cell::race::OnceBox;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) const SUBSCRIPTION_MAGIC: u32 = 0x5342_5342; // "SBSB"

/// A subscription's callback. It never runs concurrently with itself.
pub type Callback = Box<dyn Fn(&Arc<Subscription>, &MessageRef) + Send + Sync>;

/// A C-style callback: called with its argument and the addresses of the subscription
/// and of the message (which are what C handles point to).
pub type RawCallback = unsafe extern "C" fn(data: *mut c_void, sub: *mut c_void, msg: *mut c_void);

/// What a subscription calls. A C subscriber's function and argument are stored inline
/// (a boxed closure holding them cost an allocation per subscription).
///
/// A library closure (caching topics, routers) holds references to library objects,
/// and through them to user data (a cache's snapshots, whose dtors are module code). It
/// is dropped when the final message has been handled, before a join can return: the
/// finished subscription itself may stay referenced by its topic's list for a while
/// (`small_list::retire`), and a module unloaded after its join must not have its dtors
/// run later from there. The closure is called through a reference cloned out of the
/// `ArcSwapOption` (never borrowed from it), so taking it out cannot pull it from under
/// a call. That word (a locked `Option`, 16 bytes, made the enum 24) fits beside the
/// C variant's function pointer, whose niche holds the discriminant: 16 bytes in all.
enum Handler {
    Raw { f: RawCallback, data: *mut c_void },
    Boxed(ArcSwapOption<Callback>),
}

// SAFETY: `Raw`'s argument is the C subscriber's; API.md makes the subscriber promise
// that it may be used from whichever thread runs the callback. `Boxed` is Send + Sync.
unsafe impl Send for Handler {}
// SAFETY: as above; the library never dereferences the argument.
unsafe impl Sync for Handler {}

/// Field order matters (`repr(C)`): publishers read the first group on every publish,
/// while the mailbox at the end is written on every push and every batch. Between them
/// sit fields publishers never touch (the callback, read by the runner; the rest only
/// at subscribe/unsubscribe time), so that the read-mostly group never shares a cache
/// line with the mailbox's written words (checked by the assertion below). Sharing one
/// made every publish miss on the filter and the overflow flag.
///
/// The spacer costs no room: it is those fields and the mailbox's own rarely written
/// words (its ring pointer, condvars and done flag), 64 bytes where the separation
/// needs 63 (the read-mostly group ends at 36, the mailbox's length is at 100). What
/// keeps the whole at 168 bytes (a 192-byte block with the `Arc` counts, a class that
/// W8's figure rests on, see `layout_sizes`) is the mailbox's state: 56 bytes, its
/// queue buffers boxed and only while in use. Another field in the spacer would not
/// cost padding either, but it would push the mailbox's state 8 bytes further: into
/// the next size class (fields most subscriptions leave unset go to `Rare`).
#[repr(C)]
pub struct Subscription {
    // Read on every publish, written rarely.
    magic: u32,
    kind: Kind,
    subscribed: AtomicBool,
    /// Mirrors `Overflow::Block`, so other policies skip the blocking bookkeeping.
    blocking_overflow: AtomicBool,
    topic: Arc<Topic>,
    pub(crate) filter: Filter,
    /// Dedicated kind: the fork generation whose process runs this subscription's thread
    /// (its low 32 bits: `generation_tag`).
    thread_generation: AtomicU32,
    // Not touched by publishers: the spacer.
    /// The id + 1 of the type the longest callback handled (0: none yet); written by the
    /// runner with `callback_max_ns`, rarely once the maximum settled.
    callback_max_type: AtomicU32,
    callback: Handler,
    /// Process-unique number; the uniqueid text "<topic>:<number>" is built on demand.
    number: u64,
    /// What few subscriptions have: allocated by the first that needs it.
    rare: OnceBox<Rare>,
    /// The longest single callback so far, in `tick_clock` ticks (see
    /// `callback_max_type`). Written by the runner only (callbacks never overlap).
    callback_max_ticks: AtomicU64,
    // Written on every push and batch (its own cold fields first).
    mailbox: Mailbox,
}

/// The last read-mostly byte and the first byte the mailbox writes per message are at
/// least a cache line apart, wherever the allocation starts.
#[cfg(not(loom))]
const _: () = assert!(
    std::mem::offset_of!(Subscription, mailbox) + Mailbox::FIRST_HOT_OFFSET
        >= std::mem::offset_of!(Subscription, thread_generation) + 4 + 63
);

/// A subscription's fields that most subscriptions never set, boxed (`Subscription::rare`,
/// one word): in the subscription they pushed its mailbox's per-message words 8 bytes
/// further, and its block into the next size class.
#[derive(Default)]
struct Rare {
    /// Pool kind: the worker group that runs it (None: the shared one); the subscription
    /// uses the group (keeps it alive) until its final message was handled. Set at
    /// subscribe time (the box comes with it), read when the subscription is scheduled.
    group: Option<Arc<Group>>,
    /// The uniqueid text, built on demand (logs, statistics, a dedicated thread's name).
    uniqueid: OnceBox<CString>,
}

thread_local! {
    /// Subscriptions whose callback this thread is running right now (innermost last):
    /// a join of one of them would wait on ourselves.
    static RUNNING: RefCell<Vec<*const Subscription>> = const { RefCell::new(Vec::new()) };
}

struct RunningGuard;
impl RunningGuard {
    fn enter(sub: *const Subscription) -> RunningGuard {
        RUNNING.with(|r| r.borrow_mut().push(sub));
        RunningGuard
    }
}
impl Drop for RunningGuard {
    fn drop(&mut self) {
        let _ = RUNNING.try_with(|r| r.borrow_mut().pop());
    }
}

/// Is this thread inside any subscription's callback? Such a thread must not wait for
/// another thread's synchronous run: that thread might be waiting for one of ours.
pub(crate) fn in_any_callback() -> bool {
    RUNNING
        .try_with(|r| !r.borrow().is_empty())
        .unwrap_or(false)
}

fn is_running_here(sub: *const Subscription) -> bool {
    RUNNING
        .try_with(|r| r.borrow().contains(&sub))
        .unwrap_or(false)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The fork generation's low 32 bits: two generations that share them are 2^32 nested
/// forks apart, which no process lineage reaches.
fn generation_tag() -> u32 {
    fork::generation() as u32
}

/// A runner between two batches waits for this many queued messages...
const COALESCE_BATCH: usize = 16;
/// ...for at most this long (see `Subscription::coalesce`).
const COALESCE_WAIT: Duration = Duration::from_micros(2);

impl Subscription {
    /// Subscribes `callback` to `topic`. The callback's first message is the Subscribe
    /// change message.
    pub fn subscribe(
        topic: &Arc<Topic>,
        kind: Kind,
        callback: Callback,
    ) -> Result<Arc<Subscription>> {
        Subscription::subscribe_with(
            topic,
            kind,
            None,
            Handler::Boxed(ArcSwapOption::from_pointee(callback)),
        )
    }

    /// As `subscribe`, run by the worker group `group`.
    pub fn subscribe_in(
        topic: &Arc<Topic>,
        group: &Arc<Group>,
        callback: Callback,
    ) -> Result<Arc<Subscription>> {
        Subscription::subscribe_with(
            topic,
            Kind::Pool,
            Some(group),
            Handler::Boxed(ArcSwapOption::from_pointee(callback)),
        )
    }

    /// As `subscribe`, with a C function and its argument.
    pub fn subscribe_raw(
        topic: &Arc<Topic>,
        kind: Kind,
        f: RawCallback,
        data: *mut c_void,
    ) -> Result<Arc<Subscription>> {
        Subscription::subscribe_with(topic, kind, None, Handler::Raw { f, data })
    }

    /// As `subscribe_raw`, run by the worker group `group`.
    pub fn subscribe_raw_in(
        topic: &Arc<Topic>,
        group: &Arc<Group>,
        f: RawCallback,
        data: *mut c_void,
    ) -> Result<Arc<Subscription>> {
        Subscription::subscribe_with(topic, Kind::Pool, Some(group), Handler::Raw { f, data })
    }

    /// `group`: the pool kind's worker group (None: the shared one).
    fn subscribe_with(
        topic: &Arc<Topic>,
        kind: Kind,
        group: Option<&Arc<Group>>,
        callback: Handler,
    ) -> Result<Arc<Subscription>> {
        // The shared group never ends: its subscriptions skip the use count.
        let group = group.filter(|_| kind == Kind::Pool).map(|g| {
            g.acquire();
            Arc::clone(g)
        });
        tick_clock::init();
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(Subscription {
            magic: SUBSCRIPTION_MAGIC,
            kind,
            topic: Arc::clone(topic),
            number: n,
            rare: match group {
                Some(group) => OnceBox::with_value(Box::new(Rare {
                    group: Some(group),
                    uniqueid: OnceBox::new(),
                })),
                None => OnceBox::new(),
            },
            callback_max_ticks: AtomicU64::new(0),
            callback_max_type: AtomicU32::new(0),
            callback,
            filter: Filter::new(),
            mailbox: Mailbox::new(),
            subscribed: AtomicBool::new(true),
            blocking_overflow: AtomicBool::new(false),
            thread_generation: AtomicU32::new(generation_tag()),
        });
        fork::install();
        if kind == Kind::Dedicated {
            sub.spawn_thread()?;
        }
        let change = SubscriptionChange::message(topic, n, false);
        sub.offer(&change, false);
        topic.add_subscriber(&sub);
        topic.publish_except(&change, Some(&sub));
        Ok(sub)
    }

    /// This subscription's slot of the releasing window (see [`releasing`]).
    pub(crate) fn releasing_key(&self) -> releasing::Key {
        releasing::Key::of(&self.mailbox)
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == SUBSCRIPTION_MAGIC
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }
    pub fn uniqueid(&self) -> &str {
        self.uniqueid_cstr().to_str().expect("built from UTF-8")
    }
    pub(crate) fn uniqueid_cstr(&self) -> &CStr {
        self.rare()
            .uniqueid
            .get_or_init(|| Box::new(uniqueid_text(&self.topic, self.number)))
    }
    fn rare(&self) -> &Rare {
        self.rare.get_or_init(Box::default)
    }
    fn group(&self) -> Option<&Arc<Group>> {
        self.rare.get().and_then(|r| r.group.as_ref())
    }
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }
    pub(crate) fn is_running_on_this_thread(&self) -> bool {
        is_running_here(self)
    }
    pub fn is_done(&self) -> bool {
        self.mailbox.is_done()
    }
    /// The thread running this subscription's callbacks now, if any.
    pub(crate) fn runner(&self) -> Option<ThreadToken> {
        self.mailbox.runner()
    }
    /// Messages queued and not yet taken by the runner.
    pub fn queue_len(&self) -> usize {
        self.mailbox.len()
    }
    pub fn congestion_warnings(&self) -> u64 {
        self.mailbox.congestion_warnings()
    }
    /// Process-unique number of this subscription.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// This subscription's figures now.
    pub fn stats(&self) -> SubscriptionStats {
        let q = self.mailbox.stats();
        let ty = self.callback_max_type.load(Ordering::Relaxed);
        SubscriptionStats {
            delivered: q.delivered,
            dropped: q.dropped,
            congestion_warnings: q.congestion_warnings,
            queued: q.queued,
            queued_max: q.queued_max,
            callback_max_ns: self.callback_max_ns(),
            callback_max_type: ty.checked_sub(1).and_then(MessageType::by_id),
            congested: q.congested,
        }
    }

    /// Above its high-water mark now (in alert).
    pub(crate) fn is_congested(&self) -> bool {
        self.mailbox.is_congested()
    }

    /// Records how long one callback took (from `start`), and returns the time it ended.
    #[inline]
    fn note_callback(&self, start: Option<u64>, type_id: u32) -> Option<u64> {
        let start = start?;
        let now = self.stats_clock()?;
        let ticks = now.saturating_sub(start);
        if ticks > self.callback_max_ticks.load(Ordering::Relaxed) {
            self.callback_max_type.store(type_id + 1, Ordering::Relaxed);
            self.callback_max_ticks.store(ticks, Ordering::Relaxed);
        }
        Some(now)
    }

    /// The clock that times this subscription's callbacks, in its ticks (None: the
    /// statistics are compiled out). A synchronous subscription's callbacks run on the
    /// publishers' threads, which pay for every read: the time-stamp counter
    /// (`tick_clock`). A queued one's runner reads the vDSO clock: measured with the
    /// counter there too, W1 and W2 lost 3-5 % on a 2-CPU machine, the runner catching
    /// up with the publisher sooner and pulling the queue's lines to and fro per message.
    #[inline]
    fn stats_clock(&self) -> Option<u64> {
        #[cfg(not(feature = "no-stats"))]
        return Some(if self.kind == Kind::Synchronous {
            tick_clock::now()
        } else {
            tick_clock::instant_ns()
        });
        #[cfg(feature = "no-stats")]
        None
    }

    /// `callback_max_ticks` in nanoseconds.
    fn callback_max_ns(&self) -> u64 {
        let ticks = self.callback_max_ticks.load(Ordering::Relaxed);
        if self.kind == Kind::Synchronous {
            tick_clock::to_ns(ticks)
        } else {
            ticks
        }
    }

    /// After a runner's batches: the queue may have left congestion (see
    /// `Mailbox::take_alert_changed`).
    fn after_batches(&self) {
        if self.mailbox.take_alert_changed() {
            crate::stats::sync_alert(self);
        }
    }

    pub fn accept_message_type(&self, ty: &Arc<MessageType>) {
        self.filter.accept(ty);
    }
    pub fn decline_message_type(&self, ty: &Arc<MessageType>) {
        self.filter.decline(ty);
    }
    pub fn set_selective(&self, on: bool) {
        self.filter.set_selective(on);
    }
    /// Still subscribed, and accepts `ty`: what a publisher checks before it delivers.
    /// An unsubscribed subscription may linger in its topic's list for a while (see
    /// `small_list::retire`); its mailbox is closed or about to be, so this check only
    /// saves the publisher a refused push.
    pub(crate) fn is_live_for(&self, ty: &MessageType) -> bool {
        self.subscribed.load(Ordering::Relaxed) && self.filter.accepts(ty)
    }

    /// Warn when more than `high_water` messages wait; warn again only after the queue
    /// fell below `low_water`.
    pub fn set_congestion_limits(&self, low_water: usize, high_water: usize) -> Result<()> {
        if high_water == 0 || low_water > high_water {
            return Err(Error::invalid(format!(
                "congestion limits need 0 <= low_water <= high_water and high_water > 0 (got {low_water}, {high_water})"
            )));
        }
        self.mailbox.set_limits(low_water, high_water);
        crate::stats::sync_alert(self);
        Ok(())
    }

    /// What to do when more than `limit` messages wait. The final message is never
    /// dropped; drops are counted ([`Subscription::dropped`]).
    pub fn set_overflow(&self, policy: Overflow, limit: usize) -> Result<()> {
        if policy != Overflow::Unbounded && limit == 0 {
            return Err(Error::invalid("an overflow limit must be at least 1"));
        }
        self.blocking_overflow
            .store(policy == Overflow::Block, Ordering::Relaxed);
        self.mailbox.set_overflow(policy, limit);
        Ok(())
    }

    pub fn overflow(&self) -> Overflow {
        self.mailbox.lock().overflow()
    }

    /// Messages the overflow policy dropped.
    pub fn dropped(&self) -> u64 {
        self.mailbox.lock().dropped()
    }

    /// True when `msg` is this subscription's final message.
    pub fn is_final_message(&self, msg: &Message) -> bool {
        msg.value::<SubscriptionChange>().is_some_and(|c| {
            c.unsubscribe && Arc::ptr_eq(&c.topic, &self.topic) && c.number == self.number
        })
    }

    /// Queues `msg` (already filtered by the caller) and does what the mailbox asks.
    /// Returns the item's sequence number, or None when the mailbox is closed.
    pub(crate) fn offer(self: &Arc<Self>, msg: &MessageRef, last: bool) -> Option<u64> {
        if self.kind == Kind::Dedicated
            && self.thread_generation.load(Ordering::Relaxed) != generation_tag()
        {
            self.respawn_after_fork();
        }
        // Only the synchronous kind compares thread ids; the others skip the lookup.
        let me = (self.kind == Kind::Synchronous).then(crate::sync::thread_token);
        if let (Some(me), false) = (me, last) {
            // The common synchronous publish: nobody runs the subscription and nothing
            // waits, so the message is delivered from the caller's hands, with no item
            // queued and no count taken on it (the caller holds it for the whole call).
            match self.mailbox.claim_direct(me) {
                Claim::Claimed(seq) => {
                    self.run_until_idle(me, Some(msg));
                    return Some(seq);
                }
                Claim::Closed => return None,
                Claim::Busy => {}
            }
        }
        let item = Item {
            msg: MessageRef::clone(msg),
            last,
            from: me,
        };
        let push = if self.kind == Kind::Synchronous {
            // From inside a callback, a publish to a synchronous subscription that another
            // thread is running is deferred to that thread instead of waited for: that
            // thread, in the very callback we would wait for, might publish to a
            // subscription this thread is running, and both would wait forever.
            self.mailbox.push(item, self.kind, !in_any_callback())
        } else if self.blocking_overflow.load(Ordering::Relaxed) {
            // A runner waiting for room in its own queue would wait forever, and so would a
            // callback whose wait closes a cycle (`waits`): both are let through. A pool
            // worker waiting lets the pool start another.
            let permit = (!is_running_here(Arc::as_ptr(self)))
                .then(|| waits::permit(self))
                .flatten();
            let push = pool::blocking(|| self.mailbox.push(item, self.kind, permit.is_some()));
            drop(permit);
            push
        } else {
            self.mailbox.push(item, self.kind, false)
        };
        match push {
            Push::Closed | Push::Dropped => None,
            Push::Queued {
                seq,
                action,
                congested,
            } => {
                if let Some(len) = congested {
                    crate::stats::sync_alert(self);
                    log::warn(&format!(
                        "subscription {} to topic '{}': {len} messages queued (high-water mark crossed)",
                        self.uniqueid(),
                        self.topic.name()
                    ));
                }
                match action {
                    Action::Schedule => self.schedule(),
                    Action::RunHere => {
                        self.run_until_idle(me.unwrap_or_else(crate::sync::thread_token), None)
                    }
                    Action::WaitTurn => {
                        let me = me.unwrap_or_else(crate::sync::thread_token);
                        if pool::blocking(|| self.mailbox.wait_turn(me)) {
                            self.run_until_idle(me, None);
                        }
                    }
                    Action::Nothing | Action::Wake | Action::Nested | Action::Deferred => {}
                }
                Some(seq)
            }
        }
    }

    /// Hands the subscription to its group's pool (the mailbox said it is runnable).
    fn schedule(self: &Arc<Self>) {
        let group = self.group().unwrap_or_else(|| worker_group::shared());
        group.pool().schedule(Arc::clone(self));
    }

    /// After the final message was handled: the subscription no longer uses its group.
    fn leave_group(&self) {
        if let Some(g) = self.group() {
            g.release();
        }
    }

    /// Permission to block until this subscription makes progress (`waits`); a
    /// `Deadlock` error saying `consequence` when the wait would close a cycle.
    fn wait_permit(self: &Arc<Self>, consequence: &str) -> Result<waits::WaitPermit> {
        waits::permit(self).ok_or_else(|| {
            Error::new(
                ErrorKind::Deadlock,
                format!(
                    "subscription {}'s callback runs on a thread that waits for this one: {consequence}",
                    self.uniqueid()
                ),
            )
        })
    }

    /// Blocks until the item numbered `seq` has been handled (or the subscription is done).
    /// Fails with `Deadlock` when the wait would close a cycle of waits (`waits`).
    pub(crate) fn wait_handled(self: &Arc<Self>, seq: u64) -> Result<()> {
        let _permit = self.wait_permit(
            "waiting in publish_sync would deadlock; the message is delivered when that callback returns",
        )?;
        pool::blocking(|| self.mailbox.wait_until(|st| st.handled() >= seq || st.done));
        Ok(())
    }

    /// Delivers one batch; returns true when it held the final message.
    fn deliver(self: &Arc<Self>, batch: &mut VecDeque<Item>) -> (usize, bool) {
        let _running = RunningGuard::enter(Arc::as_ptr(self));
        let n = batch.len();
        let mut last = false;
        // One clock read per callback: each one's end is the next one's start.
        let mut t = self.stats_clock();
        for item in batch.drain(..) {
            let ty = item.msg.message_type().id();
            last |= self.deliver_item(item);
            t = self.note_callback(t, ty);
        }
        (n, last)
    }

    /// Delivers one item (the caller marked this thread running the subscription);
    /// returns whether it was the final one.
    fn deliver_item(self: &Arc<Self>, item: Item) -> bool {
        self.deliver_message(&item.msg, item.last)
    }

    /// `deliver_item` of a message the caller holds; `last`: the final message.
    fn deliver_message(self: &Arc<Self>, msg: &MessageRef, last: bool) -> bool {
        // The final message is filtered here: it is queued whatever the filter says,
        // because it closes the mailbox.
        if !last || self.filter.accepts(msg.message_type()) {
            self.call(msg);
        }
        if last {
            self.release_handler();
            self.leave_group();
        }
        last
    }

    /// Delivers the message a publisher holds, claimed as a batch of one that the
    /// mailbox never queued (`Mailbox::claim_direct`; never the final message), timed as
    /// a callback.
    fn deliver_claimed(self: &Arc<Self>, msg: &MessageRef) {
        let _running = RunningGuard::enter(Arc::as_ptr(self));
        let t = self.stats_clock();
        self.deliver_message(msg, false);
        self.note_callback(t, msg.message_type().id());
    }

    /// After the final message: drops a library closure and what it holds (see
    /// `Handler`). Runs on the runner's thread before the mailbox is marked done.
    fn release_handler(&self) {
        if let Handler::Boxed(cb) = &self.callback {
            let closure = cb.swap(None);
            drop(closure); // may run user dtors
        }
    }

    fn call(self: &Arc<Self>, msg: &MessageRef) {
        let run = || match &self.callback {
            Handler::Boxed(cb) => {
                if let Some(closure) = cb.load_full() {
                    closure(self, msg);
                }
            }
            // SAFETY: the function and argument the subscriber registered, called with the
            // subscription and the message, both alive (borrowed) for the call.
            Handler::Raw { f, data } => unsafe {
                f(
                    *data,
                    Arc::as_ptr(self).cast_mut().cast(),
                    MessageRef::as_ptr(msg).cast_mut().cast(),
                )
            },
        };
        if catch_unwind(AssertUnwindSafe(run)).is_err() {
            log::log(
                log::Level::Error,
                &format!(
                    "subscription {}: callback panicked; message skipped",
                    self.uniqueid()
                ),
            );
        }
    }

    /// Runs batches on this thread until the queue is empty, starting with `claimed`
    /// (the publisher's message, when it claimed the idle mailbox) or else the queue.
    fn run_until_idle(self: &Arc<Self>, me: ThreadToken, mut claimed: Option<&MessageRef>) {
        loop {
            let mut next = match claimed.take() {
                Some(msg) => {
                    self.deliver_claimed(msg);
                    self.mailbox.finish_one_and_take(me)
                }
                None => self.mailbox.take_batch(me, self.kind),
            };
            while let Some(mut batch) = next {
                let (n, last) = self.deliver(&mut batch);
                next = self.mailbox.finish_and_take(batch, n, last, me, self.kind);
            }
            self.after_batches();
            // Synchronous kind: the run may have been handed to another publisher while
            // items of ours (published from our own callbacks) wait behind theirs. They
            // are delivered on this thread: wait for the run to come back. Inside an
            // outer callback this thread must not wait for another's run (see `offer`):
            // the new runner delivers them instead.
            // The lock-free length first: every synchronous run ends here, and almost
            // always with an empty queue. Only this thread removes its own items, and
            // every length stored since it queued them counts them, so 0 means none.
            if self.kind != Kind::Synchronous
                || self.mailbox.len() == 0
                || !self.mailbox.has_items_from(me)
            {
                return;
            }
            if in_any_callback() {
                if self.mailbox.reclaim_or_defer(me) {
                    continue;
                }
                return;
            }
            if !pool::blocking(|| self.mailbox.wait_turn(me)) {
                return;
            }
        }
    }

    /// A pool worker's turn: at most `max_batches` batches. After `Turn::Final` the worker
    /// is in the releasing window (see [`releasing`]) until it drops its reference.
    pub(crate) fn run_pool_turn(self: &Arc<Self>, me: ThreadToken, max_batches: usize) -> Turn {
        let turn = self.pool_turn(me, max_batches);
        self.after_batches();
        turn
    }

    fn pool_turn(self: &Arc<Self>, me: ThreadToken, max_batches: usize) -> Turn {
        let mut next = self.mailbox.take_batch(me, self.kind);
        for turn in 1..=max_batches {
            let Some(mut batch) = next else {
                return Turn::Idle;
            };
            let (n, last) = self.deliver(&mut batch);
            if last {
                releasing::enter(self.releasing_key());
                self.mailbox.finish_batch(batch, n, true);
                return Turn::Final;
            }
            if turn == max_batches {
                self.mailbox.finish_batch(batch, n, false);
                break;
            }
            // A worker that waits for more messages must not keep others waiting.
            if !pool::has_queued_work() {
                self.coalesce();
            }
            next = self.mailbox.finish_and_take(batch, n, false, me, self.kind);
        }
        self.mailbox.reschedule();
        Turn::More
    }

    fn spawn_thread(self: &Arc<Self>) -> Result<()> {
        let runner = Arc::clone(self);
        thread::Builder::new()
            .name(format!("sb-sub-{}", self.uniqueid()))
            .spawn(move || {
                let key = runner.releasing_key();
                if runner.dedicated_thread() {
                    releasing::leave(key);
                }
            })
            .map(drop)
            .map_err(|e| {
                Error::new(
                    ErrorKind::NoMemory,
                    format!("cannot start subscription thread: {e}"),
                )
            })
    }

    /// In a forked child the dedicated thread is gone: start a new one, once.
    fn respawn_after_fork(self: &Arc<Self>) {
        let now = generation_tag();
        let was = self.thread_generation.load(Ordering::Acquire);
        if was != now
            && self
                .thread_generation
                .compare_exchange(was, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            if let Err(e) = self.spawn_thread() {
                log::warn(&format!("subscription {}: {e}", self.uniqueid()));
            }
        }
    }

    /// Returns true after the final message (its reference dropped by then), having
    /// entered the releasing window.
    fn dedicated_thread(self: Arc<Self>) -> bool {
        let me = crate::sync::thread_token();
        loop {
            // Spin a little before parking: under load the next message is usually a
            // few hundred nanoseconds away, and a futex round trip costs more.
            let mut spins = 0u32;
            while !self.mailbox.runner_sees_items() && spins < 1_016 {
                if spins < 1_000 {
                    std::hint::spin_loop();
                } else {
                    thread::yield_now();
                }
                spins += 1;
            }
            let mut next = self.mailbox.park_and_take(me, self.kind);
            while let Some(mut batch) = next {
                let (n, last) = self.deliver(&mut batch);
                if last {
                    releasing::enter(self.releasing_key());
                    self.mailbox.finish_batch(batch, n, true);
                    self.after_batches();
                    return true;
                }
                self.after_batches();
                self.coalesce();
                next = self.mailbox.finish_and_take(batch, n, false, me, self.kind);
            }
            self.after_batches();
        }
    }

    /// Called between two batches of a runner. When messages arrived while the batch ran
    /// but only a few, the publisher is streaming: give it a moment (at most
    /// `COALESCE_WAIT`) to queue `COALESCE_BATCH` before taking the lock. A runner that
    /// takes batches of one or two pulls the lock's cache line (and the queue's) away
    /// from the publisher for every message; W1/W2 measured 10-15 % faster with this.
    /// An empty queue returns at once, so an isolated message is never delayed; only the
    /// followers of a burst can be, by at most `COALESCE_WAIT`.
    fn coalesce(&self) {
        // Once unsubscribed, the final message is queued or about to be, and a joiner
        // waits for it: nothing is worth waiting for.
        let enough = || {
            !self.mailbox.runner_sees_items()
                || self.mailbox.runner_sees_at_least(COALESCE_BATCH)
                || !self.subscribed.load(Ordering::Relaxed)
        };
        if enough() {
            return;
        }
        let start = Instant::now();
        while !enough() && start.elapsed() < COALESCE_WAIT {
            for _ in 0..8 {
                std::hint::spin_loop();
            }
        }
    }

    /// Removes the subscription from its topic and queues its final message.
    pub fn unsubscribe(self: &Arc<Self>) -> Result<()> {
        if !self.subscribed.swap(false, Ordering::AcqRel) {
            return Err(Error::state(format!(
                "subscription {} is already unsubscribed",
                self.uniqueid()
            )));
        }
        self.topic.retire_subscriber();
        let change = SubscriptionChange::message(&self.topic, self.number, true);
        self.topic.publish_except(&change, Some(self));
        self.offer(&change, true);
        Ok(())
    }

    /// Waits until the final message has been handled. Fails with `Deadlock` when called
    /// from this subscription's own callback, or when the wait would close a cycle of
    /// waits (`waits`).
    pub fn join(self: &Arc<Self>) -> Result<()> {
        if is_running_here(Arc::as_ptr(self)) {
            return Err(Error::new(
                ErrorKind::Deadlock,
                format!(
                    "join of subscription {} from its own callback would deadlock; it completes after the callback returns",
                    self.uniqueid()
                ),
            ));
        }
        self.wait_done()?;
        releasing::wait(self.releasing_key());
        // A subscription that ended above its high-water mark leaves the alert registry
        // before the join returns (its runner may not have told it yet); one relaxed load
        // when nothing is in alert.
        if crate::stats::alert_count() > 0 {
            crate::stats::sync_alert(self);
        }
        Ok(())
    }

    fn wait_done(self: &Arc<Self>) -> Result<()> {
        // The final message is usually a few microseconds away (a module unloading, a
        // churning subscriber): spin briefly before paying for a sleep and a wake-up.
        for i in 0..200 {
            if self.mailbox.is_done() {
                return Ok(());
            }
            if i < 100 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        let _permit = self.wait_permit("a join would deadlock")?;
        pool::blocking(|| self.mailbox.wait_until(|st| st.done));
        Ok(())
    }

    /// Unsubscribes (if still subscribed) and joins.
    pub fn unsubscribe_and_join(self: &Arc<Self>) -> Result<()> {
        let unsub = self.unsubscribe();
        self.join()?;
        unsub
    }
}

/// How a pool worker's turn ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Turn {
    /// Work is left: the subscription goes back on the pool's queue.
    More,
    /// Nothing queued now; the next publish schedules it again. The turn entered the
    /// releasing window as the subscription went idle (`Mailbox::take_batch`); the worker
    /// must `releasing::leave` once it dropped its reference.
    Idle,
    /// The final message was handled; the worker must `releasing::leave` once it dropped
    /// its reference.
    Final,
}

/// Runners (pool workers, dedicated threads) between handling a subscription's final
/// message and dropping their reference to it.
///
/// A join returns once its subscription's count is zero, so that after
/// `sb_unsubscribe_and_join` no library thread still holds the subscription (nor, through
/// it, its topic): a module that unloads and a process that exits right after the join
/// leave nothing for a leak checker to find. The counts live in static memory, because
/// the runner cannot signal through the subscription after dropping its reference (it may
/// have been the last): a fixed set of slots, each subscription counted in the slot its
/// mailbox's address picks (`Key`). A join waits only for its own slot, so the windows
/// of other subscriptions (a busy pool enters one whenever a subscription goes idle) do
/// not hold it up; two subscriptions sharing a slot only make a join wait as long as a
/// window lasts, a few instructions while its runner runs.
pub(crate) mod releasing {
    use crate::mailbox::Mailbox;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    const SLOT_BITS: u32 = 6;
    /// One count per cache line: runners of different subscriptions do not bounce one.
    #[repr(align(64))]
    struct Slot(AtomicUsize);
    static RUNNERS: [Slot; 1 << SLOT_BITS] = [const { Slot(AtomicUsize::new(0)) }; 1 << SLOT_BITS];
    /// A runner descheduled inside the window resumes well within this; past it the join
    /// returns anyway (the reference goes shortly after), never hangs.
    const BOUND: Duration = Duration::from_secs(2);
    /// Polls of a busy slot before the joiner gives up its core: the window lasts a few
    /// hundred nanoseconds while its runner runs, and a yield on a loaded machine can
    /// cost the joiner a whole time slice (W9 churned at half the rate when the first
    /// poll yielded).
    const SPINS: u32 = 256;

    /// The slot of one subscription: computed from its mailbox's address, which the
    /// runner still knows (as a number) after dropping its reference.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Key(usize);

    impl Key {
        pub(crate) fn of(mailbox: &Mailbox) -> Key {
            let addr = std::ptr::from_ref(mailbox) as usize as u64;
            // Fibonacci hashing of the address without its low (alignment) bits.
            let h = (addr >> 6).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOT_BITS);
            Key(h as usize)
        }
        #[cfg(test)]
        pub(crate) fn index(self) -> usize {
            self.0
        }
        fn slot(self) -> &'static AtomicUsize {
            &RUNNERS[self.0].0
        }
    }

    /// Before the completion this window covers becomes visible to joiners.
    pub(crate) fn enter(key: Key) {
        key.slot().fetch_add(1, Ordering::SeqCst);
    }

    /// After the runner dropped its reference.
    pub(crate) fn leave(key: Key) {
        key.slot().fetch_sub(1, Ordering::SeqCst);
    }

    /// In a forked child: no runner survived the fork, so none is inside a window.
    pub(crate) fn fork_reset() {
        for slot in &RUNNERS {
            slot.0.store(0, Ordering::SeqCst);
        }
    }

    /// Called once the joined subscription is done (so its runner entered before).
    pub(crate) fn wait(key: Key) {
        let slot = key.slot();
        for _ in 0..SPINS {
            if slot.load(Ordering::SeqCst) == 0 {
                return;
            }
            std::hint::spin_loop();
        }
        let start = Instant::now();
        let mut polls = 0u32;
        while slot.load(Ordering::SeqCst) != 0 && start.elapsed() < BOUND {
            polls += 1;
            if polls < 64 {
                thread::yield_now();
            } else {
                thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

/// A subscription's figures (`sb_subscription_stats`).
#[derive(Clone, Debug, Default)]
pub struct SubscriptionStats {
    /// Messages handled (the Subscribe change message included; evicted ones not).
    pub delivered: u64,
    pub dropped: u64,
    pub congestion_warnings: u64,
    pub queued: u64,
    pub queued_max: u64,
    pub callback_max_ns: u64,
    pub callback_max_type: Option<TypeRef>,
    /// Above its high-water mark now.
    pub congested: bool,
}

/// A subscription's uniqueid: "<topic name>:<number>". Built by hand, in one
/// allocation of the right size: every subscribe and unsubscribe builds one for its change
/// message, and `format!` made that a third of a subscribe/unsubscribe cycle's
/// instructions (W9).
fn uniqueid_text(topic: &Topic, number: u64) -> CString {
    let name = topic.name_cstr().to_bytes();
    let mut digits = [0u8; 20]; // u64::MAX has 20 digits
    let mut at = digits.len();
    let mut n = number;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut text = Vec::with_capacity(name.len() + 1 + (digits.len() - at) + 1);
    text.extend_from_slice(name);
    text.push(b':');
    text.extend_from_slice(&digits[at..]);
    CString::new(text).expect("topic names have no NUL")
}

/// The type of Subscribe / Unsubscribe change messages.
pub fn change_type() -> &'static Arc<MessageType> {
    static TYPE: LazyLock<Arc<MessageType>> =
        LazyLock::new(|| MessageType::builtin("sb_subscription_change"));
    &TYPE
}

/// C view of a change message (`sb_subscription_change`).
#[repr(C)]
pub struct ChangeView {
    pub topic: *const Topic,
    pub uniqueid: *const c_char,
    pub description: *const c_char,
}

/// Payload of a change message. `view` comes first so the payload's address is the C
/// struct's address.
#[repr(C)]
pub struct SubscriptionChange {
    view: ChangeView,
    topic: Arc<Topic>,
    uniqueid: CString,
    number: u64,
    unsubscribe: bool,
}

// SAFETY: the view's pointers point into `topic` and `uniqueid`, owned by the same value
// and immutable for its whole life.
unsafe impl Send for SubscriptionChange {}
// SAFETY: as above.
unsafe impl Sync for SubscriptionChange {}

impl SubscriptionChange {
    fn message(topic: &Arc<Topic>, number: u64, unsubscribe: bool) -> MessageRef {
        let uniqueid = uniqueid_text(topic, number);
        let description = if unsubscribe {
            c"Unsubscribe"
        } else {
            c"Subscribe"
        };
        let change = SubscriptionChange {
            view: ChangeView {
                topic: Arc::as_ptr(topic),
                uniqueid: uniqueid.as_ptr(),
                description: description.as_ptr(),
            },
            topic: Arc::clone(topic),
            uniqueid,
            number,
            unsubscribe,
        };
        Message::with_value(change_type(), change)
    }
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }
    pub fn uniqueid(&self) -> &str {
        self.uniqueid.to_str().unwrap_or("")
    }
    pub fn is_unsubscribe(&self) -> bool {
        self.unsubscribe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A join waits for the releasing window of its own subscription only: with the
    /// window of a subscription in another slot held open, it returns at once (a single
    /// count for every subscription made it wait out the whole bound, 2 s); with its own
    /// open, it returns once that window closes.
    #[test]
    fn a_join_waits_only_for_its_own_releasing_window() {
        let boxes: Vec<Mailbox> = (0..64).map(|_| Mailbox::new()).collect();
        let a = releasing::Key::of(&boxes[0]);
        let b = boxes
            .iter()
            .map(releasing::Key::of)
            .find(|k| k.index() != a.index())
            .expect("64 mailboxes share no slot with the first");
        releasing::enter(a);
        let start = Instant::now();
        releasing::wait(b);
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1),
            "a join waited for another subscription's window"
        );
        let closed = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                closed.store(true, Ordering::SeqCst);
                releasing::leave(a);
            });
            releasing::wait(a);
            assert!(
                closed.load(Ordering::SeqCst),
                "a join returned while its own window was open"
            );
        });
    }

    #[test]
    fn uniqueid_text_is_name_colon_number() {
        let topic = Topic::create("uniqueid/text").unwrap();
        for (n, want) in [
            (0, "uniqueid/text:0"),
            (7, "uniqueid/text:7"),
            (10, "uniqueid/text:10"),
            (1234567890, "uniqueid/text:1234567890"),
            (u64::MAX, "uniqueid/text:18446744073709551615"),
        ] {
            assert_eq!(uniqueid_text(&topic, n).to_str().unwrap(), want);
        }
    }
}
