//! Subscriptions.

use super::message::{sb_message, sb_message_type};
use super::pool::sb_pool;
use super::topic::sb_topic;
use super::{act_and_release, boundary, fail_code, fail_null, to_code, Handle};
use crate::error::{set_last_error, Error, Result};
use crate::filter::{FILTER_NONE, FILTER_SELECTIVE};
use crate::mailbox::{Kind, Overflow};
use crate::message_type::FORMATTER_JSON;
use crate::subscription::{change_type, ChangeView, RawCallback, Subscription};
use std::ffi::{c_char, c_int, c_long, c_uint, c_void};

/// A subscription (opaque, refcounted).
pub struct sb_subscription {
    _opaque: [u8; 0],
}

impl Handle for sb_subscription {
    type Rust = Subscription;
    type Ptr = std::sync::Arc<Subscription>;
    const WHAT: &'static str = "sb_subscription";
    fn magic_ok(r: &Subscription) -> bool {
        r.magic_ok()
    }
}

/// A subscription callback. `msg` and `sub` are borrowed for the call (sb_message_ref /
/// sb_subscription_ref them to keep them); invocations of one subscription never
/// overlap. It may call the library (publish, subscribe, unsubscribe, even its own
/// sb_unsubscribe_and_join, which then does not wait). It must return normally: no C++
/// exception may propagate out of it and no longjmp may leave it (either would skip the
/// library's cleanup and is undefined behaviour).
pub type sb_subscription_cb = Option<
    unsafe extern "C" fn(data: *mut c_void, sub: *mut sb_subscription, msg: *mut sb_message),
>;

/// Filter modes (an unsigned int, so any value C passes is checked, never UB).
pub type sb_subscription_filter = c_uint;
/// Deliver every type (except declined ones).
pub const SB_FILTER_NONE: sb_subscription_filter = 0;
/// Deliver accepted types only.
pub const SB_FILTER_SELECTIVE: sb_subscription_filter = 1;

const _: () = assert!(SB_FILTER_NONE == FILTER_NONE && SB_FILTER_SELECTIVE == FILTER_SELECTIVE);

/// Formatter bit for sb_subscription_accept_formatters: the message's type has
/// `to_json` (its vtable gave one).
pub const SB_FORMATTER_JSON: c_uint = 1;

const _: () = assert!(SB_FORMATTER_JSON == FORMATTER_JSON as c_uint);

/// Overflow policies (an unsigned int, checked on input).
pub type sb_overflow = c_uint;
/// No limit: a slow subscriber's queue grows (the default, as in Stasis).
pub const SB_OVERFLOW_UNBOUNDED: sb_overflow = 0;
/// When the queue holds `limit` messages, drop the oldest to make room.
pub const SB_OVERFLOW_DROP_OLDEST: sb_overflow = 1;
/// When the queue holds `limit` messages, drop the new one.
pub const SB_OVERFLOW_DROP_NEWEST: sb_overflow = 2;
/// When the queue holds `limit` messages, the publisher waits for room. A publish that
/// could never see room is let through: from the subscription's own callback, or from a
/// callback while this subscription's callback runs on a thread that waits for this one.
pub const SB_OVERFLOW_BLOCK: sb_overflow = 3;

/// Data of a subscription change message (type `sb_subscription_change_type()`), read
/// with sb_message_data(). Every field is borrowed from the message: valid while the
/// message lives (for the duration of the callback, or longer if you sb_message_ref the
/// message); take your own reference (sb_topic_ref) or copy (strdup) to keep one longer.
#[repr(C)]
pub struct sb_subscription_change {
    /// The topic subscribed to or left (borrowed from the message, which holds a
    /// reference).
    pub topic: *mut sb_topic,
    /// The uniqueid of the subscription that changed (borrowed from the message).
    pub uniqueid: *const c_char,
    /// "Subscribe" or "Unsubscribe" (static text).
    pub description: *const c_char,
}

