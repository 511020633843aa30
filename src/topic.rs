//! Topics: named publish points, their registry, and the publish path.
//!
//! The publish path takes no lock: a topic's subscriber list and forward list are
//! immutable snapshots behind arc-swap (the first element in a slot of the topic, the
//! others in a list: `split_list`), replaced by the (rare) writers. A publish walks the
//! topic and, transitively, the topics it forwards to, delivering straight into each
//! subscription's mailbox: forwarding adds no queue hop. Each topic is visited at most
//! once per publish and a subscription belongs to exactly one topic, so diamonds deliver
//! once per subscription. Every walk through forwards (publish, the cycle check,
//! counting, `wants`) keeps its own stack or worklist: chains of forwards may be any
//! length, and callbacks run on pool threads with small stacks.
//!
//! Dropping a topic cannot cascade down a chain of forwards: every forward in a topic's
//! lists holds that topic (its `from`), so a topic whose last reference goes has no
//! forwards left, and a forward's drop releases its `to`, which is in the same case.
//!
//! Unsubscribing and cancelling a forward cost O(1) amortized, however many subscriptions
//! or forwards the topic has: the element is flagged (publishers skip it) and the list is
//! rebuilt only once flagged elements are half of it (`small_list::retire`).

use crate::eid::Eid;
use crate::error::{Error, ErrorKind, Result};
use crate::forward::Forward;
use crate::message::{Message, MessageRef};
use crate::message_type::{MessageType, DEAD_MAGIC};
use crate::names::check_name;
use crate::small_list::SmallList;
use crate::split_list::{self, Snapshot};
use crate::subscription::Subscription;
use crate::tap;
use arc_swap::{ArcSwap, ArcSwapOption};
use once_cell::race::OnceBox;
use parking_lot::Mutex;
use smallvec::SmallVec;
use std::borrow::Borrow;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock, Weak};

pub(crate) const TOPIC_MAGIC: u32 = 0x5342_5450; // "SBTP"

type SubList = SmallList<Arc<Subscription>>;
pub(crate) type ForwardList = SmallList<Arc<Forward>>;

/// Field order: the flags fill what was the padding after `magic`, and the lock (one
/// byte, its counts in the side part) and one more flag come last: 72 bytes, so a topic
/// takes a 96-byte block of the allocator instead of 112 (W8 holds 100,000; see
/// `layout_sizes` in lib.rs).
#[repr(C)]
pub struct Topic {
    magic: u32,
    /// Some forward is in the lists: lets the common publish skip loading them.
    has_forwards: AtomicBool,
    has_more_subs: AtomicBool,
    has_more_forwards: AtomicBool,
    /// A tap is installed (`tap`): lets every other publish skip the tap map.
    has_tap: AtomicBool,
    name: CString,
    /// Process-unique number; the uniqueid text is built on demand.
    number: u64,
    /// When the topic was created (CLOCK_REALTIME ns), for its statistics.
    created_ns: u64,
    /// What most topics never need, in one thin box allocated on first use: the
    /// detail, the uniqueid text, the publish counters (allocated by the first
    /// publish), and the subscriptions and forwards past the first. Keeps the
    /// counters, written by every publish, off the cache line that publishers only
    /// read.
    side: OnceBox<TopicSide>,
    /// The subscriptions are a split list (`split_list`): the first in this slot, the
    /// others in the side part (`more_subs`, when `has_more_subs`), so a topic with one
    /// subscription allocates no list. May hold unsubscribed subscriptions, which
    /// publishers skip.
    first_sub: ArcSwapOption<Subscription>,
    /// The forwards out of this topic, split the same way. Written under the forward
    /// graph lock. May hold cancelled forwards, which publishers skip.
    first_forward: ArcSwapOption<Forward>,
    /// Serializes writers of the lists and of the retirement counts.
    write: Mutex<()>,
    /// Some subscription may be in the lists (cleared, under `write`, once both parts
    /// are empty): a topic that only forwards (a channel's topic into its aggregate)
    /// costs its publishers no load of an empty list. After the lock, in what was
    /// padding.
    has_subs: AtomicBool,
}

