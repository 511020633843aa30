//! Topics, publishing, forwarding and topic pools.

use super::message::{sb_message, sb_message_type};
use super::subscription::sb_subscription;
use super::{boundary, fail_code, fail_null, str_arg, Handle};
use crate::error::set_last_error;
use crate::forward::Forward;
use crate::names::check_name;
use crate::topic::Topic;
use crate::topic_pool::TopicPool;
use std::ffi::{c_char, c_int};

/// A named topic (opaque, refcounted).
pub struct sb_topic {
    _opaque: [u8; 0],
}
/// A forward from one topic to another (opaque; released by sb_forward_cancel).
pub struct sb_forward {
    _opaque: [u8; 0],
}
/// A pool of per-object topics forwarding into one topic (opaque, refcounted).
pub struct sb_topic_pool {
    _opaque: [u8; 0],
}

impl Handle for sb_topic {
    type Rust = Topic;
    type Ptr = std::sync::Arc<Topic>;
    const WHAT: &'static str = "sb_topic";
    fn magic_ok(r: &Topic) -> bool {
        r.magic_ok()
    }
}
impl Handle for sb_forward {
    type Rust = Forward;
    type Ptr = std::sync::Arc<Forward>;
    const WHAT: &'static str = "sb_forward";
    fn magic_ok(r: &Forward) -> bool {
        r.magic_ok()
    }
}
impl Handle for sb_topic_pool {
    type Rust = TopicPool;
    type Ptr = std::sync::Arc<TopicPool>;
    const WHAT: &'static str = "sb_topic_pool";
    fn magic_ok(r: &TopicPool) -> bool {
        r.magic_ok()
    }
}

fn clamp(n: usize) -> c_int {
    n.min(c_int::MAX as usize) as c_int
}

/// Creates the topic `name` (new reference), or returns the live topic of that name.
/// Ownership: `name` is borrowed for the call (copied); returns a new reference
/// (sb_topic_unref).
#[no_mangle]
pub extern "C" fn sb_topic_create(name: *const c_char) -> *mut sb_topic {
    boundary(
        || match str_arg("topic name", name).and_then(Topic::create) {
            Ok(t) => sb_topic::into_raw(t),
            Err(e) => fail_null(e),
        },
    )
}

/// As sb_topic_create, with a free-text description (used only when the topic is new).
/// Ownership: as sb_topic_create (`detail` copied too).
#[no_mangle]
pub extern "C" fn sb_topic_create_with_detail(
    name: *const c_char,
    detail: *const c_char,
) -> *mut sb_topic {
    boundary(|| {
        let r = str_arg("topic name", name)
            .and_then(|n| {
                Ok((
                    n,
                    if detail.is_null() {
                        ""
                    } else {
                        str_arg("topic detail", detail)?
                    },
                ))
            })
            .and_then(|(n, d)| Topic::create_with_detail(n, d));
        match r {
            Ok(t) => sb_topic::into_raw(t),
            Err(e) => fail_null(e),
        }
    })
}

/// The live topic `name` (new reference), or NULL: a lookup, so no live topic of that
/// name is a success (sb_last_error_code() 0); a NULL or malformed name is SB_E_INVAL.
/// Ownership: `name` is borrowed for the call.
#[no_mangle]
pub extern "C" fn sb_topic_get(name: *const c_char) -> *mut sb_topic {
    boundary(|| {
        match str_arg("topic name", name).and_then(|n| check_name("topic", n).map(|()| n)) {
            Ok(n) => Topic::get(n).map_or(std::ptr::null_mut(), sb_topic::into_raw),
            Err(e) => fail_null(e),
        }
    })
}

/// The topic's name (borrowed).
/// Ownership: `topic` is borrowed; the name is borrowed from it: valid while the topic
/// lives.
#[no_mangle]
pub extern "C" fn sb_topic_name(topic: *const sb_topic) -> *const c_char {
    boundary(|| match sb_topic::borrow(topic) {
        Ok(t) => t.name_cstr().as_ptr(),
        Err(e) => fail_null::<c_char>(e),
    })
}

/// The topic's detail text (borrowed; "" when none).
/// Ownership: borrowed from the topic, as sb_topic_name.
#[no_mangle]
pub extern "C" fn sb_topic_detail(topic: *const sb_topic) -> *const c_char {
    boundary(|| match sb_topic::borrow(topic) {
        Ok(t) => t.detail().as_ptr(),
        Err(e) => fail_null::<c_char>(e),
    })
}

