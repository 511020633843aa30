//! Worker groups (`sb_pool_*`): named pools with limits of their own.

use super::router::sb_router;
use super::subscription::{sb_subscription, sb_subscription_cb, subscribe, Runner};
use super::topic::sb_topic;
use super::{boundary, fail_code, fail_null, str_arg, to_code, Handle, UserData};
use crate::error::{set_last_error, Error};
use crate::router::Router;
use crate::worker_group::{self, Group};
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::time::Duration;

/// A worker group (opaque, refcounted): a named pool of worker threads with limits of
/// its own, which runs the pool subscriptions, routers and tasks placed in it.
pub struct sb_pool {
    _opaque: [u8; 0],
}

impl Handle for sb_pool {
    type Rust = Group;
    type Ptr = std::sync::Arc<Group>;
    const WHAT: &'static str = "sb_pool";
    fn magic_ok(r: &Group) -> bool {
        r.magic_ok()
    }
}

/// A task for sb_pool_submit: called once with its `data`, on a worker of the group.
pub type sb_pool_task_fn = Option<unsafe extern "C" fn(data: *mut c_void)>;

fn timeout(ms: c_uint) -> Duration {
    Duration::from_millis(u64::from(ms))
}

/// Creates the worker group `name`: at least `min_threads` workers kept alive once
/// started, at most `max_threads` running callbacks and tasks at once (workers blocked in
/// a library wait get stand-ins, as in sb_pool_configure), idle workers above the
/// minimum exit after `idle_timeout_ms`. Workers start as work arrives.
/// If a live group has that name, returns it when its limits are these (its current
/// ones, after any sb_pool_reconfigure), else NULL with SB_E_INVAL. "default" is the
/// shared pool. NULL with SB_E_INVAL also for a NULL or empty name, max_threads 0, or
/// min_threads above max_threads.
/// The group lives while a reference, a subscription (until its final message was
/// handled) or a queued task uses it; then its name is free again and its threads end.
/// Ownership: `name` is borrowed (copied). Returns a new reference (sb_pool_unref).
#[no_mangle]
pub extern "C" fn sb_pool_create(
    name: *const c_char,
    min_threads: c_uint,
    max_threads: c_uint,
    idle_timeout_ms: c_uint,
) -> *mut sb_pool {
    boundary(|| {
        let r = str_arg("worker group name", name).and_then(|n| {
            worker_group::create(
                n,
                min_threads as usize,
                max_threads as usize,
                timeout(idle_timeout_ms),
            )
        });
        match r {
            Ok(g) => sb_pool::into_raw(g),
            Err(e) => fail_null(e),
        }
    })
}

/// The live worker group `name` ("default": the shared pool, always there), or NULL
/// (SB_E_INVAL: none of that name, or a NULL name).
/// Ownership: `name` is borrowed. Returns a new reference (sb_pool_unref).
#[no_mangle]
pub extern "C" fn sb_pool_get(name: *const c_char) -> *mut sb_pool {
    boundary(|| match str_arg("worker group name", name) {
        Ok(n) => match worker_group::get(n) {
            Some(g) => sb_pool::into_raw(g),
            None => fail_null(Error::invalid(format!("no live worker group named '{n}'"))),
        },
        Err(e) => fail_null(e),
    })
}

/// Sets the group's limits (as sb_pool_create's); takes effect at once. On the "default"
/// group it is sb_pool_configure. Returns SB_OK, or SB_E_INVAL for a NULL or dead
/// handle or bad limits (the limits are then unchanged).
/// Ownership: `pool` is borrowed.
#[no_mangle]
pub extern "C" fn sb_pool_reconfigure(
    pool: *mut sb_pool,
    min_threads: c_uint,
    max_threads: c_uint,
    idle_timeout_ms: c_uint,
) -> c_int {
    boundary(|| {
        to_code(sb_pool::borrow(pool).and_then(|g| {
            g.reconfigure(
                min_threads as usize,
                max_threads as usize,
                timeout(idle_timeout_ms),
            )
        }))
    })
}