/// A topic's rarely needed parts (see `Topic::side`).
struct TopicSide {
    detail: Option<CString>,
    uniqueid: OnceLock<CString>,
    published: AtomicU64,
    not_dispatched: AtomicU64,
    /// Subscriptions and forwards past the first (see `Topic::first_sub`).
    more_subs: split_list::More<Subscription>,
    more_forwards: split_list::More<Forward>,
    /// Unsubscribed subscriptions and cancelled forwards still in those lists (see
    /// `small_list::retire`); written under the topic's `write` lock.
    retired_subs: AtomicU32,
    retired_forwards: AtomicU32,
}

impl Default for TopicSide {
    fn default() -> TopicSide {
        TopicSide {
            detail: None,
            uniqueid: OnceLock::new(),
            published: AtomicU64::new(0),
            not_dispatched: AtomicU64::new(0),
            more_subs: ArcSwap::new(Arc::clone(&EMPTY_SUBS)),
            more_forwards: ArcSwap::new(Arc::clone(&EMPTY_FORWARDS)),
            retired_subs: AtomicU32::new(0),
            retired_forwards: AtomicU32::new(0),
        }
    }
}

/// A topic's figures (`sb_topic_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopicStats {
    /// Publishes that reached this topic: published to it, or forwarded into it
    /// (subscription change messages are not counted).
    pub published: u64,
    /// Of those, the ones that reached at least one subscription (here or further on).
    pub dispatched: u64,
    /// Of those, the ones that reached no subscription.
    pub not_dispatched: u64,
    pub subscribers: u32,
    pub created_ns: u64,
}

static EMPTY_SUBS: LazyLock<Arc<SubList>> = LazyLock::new(|| Arc::new(SmallList::Empty));
static EMPTY_FORWARDS: LazyLock<Arc<ForwardList>> = LazyLock::new(|| Arc::new(SmallList::Empty));
type RegistryMap = HashSet<RegEntry>;
static REGISTRY: LazyLock<Mutex<RegistryMap>> = LazyLock::new(Default::default);

/// A registry entry: a weak reference to a topic, hashed and compared by that topic's
/// name, read through the reference. One pointer per entry, and each name stored once
/// (W8: a key of its own cost 32 bytes per topic, a borrowed key beside the reference
/// about 21 bytes of table per topic more than this).
///
/// Invariant: an entry is inserted only for a topic just created, and removed (under
/// the registry lock) by that topic's `Drop` before its fields are dropped, or before a
/// new topic of the same name replaces it. Every entry is read under the registry lock,
/// so the topic's `name` is alive whenever it is read, even once the topic's last
/// strong reference is gone (its `Drop` waits for the lock, and until it has removed
/// the entry it only reads `name` too).
struct RegEntry(Weak<Topic>);

impl RegEntry {
    fn name(&self) -> &[u8] {
        // SAFETY: the allocation lives as long as this weak reference, and by the
        // invariant above the topic's fields are not dropped while the entry is in the
        // registry, which is only read under its lock.
        unsafe { (*self.0.as_ptr()).name.as_bytes() }
    }
}

impl Borrow<[u8]> for RegEntry {
    fn borrow(&self) -> &[u8] {
        self.name()
    }
}
// Hash and Eq as the borrowed bytes', as `Borrow` requires.
impl Hash for RegEntry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name().hash(state);
    }
}
impl PartialEq for RegEntry {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}
impl Eq for RegEntry {}
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Topics already visited by one publish, by process-unique number (not by address: a
/// topic visited and released while the walk goes on could see its address reused by a
/// new topic that the walk then reaches, and skips). Most publishes touch one or two
/// topics, so the first few live inline and no allocation happens; past those, a hash
/// set, so that a topic forwarding to thousands of others is not walked in quadratic
/// time (10,000 forwards took 8.6 ms per publish with a list).
struct Visited {
    inline: [u64; 8],
    n: usize,
    more: HashSet<u64>,
}

impl Visited {
    fn new(first: &Topic) -> Visited {
        let mut inline = [0; 8];
        inline[0] = first.number;
        Visited {
            inline,
            n: 1,
            more: HashSet::new(),
        }
    }
    /// Records `t`; false when it was already there.
    fn insert(&mut self, t: &Topic) -> bool {
        let t = t.number;
        if self.inline[..self.n].contains(&t) {
            return false;
        }
        if self.n < self.inline.len() {
            self.inline[self.n] = t;
            self.n += 1;
            true
        } else {
            self.more.insert(t)
        }
    }
}

/// Who a publish is for, beyond the plain case.
#[derive(Default)]
pub(crate) struct PublishCtx<'a> {
    /// Skip this subscription (it already got the message another way).
    pub(crate) exclude: Option<&'a Arc<Subscription>>,
    /// Report the sequence number of the delivery to this subscription.
    pub(crate) watch: Option<&'a Arc<Subscription>>,
    pub(crate) watched_seq: Option<u64>,
}