/// A process-unique id of the topic (borrowed).
/// Ownership: borrowed from the topic, as sb_topic_name.
#[no_mangle]
pub extern "C" fn sb_topic_uniqueid(topic: *const sb_topic) -> *const c_char {
    boundary(|| match sb_topic::borrow(topic) {
        Ok(t) => t.uniqueid().as_ptr(),
        Err(e) => fail_null::<c_char>(e),
    })
}

/// Subscriptions a publish here reaches, counting those reached via forwards.
/// A NULL or dead handle also gives 0: sb_last_error_code() is then SB_E_INVAL (0 after
/// a real count). Ownership: `topic` is borrowed.
#[no_mangle]
pub extern "C" fn sb_topic_subscribers(topic: *const sb_topic) -> usize {
    boundary(|| match sb_topic::borrow(topic) {
        Ok(t) => t.subscriber_count(),
        Err(e) => {
            set_last_error(&e);
            0
        }
    })
}

/// 1 when a message of `type` published here would reach at least one subscription that
/// accepts it, else 0. Lets producers skip building messages nobody reads. SB_E_INVAL
/// (negative) for a NULL or dead handle: test `> 0` before skipping work.
/// Ownership: both arguments borrowed.
#[no_mangle]
pub extern "C" fn sb_topic_wants(topic: *const sb_topic, ty: *const sb_message_type) -> c_int {
    boundary(
        || match (sb_topic::borrow(topic), sb_message_type::borrow(ty)) {
            (Ok(t), Ok(ty)) => t.wants(&ty) as c_int,
            (Err(e), _) | (_, Err(e)) => fail_code(e),
        },
    )
}

/// Takes a new reference; returns `topic`.
/// Ownership: returns a new reference to the same topic; `topic` is borrowed.
#[no_mangle]
pub extern "C" fn sb_topic_ref(topic: *mut sb_topic) -> *mut sb_topic {
    boundary(|| match sb_topic::clone_arc(topic) {
        Ok(t) => sb_topic::into_raw(t),
        Err(e) => fail_null(e),
    })
}

/// Drops a reference; the topic leaves the registry with its last one. NULL-safe.
/// Ownership: takes ownership of (releases) one reference. Subscriptions, forwards,
/// pools and caching topics keep references of their own.
#[no_mangle]
pub extern "C" fn sb_topic_unref(topic: *mut sb_topic) {
    boundary(|| {
        let _ = sb_topic::release(topic).map_err(|e| set_last_error(&e));
    })
}

/// Publishes `msg` (the caller keeps its reference). Returns the number of subscriptions
/// reached (>= 0), or a negative code. Synchronous subscriptions have run when it returns,
/// with one exception that keeps callbacks from deadlocking each other: called from inside
/// a callback, a synchronous subscription that another thread is running right now is not
/// waited for; that thread delivers `msg` after its current callback returns.
/// Ownership: both arguments borrowed: the caller keeps its reference to `msg`
/// (subscriptions take their own while the message is queued).
#[no_mangle]
pub extern "C" fn sb_publish(topic: *mut sb_topic, msg: *mut sb_message) -> c_int {
    boundary(
        || match (sb_topic::borrow(topic), sb_message::borrow(msg)) {
            (Ok(t), Ok(m)) => clamp(t.publish(&m)),
            (Err(e), _) | (_, Err(e)) => fail_code(e),
        },
    )
}

/// Publishes `msg` to `sub`'s topic and returns once `sub` has handled it (immediately
/// when `sub` filters that type out). SB_E_STATE when `sub` is unsubscribed. When the
/// wait could never end it publishes and returns SB_E_DEADLOCK at once: called from
/// `sub`'s own callback, or from a callback while `sub`'s callback runs on a thread that
/// itself waits (directly or through others) for this one.
/// Ownership: both arguments borrowed, as sb_publish.
#[no_mangle]
pub extern "C" fn sb_publish_sync(sub: *mut sb_subscription, msg: *mut sb_message) -> c_int {
    boundary(
        || match (sb_subscription::borrow(sub), sb_message::borrow(msg)) {
            (Ok(s), Ok(m)) => match Topic::publish_sync(&s, &m) {
                Ok(n) => clamp(n),
                Err(e) => fail_code(e),
            },
            (Err(e), _) | (_, Err(e)) => fail_code(e),
        },
    )
}