const _: () =
    assert!(std::mem::size_of::<sb_subscription_change>() == std::mem::size_of::<ChangeView>());

/// Applies a C filter mode (shared by subscriptions, caching topics).
pub(crate) fn set_filter_mode(sub: &Subscription, filter: sb_subscription_filter) -> Result<()> {
    match filter {
        SB_FILTER_NONE => sub.set_selective(false),
        SB_FILTER_SELECTIVE => sub.set_selective(true),
        other => return Err(Error::invalid(format!("unknown filter mode {other}"))),
    }
    Ok(())
}

/// Applies C congestion limits (shared by subscriptions and routers).
pub(crate) fn set_congestion_limits(
    sub: &Subscription,
    low_water: c_long,
    high_water: c_long,
) -> Result<()> {
    if low_water < 0 || high_water <= 0 {
        return Err(Error::invalid(format!(
            "congestion limits must be non-negative with high_water > 0 (got {low_water}, {high_water})"
        )));
    }
    sub.set_congestion_limits(low_water as usize, high_water as usize)
}

/// Who runs a new subscription's callbacks: a kind, or a worker group's pool.
pub(crate) enum Runner {
    Kind(Kind),
    Group(*mut sb_pool),
}

pub(crate) fn subscribe(
    topic: *mut sb_topic,
    cb: sb_subscription_cb,
    data: *mut c_void,
    runner: Runner,
) -> *mut sb_subscription {
    boundary(|| {
        let t = match sb_topic::borrow(topic) {
            Ok(t) => t,
            Err(e) => return fail_null(e),
        };
        let Some(cb) = cb else {
            return fail_null(Error::invalid("callback is NULL"));
        };
        // SAFETY: only the pointee types of the parameters differ (`sb_subscription *`
        // and `sb_message *` against `void *`): pointers are ABI-compatible whatever they
        // point to, and the library passes exactly the subscription's and the message's
        // addresses, which is what those handles are.
        let raw: RawCallback = unsafe {
            std::mem::transmute::<
                unsafe extern "C" fn(*mut c_void, *mut sb_subscription, *mut sb_message),
                RawCallback,
            >(cb)
        };
        let sub = match runner {
            Runner::Kind(kind) => Subscription::subscribe_raw(&t, kind, raw, data),
            Runner::Group(pool) => sb_pool::borrow(pool)
                .and_then(|g| Subscription::subscribe_raw_in(&t, &g, raw, data)),
        };
        match sub {
            Ok(s) => sb_subscription::into_raw(s),
            Err(e) => fail_null(e),
        }
    })
}

/// Subscribes `cb` on a thread of its own. Returns a new reference, released by
/// sb_unsubscribe / sb_unsubscribe_and_join. The first message is the Subscribe change.
/// Ownership: `topic` is borrowed; the subscription keeps its own reference to it.
/// `data` stays the caller's: the library never reads, writes or frees it, and passes
/// it to `cb` until the final message was handled, so keep it valid until a join
/// (sb_unsubscribe_and_join / sb_subscription_join) returned.
#[no_mangle]
pub extern "C" fn sb_subscribe(
    topic: *mut sb_topic,
    cb: sb_subscription_cb,
    data: *mut c_void,
) -> *mut sb_subscription {
    subscribe(topic, cb, data, Runner::Kind(Kind::Dedicated))
}

/// As sb_subscribe, run by the shared worker pool.
/// Ownership: as sb_subscribe.
#[no_mangle]
pub extern "C" fn sb_subscribe_pool(
    topic: *mut sb_topic,
    cb: sb_subscription_cb,
    data: *mut c_void,
) -> *mut sb_subscription {
    subscribe(topic, cb, data, Runner::Kind(Kind::Pool))
}