impl Topic {
    /// Creates the topic `name`, or returns the live topic that holds that name.
    pub fn create(name: &str) -> Result<Arc<Topic>> {
        Topic::create_with_detail(name, "")
    }

    pub fn create_with_detail(name: &str, detail: &str) -> Result<Arc<Topic>> {
        check_name("topic", name)?;
        if detail.contains('\0') {
            return Err(Error::invalid("topic detail contains a NUL byte"));
        }
        let mut reg = REGISTRY.lock();
        if let Some(live) = reg.get(name.as_bytes()).and_then(|e| e.0.upgrade()) {
            return Ok(live);
        }
        Ok(Topic::register_new(&mut reg, name, detail))
    }

    /// A new topic named `base`, or `base-2`, `base-3`... : the first name no live topic
    /// holds. For topics that must not be shared with whoever created the same name
    /// (a caching topic's update topic: two caches over one original would otherwise
    /// each deliver the other's updates).
    pub(crate) fn create_distinct(base: &str) -> Result<Arc<Topic>> {
        check_name("topic", base)?;
        let mut reg = REGISTRY.lock();
        let mut name = base.to_owned();
        let mut k = 1u64;
        // `strong_count`, not `upgrade`: an upgraded reference dropped here, under the
        // registry lock, could be a dying topic's last one, and its drop takes this lock.
        while reg
            .get(name.as_bytes())
            .is_some_and(|e| e.0.strong_count() > 0)
        {
            k += 1;
            name = format!("{base}-{k}");
            check_name("topic", &name)?;
        }
        Ok(Topic::register_new(&mut reg, &name, ""))
    }

    /// Creates a topic of a name no live topic holds (checked by the caller, under the
    /// registry lock it passes).
    fn register_new(reg: &mut RegistryMap, name: &str, detail: &str) -> Arc<Topic> {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let topic = Arc::new(Topic {
            magic: TOPIC_MAGIC,
            name: CString::new(name).expect("checked for NUL"),
            number: n,
            created_ns: crate::message::now_realtime_ns(),
            side: if detail.is_empty() {
                OnceBox::new()
            } else {
                OnceBox::with_value(Box::new(TopicSide {
                    detail: Some(CString::new(detail).expect("checked for NUL")),
                    ..TopicSide::default()
                }))
            },
            has_forwards: AtomicBool::new(false),
            has_more_subs: AtomicBool::new(false),
            has_more_forwards: AtomicBool::new(false),
            has_tap: AtomicBool::new(false),
            first_sub: ArcSwapOption::const_empty(),
            first_forward: ArcSwapOption::const_empty(),
            write: Mutex::new(()),
            has_subs: AtomicBool::new(false),
        });
        // A dead topic's entry goes first: `insert` would keep it (an equal entry).
        reg.remove(name.as_bytes());
        reg.insert(RegEntry(Arc::downgrade(&topic)));
        topic
    }

    /// The live topic named `name`.
    pub fn get(name: &str) -> Option<Arc<Topic>> {
        REGISTRY
            .lock()
            .get(name.as_bytes())
            .and_then(|e| e.0.upgrade())
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == TOPIC_MAGIC
    }
    pub fn name(&self) -> &str {
        self.name.to_str().expect("checked UTF-8")
    }
    pub(crate) fn name_cstr(&self) -> &CStr {
        &self.name
    }
    pub fn detail(&self) -> &CStr {
        self.side
            .get()
            .and_then(|s| s.detail.as_deref())
            .unwrap_or(c"")
    }
    pub fn uniqueid(&self) -> &CStr {
        self.side().uniqueid.get_or_init(|| {
            CString::new(format!("{}-{:x}", Eid::default_eid(), self.number)).expect("no NUL")
        })
    }
    fn side(&self) -> &TopicSide {
        self.side.get_or_init(Box::default)
    }

