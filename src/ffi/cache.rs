//! Caches, caching topics and message lists.

use super::library::sb_eid;
use super::message::{sb_message, sb_message_type};
use super::subscription::{sb_subscription_filter, set_filter_mode};
use super::topic::sb_topic;
use super::{act_and_release, boundary, fail_code, fail_null, str_arg, to_code, Handle, UserData};
use crate::cache::{AggregatePublishFn, Cache, CacheEntry, CalcFn, IdFn};
use crate::caching_topic::{clear_message, clear_type, update_type, CachingTopic, UpdateView};
use crate::eid::Eid;
use crate::error::{set_last_error, Error};
use crate::message::{Message, MessageRef};
use crate::message_type::DEAD_MAGIC;
use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A cache of snapshots (opaque, refcounted).
pub struct sb_cache {
    _opaque: [u8; 0],
}
/// Every snapshot of one object (opaque; borrowed, seen only inside a calc function).
pub struct sb_cache_entry {
    _opaque: [u8; 0],
}
/// A caching topic (opaque; released by sb_caching_unsubscribe*).
pub struct sb_caching_topic {
    _opaque: [u8; 0],
}
/// A list of messages returned by gets and dumps (opaque; sb_message_list_free).
pub struct sb_message_list {
    _opaque: [u8; 0],
}

impl Handle for sb_cache {
    type Rust = Cache;
    type Ptr = std::sync::Arc<Cache>;
    const WHAT: &'static str = "sb_cache";
    fn magic_ok(r: &Cache) -> bool {
        r.magic_ok()
    }
}
impl Handle for sb_cache_entry {
    type Rust = CacheEntry;
    type Ptr = std::sync::Arc<CacheEntry>;
    const WHAT: &'static str = "sb_cache_entry";
    fn magic_ok(r: &CacheEntry) -> bool {
        r.magic_ok()
    }
}
impl Handle for sb_caching_topic {
    type Rust = CachingTopic;
    type Ptr = std::sync::Arc<CachingTopic>;
    const WHAT: &'static str = "sb_caching_topic";
    fn magic_ok(r: &CachingTopic) -> bool {
        r.magic_ok()
    }
}

const LIST_MAGIC: u32 = 0x5342_4c53; // "SBLS"

/// Owned by C through a Box (not refcounted).
#[repr(C)]
struct MessageList {
    magic: u32,
    items: Vec<MessageRef>,
}