/// As sb_subscribe, run on the publisher's thread inside sb_publish (serialized: a
/// publisher on another thread waits its turn; a nested publish from the callback is
/// delivered after the callback returns).
/// Ownership: as sb_subscribe.
#[no_mangle]
pub extern "C" fn sb_subscribe_synchronous(
    topic: *mut sb_topic,
    cb: sb_subscription_cb,
    data: *mut c_void,
) -> *mut sb_subscription {
    subscribe(topic, cb, data, Runner::Kind(Kind::Synchronous))
}

/// Unsubscribes and releases the caller's reference; returns at once. The final message
/// (Unsubscribe change) is delivered last. Leaving the topic costs O(1) amortized however
/// many subscriptions it has (publishing the Unsubscribe change to them is O(their
/// number), as any publish). Returns NULL.
/// Ownership: takes ownership of the caller's reference to `sub` (`sub =
/// sb_unsubscribe(sub);`); the callback may still run until the final message was
/// handled.
#[no_mangle]
pub extern "C" fn sb_unsubscribe(sub: *mut sb_subscription) -> *mut sb_subscription {
    boundary(|| act_and_release(sub, |s| s.unsubscribe()))
}

/// Unsubscribes, waits until the final message was handled, and releases the caller's
/// reference. It does not wait (last error SB_E_DEADLOCK) when the wait could never end:
/// from the subscription's own callback, or from a callback while the subscription's
/// callback runs on a thread that waits for this one. Returns NULL.
/// sb_last_error_code() tells the outcome: 0 after a join, SB_E_DEADLOCK when the wait
/// was refused (the subscription is unsubscribed either way), SB_E_STATE when another
/// reference had unsubscribed it already (it still waited for the final message).
/// Ownership: takes ownership of the caller's reference to `sub`.
#[no_mangle]
pub extern "C" fn sb_unsubscribe_and_join(sub: *mut sb_subscription) -> *mut sb_subscription {
    // Joins even if another reference unsubscribed first: the caller asked to wait for
    // the final message.
    boundary(|| act_and_release(sub, |s| s.unsubscribe_and_join()))
}

/// Waits until the final message was handled (the caller keeps its reference). From the
/// subscription's own callback, or from a callback while the subscription's callback runs
/// on a thread that waits for this one, it returns at once with SB_E_DEADLOCK.
/// Returns SB_OK once the final message was handled, SB_E_DEADLOCK when the wait was
/// refused, SB_E_INVAL for a NULL or dead handle.
/// A join that returned SB_OK makes everything the callbacks wrote visible to the
/// caller (it synchronizes with the end of the last callback), so their results may be
/// read without more locking. Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_join(sub: *mut sb_subscription) -> c_int {
    boundary(|| to_code(sb_subscription::borrow(sub).and_then(|s| s.join())))
}

/// 1 once the final message was handled, 0 before. A NULL or dead handle is
/// SB_E_INVAL (negative), so a loop `while (!sb_subscription_is_done(s))` ends; test
/// `> 0` / `== 1` for "done".
/// Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_is_done(sub: *mut sb_subscription) -> c_int {
    boundary(|| match sb_subscription::borrow(sub) {
        Ok(s) => s.is_done() as c_int,
        Err(e) => fail_code(e),
    })
}

/// 1 until the subscription is unsubscribed, then 0; SB_E_INVAL (negative) for a NULL or
/// dead handle.
/// Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_is_subscribed(sub: *const sb_subscription) -> c_int {
    boundary(|| match sb_subscription::borrow(sub) {
        Ok(s) => s.is_subscribed() as c_int,
        Err(e) => fail_code(e),
    })
}

/// 1 when `msg` is `sub`'s final message, else 0; SB_E_INVAL (negative) for a NULL or
/// dead handle. Both arguments are borrowed.
/// Ownership: both arguments are borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_final_message(
    sub: *const sb_subscription,
    msg: *const sb_message,
) -> c_int {
    boundary(
        || match (sb_subscription::borrow(sub), sb_message::borrow(msg)) {
            (Ok(s), Ok(m)) => s.is_final_message(&m) as c_int,
            (Err(e), _) | (_, Err(e)) => fail_code(e),
        },
    )
}

