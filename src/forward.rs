//! Forwarding: everything published to one topic also reaches another's subscriptions.
//!
//! A forward is an element of the source topic's forward list; the publish path follows
//! it directly (see `topic`). Creating and cancelling forwards is serialized by one lock so
//! that the cycle check sees a stable graph; publishers never take it. A cancelled forward
//! is flagged at once and leaves the list with others later (`small_list::retire`), so a
//! cancel costs O(1) amortized however many forwards leave the topic.

use crate::error::{Error, Result};
use crate::message_type::DEAD_MAGIC;
use crate::topic::Topic;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub(crate) const FORWARD_MAGIC: u32 = 0x5342_4657; // "SBFW"

static GRAPH: Mutex<()> = Mutex::new(());

/// `cancelled` sits beside `magic`, in what would be padding: 24 bytes, so a forward
/// takes a 48-byte block of the allocator instead of 64 (W8 holds 100,000 of them).
#[repr(C)]
pub struct Forward {
    magic: u32,
    cancelled: AtomicBool,
    from: Arc<Topic>,
    to: Arc<Topic>,
}

impl Forward {
    /// Forwards every message published to `from` to `to`. Refuses a forward that would
    /// close a cycle (including `from == to`).
    pub fn create(from: &Arc<Topic>, to: &Arc<Topic>) -> Result<Arc<Forward>> {
        let _g = GRAPH.lock();
        // Iterative (see `Topic::any_reachable`): a chain of 100,000 forwards is walked
        // whole when its tail is forwarded to its head.
        if to.any_reachable(|t| std::ptr::eq(t, Arc::as_ptr(from))) {
            return Err(Error::invalid(format!(
                "forwarding '{}' to '{}' would close a cycle",
                from.name(),
                to.name()
            )));
        }
        let forward = Arc::new(Forward {
            magic: FORWARD_MAGIC,
            cancelled: AtomicBool::new(false),
            from: Arc::clone(from),
            to: Arc::clone(to),
        });
        from.add_forward(&forward);
        crate::tap::interest_changed();
        Ok(forward)
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == FORWARD_MAGIC
    }
    pub fn from(&self) -> &Arc<Topic> {
        &self.from
    }
    pub fn to(&self) -> &Arc<Topic> {
        &self.to
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Stops forwarding: a publish that starts after this returns skips the forward.
    /// Costs O(1) amortized (see the module comment).
    pub fn cancel(&self) -> Result<()> {
        if self.cancelled.swap(true, Ordering::AcqRel) {
            return Err(Error::state("forward is already cancelled"));
        }
        let g = GRAPH.lock();
        let replaced = self.from.retire_forward();
        drop(g);
        crate::tap::interest_changed();
        drop(replaced); // may drop the last reference to forwards and topics: unlocked
        Ok(())
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

/// Takes the graph lock for fork() (see `fork`).
pub(crate) fn fork_lock() {
    std::mem::forget(GRAPH.lock());
}

/// Releases the lock `fork_lock` took.
///
/// # Safety
/// Only after `fork_lock` on this thread (or in a child forked from it).
pub(crate) unsafe fn fork_unlock() {
    // SAFETY: per the contract above, the lock is held and its guard was forgotten.
    unsafe { GRAPH.force_unlock() };
}