impl Drop for MessageList {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

pub(crate) fn list_out(items: Vec<MessageRef>) -> *mut sb_message_list {
    Box::into_raw(Box::new(MessageList {
        magic: LIST_MAGIC,
        items,
    }))
    .cast()
}

fn list_ref<'a>(list: *const sb_message_list) -> Result<&'a MessageList, Error> {
    if list.is_null() {
        return Err(Error::invalid("sb_message_list is NULL"));
    }
    // SAFETY: non-null; the caller promises a list from this library, not yet freed. The
    // magic check catches most freed or foreign pointers.
    let l = unsafe { &*list.cast::<MessageList>() };
    if l.magic != LIST_MAGIC {
        return Err(Error::invalid("sb_message_list pointer is not a live list"));
    }
    Ok(l)
}

/// Returns the object id of a snapshot (borrowed, e.g. from the message's data, and read
/// only during the call), or NULL when the message is not cacheable. `msg` is borrowed
/// for the call. Called for every message the caching topic sees, on the publisher's
/// thread. Ids are UTF-8 text, as the getters take them: a snapshot whose id is not is
/// not cached (one warning per cache through the log handler). Like every callback it
/// must return normally (no C++ exception, no longjmp out).
pub type sb_snapshot_get_id = Option<unsafe extern "C" fn(msg: *mut sb_message) -> *const c_char>;
/// Computes an entry's aggregate after a change (`new_snapshot` NULL on a clear). `entry`
/// and `new_snapshot` are borrowed for the call. Returns a NEW reference, which the cache
/// takes over: the current aggregate (sb_message_ref'd) for "unchanged", NULL for "no
/// aggregate". Must return normally (no C++ exception, no longjmp out).
pub type sb_cache_aggregate_calc_fn = Option<
    unsafe extern "C" fn(
        entry: *mut sb_cache_entry,
        new_snapshot: *mut sb_message,
    ) -> *mut sb_message,
>;
/// Publishes a changed aggregate to the original topic (both arguments borrowed for the
/// call: sb_publish does not take a reference either). Must return normally (no C++
/// exception, no longjmp out).
pub type sb_cache_aggregate_publish_fn =
    Option<unsafe extern "C" fn(topic: *mut sb_topic, aggregate: *mut sb_message)>;

/// As sb_snapshot_get_id, with the `data` given to sb_cache_create_with_data.
pub type sb_snapshot_get_id_with_data =
    Option<unsafe extern "C" fn(data: *mut c_void, msg: *mut sb_message) -> *const c_char>;
/// As sb_cache_aggregate_calc_fn, with the `data` given to sb_cache_create_with_data.
pub type sb_cache_aggregate_calc_with_data_fn = Option<
    unsafe extern "C" fn(
        data: *mut c_void,
        entry: *mut sb_cache_entry,
        new_snapshot: *mut sb_message,
    ) -> *mut sb_message,
>;
/// As sb_cache_aggregate_publish_fn, with the `data` given to sb_cache_create_with_data.
pub type sb_cache_aggregate_publish_with_data_fn = Option<
    unsafe extern "C" fn(data: *mut c_void, topic: *mut sb_topic, aggregate: *mut sb_message),
>;

/// Data of a cache update message (type `sb_cache_update_type()`), read with
/// sb_message_data(). The update message holds a reference to each snapshot: every field
/// is borrowed from it, valid while the update message lives (the duration of the
/// callback, or longer if you sb_message_ref the update). To keep a snapshot past that,
/// sb_message_ref the snapshot itself.
#[repr(C)]
pub struct sb_cache_update {
    /// Type of the snapshots (borrowed; types live until the process ends).
    pub r#type: *mut sb_message_type,
    /// Previous snapshot, or NULL when the entry is new (borrowed from the update).
    pub old_snapshot: *mut sb_message,
    /// New snapshot, or NULL on a clear (borrowed from the update).
    pub new_snapshot: *mut sb_message,
}

const _: () = assert!(std::mem::size_of::<sb_cache_update>() == std::mem::size_of::<UpdateView>());

/// The id function a C id callback becomes: `call(msg)` is the callback's answer.
fn c_id_fn(call: impl Fn(*mut sb_message) -> *const c_char + Send + Sync + 'static) -> IdFn {
    let warned_not_utf8 = AtomicBool::new(false);
    Box::new(move |msg: &MessageRef| {
        let p = call(sb_message::as_ptr(msg));
        // SAFETY: NULL or a NUL-terminated string borrowed from the message (header:
        // "borrowed, e.g. from the message's data"). The cache reads it only during the
        // call that asked for it and copies it to keep it.
        let id = (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })?;
        match id.to_str() {
            Ok(id) => Some(Cow::Borrowed(id)),
            // Not cached: a lossy conversion would give distinct ids one key (every bad
            // byte becomes U+FFFD), and the getters refuse such ids anyway. Said once per
            // cache, not per snapshot.
            Err(_) => {
                if !warned_not_utf8.swap(true, Ordering::Relaxed) {
                    crate::log::warn(&format!(
                        "cache id function returned an id that is not valid UTF-8 ({:?}): \
                         such snapshots are not cached",
                        id
                    ));
                }
                None
            }
        }
    })
}

