//! Deadlock detection for the library's blocking waits made from inside callbacks.
//!
//! A thread running a callback holds that subscription's run: nobody else delivers to it
//! until the callback returns. If that callback then blocks in `sb_publish_sync`, in a join
//! or on a full `SB_OVERFLOW_BLOCK` queue, it waits for another subscription's runner; if
//! that runner (or the thread it waits for, and so on) waits for a run this thread holds,
//! neither ever returns. Such a wait is refused instead (`SB_E_DEADLOCK`, or a blocking
//! push let through).
//!
//! Only threads inside a callback register here: a thread outside every callback holds no
//! run, so nothing can wait for it and it can close no cycle. A registered thread gains no
//! run while it waits (runs are taken by threads that are not blocked), so every cycle is
//! closed by a registration, and the check of that registration, made under the same lock
//! as every other, sees the whole chain.

use crate::subscription::Subscription;
use crate::sync::{thread_token, ThreadToken};
use std::sync::{Arc, Mutex, PoisonError};

/// The threads waiting now, each with the subscription whose progress it waits for.
/// A handful at most: a linear scan beats hashing.
static WAITING: Mutex<Vec<(ThreadToken, Arc<Subscription>)>> = Mutex::new(Vec::new());

/// Proof that the calling thread may block waiting for `target`'s runner; deregisters
/// when dropped.
pub(crate) struct WaitPermit {
    registered: Option<ThreadToken>,
}

/// Asks to block waiting for `target` to make progress. None: the wait would close a
/// cycle of waits (the thread running `target`, or one it waits for, waits for this one).
pub(crate) fn permit(target: &Arc<Subscription>) -> Option<WaitPermit> {
    if !crate::subscription::in_any_callback() {
        return Some(WaitPermit { registered: None });
    }
    let me = thread_token();
    let mut waiting = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
    let mut next = target.runner();
    // Each step moves to a distinct waiting thread, so the walk is at most that long.
    for _ in 0..=waiting.len() {
        let Some(runner) = next else { break };
        if runner == me {
            return None;
        }
        next = waiting
            .iter()
            .find(|(t, _)| *t == runner)
            .and_then(|(_, sub)| sub.runner());
    }
    waiting.push((me, Arc::clone(target)));
    Some(WaitPermit {
        registered: Some(me),
    })
}

impl Drop for WaitPermit {
    fn drop(&mut self) {
        if let Some(me) = self.registered {
            let mut waiting = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = waiting
                .iter()
                .position(|(t, _)| *t == me)
                .map(|i| waiting.swap_remove(i));
            if waiting.is_empty() {
                waiting.shrink_to_fit(); // waits from callbacks are rare: hold no memory
            }
            drop(waiting);
            drop(entry); // may drop the last reference to a subscription: not under the lock
        }
    }
}