/// The subscription's unique id, "<topic name>:<number>" with a number no other
/// subscription of this process has (borrowed: valid while the subscription lives).
/// Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_uniqueid(sub: *const sb_subscription) -> *const c_char {
    boundary(|| match sb_subscription::borrow(sub) {
        Ok(s) => s.uniqueid_cstr().as_ptr(),
        Err(e) => fail_null::<c_char>(e),
    })
}

/// Delivers `type` and switches the filter to SB_FILTER_SELECTIVE.
/// Returns SB_OK or SB_E_INVAL. Ownership: `sub` borrowed; `type` borrowed (the
/// subscription keeps a reference).
#[no_mangle]
pub extern "C" fn sb_subscription_accept_message_type(
    sub: *mut sb_subscription,
    ty: *const sb_message_type,
) -> c_int {
    boundary(
        || match (sb_subscription::borrow(sub), sb_message_type::clone_arc(ty)) {
            (Ok(s), Ok(t)) => {
                s.accept_message_type(&t);
                0
            }
            (Err(e), _) | (_, Err(e)) => fail_code(e),
        },
    )
}

/// Stops delivering `type` (in either filter mode).
/// Returns SB_OK or SB_E_INVAL. Ownership: as sb_subscription_accept_message_type.
#[no_mangle]
pub extern "C" fn sb_subscription_decline_message_type(
    sub: *mut sb_subscription,
    ty: *const sb_message_type,
) -> c_int {
    boundary(
        || match (sb_subscription::borrow(sub), sb_message_type::clone_arc(ty)) {
            (Ok(s), Ok(t)) => {
                s.decline_message_type(&t);
                0
            }
            (Err(e), _) | (_, Err(e)) => fail_code(e),
        },
    )
}

/// Also delivers every message whose type has one of the `formatters` (SB_FORMATTER_JSON:
/// the type has `to_json`), whether or not the type was accepted by name, including
/// types created (or given a to_json) later; switches the filter to SB_FILTER_SELECTIVE,
/// as accepting a type does. Bits add up across calls; 0 changes nothing. A type declined
/// with sb_subscription_decline_message_type stays declined even when it has an accepted
/// formatter (unlike Stasis, where decline only undoes an accept); accepting the type by
/// name lifts the decline. Formatter acceptance counts for sb_topic_wants and for what a
/// cluster node takes from the network. Only selective filters use it (SB_FILTER_NONE
/// delivers every type not declined anyway).
/// Returns SB_OK, or SB_E_INVAL for a NULL or dead handle or an unknown bit.
/// Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_accept_formatters(
    sub: *mut sb_subscription,
    formatters: c_uint,
) -> c_int {
    boundary(|| {
        to_code(sb_subscription::borrow(sub).and_then(|s| s.filter.accept_formatters(formatters)))
    })
}

/// Sets the filter mode: SB_FILTER_NONE or SB_FILTER_SELECTIVE.
/// Returns SB_OK or SB_E_INVAL. Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_set_filter(
    sub: *mut sb_subscription,
    filter: sb_subscription_filter,
) -> c_int {
    boundary(|| to_code(sb_subscription::borrow(sub).and_then(|s| set_filter_mode(&s, filter))))
}

/// Warn (log line + counter) once when more than `high_water` messages are queued, and
/// again only after the queue fell below `low_water`. Needs 0 <= low <= high, high > 0.
/// Defaults: 5000 and 10000 (a wide gap: a subscriber that keeps up with bursts whose
/// backlog swings across one mark is warned about once, not at every burst).
/// Returns SB_OK or SB_E_INVAL. Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_set_congestion_limits(
    sub: *mut sb_subscription,
    low_water: c_long,
    high_water: c_long,
) -> c_int {
    boundary(|| {
        to_code(
            sb_subscription::borrow(sub)
                .and_then(|s| set_congestion_limits(&s, low_water, high_water)),
        )
    })
}