/// The calc function a C calc callback becomes: `call(entry, new)` returns NULL or a new
/// reference.
fn c_calc_fn(
    call: impl Fn(*mut sb_cache_entry, *mut sb_message) -> *mut sb_message + Send + Sync + 'static,
) -> CalcFn {
    Box::new(move |entry: &Arc<CacheEntry>, new: Option<&MessageRef>| {
        let new_ptr = new.map_or(std::ptr::null_mut(), sb_message::as_ptr);
        let agg = call(sb_cache_entry::as_ptr(entry), new_ptr);
        // SAFETY: calc returns NULL or a new reference, which we take over.
        (!agg.is_null())
            .then(|| unsafe { MessageRef::from_raw(agg.cast_const().cast::<Message>()) })
    })
}

/// The publish function a C publish callback becomes (both arguments borrowed).
fn c_publish_fn(
    call: impl Fn(*mut sb_topic, *mut sb_message) + Send + Sync + 'static,
) -> AggregatePublishFn {
    Box::new(move |topic: &Arc<crate::Topic>, agg: &MessageRef| {
        call(sb_topic::as_ptr(topic), sb_message::as_ptr(agg))
    })
}

fn make_cache(
    id_fn: sb_snapshot_get_id,
    calc: sb_cache_aggregate_calc_fn,
    publish: sb_cache_aggregate_publish_fn,
) -> *mut sb_cache {
    let Some(id_fn) = id_fn else {
        return fail_null(Error::invalid("id_fn is NULL"));
    };
    // SAFETY (each closure): the cache's own C callbacks, called with live handles that
    // the library keeps alive for the call.
    let id = c_id_fn(move |m| unsafe { id_fn(m) });
    let calc = calc.map(|f| c_calc_fn(move |e, m| unsafe { f(e, m) }));
    let publish = publish.map(|f| c_publish_fn(move |t, m| unsafe { f(t, m) }));
    sb_cache::into_raw(Cache::with_aggregate(id, calc, publish))
}

/// A cache keyed by (message type, `id_fn(msg)`, eid). New reference.
/// Ownership: returns a new reference (drop it with sb_cache_unref); `id_fn` is called
/// until the cache and every caching topic using it are gone.
#[no_mangle]
pub extern "C" fn sb_cache_create(id_fn: sb_snapshot_get_id) -> *mut sb_cache {
    boundary(|| make_cache(id_fn, None, None))
}

/// A cache with aggregates: `calc` recomputes an entry's aggregate on every change; when
/// it changes, `publish(original, aggregate)` is called (NULL: sb_publish to the original
/// topic) and an (old, new) aggregate update is published on the caching topic.
/// Ownership: returns a new reference (sb_cache_unref). `calc` returns a new reference
/// the cache takes over; `publish` borrows its arguments for the call.
#[no_mangle]
pub extern "C" fn sb_cache_create_full(
    id_fn: sb_snapshot_get_id,
    calc: sb_cache_aggregate_calc_fn,
    publish: sb_cache_aggregate_publish_fn,
) -> *mut sb_cache {
    boundary(|| make_cache(id_fn, calc, publish))
}

/// As sb_cache_create_full, with callbacks that receive `data` as their first argument
/// (so one set of functions can serve several caches, or a module can reach its own state
/// without globals). `calc` and `publish` may be NULL, as in sb_cache_create_full.
/// The library never touches `data` itself, and does not free it: it must stay valid as
/// long as a callback may run, that is until every caching topic using the cache has been
/// joined (sb_caching_unsubscribe_and_join) and no other thread is still publishing to
/// their original topics; free it after that. Returns a new reference, or NULL
/// (SB_E_INVAL) when `id_fn` is NULL.
/// Ownership: returns a new reference (sb_cache_unref); `data` stays the caller's.
#[no_mangle]
pub extern "C" fn sb_cache_create_with_data(
    id_fn: sb_snapshot_get_id_with_data,
    calc: sb_cache_aggregate_calc_with_data_fn,
    publish: sb_cache_aggregate_publish_with_data_fn,
    data: *mut c_void,
) -> *mut sb_cache {
    boundary(|| {
        let Some(id_fn) = id_fn else {
            return fail_null(Error::invalid("id_fn is NULL"));
        };
        let data = UserData(data);
        // SAFETY (each closure): the cache's own C callbacks, called with the caller's
        // `data` and live handles that the library keeps alive for the call.
        let id = c_id_fn(move |m| {
            let d = data;
            unsafe { id_fn(d.0, m) }
        });
        let calc = calc.map(|f| {
            c_calc_fn(move |e, m| {
                let d = data;
                unsafe { f(d.0, e, m) }
            })
        });
        let publish = publish.map(|f| {
            c_publish_fn(move |t, m| {
                let d = data;
                unsafe { f(d.0, t, m) }
            })
        });
        sb_cache::into_raw(Cache::with_aggregate(id, calc, publish))
    })
}

