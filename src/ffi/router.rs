//! Message routers.

use super::message::{sb_message, sb_message_type};
use super::subscription::{sb_subscription, sb_subscription_cb, set_congestion_limits};
use super::topic::sb_topic;
use super::{act_and_release, boundary, fail_code, fail_null, to_code, Handle, UserData};
use crate::error::{set_last_error, Error, Result};
use crate::mailbox::Kind;
use crate::router::Router;
use crate::subscription::Callback;
use crate::topic::Topic;
use std::ffi::{c_int, c_long, c_void};

/// A message router (opaque, refcounted; sb_router_unsubscribe* releases the creator's
/// reference).
pub struct sb_router {
    _opaque: [u8; 0],
}

impl Handle for sb_router {
    type Rust = Router;
    type Ptr = std::sync::Arc<Router>;
    const WHAT: &'static str = "sb_router";
    fn magic_ok(r: &Router) -> bool {
        r.magic_ok()
    }
}

fn c_callback(cb: sb_subscription_cb, data: *mut c_void) -> Result<Callback> {
    let cb = cb.ok_or_else(|| Error::invalid("callback is NULL"))?;
    let data = UserData(data);
    Ok(Box::new(move |sub, msg| {
        let data = data;
        // SAFETY: the route the module registered, with borrowed handles alive for the call.
        unsafe {
            cb(
                data.0,
                sb_subscription::as_ptr(sub),
                sb_message::as_ptr(msg),
            )
        }
    }))
}

fn create(topic: *mut sb_topic, kind: Kind) -> *mut sb_router {
    boundary(
        || match sb_topic::borrow(topic).and_then(|t| Router::new(&t, kind)) {
            Ok(r) => sb_router::into_raw(r),
            Err(e) => fail_null(e),
        },
    )
}

/// A router on a thread of its own. New reference.
/// Ownership: `topic` is borrowed; the router keeps its own reference to it until its
/// final message was handled. Returns a new reference, released by
/// sb_router_unsubscribe / sb_router_unsubscribe_and_join.
#[no_mangle]
pub extern "C" fn sb_router_create(topic: *mut sb_topic) -> *mut sb_router {
    create(topic, Kind::Dedicated)
}

/// A router run by the shared pool. New reference.
/// Ownership: as sb_router_create.
#[no_mangle]
pub extern "C" fn sb_router_create_pool(topic: *mut sb_topic) -> *mut sb_router {
    create(topic, Kind::Pool)
}

/// Routes messages of `type` to `cb(data, ...)` (replaces an existing route of `type`).
/// Ownership: `r` and `type` are borrowed (the router keeps the type); `data` stays the
/// caller's and must stay valid until the router is joined
/// (sb_router_unsubscribe_and_join).
#[no_mangle]
pub extern "C" fn sb_router_add(
    r: *mut sb_router,
    ty: *mut sb_message_type,
    cb: sb_subscription_cb,
    data: *mut c_void,
) -> c_int {
    boundary(|| {
        to_code((|| {
            sb_router::borrow(r)?.add(&sb_message_type::clone_arc(ty)?, c_callback(cb, data)?)
        })())
    })
}

/// Routes cache updates whose snapshots are of `type` to `cb(data, ...)`.
/// The route's `msg` is the cache update message itself (type sb_cache_update_type(),
/// data an sb_cache_update whose `type` is `type`), borrowed for the call like any
/// callback's msg; its old/new snapshots are borrowed from it. Ownership: as
/// sb_router_add.
#[no_mangle]
pub extern "C" fn sb_router_add_cache_update(
    r: *mut sb_router,
    ty: *mut sb_message_type,
    cb: sb_subscription_cb,
    data: *mut c_void,
) -> c_int {
    boundary(|| {
        to_code((|| {
            sb_router::borrow(r)?
                .add_cache_update(&sb_message_type::clone_arc(ty)?, c_callback(cb, data)?)
        })())
    })
}

/// Removes the route of `type` (SB_E_INVAL when there is none).
/// Ownership: both arguments borrowed. A route callback already running finishes.
#[no_mangle]
pub extern "C" fn sb_router_remove(r: *mut sb_router, ty: *mut sb_message_type) -> c_int {
    boundary(|| {
        to_code((|| {
            sb_router::borrow(r)?.remove(&*sb_message_type::borrow(ty)?)
        })())
    })
}

