//! Aggregate publications of one cache, in the order the aggregates were installed.
//!
//! An aggregate is computed and installed by whichever thread changed its entry, and then
//! published (`publish(original, aggregate)`, user code) with no lock held. Two threads
//! updating one object could otherwise publish in the opposite order of their installs,
//! leaving subscribers with a stale aggregate as the last one they saw. So an install
//! queues its aggregate here while it still holds the shard's write lock (the queue's
//! order is the install order), and publications come only out of the queue, by one
//! thread at a time: the first to find nobody draining drains, the others leave their
//! aggregate to it and return. Nobody waits, so no thread is ever blocked by another's
//! publish function, and a publish function that reenters the cache (its publish reaches
//! a caching topic of the same cache) only queues: the outer drain publishes it next.
//!
//! Lock order: a shard's lock, then the queue's lock; the queue's lock is held only to
//! push or pop, never while publishing or dropping a message.

use crate::message::MessageRef;
use crate::topic::Topic;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An aggregate to publish, and the original topic it goes to.
type Pending = (Arc<Topic>, MessageRef);

#[derive(Default)]
pub(crate) struct AggregateOutbox {
    queue: Mutex<VecDeque<Pending>>,
    /// Some thread is publishing out of the queue.
    draining: AtomicBool,
}

/// Clears `draining` however the drain ends (a publish function that panicked included),
/// so the queue never stays without a drainer.
struct DrainGuard<'a>(&'a AtomicBool);

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl AggregateOutbox {
    /// Queues `aggregate` for `original`. Called under the write lock of the shard that
    /// installed it: installs of one object are serialized by that lock, so they queue in
    /// install order.
    pub(crate) fn push(&self, original: &Arc<Topic>, aggregate: MessageRef) {
        self.queue
            .lock()
            .push_back((Arc::clone(original), aggregate));
    }

    /// Publishes queued aggregates in order with `publish`, unless another thread (or an
    /// outer call on this one) is doing it: that drain publishes ours too before it stops.
    /// Called with no lock held.
    pub(crate) fn drain(&self, publish: impl Fn(&Arc<Topic>, &MessageRef)) {
        loop {
            if self.draining.swap(true, Ordering::SeqCst) {
                return;
            }
            {
                let _guard = DrainGuard(&self.draining);
                loop {
                    let next = self.queue.lock().pop_front();
                    let Some((original, aggregate)) = next else {
                        break;
                    };
                    publish(&original, &aggregate);
                }
            }
            // A push after our last pop may have seen us still draining and left its
            // aggregate to us: look again now that the flag is down.
            if self.queue.lock().is_empty() {
                return;
            }
        }
    }
}