    /// Counts one publish of `msg` that reached this topic (published to it or
    /// forwarded into it); `reached`: subscriptions it reached from here, through forwards
    /// included. Subscription change messages are the bus's own bookkeeping and are not
    /// counted: so a topic that only ever sees subscribes (W8's hundred thousand) never
    /// allocates its counters.
    #[inline]
    fn count_publish(&self, msg: &Message, reached: usize) {
        #[cfg(not(feature = "no-stats"))]
        {
            if Arc::ptr_eq(msg.message_type(), crate::subscription::change_type()) {
                return;
            }
            let side = self.side();
            side.published.fetch_add(1, Ordering::Relaxed);
            if reached == 0 {
                side.not_dispatched.fetch_add(1, Ordering::Relaxed);
            }
        }
        #[cfg(feature = "no-stats")]
        let _ = (msg, reached);
    }

    /// This topic's figures now.
    pub fn stats(&self) -> TopicStats {
        let (published, not_dispatched) = self.side.get().map_or((0, 0), |s| {
            (
                s.published.load(Ordering::Relaxed),
                s.not_dispatched.load(Ordering::Relaxed),
            )
        });
        TopicStats {
            published,
            dispatched: published.saturating_sub(not_dispatched),
            not_dispatched,
            subscribers: self.subscriber_count() as u32,
            created_ns: self.created_ns,
        }
    }

    /// Adds `sub` unless it was already unsubscribed (a callback may unsubscribe while
    /// handling its Subscribe message, before this runs); checked under the same lock
    /// `remove_subscriber` takes, so one of the two always sees the other.
    pub(crate) fn add_subscriber(&self, sub: &Arc<Subscription>) {
        let _w = self.write.lock();
        if !sub.is_subscribed() {
            return;
        }
        // Before the element: a publisher that sees it sees the flag.
        self.has_subs.store(true, Ordering::Release);
        split_list::push(
            &self.first_sub,
            &self.has_more_subs,
            || &self.side().more_subs,
            Arc::clone(sub),
        );
        tap::interest_changed();
    }

    /// Adds `forward` (out of this topic). Called under the forward graph lock.
    pub(crate) fn add_forward(&self, forward: &Arc<Forward>) {
        let _w = self.write.lock();
        split_list::push(
            &self.first_forward,
            &self.has_more_forwards,
            || &self.side().more_forwards,
            Arc::clone(forward),
        );
        self.has_forwards.store(true, Ordering::Release);
    }

    /// This topic's subscriptions now (unsubscribed ones included).
    #[inline]
    fn subscribers(&self) -> Snapshot<Subscription> {
        Snapshot::load(&self.first_sub, &self.has_more_subs, || {
            self.side.get().map(|s| &s.more_subs)
        })
    }

    /// The forwards out of this topic now (cancelled ones included).
    #[inline]
    fn forwards(&self) -> Snapshot<Forward> {
        Snapshot::load(&self.first_forward, &self.has_more_forwards, || {
            self.side.get().map(|s| &s.more_forwards)
        })
    }

    /// Process-unique number of this topic.
    pub fn number(&self) -> u64 {
        self.number
    }

    pub(crate) fn set_has_tap(&self, on: bool) {
        self.has_tap.store(on, Ordering::Release);
    }

    /// Runs this topic's tap, if any; true when it claimed the publish.
    fn run_tap(&self, msg: &MessageRef, through_tap: bool) -> bool {
        self.has_tap.load(Ordering::Acquire) && tap::run(self, msg, through_tap)
    }

    /// One of this topic's subscriptions was unsubscribed (its flag is already clear, so
    /// publishers skip it): it leaves the list now or with others later.
    pub(crate) fn retire_subscriber(&self) {
        let w = self.write.lock();
        let side = self.side.get();
        let mut gone = side.map_or(0, |s| s.retired_subs.load(Ordering::Relaxed));
        let replaced = split_list::retire_one(
            &self.first_sub,
            &self.has_more_subs,
            side.map(|s| &s.more_subs),
            &mut gone,
            |s| !s.is_subscribed(),
            &EMPTY_SUBS,
        );
        if let Some(side) = side {
            side.retired_subs.store(gone, Ordering::Relaxed);
        }
        if split_list::is_empty(&self.first_sub, side.map(|s| &s.more_subs)) {
            self.has_subs.store(false, Ordering::Release);
        }
        drop(w);
        tap::interest_changed();
        drop(replaced); // may drop the last reference to subscriptions: not under the lock
    }