/// Takes a new reference; returns `cache`.
/// Ownership: returns a new reference to the same cache; `cache` is borrowed.
#[no_mangle]
pub extern "C" fn sb_cache_ref(cache: *mut sb_cache) -> *mut sb_cache {
    boundary(|| match sb_cache::clone_arc(cache) {
        Ok(c) => sb_cache::into_raw(c),
        Err(e) => fail_null(e),
    })
}

/// Drops a reference. NULL-safe.
/// Ownership: takes ownership of (releases) one reference. Caching topics using the
/// cache keep their own.
#[no_mangle]
pub extern "C" fn sb_cache_unref(cache: *mut sb_cache) {
    boundary(|| {
        let _ = sb_cache::release(cache).map_err(|e| set_last_error(&e));
    })
}

fn entry_msg(
    entry: *mut sb_cache_entry,
    pick: impl FnOnce(&CacheEntry) -> Option<&MessageRef>,
) -> *mut sb_message {
    match sb_cache_entry::borrow(entry) {
        Ok(e) => pick(&e).map_or(std::ptr::null_mut(), sb_message::as_ptr),
        Err(e) => fail_null(e),
    }
}

/// The entry's aggregate (borrowed), or NULL.
/// Ownership: `entry` is borrowed (valid only inside the calc call that received it);
/// the result is borrowed from the entry: sb_message_ref it to keep it past the call.
#[no_mangle]
pub extern "C" fn sb_cache_entry_get_aggregate(entry: *mut sb_cache_entry) -> *mut sb_message {
    boundary(|| entry_msg(entry, CacheEntry::aggregate))
}

/// The entry's local snapshot (borrowed), or NULL.
/// Ownership: borrowed from the entry, as sb_cache_entry_get_aggregate.
#[no_mangle]
pub extern "C" fn sb_cache_entry_get_local(entry: *mut sb_cache_entry) -> *mut sb_message {
    boundary(|| entry_msg(entry, CacheEntry::local))
}

/// The entry's `idx`-th remote snapshot (borrowed; ordered by eid), or NULL past the end.
/// Ownership: borrowed from the entry, as sb_cache_entry_get_aggregate.
#[no_mangle]
pub extern "C" fn sb_cache_entry_get_remote(
    entry: *mut sb_cache_entry,
    idx: usize,
) -> *mut sb_message {
    boundary(|| entry_msg(entry, |e| e.remote(idx)))
}

/// Subscribes synchronously to `original` and keeps `cache` current from its messages;
/// updates are published on sb_caching_get_topic(). Released by sb_caching_unsubscribe*.
/// Ownership: `original` and `cache` are borrowed for the call; the caching topic takes
/// references of its own: it keeps `original`, `cache` (and so the snapshots in it) and
/// its update topic alive until it is released with sb_caching_unsubscribe /
/// sb_caching_unsubscribe_and_join (after the join everything it held is released).
/// Returns a new reference, which those functions take over; there is no separate
/// unref.
#[no_mangle]
pub extern "C" fn sb_caching_topic_create(
    original: *mut sb_topic,
    cache: *mut sb_cache,
) -> *mut sb_caching_topic {
    boundary(
        || match (sb_topic::borrow(original), sb_cache::borrow(cache)) {
            (Ok(t), Ok(c)) => match CachingTopic::create(&t, &c) {
                Ok(ct) => sb_caching_topic::into_raw(ct),
                Err(e) => fail_null(e),
            },
            (Err(e), _) | (_, Err(e)) => fail_null(e),
        },
    )
}

