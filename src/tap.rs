//! Taps: observers that the publish walk calls inline, and the interest epoch.
//!
//! A layer above the core (the cluster) needs to see every publish that reaches some
//! topics, on the publisher's thread and in publish order, without being a subscription
//! (a subscription's callback may run later on another thread, and subscriptions are
//! visible to everyone counting them). A tap is that: one per topic at most, called by
//! the walk with `through_tap` telling whether this publish already passed another
//! tapped topic on its way here (so a layer can act once per publish, at the first tapped
//! topic). A tap must be quick and must not block: it runs inside `sb_publish`.
//!
//! Topics without a tap pay one relaxed load of a flag they already share a cache line
//! with; the taps themselves live in a global copy-on-write map keyed by topic number.
//!
//! A layer with several instances (two clusters joined at once) claims a topic before it
//! taps it (`claim`), so that one instance never replaces another's tap: the first would
//! go on listing the topic as its own while the second took its publishes. A claim made
//! before a fork is void in the child (the instance that made it has no threads there).
//!
//! The interest epoch counts changes to who wants what (subscribe, unsubscribe, filter
//! changes, forwards): a layer that mirrors `Topic::wants` elsewhere polls it to know
//! when to look again.

use crate::message::MessageRef;
use crate::topic::Topic;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

/// An inline observer of publishes reaching a topic.
pub trait Tap: Send + Sync {
    /// `msg` was published to `topic` or forwarded into it. `through_tap`: the publish
    /// reached `topic` through a topic whose tap claimed it. Returns whether this tap
    /// claims the publish (the topics it reaches from here are then `through_tap`).
    fn on_publish(&self, topic: &Topic, msg: &MessageRef, through_tap: bool) -> bool;
}

type TapMap = HashMap<u64, Arc<dyn Tap>>;
static TAPS: LazyLock<ArcSwap<TapMap>> = LazyLock::new(Default::default);
/// Claims: topic number -> (owner, fork generation of the claim).
type Claims = HashMap<u64, (usize, u64)>;
/// Serializes writers of `TAPS` (readers never lock), and holds the claims.
static TAPS_WRITE: Mutex<Option<Claims>> = Mutex::new(None);

thread_local! {
    /// The tap writers' lock, held across a fork by the thread that forks.
    static FORK_GUARD: std::cell::RefCell<Option<parking_lot::MutexGuard<'static, Option<Claims>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Before a fork: a child must not inherit the lock held by a thread it does not have
/// (its first share would wait forever).
pub(crate) fn fork_lock() {
    let guard = TAPS_WRITE.lock();
    let _ = FORK_GUARD.try_with(|g| *g.borrow_mut() = Some(guard));
}

/// After a fork, in the parent or the child (the thread that forked).
pub(crate) fn fork_unlock() {
    let _ = FORK_GUARD.try_with(|g| drop(g.borrow_mut().take()));
}

/// What `claim` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The topic was free: it is the owner's now.
    New,
    /// The owner held it already.
    Held,
    /// Another owner holds it: the owner must not tap it.
    Taken,
}

/// Claims `topic` for `owner` (any number unique among live owners, e.g. an address).
pub fn claim(topic: &Topic, owner: usize) -> Claim {
    let mut w = TAPS_WRITE.lock();
    let claims = w.get_or_insert_with(HashMap::new);
    let generation = crate::fork::generation();
    match claims.get(&topic.number()) {
        Some(&(o, g)) if g == generation && o == owner => Claim::Held,
        Some(&(_, g)) if g == generation => Claim::Taken,
        _ => {
            claims.insert(topic.number(), (owner, generation));
            Claim::New
        }
    }
}

/// Gives up `owner`'s claim of `topic` and removes its tap; nothing when another owner
/// holds it.
pub fn unclaim(topic: &Topic, owner: usize) {
    let mut w = TAPS_WRITE.lock();
    let claims = w.get_or_insert_with(HashMap::new);
    if claims.get(&topic.number()).map(|&(o, _)| o) != Some(owner) {
        return;
    }
    claims.remove(&topic.number());
    let mut map = TapMap::clone(&TAPS.load());
    map.remove(&topic.number());
    topic.set_has_tap(false);
    TAPS.store(Arc::new(map));
}

static INTEREST_EPOCH: AtomicU64 = AtomicU64::new(0);

/// Installs `tap` on `topic` (replacing any), or removes it with None. A publish that
/// starts after this returns sees the change. A layer that claims topics (`claim`) calls
/// it only for topics it holds.
pub fn set_tap(topic: &Topic, tap: Option<Arc<dyn Tap>>) {
    let _w = TAPS_WRITE.lock();
    let mut map = TapMap::clone(&TAPS.load());
    match tap {
        Some(t) => {
            map.insert(topic.number(), t);
        }
        None => {
            map.remove(&topic.number());
        }
    }
    topic.set_has_tap(map.contains_key(&topic.number()));
    TAPS.store(Arc::new(map));
}

/// Calls `topic`'s tap, if it has one; returns whether the tap claimed the publish.
pub(crate) fn run(topic: &Topic, msg: &MessageRef, through_tap: bool) -> bool {
    let taps = TAPS.load();
    taps.get(&topic.number())
        .is_some_and(|tap| tap.on_publish(topic, msg, through_tap))
}

/// The current interest epoch (see the module comment).
pub fn interest_epoch() -> u64 {
    INTEREST_EPOCH.load(Ordering::Acquire)
}

/// Someone's interest changed.
pub(crate) fn interest_changed() {
    INTEREST_EPOCH.fetch_add(1, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::{claim, unclaim, Claim};
    use crate::topic::Topic;

    #[test]
    fn a_claimed_topic_is_refused_to_other_owners_until_given_up() {
        let t = Topic::create("tap-claims").unwrap();
        assert_eq!(claim(&t, 1), Claim::New);
        assert_eq!(claim(&t, 1), Claim::Held);
        assert_eq!(claim(&t, 2), Claim::Taken);
        unclaim(&t, 2); // not its own: nothing
        assert_eq!(claim(&t, 2), Claim::Taken);
        unclaim(&t, 1);
        assert_eq!(claim(&t, 2), Claim::New);
        unclaim(&t, 2);
    }
}