/// Sets what happens when more than `limit` messages wait for `sub` (see SB_OVERFLOW_*).
/// The final message is never dropped or refused; drops are counted
/// (sb_subscription_dropped). Synchronous subscriptions run inside sb_publish and never
/// build a queue: the policy is recorded but has no effect on them. SB_E_INVAL for an
/// unknown policy or a zero limit.
/// Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_set_overflow(
    sub: *mut sb_subscription,
    policy: sb_overflow,
    limit: usize,
) -> c_int {
    boundary(|| {
        let policy = match policy {
            SB_OVERFLOW_UNBOUNDED => Overflow::Unbounded,
            SB_OVERFLOW_DROP_OLDEST => Overflow::DropOldest,
            SB_OVERFLOW_DROP_NEWEST => Overflow::DropNewest,
            SB_OVERFLOW_BLOCK => Overflow::Block,
            other => return fail_code(Error::invalid(format!("unknown overflow policy {other}"))),
        };
        to_code(sb_subscription::borrow(sub).and_then(|s| s.set_overflow(policy, limit)))
    })
}

/// Messages the overflow policy dropped for `sub`.
/// Ownership: `sub` is borrowed. A NULL or dead handle gives 0 with
/// sb_last_error_code() SB_E_INVAL.
#[no_mangle]
pub extern "C" fn sb_subscription_dropped(sub: *const sb_subscription) -> u64 {
    boundary(|| match sb_subscription::borrow(sub) {
        Ok(s) => s.dropped(),
        Err(e) => {
            set_last_error(&e);
            0
        }
    })
}

/// Times this subscription crossed its high-water mark.
/// Ownership: `sub` is borrowed. A NULL or dead handle gives 0 with
/// sb_last_error_code() SB_E_INVAL.
#[no_mangle]
pub extern "C" fn sb_subscription_congestion_warnings(sub: *const sb_subscription) -> u64 {
    boundary(|| match sb_subscription::borrow(sub) {
        Ok(s) => s.congestion_warnings(),
        Err(e) => {
            set_last_error(&e);
            0
        }
    })
}

/// Messages queued and not yet taken for delivery.
/// A NULL or dead handle also gives 0: sb_last_error_code() is then SB_E_INVAL (0 after
/// a real count). Ownership: `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_queue_length(sub: *const sb_subscription) -> usize {
    boundary(|| match sb_subscription::borrow(sub) {
        Ok(s) => s.queue_len(),
        Err(e) => {
            set_last_error(&e);
            0
        }
    })
}

/// Takes a new reference; returns `sub`.
/// Ownership: returns a new reference to the same subscription; `sub` is borrowed.
#[no_mangle]
pub extern "C" fn sb_subscription_ref(sub: *mut sb_subscription) -> *mut sb_subscription {
    boundary(|| match sb_subscription::clone_arc(sub) {
        Ok(s) => sb_subscription::into_raw(s),
        Err(e) => fail_null(e),
    })
}

/// Drops a reference (does not unsubscribe). NULL-safe.
/// Ownership: takes ownership of (releases) one reference.
#[no_mangle]
pub extern "C" fn sb_subscription_unref(sub: *mut sb_subscription) {
    boundary(|| {
        let _ = sb_subscription::release(sub).map_err(|e| set_last_error(&e));
    })
}

/// The type of Subscribe/Unsubscribe change messages (borrowed, lives forever).
/// Messages of this type are made by the library only: sb_message_create* refuses it
/// (SB_E_INVAL). Ownership: borrowed (never unref it).
#[no_mangle]
pub extern "C" fn sb_subscription_change_type() -> *mut sb_message_type {
    boundary(|| sb_message_type::as_ptr(change_type()))
}