/// The topic cache updates are published on (borrowed): a topic of this caching topic's
/// own, named "<original>-cached" ("<original>-cached-2", ... while other caching topics
/// of the same original live).
/// Ownership: borrowed: valid while the caching topic lives (sb_topic_ref it to keep it
/// longer). `ct` is borrowed.
#[no_mangle]
pub extern "C" fn sb_caching_get_topic(ct: *mut sb_caching_topic) -> *mut sb_topic {
    boundary(|| match sb_caching_topic::borrow(ct) {
        Ok(c) => sb_topic::as_ptr(c.topic()),
        Err(e) => fail_null(e),
    })
}

/// Caches messages of `type` only (switches the caching subscription to selective).
/// Ownership: both arguments are borrowed (the caching topic keeps the type).
#[no_mangle]
pub extern "C" fn sb_caching_accept_message_type(
    ct: *mut sb_caching_topic,
    ty: *mut sb_message_type,
) -> c_int {
    boundary(
        || match (sb_caching_topic::borrow(ct), sb_message_type::clone_arc(ty)) {
            (Ok(c), Ok(t)) => {
                let sub = c.subscription();
                sub.accept_message_type(&t);
                // Clears must still reach the cache.
                sub.accept_message_type(clear_type());
                0
            }
            (Err(e), _) | (_, Err(e)) => fail_code(e),
        },
    )
}

/// Sets the caching subscription's filter mode.
/// Ownership: `ct` is borrowed.
#[no_mangle]
pub extern "C" fn sb_caching_set_filter(
    ct: *mut sb_caching_topic,
    filter: sb_subscription_filter,
) -> c_int {
    boundary(|| {
        to_code(
            sb_caching_topic::borrow(ct).and_then(|c| set_filter_mode(c.subscription(), filter)),
        )
    })
}

fn caching_unsubscribe(ct: *mut sb_caching_topic, join: bool) -> *mut sb_caching_topic {
    boundary(|| {
        act_and_release(ct, |c| {
            let sub = c.subscription();
            if join {
                sub.unsubscribe_and_join()
            } else {
                sub.unsubscribe()
            }
        })
    })
}

/// Stops caching and releases the caching topic. Returns NULL.
/// Ownership: takes ownership of the caller's reference to `ct` (do not use `ct`
/// afterwards: `ct = sb_caching_unsubscribe(ct);`).
#[no_mangle]
pub extern "C" fn sb_caching_unsubscribe(ct: *mut sb_caching_topic) -> *mut sb_caching_topic {
    caching_unsubscribe(ct, false)
}

/// As sb_caching_unsubscribe, and waits until the caching subscription is done.
/// Refused from the caching subscription's own callbacks (the id / calc / publish
/// functions run inside it): it then unsubscribes without waiting, and
/// sb_last_error_code() is SB_E_DEADLOCK. After a join, no id / calc / publish call
/// runs any more. Returns NULL. Ownership: takes ownership of the caller's reference,
/// as sb_caching_unsubscribe.
#[no_mangle]
pub extern "C" fn sb_caching_unsubscribe_and_join(
    ct: *mut sb_caching_topic,
) -> *mut sb_caching_topic {
    caching_unsubscribe(ct, true)
}

/// Type of cache update messages (borrowed, lives forever); data is sb_cache_update.
/// Ownership: borrowed (never unref it). Messages of this type are made by caching
/// topics only: sb_message_create* refuses it (SB_E_INVAL).
#[no_mangle]
pub extern "C" fn sb_cache_update_type() -> *mut sb_message_type {
    boundary(|| sb_message_type::as_ptr(update_type()))
}