/// Removes the cache update route of `type` (SB_E_INVAL when there is none).
/// Ownership: both arguments borrowed.
#[no_mangle]
pub extern "C" fn sb_router_remove_cache_update(
    r: *mut sb_router,
    ty: *mut sb_message_type,
) -> c_int {
    boundary(|| {
        to_code((|| {
            sb_router::borrow(r)?.remove_cache_update(&*sb_message_type::borrow(ty)?)
        })())
    })
}

/// Sets the route for messages no other route takes; the router then accepts every type.
/// Ownership: `r` is borrowed; `data` stays the caller's, valid until the router is
/// joined.
#[no_mangle]
pub extern "C" fn sb_router_set_default(
    r: *mut sb_router,
    cb: sb_subscription_cb,
    data: *mut c_void,
) -> c_int {
    boundary(|| {
        to_code((|| {
            sb_router::borrow(r)?.set_default(c_callback(cb, data)?)
        })())
    })
}

/// As sb_subscription_set_congestion_limits, for the router's subscription.
/// Ownership: `r` is borrowed.
#[no_mangle]
pub extern "C" fn sb_router_set_congestion_limits(
    r: *mut sb_router,
    low_water: c_long,
    high_water: c_long,
) -> c_int {
    boundary(|| {
        to_code(
            sb_router::borrow(r)
                .and_then(|r| set_congestion_limits(r.subscription(), low_water, high_water)),
        )
    })
}

/// Publishes `msg` to the router's topic and returns once the router handled it.
/// Returns as sb_publish_sync (SB_E_DEADLOCK from one of the router's own routes).
/// Ownership: both arguments borrowed (the caller keeps its reference to `msg`).
#[no_mangle]
pub extern "C" fn sb_router_publish_sync(r: *mut sb_router, msg: *mut sb_message) -> c_int {
    boundary(|| {
        match (|| {
            Topic::publish_sync(
                sb_router::borrow(r)?.subscription(),
                &*sb_message::borrow(msg)?,
            )
        })() {
            Ok(n) => n.min(c_int::MAX as usize) as c_int,
            Err(e) => fail_code(e),
        }
    })
}

fn unsubscribe(r: *mut sb_router, join: bool) -> *mut sb_router {
    boundary(|| {
        act_and_release(r, |router| {
            let sub = router.subscription();
            if join {
                sub.unsubscribe_and_join()
            } else {
                sub.unsubscribe()
            }
        })
    })
}

/// Unsubscribes the router and releases the caller's reference. Returns NULL.
/// Ownership: takes ownership of the caller's reference to `r` (`r =
/// sb_router_unsubscribe(r);`).
#[no_mangle]
pub extern "C" fn sb_router_unsubscribe(r: *mut sb_router) -> *mut sb_router {
    unsubscribe(r, false)
}

/// As sb_router_unsubscribe, and waits until its final message was handled (from one of
/// its own routes it does not wait: last error SB_E_DEADLOCK). Returns NULL.
/// sb_last_error_code() tells the outcome: 0 after a join, SB_E_DEADLOCK when refused,
/// SB_E_STATE when another reference had unsubscribed it already (it still waited).
/// After a join no route runs again and the routes' data may be freed. Ownership: takes
/// ownership of the caller's reference to `r`.
#[no_mangle]
pub extern "C" fn sb_router_unsubscribe_and_join(r: *mut sb_router) -> *mut sb_router {
    unsubscribe(r, true)
}

/// 1 once the router's final message was handled, 0 before; SB_E_INVAL (negative) for a
/// NULL or dead handle.
/// Ownership: `r` is borrowed.
#[no_mangle]
pub extern "C" fn sb_router_is_done(r: *mut sb_router) -> c_int {
    boundary(|| match sb_router::borrow(r) {
        Ok(router) => router.subscription().is_done() as c_int,
        Err(e) => fail_code(e),
    })
}

/// Takes a new reference; returns `r`.
/// Ownership: returns a new reference to the same router; `r` is borrowed.
#[no_mangle]
pub extern "C" fn sb_router_ref(r: *mut sb_router) -> *mut sb_router {
    boundary(|| match sb_router::clone_arc(r) {
        Ok(x) => sb_router::into_raw(x),
        Err(e) => fail_null(e),
    })
}

/// Drops a reference (does not unsubscribe). NULL-safe.
/// Ownership: takes ownership of (releases) one reference.
#[no_mangle]
pub extern "C" fn sb_router_unref(r: *mut sb_router) {
    boundary(|| {
        let _ = sb_router::release(r).map_err(|e| set_last_error(&e));
    })
}