    /// A forward out of this topic was cancelled (its flag is set, so publishers skip
    /// it): it leaves the list now or with others later. Called under the forward graph
    /// lock; returns the replaced list, to be dropped once that lock is released (it
    /// may hold the last reference to forwards, and through them to topics).
    pub(crate) fn retire_forward(&self) -> split_list::Replaced<Forward> {
        let _w = self.write.lock();
        let side = self.side.get();
        let more = side.map(|s| &s.more_forwards);
        let mut gone = side.map_or(0, |s| s.retired_forwards.load(Ordering::Relaxed));
        let replaced = split_list::retire_one(
            &self.first_forward,
            &self.has_more_forwards,
            more,
            &mut gone,
            |f| f.is_cancelled(),
            &EMPTY_FORWARDS,
        );
        if let Some(side) = side {
            side.retired_forwards.store(gone, Ordering::Relaxed);
        }
        let any = !split_list::is_empty(&self.first_forward, more);
        self.has_forwards.store(any, Ordering::Release);
        replaced
    }

    /// Publishes `msg`; returns the number of subscriptions it was queued to (or, for
    /// synchronous ones, delivered to).
    pub fn publish(&self, msg: &MessageRef) -> usize {
        self.publish_ctx(msg, &mut PublishCtx::default())
    }

    pub(crate) fn publish_except(
        &self,
        msg: &MessageRef,
        exclude: Option<&Arc<Subscription>>,
    ) -> usize {
        self.publish_ctx(
            msg,
            &mut PublishCtx {
                exclude,
                ..Default::default()
            },
        )
    }

    pub(crate) fn publish_ctx(&self, msg: &MessageRef, ctx: &mut PublishCtx<'_>) -> usize {
        msg.message_type().count_publish();
        let mut count = self.deliver_local(msg, ctx);
        let tapped = self.run_tap(msg, false);
        if self.has_forwards.load(Ordering::Acquire) {
            count += self.publish_through_forwards(msg, ctx, tapped);
        }
        self.count_publish(msg, count);
        count
    }

    /// Delivers `msg` to every topic reached from this one through forwards (not to this
    /// one), each once, in the order a depth-first recursion would; returns the
    /// subscriptions reached. `tapped`: whether this topic's tap claimed the publish.
    ///
    /// The walk keeps its own stack instead of recursing: a chain of forwards may be
    /// any length (a 100,000-topic chain recursed as deep, which overflowed a pool
    /// thread's stack). Each frame holds the forward list it iterates (so the topics in
    /// it stay alive), how far it got, what its topic's subtree reached so far (counted
    /// when the frame ends, as the recursion counted on return) and whether the publish
    /// passed a tapped topic on the way. Topics without forwards of their own get no
    /// frame, and the first few frames live inline: forwarding A to B costs no
    /// allocation and one list load, as before.
    fn publish_through_forwards(
        &self,
        msg: &MessageRef,
        ctx: &mut PublishCtx<'_>,
        tapped: bool,
    ) -> usize {
        struct Frame {
            list: Snapshot<Forward>,
            next: usize,
            reached: usize,
            tapped: bool,
        }
        let list = self.forwards();
        // The common shape, a single forward into a topic that forwards nowhere (a
        // channel's topic into its aggregate, a pool topic into the pooled one): that
        // topic is the whole walk, so no stack and no visited set (a forward into its
        // own source would be a cycle, which is refused).
        if let (Some(Some(fwd)), None) = (list.slot(0), list.slot(1)) {
            let to = fwd.to();
            if !to.has_forwards.load(Ordering::Acquire) {
                if fwd.is_cancelled() {
                    return 0;
                }
                return to.deliver_leaf(msg, ctx, tapped);
            }
        }
        let mut visited = Visited::new(self);
        let mut stack: SmallVec<[Frame; 4]> = SmallVec::new();
        stack.push(Frame {
            list,
            next: 0,
            reached: 0,
            tapped,
        });
        loop {
            let top = stack.last_mut().expect("the walk ends when the stack does");
            let i = top.next;
            let Some(slot) = top.list.slot(i) else {
                // This frame's topic is done: count its subtree, then add it to the
                // topic that forwarded into it (the target of that frame's last step).
                let done = stack.pop().expect("non-empty");
                let Some(parent) = stack.last_mut() else {
                    return done.reached;
                };
                if let Some(Some(fwd)) = parent.list.slot(parent.next - 1) {
                    fwd.to().count_publish(msg, done.reached);
                }
                parent.reached += done.reached;
                continue;
            };
            top.next = i + 1;
            let Some(fwd) = slot.filter(|f| !f.is_cancelled()) else {
                continue;
            };
            let to = fwd.to();
            if !visited.insert(to) {
                continue;
            }
            if !to.has_forwards.load(Ordering::Acquire) {
                top.reached += to.deliver_leaf(msg, ctx, top.tapped);
                continue;
            }
            let reached = to.deliver_local(msg, ctx);
            let tapped = to.run_tap(msg, top.tapped) || top.tapped;
            let list = to.forwards();
            stack.push(Frame {
                list,
                next: 0,
                reached,
                tapped,
            });
        }
    }