/// Forwards everything published to `from` to `to`'s subscriptions (and onwards). Returns
/// the forward, released by sb_forward_cancel; NULL with SB_E_INVAL for a cycle.
/// Ownership: `from` and `to` are borrowed; the forward keeps references to both until
/// it is cancelled. Returns a new reference that sb_forward_cancel takes over.
#[no_mangle]
pub extern "C" fn sb_forward_all(from: *mut sb_topic, to: *mut sb_topic) -> *mut sb_forward {
    boundary(|| match (sb_topic::borrow(from), sb_topic::borrow(to)) {
        (Ok(f), Ok(t)) => match Forward::create(&f, &t) {
            Ok(fw) => sb_forward::into_raw(fw),
            Err(e) => fail_null(e),
        },
        (Err(e), _) | (_, Err(e)) => fail_null(e),
    })
}

/// Stops a forward and releases it: a publish to `from` that starts after this returns does
/// not follow it. O(1) amortized, however many forwards leave `from`. Returns NULL;
/// NULL-safe. A second cancel of the same handle (a caller bug) fails with SB_E_STATE
/// when the forward is still known, and releases nothing.
/// Ownership: takes ownership of the caller's reference (`f = sb_forward_cancel(f);`).
#[no_mangle]
pub extern "C" fn sb_forward_cancel(forward: *mut sb_forward) -> *mut sb_forward {
    boundary(|| {
        if forward.is_null() {
            return std::ptr::null_mut();
        }
        match sb_forward::borrow(forward).and_then(|f| f.cancel()) {
            // The caller's reference goes only with a cancel that happened: the handle of
            // a forward already cancelled was released by that cancel (there is no
            // sb_forward_ref), and a cancelled forward can outlive it in `from`'s list
            // (`small_list::retire`) with its magic intact; releasing again would free
            // it under the list.
            Ok(()) => {
                let _ = sb_forward::release(forward);
            }
            Err(e) => set_last_error(&e),
        }
        std::ptr::null_mut()
    })
}

/// A pool of topics "<pooled name>/<name>" that forward into `pooled_topic`.
/// Ownership: `pooled_topic` is borrowed; the pool keeps its own reference to it, and
/// to every topic it created, until the topic is deleted or the pool's last reference
/// is dropped. Returns a new reference (sb_topic_pool_unref; there is no
/// sb_topic_pool_ref).
#[no_mangle]
pub extern "C" fn sb_topic_pool_create(pooled_topic: *mut sb_topic) -> *mut sb_topic_pool {
    boundary(|| match sb_topic::borrow(pooled_topic) {
        Ok(t) => sb_topic_pool::into_raw(TopicPool::new(&t)),
        Err(e) => fail_null(e),
    })
}

/// The pool's topic for `name` (new reference), created on first use.
/// Ownership: `pool` and `name` are borrowed; returns a new reference (sb_topic_unref)
/// to the topic, which the pool also keeps until it is deleted.
#[no_mangle]
pub extern "C" fn sb_topic_pool_get_topic(
    pool: *mut sb_topic_pool,
    name: *const c_char,
) -> *mut sb_topic {
    boundary(|| {
        let r = sb_topic_pool::borrow(pool).and_then(|p| p.get_topic(str_arg("name", name)?));
        match r {
            Ok(t) => sb_topic::into_raw(t),
            Err(e) => fail_null(e),
        }
    })
}

/// Removes `name` from the pool and cancels its forward. SB_E_INVAL when absent.
/// The topic itself lives on while others hold references. Ownership: arguments
/// borrowed.
#[no_mangle]
pub extern "C" fn sb_topic_pool_delete_topic(
    pool: *mut sb_topic_pool,
    name: *const c_char,
) -> c_int {
    boundary(|| {
        let r = sb_topic_pool::borrow(pool).and_then(|p| p.delete_topic(str_arg("name", name)?));
        match r {
            Ok(()) => 0,
            Err(e) => fail_code(e),
        }
    })
}

/// 1 when the pool has a topic for `name`, else 0; SB_E_INVAL (negative) for a NULL or
/// dead pool or a NULL name.
/// Ownership: arguments borrowed.
#[no_mangle]
pub extern "C" fn sb_topic_pool_topic_exists(
    pool: *const sb_topic_pool,
    name: *const c_char,
) -> c_int {
    boundary(|| {
        match sb_topic_pool::borrow(pool).and_then(|p| Ok(p.topic_exists(str_arg("name", name)?))) {
            Ok(b) => b as c_int,
            Err(e) => fail_code(e),
        }
    })
}

/// Drops a reference; the last one cancels the pool's forwards. NULL-safe.
/// Ownership: takes ownership of (releases) one reference.
#[no_mangle]
pub extern "C" fn sb_topic_pool_unref(pool: *mut sb_topic_pool) {
    boundary(|| {
        let _ = sb_topic_pool::release(pool).map_err(|e| set_last_error(&e));
    })
}