/// Takes one more reference; returns `pool` (NULL, with SB_E_INVAL, for a NULL or dead
/// handle).
/// Ownership: `pool` is borrowed; returns a new reference (sb_pool_unref).
#[no_mangle]
pub extern "C" fn sb_pool_ref(pool: *mut sb_pool) -> *mut sb_pool {
    boundary(|| match sb_pool::clone_arc(pool) {
        Ok(g) => {
            g.acquire();
            sb_pool::into_raw(g)
        }
        Err(e) => fail_null(e),
    })
}

/// Releases a reference. NULL-safe. When nothing else uses the group (no reference,
/// no unfinished subscription, no queued task) it ends: its name is free again and its
/// threads exit shortly after (they are not waited for; this call never blocks).
/// Ownership: takes ownership of the caller's reference to `pool`.
#[no_mangle]
pub extern "C" fn sb_pool_unref(pool: *mut sb_pool) {
    boundary(|| {
        if pool.is_null() {
            return;
        }
        match sb_pool::borrow(pool) {
            Ok(g) => {
                g.release();
                let _ = sb_pool::release(pool);
            }
            Err(e) => set_last_error(&e),
        }
    })
}

/// Runs `fn(data)` once on a worker of the group, after this call returns (never inside
/// it). Returns SB_OK (the task will run, even if every reference to the group is
/// released meanwhile: a queued task keeps its group alive), or, without running it,
/// SB_E_INVAL for a NULL or dead handle or a NULL `fn`, SB_E_STATE when the group has
/// ended. The caller must own a reference to `pool` for the duration of the call: a
/// submit that races with the release of the last reference is a use after free (the
/// library detects it when it can: SB_E_INVAL or SB_E_STATE). Tasks run in no set order
/// relative to each other (up to max_threads at once); a task may call the library,
/// including sb_pool_submit and joins (a worker blocked in a join gets a stand-in).
/// Tasks still queued when the process exits are not run.
/// Ownership: `pool` is borrowed; `data` stays the caller's (the library never touches
/// it) and must stay valid until the task ran.
#[no_mangle]
pub extern "C" fn sb_pool_submit(
    pool: *mut sb_pool,
    task: sb_pool_task_fn,
    data: *mut c_void,
) -> c_int {
    boundary(|| {
        let g = match sb_pool::borrow(pool) {
            Ok(g) => g,
            Err(e) => return fail_code(e),
        };
        let Some(f) = task else {
            return fail_code(Error::invalid("task function is NULL"));
        };
        let data = UserData(data);
        to_code(g.submit(move || {
            let data = data;
            // SAFETY: the function and argument the caller submitted, called once.
            unsafe { f(data.0) }
        }))
    })
}

/// As sb_subscribe_pool, run by the worker group `pool`. The subscription uses the group
/// (keeps it alive) until its final message was handled. Its callbacks never overlap,
/// and a slow callback of another group never delays them. NULL (SB_E_INVAL) for a NULL
/// or dead `topic` or `pool`, or a NULL `cb`.
/// Ownership: `topic` and `pool` are borrowed (the subscription keeps its own uses);
/// otherwise as sb_subscribe.
#[no_mangle]
pub extern "C" fn sb_subscribe_pool_in(
    topic: *mut sb_topic,
    pool: *mut sb_pool,
    cb: sb_subscription_cb,
    data: *mut c_void,
) -> *mut sb_subscription {
    subscribe(topic, cb, data, Runner::Group(pool))
}

/// As sb_router_create_pool, run by the worker group `pool` (which the router uses until
/// its final message was handled). NULL (SB_E_INVAL) for a NULL or dead `topic` or
/// `pool`.
/// Ownership: `topic` and `pool` are borrowed; otherwise as sb_router_create.
#[no_mangle]
pub extern "C" fn sb_router_create_in(topic: *mut sb_topic, pool: *mut sb_pool) -> *mut sb_router {
    boundary(|| {
        let r = sb_topic::borrow(topic)
            .and_then(|t| sb_pool::borrow(pool).and_then(|g| Router::new_in(&t, &g)));
        match r {
            Ok(r) => sb_router::into_raw(r),
            Err(e) => fail_null(e),
        }
    })
}