    /// A step of the walk into a topic that forwards nowhere: its subscriptions, its
    /// tap, its count; returns the subscriptions reached. `tapped`: the message already
    /// went through a tap on its way here.
    fn deliver_leaf(&self, msg: &MessageRef, ctx: &mut PublishCtx<'_>, tapped: bool) -> usize {
        let reached = self.deliver_local(msg, ctx);
        self.run_tap(msg, tapped);
        self.count_publish(msg, reached);
        reached
    }

    fn deliver_local(&self, msg: &MessageRef, ctx: &mut PublishCtx<'_>) -> usize {
        if !self.has_subs.load(Ordering::Acquire) {
            return 0;
        }
        let subs = self.subscribers();
        let ty = msg.message_type();
        let mut count = 0;
        for sub in subs.iter() {
            if ctx.exclude.is_some_and(|e| Arc::ptr_eq(e, sub)) || !sub.is_live_for(ty) {
                continue;
            }
            if let Some(seq) = sub.offer(msg, false) {
                count += 1;
                if ctx.watch.is_some_and(|w| Arc::ptr_eq(w, sub)) {
                    ctx.watched_seq = Some(seq);
                }
            }
        }
        count
    }

    /// Calls `f` on this topic and on every topic it reaches through forwards, once each,
    /// until `f` returns true; returns whether it did. Iterative (a worklist, not a
    /// recursion): a chain of forwards may be any length, and this runs on pool threads'
    /// small stacks too. The order is unspecified.
    pub(crate) fn any_reachable(&self, mut f: impl FnMut(&Topic) -> bool) -> bool {
        if f(self) {
            return true;
        }
        if !self.has_forwards.load(Ordering::Acquire) {
            return false;
        }
        let mut visited = Visited::new(self);
        let mut pending: Vec<Arc<Topic>> = Vec::new();
        self.push_forward_targets(&mut visited, &mut pending);
        while let Some(t) = pending.pop() {
            if f(&t) {
                return true;
            }
            t.push_forward_targets(&mut visited, &mut pending);
        }
        false
    }

    /// Pushes the destinations of this topic's live forwards that `visited` does not
    /// hold yet (a cancelled forward may still be in the list, see `retire_forward`).
    fn push_forward_targets(&self, visited: &mut Visited, pending: &mut Vec<Arc<Topic>>) {
        if !self.has_forwards.load(Ordering::Acquire) {
            return;
        }
        for fwd in self.forwards().iter() {
            if !fwd.is_cancelled() && visited.insert(fwd.to()) {
                pending.push(Arc::clone(fwd.to()));
            }
        }
    }

    /// Subscriptions a publish here would reach, including through forwards.
    pub fn subscriber_count(&self) -> usize {
        let mut n = 0;
        self.any_reachable(|t| {
            n += t.subscribers().iter().filter(|s| s.is_subscribed()).count();
            false
        });
        n
    }

    /// Subscriptions of this topic alone.
    pub fn direct_subscribers(&self) -> Vec<Arc<Subscription>> {
        let subs = self.subscribers();
        subs.iter().filter(|s| s.is_subscribed()).cloned().collect()
    }

    /// Would a message of type `ty` reach at least one subscription that accepts it?
    pub fn wants(&self, ty: &MessageType) -> bool {
        self.any_reachable(|t| t.subscribers().iter().any(|s| s.is_live_for(ty)))
    }

