//! Statistics and alerts.

use super::message::{malloc_string, sb_message_type};
use super::subscription::sb_subscription;
use super::topic::sb_topic;
use super::{boundary, fail_code, fail_null, Handle, UserData};
use crate::error::{Error, SB_OK};
use crate::log;
use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

/// A topic's figures (sb_topic_get_stats). Fields are only ever appended.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct sb_topic_stats {
    /// Publishes that reached the topic: published to it, or forwarded into it (the
    /// library's Subscribe / Unsubscribe change messages are not counted).
    pub published: u64,
    /// Of those, the ones that reached at least one subscription (here or through the
    /// topic's forwards): published = dispatched + not_dispatched.
    pub dispatched: u64,
    /// Of those, the ones that reached no subscription.
    pub not_dispatched: u64,
    /// Subscriptions a publish here reaches now (as sb_topic_subscribers).
    pub subscribers: u32,
    /// When the topic was created (CLOCK_REALTIME ns).
    pub created_ns: u64,
}

/// A subscription's figures (sb_subscription_get_stats). Fields are only ever appended.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct sb_subscription_stats {
    /// Messages handled by the callback (the Subscribe change message included).
    pub delivered: u64,
    /// Messages its overflow policy dropped.
    pub dropped: u64,
    /// Times its queue crossed its high-water mark.
    pub congestion_warnings: u64,
    /// Messages queued now (not yet taken for delivery).
    pub queued: u64,
    /// The longest its queue has been.
    pub queued_max: u64,
    /// Its longest single callback, in ns.
    pub callback_max_ns: u64,
    /// The type of the message that callback handled (borrowed; types live for the
    /// process), NULL before the first callback.
    pub callback_max_type: *const sb_message_type,
}

/// Called when a subsystem (a topic name up to its first '/' or ':') enters alert
/// (`in_alert` 1: one of its subscriptions crossed its high-water mark) and when it
/// leaves it (0: every such subscription is back under its low-water mark, or gone).
/// `subsystem` is borrowed for the call. Called on a library thread (the log thread),
/// one call at a time, in the order the changes happened, with none of the bus's locks
/// held (only the log thread's own, which replacing a log or alert handler waits for).
/// It may call the library. It must return normally.
pub type sb_alert_fn =
    Option<unsafe extern "C" fn(data: *mut c_void, in_alert: c_int, subsystem: *const c_char)>;

/// Fills `*out` with `topic`'s figures. SB_OK, or SB_E_INVAL for a NULL or dead handle
/// or a NULL `out`. Cheap: no lock is taken but to count subscriptions (as
/// sb_topic_subscribers).
/// Ownership: `topic` is borrowed; `out` is the caller's, written.
#[no_mangle]
pub extern "C" fn sb_topic_get_stats(topic: *const sb_topic, out: *mut sb_topic_stats) -> c_int {
    boundary(|| {
        let t = match sb_topic::borrow(topic) {
            Ok(t) => t,
            Err(e) => return fail_code(e),
        };
        if out.is_null() {
            return fail_code(Error::invalid("out is NULL"));
        }
        let s = t.stats();
        // SAFETY: out is non-null and the caller promises a writable sb_topic_stats.
        unsafe {
            *out = sb_topic_stats {
                published: s.published,
                dispatched: s.dispatched,
                not_dispatched: s.not_dispatched,
                subscribers: s.subscribers,
                created_ns: s.created_ns,
            }
        };
        SB_OK
    })
}

/// Fills `*out` with `sub`'s figures. SB_OK, or SB_E_INVAL for a NULL or dead handle or
/// a NULL `out`. Works on a finished subscription too (its final figures).
/// Ownership: `sub` is borrowed; `out` is the caller's, written; `out->callback_max_type`
/// is borrowed (types live for the process).
#[no_mangle]
pub extern "C" fn sb_subscription_get_stats(
    sub: *const sb_subscription,
    out: *mut sb_subscription_stats,
) -> c_int {
    boundary(|| {
        let s = match sb_subscription::borrow(sub) {
            Ok(s) => s,
            Err(e) => return fail_code(e),
        };
        if out.is_null() {
            return fail_code(Error::invalid("out is NULL"));
        }
        let st = s.stats();
        let ty = st.callback_max_type.as_ref().map_or(std::ptr::null(), |t| {
            sb_message_type::as_ptr(t).cast_const()
        });
        // SAFETY: out is non-null and the caller promises a writable struct.
        unsafe {
            *out = sb_subscription_stats {
                delivered: st.delivered,
                dropped: st.dropped,
                congestion_warnings: st.congestion_warnings,
                queued: st.queued,
                queued_max: st.queued_max,
                callback_max_ns: st.callback_max_ns,
                callback_max_type: ty,
            }
        };
        SB_OK
    })
}

/// The whole bus as one JSON object: "topics" (each with its figures and its
/// "subscriptions"), "types", "pools", "alerts", "log" and "clusters" (every cluster
/// joined in this process). Registries are locked only to collect references:
/// formatting never stalls publishers. NULL (SB_E_NOMEM) only if memory runs out.
/// Ownership: returns a new malloc()'d string, freed with sb_string_free.
#[no_mangle]
pub extern "C" fn sb_stats_json() -> *mut c_char {
    boundary(|| out_string(crate::stats::json()))
}

/// The whole bus in the Prometheus text exposition format (0.0.4), metric names
/// prefixed switchboard_: serve it as is on a /metrics endpoint. Same content and
/// locking as sb_stats_json. NULL (SB_E_NOMEM) only if memory runs out.
/// Ownership: returns a new malloc()'d string, freed with sb_string_free.
#[no_mangle]
pub extern "C" fn sb_stats_prometheus() -> *mut c_char {
    boundary(|| out_string(crate::stats::prometheus()))
}

fn out_string(s: String) -> *mut c_char {
    let p = malloc_string(&s);
    if p.is_null() {
        return fail_null(Error::new(
            crate::error::ErrorKind::NoMemory,
            "out of memory for the statistics text",
        ));
    }
    p
}

/// Installs the alert handler (NULL: none). `data` is passed back untouched. Calls are
/// made as for the log handler (sb_set_log_handler): on the library's log thread, so a
/// slow handler never slows publishers. Replacing or removing a handler waits: alert
/// changes queued before this call are delivered to the previous handler, and its call in
/// flight returns first, so once this returns the previous handler is never called again
/// (its module may be unloaded). Called from inside a handler (alert or log) it does not
/// wait; the change applies when that call returns. A new handler hears only of changes
/// after it was installed: sb_alert_count() and sb_stats_json() tell the state now.
/// Ownership: `data` stays the caller's (borrowed until the handler is replaced and this
/// call returned).
#[no_mangle]
pub extern "C" fn sb_set_alert_handler(handler: sb_alert_fn, data: *mut c_void) {
    boundary(|| match handler {
        None => log::set_alert_handler(None),
        Some(f) => {
            let data = UserData(data);
            log::set_alert_handler(Some(Arc::new(move |on: bool, subsystem: &str| {
                let text = std::ffi::CString::new(subsystem).unwrap_or_default();
                let data = data;
                // SAFETY: the host installed `f` for exactly this call.
                unsafe { f(data.0, c_int::from(on), text.as_ptr()) }
            })));
        }
    })
}

/// Subscriptions above their high-water mark now (see
/// sb_subscription_set_congestion_limits): 0 when the bus is not congested.
/// Ownership: no pointers.
#[no_mangle]
pub extern "C" fn sb_alert_count() -> c_int {
    boundary(|| c_int::try_from(crate::stats::alert_count()).unwrap_or(c_int::MAX))
}