/// Type of cache clear messages (borrowed, lives forever).
/// Ownership: borrowed (never unref it). Make clear messages with
/// sb_cache_clear_create: sb_message_create* refuses this type (SB_E_INVAL).
#[no_mangle]
pub extern "C" fn sb_cache_clear_type() -> *mut sb_message_type {
    boundary(|| sb_message_type::as_ptr(clear_type()))
}

/// A message that, published to an original topic, removes `snapshot`'s entry (the
/// entry of the same type, id and eid). New reference.
/// Ownership: `snapshot` is borrowed (the clear message keeps its own reference to it);
/// returns a new reference (sb_message_unref) or NULL.
#[no_mangle]
pub extern "C" fn sb_cache_clear_create(snapshot: *mut sb_message) -> *mut sb_message {
    boundary(|| match sb_message::borrow(snapshot) {
        Ok(m) => sb_message::into_raw(clear_message(&m)),
        Err(e) => fail_null(e),
    })
}

fn with_cache_type_id<R: super::FailureValue>(
    cache: *mut sb_cache,
    ty: *mut sb_message_type,
    id: *const c_char,
    f: impl FnOnce(&Cache, &crate::MessageType, &str) -> R,
    fail: impl FnOnce(Error) -> R,
) -> R {
    let r = (|| {
        Ok::<_, Error>((
            sb_cache::borrow(cache)?,
            sb_message_type::borrow(ty)?,
            str_arg("id", id)?,
        ))
    })();
    match r {
        Ok((c, t, i)) => f(&c, &t, i),
        Err(e) => fail(e),
    }
}

fn msg_out(m: Option<MessageRef>) -> *mut sb_message {
    m.map_or(std::ptr::null_mut(), sb_message::into_raw)
}

/// The local snapshot of (type, id) — new reference — or NULL.
/// Ownership: the arguments are borrowed; returns a new reference (sb_message_unref),
/// or NULL when nothing is cached (sb_last_error_code() 0) or on bad input (non-zero).
#[no_mangle]
pub extern "C" fn sb_cache_get(
    cache: *mut sb_cache,
    ty: *mut sb_message_type,
    id: *const c_char,
) -> *mut sb_message {
    boundary(|| with_cache_type_id(cache, ty, id, |c, t, i| msg_out(c.get(t, i)), fail_null))
}

/// The snapshot of (type, id) from `eid` — or the aggregate when `eid` is NULL — new
/// reference, or NULL.
/// Ownership: as sb_cache_get.
#[no_mangle]
pub extern "C" fn sb_cache_get_by_eid(
    cache: *mut sb_cache,
    ty: *mut sb_message_type,
    id: *const c_char,
    eid: *const sb_eid,
) -> *mut sb_message {
    boundary(|| {
        // SAFETY: NULL or a valid eid, per the contract.
        let eid = unsafe { eid.as_ref() }.map(Eid::from);
        with_cache_type_id(
            cache,
            ty,
            id,
            |c, t, i| msg_out(c.get_by_eid(t, i, eid.as_ref())),
            fail_null,
        )
    })
}

/// Every snapshot (local and remote) of (type, id). Free with sb_message_list_free.
/// Ownership: the arguments are borrowed; returns a new list the caller owns (it holds
/// a reference to each message): free it with sb_message_list_free. NULL only on bad
/// input; an unknown id gives an empty list.
#[no_mangle]
pub extern "C" fn sb_cache_get_all(
    cache: *mut sb_cache,
    ty: *mut sb_message_type,
    id: *const c_char,
) -> *mut sb_message_list {
    boundary(|| {
        with_cache_type_id(
            cache,
            ty,
            id,
            |c, t, i| list_out(c.get_all(t, i)),
            fail_null,
        )
    })
}

fn dump(
    cache: *mut sb_cache,
    ty: *mut sb_message_type,
    f: impl FnOnce(&Cache, Option<&crate::MessageType>) -> Vec<MessageRef>,
) -> *mut sb_message_list {
    let c = match sb_cache::borrow(cache) {
        Ok(c) => c,
        Err(e) => return fail_null(e),
    };
    if ty.is_null() {
        return list_out(f(&c, None));
    }
    match sb_message_type::borrow(ty) {
        Ok(t) => list_out(f(&c, Some(&t))),
        Err(e) => fail_null(e),
    }
}