    /// Publishes to `sub`'s topic and waits until `sub` handled the message.
    pub fn publish_sync(sub: &Arc<Subscription>, msg: &MessageRef) -> Result<usize> {
        if !sub.is_subscribed() {
            return Err(Error::state(format!(
                "subscription {} is unsubscribed",
                sub.uniqueid()
            )));
        }
        let mut ctx = PublishCtx {
            watch: Some(sub),
            ..Default::default()
        };
        let count = sub.topic().publish_ctx(msg, &mut ctx);
        if let Some(seq) = ctx.watched_seq {
            if sub.is_running_on_this_thread() {
                return Err(Error::new(
                    ErrorKind::Deadlock,
                    "publish_sync to a subscription from its own callback cannot wait; the message is delivered after the callback returns",
                ));
            }
            sub.wait_handled(seq)?;
        }
        Ok(count)
    }
}

impl Drop for Topic {
    fn drop(&mut self) {
        let mut reg = REGISTRY.lock();
        let name = self.name.as_bytes();
        if let Some(e) = reg.get(name) {
            if std::ptr::eq(e.0.as_ptr(), self) {
                reg.remove(name);
                if reg.is_empty() {
                    // The last topic is gone: give the table back (a process that stops
                    // using the bus holds no registry memory).
                    reg.shrink_to_fit();
                }
            }
        }
        drop(reg);
        self.magic = DEAD_MAGIC;
    }
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Topic({})", self.name())
    }
}

/// Every live topic. The registry lock is held only to collect the references: the
/// caller formats without it (and drops them after, which may take it again).
pub fn live_topics() -> Vec<Arc<Topic>> {
    REGISTRY
        .lock()
        .iter()
        .filter_map(|e| e.0.upgrade())
        .collect()
}

/// Number of live named topics (for leak checks).
pub fn live_topic_count() -> usize {
    REGISTRY
        .lock()
        .iter()
        .filter(|e| e.0.strong_count() > 0)
        .count()
}

/// Takes the registry lock for fork() (see `fork`).
pub(crate) fn fork_lock() {
    std::mem::forget(REGISTRY.lock());
}

/// Releases the lock `fork_lock` took.
///
/// # Safety
/// Only after `fork_lock` on this thread (or in a child forked from it).
pub(crate) unsafe fn fork_unlock() {
    // SAFETY: per the contract above, the lock is held and its guard was forgotten.
    unsafe { REGISTRY.force_unlock() };
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn registry_keys_borrow_the_topics_names() {
        let a = Topic::create("test/registry/a").unwrap();
        let ab = Topic::create("test/registry/ab").unwrap();
        assert!(Arc::ptr_eq(&Topic::get("test/registry/a").unwrap(), &a));
        assert!(Arc::ptr_eq(&Topic::get("test/registry/ab").unwrap(), &ab));
        assert!(Topic::get("test/registry/").is_none());
        // Creating a live name returns the live topic.
        assert!(Arc::ptr_eq(&Topic::create("test/registry/a").unwrap(), &a));
        // A dropped topic leaves no entry (its key pointed into its own name); the name
        // can be created again, and looked up through the new topic's key.
        drop(a);
        assert!(Topic::get("test/registry/a").is_none());
        let again = Topic::create("test/registry/a").unwrap();
        assert_eq!(again.name(), "test/registry/a");
        assert!(Arc::ptr_eq(&Topic::get("test/registry/a").unwrap(), &again));
        // A dead entry still in the map (its topic's last reference went on another
        // thread, whose Drop waits for the registry lock) is replaced.
        let weak = Arc::downgrade(&again);
        let mut reg = REGISTRY.lock();
        let dropper = std::thread::spawn(move || drop(again));
        while weak.strong_count() > 0 {
            std::thread::yield_now();
        }
        let dead = reg.get(b"test/registry/a".as_slice());
        assert!(dead.is_some_and(|e| e.0.upgrade().is_none() && e.name() == b"test/registry/a"));
        let newer = Topic::register_new(&mut reg, "test/registry/a", "");
        drop(reg);
        dropper.join().unwrap(); // its Drop found the newer topic's entry and left it
        assert!(weak.upgrade().is_none());
        assert!(Arc::ptr_eq(&Topic::get("test/registry/a").unwrap(), &newer));
        drop(newer);
        drop(ab);
        assert!(Topic::get("test/registry/a").is_none());
        assert!(Topic::get("test/registry/ab").is_none());
    }

    #[test]
    fn a_registry_entry_is_one_pointer() {
        assert_eq!(
            std::mem::size_of::<RegEntry>(),
            std::mem::size_of::<usize>()
        );
    }
}
