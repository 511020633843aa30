//! fork() support: a process that set up the bus and then forks (as Kamailio forks its
//! workers after loading modules) can use the bus in each child.
//!
//! Only the forking thread survives in a child, so:
//! - the global locks are taken before the fork and released on both sides, so no child
//!   inherits one in a held state (log queue, registries, forward graph, pool, taps);
//! - the log thread is started again by the child's first log line;
//! - every worker group's pool forgets its workers and starts new ones on demand;
//! - the timer thread is started again by the child's first timer; the parent's pending
//!   timers stay the parent's (the child sets its copies aside, see `timer`);
//! - each dedicated subscription remembers the fork generation its thread belongs to and
//!   starts a new thread on the first delivery in a newer generation.
//!
//! Forking while other threads are publishing is not supported (a subscription's own
//! mailbox lock could be held at that instant); fork from a quiescent moment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// Fork generation of this process: 0 in the original process, +1 in each child.
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Installs the fork handlers (once per process; cheap after the first call).
pub(crate) fn install() {
    INSTALL.call_once(|| {
        // SAFETY: the three handlers are plain extern "C" functions with no arguments,
        // valid for the life of the process (the library is never unloaded: -z nodelete).
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        if rc != 0 {
            crate::log::warn("pthread_atfork failed: the bus will not work in forked children");
        }
    });
}

extern "C" fn prepare() {
    // The order every other path takes them in: a log or alert handler runs holding the
    // first and may take the alert registry's; an alert change is queued to the log
    // under the alert registry's lock.
    crate::log::fork_lock_handlers();
    crate::stats::fork_lock();
    crate::log::fork_lock_queue();
    crate::tap::fork_lock();
    crate::message_type::fork_lock();
    crate::topic::fork_lock();
    crate::forward::fork_lock();
    crate::worker_group::fork_lock();
    crate::timer::fork_lock();
}

extern "C" fn parent() {
    crate::timer::fork_unlock();
    // SAFETY: `prepare` took these locks on this thread, in this order.
    crate::worker_group::fork_unlock();
    unsafe {
        crate::forward::fork_unlock();
        crate::topic::fork_unlock();
        crate::message_type::fork_unlock();
    }
    crate::tap::fork_unlock();
    crate::log::fork_unlock();
    crate::stats::fork_unlock();
}

extern "C" fn child() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
    crate::timer::fork_reset_and_unlock();
    // SAFETY: `prepare` took these locks on the thread that forked, which is this
    // child's only thread.
    crate::worker_group::fork_reset_and_unlock();
    crate::subscription::releasing::fork_reset();
    unsafe {
        crate::forward::fork_unlock();
        crate::topic::fork_unlock();
        crate::message_type::fork_unlock();
    }
    crate::tap::fork_unlock();
    crate::log::fork_reset_and_unlock();
    crate::stats::fork_unlock();
}