/// The local snapshots of `type` (NULL: every type), as a consistent copy: each entry is
/// read whole (its snapshots as they were together at one instant), every entry present
/// for the whole dump is listed exactly once, entries added during the dump are not, and
/// entries removed during it may be. Different entries may be read at different instants
/// (the copy is made a few entries at a time, so a publisher never waits for a whole
/// dump). A dump of one type costs that type's entries only. The same holds for
/// sb_cache_dump_by_eid and sb_cache_dump_all.
/// Ownership: the arguments are borrowed; returns a new list the caller owns (it holds
/// a reference to each message): free it with sb_message_list_free, which drops those
/// references. NULL only on bad input.
#[no_mangle]
pub extern "C" fn sb_cache_dump(
    cache: *mut sb_cache,
    ty: *mut sb_message_type,
) -> *mut sb_message_list {
    boundary(|| dump(cache, ty, |c, t| c.dump(t)))
}

/// The snapshots of one eid (NULL eid: the aggregates).
/// Ownership: as sb_cache_dump (free the list with sb_message_list_free).
#[no_mangle]
pub extern "C" fn sb_cache_dump_by_eid(
    cache: *mut sb_cache,
    ty: *mut sb_message_type,
    eid: *const sb_eid,
) -> *mut sb_message_list {
    boundary(|| {
        // SAFETY: NULL or a valid eid, per the contract.
        let eid = unsafe { eid.as_ref() }.map(Eid::from);
        dump(cache, ty, |c, t| match eid {
            Some(e) => c.dump_by_eid(t, &e),
            None => c.dump_aggregates(t),
        })
    })
}

/// Every snapshot of every eid (no aggregates).
/// Ownership: as sb_cache_dump (free the list with sb_message_list_free).
#[no_mangle]
pub extern "C" fn sb_cache_dump_all(
    cache: *mut sb_cache,
    ty: *mut sb_message_type,
) -> *mut sb_message_list {
    boundary(|| dump(cache, ty, |c, t| c.dump_all(t)))
}

/// Number of messages in `list` (0 for NULL).
/// Ownership: `list` is borrowed. A NULL or freed list also gives 0, with
/// sb_last_error_code() SB_E_INVAL.
#[no_mangle]
pub extern "C" fn sb_message_list_len(list: *const sb_message_list) -> usize {
    boundary(|| match list_ref(list) {
        Ok(l) => l.items.len(),
        Err(e) => {
            set_last_error(&e);
            0
        }
    })
}

/// The `i`-th message (borrowed from the list), or NULL past the end.
/// Ownership: `list` is borrowed; the message is borrowed from the list (valid until
/// sb_message_list_free): sb_message_ref it to keep it longer.
#[no_mangle]
pub extern "C" fn sb_message_list_get(list: *const sb_message_list, i: usize) -> *mut sb_message {
    boundary(|| match list_ref(list) {
        Ok(l) => match l.items.get(i) {
            Some(m) => sb_message::as_ptr(m),
            None => fail_null(Error::invalid(format!(
                "index {i} is past the end of a list of {}",
                l.items.len()
            ))),
        },
        Err(e) => fail_null(e),
    })
}

/// Frees a list and its references. NULL-safe.
/// Ownership: takes ownership of `list` and drops its references to the messages.
#[no_mangle]
pub extern "C" fn sb_message_list_free(list: *mut sb_message_list) {
    boundary(|| {
        if list.is_null() {
            return;
        }
        match list_ref(list) {
            // SAFETY: a live list from list_out, freed exactly once here.
            Ok(_) => drop(unsafe { Box::from_raw(list.cast::<MessageList>()) }),
            Err(e) => set_last_error(&e),
        }
    })
}
