//! Timed publishing: sb_publish_after, sb_timer_cancel.

use super::message::sb_message;
use super::topic::sb_topic;
use super::{boundary, fail_code, fail_null, Handle};
use crate::error::set_last_error;
use crate::timer::{self, Timer};
use std::ffi::c_int;

/// A timed publish (opaque, refcounted): see sb_publish_after.
pub struct sb_timer {
    _opaque: [u8; 0],
}

impl Handle for sb_timer {
    type Rust = Timer;
    type Ptr = std::sync::Arc<Timer>;
    const WHAT: &'static str = "sb_timer";
    fn magic_ok(r: &Timer) -> bool {
        r.magic_ok()
    }
}

/// Publishes `msg` to `topic` once `delay_ms` milliseconds have passed (never earlier),
/// as sb_publish does, from the library's timer thread, unless sb_timer_cancel cancels
/// it first. 0 fires at once; any delay is accepted (UINT64_MAX never fires in
/// practice). Timers due at the same millisecond fire in creation order. Synchronous
/// subscriptions of `topic` run on the timer thread: keep them short, they delay the
/// timers due after. Pending timers fire in the process that scheduled them only: a
/// forked child does not fire its parent's (README, "Timed publishing"); exiting with
/// timers pending is fine. Returns the timer, or NULL (SB_E_INVAL for a bad handle,
/// SB_E_NOMEM if the timer thread cannot be started).
/// Ownership: `topic` and `msg` are borrowed: the timer takes references of its own to
/// both and keeps them until it has fired or is cancelled. Returns a new reference to
/// the timer (sb_timer_unref); dropping it does not cancel the timer.
#[no_mangle]
pub extern "C" fn sb_publish_after(
    topic: *mut sb_topic,
    msg: *mut sb_message,
    delay_ms: u64,
) -> *mut sb_timer {
    boundary(
        || match (sb_topic::borrow(topic), sb_message::borrow(msg)) {
            (Ok(t), Ok(m)) => match timer::publish_after(&t, &m, delay_ms) {
                Ok(timer) => sb_timer::into_raw(timer),
                Err(e) => fail_null(e),
            },
            (Err(e), _) | (_, Err(e)) => fail_null(e),
        },
    )
}

/// Cancels the timer: returns 1 if it was pending (its message will never be published,
/// and the timer's references to the topic and message are released now), 0 if it had
/// already fired (its publish is made or under way) or was already cancelled, or a
/// negative code for a NULL or dead handle. Exactly one of "published once" and "a
/// cancel returned 1" happens, whatever the threads. May be called from any thread,
/// callbacks included. In a forked child, a timer created before the fork returns 0
/// (it is its parent's to fire).
/// Ownership: `timer` is borrowed (still to be released with sb_timer_unref).
#[no_mangle]
pub extern "C" fn sb_timer_cancel(timer: *mut sb_timer) -> c_int {
    boundary(|| match sb_timer::borrow(timer) {
        Ok(t) => c_int::from(t.cancel()),
        Err(e) => fail_code(e),
    })
}

/// 1 once the timer has fired (its publish is made or under way), 0 while it is pending
/// or if it was cancelled; a negative code for a NULL or dead handle.
/// Ownership: `timer` is borrowed.
#[no_mangle]
pub extern "C" fn sb_timer_fired(timer: *mut sb_timer) -> c_int {
    boundary(|| match sb_timer::borrow(timer) {
        Ok(t) => c_int::from(t.fired()),
        Err(e) => fail_code(e),
    })
}

/// Takes a new reference; returns `timer` (NULL for a NULL or dead handle).
/// Ownership: returns a new reference to the same timer; `timer` is borrowed.
#[no_mangle]
pub extern "C" fn sb_timer_ref(timer: *mut sb_timer) -> *mut sb_timer {
    boundary(|| match sb_timer::clone_arc(timer) {
        Ok(t) => sb_timer::into_raw(t),
        Err(e) => fail_null(e),
    })
}

/// Drops a reference to the timer handle. NULL-safe; any thread, callbacks included.
/// It does not cancel the timer: a pending timer still fires (the library keeps what it
/// needs), so fire-and-forget is `sb_timer_unref(sb_publish_after(...))`.
/// Ownership: takes ownership of (releases) one reference.
#[no_mangle]
pub extern "C" fn sb_timer_unref(timer: *mut sb_timer) {
    boundary(|| {
        let _ = sb_timer::release(timer).map_err(|e| set_last_error(&e));
    })
}
