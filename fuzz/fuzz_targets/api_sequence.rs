//! Fuzz target: random sequences of switchboard C API calls.
//!
//! The input is decoded (with `arbitrary`) into a list of [`Op`]s that run against small
//! tables of handles: topics, message types, messages, subscriptions (dedicated, pool,
//! synchronous, or in a worker group), forwards, topic pools, caches, caching topics,
//! routers, message lists and worker groups (with tasks submitted to them). Every handle argument names a slot that may be empty, in which case NULL is
//! passed; wrong-state calls (double unsubscribe, join after unsubscribe, ...) are made
//! on purpose. What the target never does is break the ownership rules itself: each slot
//! holds exactly one reference and drops it when the op releases it, so a dangling
//! pointer is never passed (use-after-free by the caller is out of contract).
//!
//! Callbacks (plain `extern "C"` functions) count messages, check the delivery
//! guarantees of API.md (no overlapping invocations, the Subscribe change first, nothing
//! after the final message or after a join returned), and, depending on a mode byte
//! from the input, publish, capture messages, unsubscribe themselves, join themselves,
//! publish_sync to themselves, ...
//!
//! At the end of every input everything is torn down (caching topics, routers and
//! subscriptions unsubscribed and joined, forwards cancelled, every reference dropped)
//! and the target checks that no topic and no message data outlives the input, so a
//! reference leak shows up as an abort even when LeakSanitizer would not see it (memory
//! still reachable through a registry).
//!
//! A broken invariant aborts the process with a line starting with "INVARIANT:".

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_long, c_uint, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use switchboard::ffi::cache::*;
use switchboard::ffi::library::*;
use switchboard::ffi::message::*;
use switchboard::ffi::pool::*;
use switchboard::ffi::router::*;
use switchboard::ffi::subscription::*;
use switchboard::ffi::timer::*;
use switchboard::ffi::topic::*;

// ---------------------------------------------------------------------------------------
// Helpers

fn fail(what: &str) -> ! {
    eprintln!("INVARIANT: {what}");
    std::process::abort();
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            fail(&format!($($fmt)+));
        }
    };
}

/// Reads a C string the library returned (ASan checks the read).
fn cstr_len(p: *const c_char) -> usize {
    if p.is_null() {
        0
    } else {
        // SAFETY: the library returns NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_bytes().len()
    }
}

fn last_error_checked() {
    let e = sb_last_error();
    check!(!e.is_null(), "sb_last_error returned NULL");
    let _ = cstr_len(e);
}

const N_TOPICS: usize = 6;
const N_TYPES: usize = 4;
const N_MSGS: usize = 6;
const N_SUBS: usize = 6;
const N_FWDS: usize = 4;
const N_POOLS: usize = 2;
const N_CACHES: usize = 2;
const N_CTS: usize = 2;
const N_ROUTERS: usize = 3;
const N_LISTS: usize = 3;
const N_GROUPS: usize = 3;
/// Worker group names the ops use (so creates and gets meet the same groups).
const GROUP_NAMES: [&CStr; 3] = [c"fz.g0", c"fz.g1", c"default"];
const N_TIMERS: usize = 4;
const MAX_OPS: usize = 192;

/// A slot reference from the input: `len` (and above) mean "NULL".
fn pick<T: Copy>(slots: &[Option<T>], s: u8) -> Option<T> {
    let i = s as usize % (slots.len() + 1);
    slots.get(i).copied().flatten()
}

fn idx(len: usize, s: u8) -> usize {
    s as usize % len
}

// ---------------------------------------------------------------------------------------
// Message data: identifies which data pointers the cache id function may read.

#[repr(C)]
struct RawData {
    magic: u64,
    id: u8,
}

const RAW_MAGIC: u64 = 0x5241_5744_4154_4121;

static STATIC_RAW: [RawData; 4] = [
    RawData {
        magic: RAW_MAGIC,
        id: 0,
    },
    RawData {
        magic: RAW_MAGIC,
        id: 1,
    },
    RawData {
        magic: RAW_MAGIC,
        id: 0x82,
    },
    RawData {
        magic: RAW_MAGIC,
        id: 3,
    },
];

/// Heap RawData pointers whose message is alive (removed by the dtor).
static LIVE_RAW: LazyLock<Mutex<HashSet<usize>>> = LazyLock::new(Default::default);
static DTORS: AtomicU64 = AtomicU64::new(0);

fn is_raw(p: *const c_void) -> bool {
    let a = p as usize;
    let s = STATIC_RAW.as_ptr() as usize;
    if a >= s && a < s + std::mem::size_of_val(&STATIC_RAW) {
        return true;
    }
    LIVE_RAW.lock().unwrap().contains(&a)
}

unsafe extern "C" fn raw_dtor(p: *mut c_void) {
    let removed = LIVE_RAW.lock().unwrap().remove(&(p as usize));
    check!(
        removed,
        "dtor ran for unknown data {p:p} (twice, or never owned)"
    );
    let b = Box::from_raw(p as *mut RawData);
    check!(b.magic == RAW_MAGIC, "dtor got corrupted data");
    drop(b);
    DTORS.fetch_add(1, SeqCst);
}

fn new_heap_raw(id: u8) -> *mut c_void {
    let p = Box::into_raw(Box::new(RawData {
        magic: RAW_MAGIC,
        id,
    })) as *mut c_void;
    LIVE_RAW.lock().unwrap().insert(p as usize);
    p
}

/// Frees heap data whose message creation failed (the caller still owns it).
fn free_heap_raw(p: *mut c_void) {
    let removed = LIVE_RAW.lock().unwrap().remove(&(p as usize));
    check!(
        removed,
        "data of a failed create was already freed by the library"
    );
    // SAFETY: from new_heap_raw, not handed over.
    drop(unsafe { Box::from_raw(p as *mut RawData) });
}

// ---------------------------------------------------------------------------------------
// Cache functions

static IDS: [&CStr; 4] = [c"id0", c"id1", c"id2", c"id3"];

unsafe extern "C" fn id_fn(msg: *mut sb_message) -> *const c_char {
    check!(!msg.is_null(), "id_fn got a NULL message");
    let ty = sb_message_get_type(msg);
    if ty == sb_subscription_change_type() {
        let c = sb_message_data(msg) as *const sb_subscription_change;
        check!(!c.is_null(), "change message without data");
        return (*c).uniqueid;
    }
    if ty == sb_cache_update_type() || ty == sb_cache_clear_type() {
        return null();
    }
    let len = sb_message_data_len(msg);
    let data = sb_message_data(msg);
    let b = if len > 0 {
        *(data as *const u8)
    } else if !data.is_null() && is_raw(data) {
        (*(data as *const RawData)).id
    } else {
        return null();
    };
    if b & 0x80 != 0 {
        null()
    } else {
        IDS[b as usize % IDS.len()].as_ptr()
    }
}

unsafe extern "C" fn calc_fn(entry: *mut sb_cache_entry, new: *mut sb_message) -> *mut sb_message {
    check!(!entry.is_null(), "calc got a NULL entry");
    let local = sb_cache_entry_get_local(entry);
    let agg = sb_cache_entry_get_aggregate(entry);
    let mut remotes = 0;
    while remotes < 16 && !sb_cache_entry_get_remote(entry, remotes).is_null() {
        remotes += 1;
    }
    let _ = sb_cache_entry_get_remote(entry, usize::MAX);
    let _ = sb_cache_entry_get_local(null_mut());
    let basis = if !new.is_null() { new } else { local };
    let choice = (remotes + 2 * usize::from(!local.is_null()) + usize::from(!new.is_null())) % 3;
    match choice {
        0 => null_mut(),
        1 => {
            if agg.is_null() {
                null_mut()
            } else {
                sb_message_ref(agg)
            }
        }
        _ => {
            if basis.is_null() {
                return null_mut();
            }
            let ty = sb_message_get_type(basis);
            let data = &STATIC_RAW[remotes % 4] as *const RawData as *mut c_void;
            sb_message_create_full(ty, data, None, null())
        }
    }
}

unsafe extern "C" fn agg_publish_fn(topic: *mut sb_topic, agg: *mut sb_message) {
    check!(
        !topic.is_null() && !agg.is_null(),
        "aggregate publish got NULL"
    );
    check!(sb_message_eid(agg).is_null(), "an aggregate has an eid");
    if !SHARED.teardown.load(SeqCst) {
        let r = sb_publish(topic, agg);
        check!(r >= 0, "publishing an aggregate failed: {r}");
    }
}

unsafe extern "C" fn to_json_fn(msg: *const sb_message) -> *mut c_char {
    let n = sb_message_data_len(msg);
    if n % 2 == 1 {
        return null_mut();
    }
    let text = format!("{{\"len\":{n}}}\0");
    let p = libc::malloc(text.len()) as *mut u8;
    if !p.is_null() {
        std::ptr::copy_nonoverlapping(text.as_ptr(), p, text.len());
    }
    p as *mut c_char
}

static VT_JSON: sb_message_vtable = sb_message_vtable {
    to_json: Some(to_json_fn),
};
static VT_NONE: sb_message_vtable = sb_message_vtable { to_json: None };

static LOG_LINES: AtomicU64 = AtomicU64::new(0);
unsafe extern "C" fn log_fn(_data: *mut c_void, level: c_int, text: *const c_char) {
    check!((1..=4).contains(&level), "log level {level}");
    check!(!text.is_null(), "log text NULL");
    let _ = cstr_len(text);
    LOG_LINES.fetch_add(1, SeqCst);
}

// ---------------------------------------------------------------------------------------
// Subscription callbacks

/// State shared by all callbacks of one input.
struct Shared {
    /// Some subscription got Overflow::Block: callbacks stop publishing, so two blocked
    /// publishers can never wait on each other (a user-made deadlock, out of scope).
    block_used: AtomicBool,
    teardown: AtomicBool,
    budget: AtomicU32,
    /// A synchronous subscription or caching topic exists (see mask 2).
    sync_exists: AtomicBool,
    /// A caching topic exists (see mask 4).
    caching_exists: AtomicBool,
}

static SHARED: Shared = Shared {
    block_used: AtomicBool::new(false),
    teardown: AtomicBool::new(false),
    budget: AtomicU32::new(0),
    sync_exists: AtomicBool::new(false),
    caching_exists: AtomicBool::new(false),
};

/// The harness's model of a subscription filter (main thread only).
#[derive(Default)]
struct FilterModel {
    selective: bool,
    accepted: HashSet<usize>,
    declined: HashSet<usize>,
}

impl FilterModel {
    /// True when the subscription surely accepts `ty`. A selective filter that accepts
    /// formatters also takes the types that have to_json now, which the model does not
    /// follow (a dormant type revived with another vtable changes): those are left out.
    fn accepts(&self, ty: *mut sb_message_type) -> bool {
        let t = ty as usize;
        if self.selective {
            self.accepted.contains(&t)
        } else {
            !self.declined.contains(&t)
        }
    }
}

/// Per subscription (or router) callback context; its address is the callback's data.
struct Ctx {
    mode: u8,
    /// A slow subscriber (sleeps in every call), so queues fill and overflow policies
    /// and congestion limits kick in.
    slow: bool,
    unsub_after: u64,
    is_router: bool,
    /// Synchronous subscription: its callback runs inside a publisher and never
    /// publishes to other topics (two threads doing so can wait on each other's turn).
    synchronous: bool,
    publish_topic: *mut sb_topic,
    router: AtomicPtr<sb_router>,
    shadow: AtomicPtr<sb_subscription>,
    count: AtomicU64,
    in_cb: AtomicBool,
    final_seen: AtomicBool,
    joined: AtomicBool,
    budget: AtomicU32,
    captured: Mutex<Vec<usize>>,
    sync_target: AtomicPtr<sb_message>,
    sync_seen: AtomicBool,
    filter: Mutex<FilterModel>,
}

impl Ctx {
    fn new(
        mode: u8,
        unsub_after: u8,
        is_router: bool,
        synchronous: bool,
        publish_topic: *mut sb_topic,
    ) -> Box<Ctx> {
        Box::new(Ctx {
            mode,
            slow: unsub_after & 0x10 != 0,
            // Mask 1 (README): unsubscribing while handling the Subscribe change left the
            // subscription in its topic; masked, callbacks start at message 2.
            unsub_after: u64::from(unsub_after % 8) + if masked(1) { 2 } else { 1 },
            is_router,
            synchronous,
            publish_topic,
            router: AtomicPtr::new(null_mut()),
            shadow: AtomicPtr::new(null_mut()),
            count: AtomicU64::new(0),
            in_cb: AtomicBool::new(false),
            final_seen: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            budget: AtomicU32::new(6),
            captured: Mutex::new(Vec::new()),
            sync_target: AtomicPtr::new(null_mut()),
            sync_seen: AtomicBool::new(false),
            filter: Mutex::new(FilterModel::default()),
        })
    }

    fn release(&self) {
        sb_topic_unref(self.publish_topic);
        sb_router_unref(self.router.swap(null_mut(), SeqCst));
        for m in self.captured.lock().unwrap().drain(..) {
            sb_message_unref(m as *mut sb_message);
        }
    }
}

fn may_publish(ctx: &Ctx) -> bool {
    // Mask 2 (README): a nested publish inside a synchronous subscription's callback was
    // orphaned when another thread published to it at the same time. Masked, callbacks
    // do not publish while synchronous subscriptions exist.
    (!masked(2) || !SHARED.sync_exists.load(SeqCst))
        // Mask 4: a caching topic's handler (a synchronous subscription) publishes its
        // updates from inside its callback; two threads publishing into caching topics
        // that reach each other (e.g. "a-cached" forwarded into "a") deadlock. Masked,
        // callbacks do not publish while caching topics exist.
        && (!masked(4) || !SHARED.caching_exists.load(SeqCst))
        // Mask 5: callbacks publishing into each other's full SB_OVERFLOW_BLOCK queues
        // waited for each other forever; now a wait that would close a cycle is let
        // through. Masked, callbacks stop publishing once a Block policy is set.
        && (!masked(5) || !SHARED.block_used.load(SeqCst))
        && !SHARED.teardown.load(SeqCst)
        && ctx
            .budget
            .fetch_update(SeqCst, SeqCst, |b| b.checked_sub(1))
            .is_ok()
        && SHARED
            .budget
            .fetch_update(SeqCst, SeqCst, |b| b.checked_sub(1))
            .is_ok()
}

unsafe extern "C" fn sub_cb(data: *mut c_void, sub: *mut sb_subscription, msg: *mut sb_message) {
    check!(!data.is_null(), "callback data is NULL");
    let ctx = &*(data as *const Ctx);
    check!(
        !sub.is_null() && !msg.is_null(),
        "callback got NULL sub or msg"
    );
    check!(
        !ctx.in_cb.swap(true, SeqCst),
        "two invocations of one subscription overlap"
    );
    check!(
        !ctx.joined.load(SeqCst),
        "callback invoked after a join of its subscription returned"
    );
    check!(
        !ctx.final_seen.load(SeqCst),
        "message delivered after the final message"
    );
    let n = ctx.count.fetch_add(1, SeqCst) + 1;
    let change_ty = sb_subscription_change_type();
    let ty = sb_message_get_type(msg);
    check!(!ty.is_null(), "message without type");
    // An overflow policy may drop the Subscribe change (only the final message is
    // protected), so check it only when nothing was dropped.
    if !ctx.is_router && n == 1 && sb_subscription_dropped(sub) == 0 {
        check!(ty == change_ty, "first message is not the Subscribe change");
        let c = &*(sb_message_data(msg) as *const sb_subscription_change);
        let desc = CStr::from_ptr(c.description);
        check!(
            desc == c"Subscribe",
            "first message is {desc:?}, not Subscribe"
        );
        let mine = CStr::from_ptr(sb_subscription_uniqueid(sub));
        let theirs = CStr::from_ptr(c.uniqueid);
        check!(
            mine == theirs,
            "first change is for {theirs:?}, not {mine:?}"
        );
    }
    let is_final = sb_subscription_final_message(sub, msg) == 1;
    if is_final {
        check!(ty == change_ty, "final message is not a change");
        check!(
            sb_subscription_is_subscribed(sub) == 0,
            "final message delivered while still subscribed"
        );
    }
    if ctx.sync_target.load(SeqCst) == msg {
        ctx.sync_seen.store(true, SeqCst);
    }
    if ctx.slow {
        std::thread::sleep(Duration::from_micros(50));
    }
    let m = ctx.mode;
    if m & 0x01 != 0 {
        let r = sb_message_ref(msg);
        check!(r == msg, "sb_message_ref returned another pointer");
        let _ = sb_message_data(r);
        let _ = sb_message_data_len(r);
        let _ = sb_message_timestamp_ns(r);
        let _ = sb_message_eid(r);
        let j = sb_message_to_json(r);
        let _ = cstr_len(j);
        sb_string_free(j);
        if ty == sb_cache_update_type() {
            let u = &*(sb_message_data(msg) as *const sb_cache_update);
            check!(!u.r#type.is_null(), "cache update without a snapshot type");
            for s in [u.old_snapshot, u.new_snapshot] {
                if !s.is_null() {
                    let _ = sb_message_get_type(s);
                }
            }
        }
        sb_message_unref(r);
    }
    if m & 0x40 != 0 {
        let mut cap = ctx.captured.lock().unwrap();
        if cap.len() < 4 {
            cap.push(sb_message_ref(msg) as usize);
        }
    }
    if m & 0x80 != 0 {
        let _ = sb_subscription_is_done(sub);
        let _ = sb_subscription_queue_length(sub);
        let _ = sb_subscription_dropped(sub);
        let _ = sb_subscription_congestion_warnings(sub);
        let _ = cstr_len(sb_subscription_uniqueid(sub));
        let _ = sb_topic_wants(ctx.publish_topic, ty);
    }
    if !is_final {
        if m & 0x02 != 0 && !ctx.synchronous && !ctx.publish_topic.is_null() && may_publish(ctx) {
            let r = sb_publish(ctx.publish_topic, msg);
            check!(r >= 0, "publish from a callback failed: {r}");
        }
        if m & 0x10 != 0 {
            // Joining oneself must not wait, and says so.
            let r = sb_subscription_join(sub);
            check!(r == SB_E_DEADLOCK, "self-join from a callback returned {r}");
        }
        // Masks 2 and 4: a synchronous subscription's callback publishing (here to its own
        // topic) was orphaned (2) / deadlocks against another thread doing the same (4).
        let sync_may_publish = !ctx.synchronous || !(masked(2) || masked(4));
        if m & 0x20 != 0 && n % 3 == 1 && sync_may_publish && may_publish(ctx) {
            let r = sb_publish_sync(sub, msg);
            check!(
                r == SB_E_DEADLOCK || r == SB_E_STATE || r >= 0,
                "publish_sync to itself from its callback returned {r}"
            );
        }
        // Masks 2 and 4 again: the final message of a synchronous subscription that
        // unsubscribes itself is a nested push, and its Unsubscribe change is published
        // to the topic's other (synchronous) subscriptions from inside the callback.
        let self_unsub_ok = sync_may_publish;
        if m & 0x04 != 0 && n == ctx.unsub_after && self_unsub_ok {
            let r = sb_subscription_ref(sub);
            check!(r == sub, "sb_subscription_ref returned another pointer");
            check!(
                sb_unsubscribe(r).is_null(),
                "sb_unsubscribe returned non-NULL"
            );
        }
        if m & 0x08 != 0 && n == ctx.unsub_after && self_unsub_ok {
            let router = ctx.router.load(SeqCst);
            if ctx.is_router && !router.is_null() {
                let r = sb_router_ref(router);
                check!(r == router, "sb_router_ref returned another pointer");
                check!(
                    sb_router_unsubscribe_and_join(r).is_null(),
                    "router unsubscribe returned non-NULL"
                );
            } else {
                let r = sb_subscription_ref(sub);
                check!(r == sub, "sb_subscription_ref returned another pointer");
                check!(
                    sb_unsubscribe_and_join(r).is_null(),
                    "sb_unsubscribe_and_join returned non-NULL"
                );
            }
        }
    }
    if is_final {
        ctx.final_seen.store(true, SeqCst);
    }
    ctx.in_cb.store(false, SeqCst);
}

// ---------------------------------------------------------------------------------------
// Input model

/// A name argument.
#[derive(Arbitrary, Debug, Clone)]
enum Name {
    Fixed(u8),
    Null,
    Empty,
    Bytes(Vec<u8>),
    /// Around and past the 4096-byte limit.
    Long(u16),
    NonUtf8(u8),
}

const FIXED_NAMES: &[&str] = &[
    "a",
    "b",
    "c",
    "a/b",
    "b/c",
    "a-cached",
    "a-cached-cached",
    "sb_subscription_change",
    "sb_cache_update",
    "sb_cache_clear",
    "declined",
    "ümlaut",
    "x:y z",
];

impl Name {
    /// None means NULL.
    fn to_c(&self) -> Option<CString> {
        let bytes: Vec<u8> = match self {
            Name::Fixed(i) => FIXED_NAMES[*i as usize % FIXED_NAMES.len()].into(),
            Name::Null => return None,
            Name::Empty => Vec::new(),
            Name::Bytes(v) => v.iter().copied().take_while(|b| *b != 0).take(40).collect(),
            Name::Long(n) => {
                let len = if n % 2 == 0 {
                    4090 + (*n as usize / 2) % 16
                } else {
                    *n as usize % 9000
                };
                vec![b'L'; len]
            }
            Name::NonUtf8(b) => vec![b'n', 0xff, b.max(&1).to_owned(), 0xc3],
        };
        Some(CString::new(bytes).expect("no NUL"))
    }
}

fn c_ptr(c: &Option<CString>) -> *const c_char {
    c.as_ref().map_or(null(), |c| c.as_ptr())
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum EidArg {
    Null,
    Default,
    Fixed(u8),
}

impl EidArg {
    fn value(self) -> Option<sb_eid> {
        match self {
            EidArg::Null => None,
            EidArg::Default => Some(sb_eid_default()),
            EidArg::Fixed(b) => Some(sb_eid {
                bytes: [2, 0, 0, 0, 0, b % 4],
            }),
        }
    }
}

fn eid_ptr(e: &Option<sb_eid>) -> *const sb_eid {
    e.as_ref().map_or(null(), |e| e as *const sb_eid)
}

#[derive(Arbitrary, Debug, Clone)]
enum IdArg {
    Fixed(u8),
    Name(Name),
}

impl IdArg {
    fn to_c(&self) -> Option<CString> {
        match self {
            IdArg::Fixed(i) => Some(IDS[*i as usize % IDS.len()].to_owned()),
            IdArg::Name(n) => n.to_c(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    // Topics
    TopicCreate {
        slot: u8,
        name: Name,
        detail: Option<Name>,
    },
    TopicGet {
        slot: u8,
        name: Name,
    },
    TopicRef {
        from: u8,
        to: u8,
    },
    TopicUnref {
        slot: u8,
    },
    TopicQuery {
        topic: u8,
        ty: u8,
    },
    // Message types
    TypeCreate {
        slot: u8,
        name: Name,
        vtable: u8,
    },
    TypeRef {
        from: u8,
        to: u8,
    },
    TypeUnref {
        slot: u8,
    },
    TypeQuery {
        slot: u8,
    },
    TypeDecline {
        name: Name,
    },
    // Messages
    MsgBytes {
        slot: u8,
        ty: u8,
        bytes: Vec<u8>,
        null_ptr: bool,
    },
    MsgRaw {
        slot: u8,
        ty: u8,
        id: u8,
        data: u8,
        eid: Option<EidArg>,
    },
    MsgRef {
        from: u8,
        to: u8,
    },
    MsgUnref {
        slot: u8,
    },
    MsgQuery {
        slot: u8,
    },
    CacheClearCreate {
        from: u8,
        to: u8,
    },
    // Publishing
    Publish {
        topic: u8,
        msg: u8,
    },
    PublishBurst {
        topic: u8,
        msg: u8,
        n: u8,
    },
    PublishSync {
        sub: u8,
        msg: u8,
    },
    // Subscriptions
    Subscribe {
        slot: u8,
        topic: u8,
        /// % 4: dedicated, pool, synchronous, in the worker group `group`.
        kind: u8,
        group: u8,
        mode: u8,
        unsub_after: u8,
        publish_to: u8,
        null_cb: bool,
    },
    Unsubscribe {
        sub: u8,
    },
    UnsubscribeAndJoin {
        sub: u8,
    },
    Join {
        sub: u8,
    },
    SubRef {
        from: u8,
        to: u8,
    },
    SubUnref {
        sub: u8,
    },
    SubQuery {
        sub: u8,
        msg: u8,
    },
    Accept {
        sub: u8,
        ty: u8,
    },
    Decline {
        sub: u8,
        ty: u8,
    },
    AcceptFormatters {
        sub: u8,
        bits: u8,
    },
    SetFilter {
        sub: u8,
        filter: u8,
    },
    Congestion {
        sub: u8,
        low: i16,
        high: i16,
    },
    Overflow {
        sub: u8,
        policy: u8,
        limit: u8,
    },
    TakeCaptured {
        ctx: u8,
        slot: u8,
    },
    // Forwards and pools
    Forward {
        slot: u8,
        from: u8,
        to: u8,
    },
    ForwardCancel {
        slot: u8,
    },
    PoolCreate {
        slot: u8,
        topic: u8,
    },
    PoolGet {
        pool: u8,
        name: Name,
        slot: u8,
    },
    PoolDelete {
        pool: u8,
        name: Name,
    },
    PoolExists {
        pool: u8,
        name: Name,
    },
    PoolUnref {
        slot: u8,
    },
    // Caches
    CacheCreate {
        slot: u8,
        kind: u8,
    },
    CacheRef {
        from: u8,
        to: u8,
    },
    CacheUnref {
        slot: u8,
    },
    CachingCreate {
        slot: u8,
        topic: u8,
        cache: u8,
    },
    CachingGetTopic {
        ct: u8,
        slot: u8,
    },
    CachingAccept {
        ct: u8,
        ty: u8,
    },
    CachingSetFilter {
        ct: u8,
        filter: u8,
    },
    CachingUnsubscribe {
        ct: u8,
        join: bool,
    },
    CacheGet {
        cache: u8,
        ty: u8,
        id: IdArg,
        eid: Option<EidArg>,
        slot: u8,
    },
    CacheList {
        cache: u8,
        ty: u8,
        id: IdArg,
        eid: EidArg,
        which: u8,
        slot: u8,
    },
    ListLen {
        list: u8,
    },
    ListGet {
        list: u8,
        i: u8,
        slot: u8,
    },
    ListFree {
        list: u8,
    },
    // Routers
    RouterCreate {
        slot: u8,
        topic: u8,
        pool: bool,
        /// Some: in the worker group of that slot (which may be empty: NULL).
        group: Option<u8>,
        mode: u8,
        unsub_after: u8,
        publish_to: u8,
    },
    RouterAdd {
        r: u8,
        ty: u8,
        cache_update: bool,
        null_cb: bool,
    },
    RouterRemove {
        r: u8,
        ty: u8,
        cache_update: bool,
    },
    RouterSetDefault {
        r: u8,
        null_cb: bool,
    },
    RouterCongestion {
        r: u8,
        low: i16,
        high: i16,
    },
    RouterPublishSync {
        r: u8,
        msg: u8,
    },
    RouterUnsubscribe {
        r: u8,
        join: bool,
    },
    RouterIsDone {
        r: u8,
    },
    RouterRef {
        from: u8,
        to: u8,
    },
    RouterUnref {
        slot: u8,
    },
    // Library
    Misc {
        which: u8,
        code: i8,
        a: EidArg,
        b: EidArg,
        text: Name,
    },
    EidSetDefault {
        eid: EidArg,
    },
    PoolConfigure {
        min: u8,
        max: u8,
        idle: u8,
    },
    // Worker groups
    GroupCreate {
        slot: u8,
        /// % 5: one of GROUP_NAMES, NULL, "".
        name: u8,
        min: u8,
        max: u8,
        idle: u8,
    },
    GroupGet {
        slot: u8,
        name: u8,
    },
    GroupRef {
        from: u8,
        to: u8,
    },
    GroupUnref {
        slot: u8,
    },
    GroupReconfigure {
        g: u8,
        min: u8,
        max: u8,
        idle: u8,
    },
    GroupSubmit {
        g: u8,
        /// Follow-up tasks the task submits to its group (each from the previous one).
        chain: u8,
        null_fn: bool,
    },
    // Timed publishing
    TimerAfter {
        slot: u8,
        topic: u8,
        msg: u8,
        delay: u8,
    },
    TimerCancel {
        slot: u8,
    },
    TimerUnref {
        slot: u8,
    },
}

/// A submitted task: its own reference to its group, and how many follow-ups it submits.
struct Task {
    pool: *mut sb_pool,
    left: u8,
}

static TASKS_SUBMITTED: AtomicU64 = AtomicU64::new(0);
static TASKS_RUN: AtomicU64 = AtomicU64::new(0);

extern "C" fn task_fn(data: *mut c_void) {
    // SAFETY: a Box<Task> the submitter leaked for this one run.
    let task = unsafe { Box::from_raw(data.cast::<Task>()) };
    if task.left > 0 {
        let next = Box::into_raw(Box::new(Task {
            pool: sb_pool_ref(task.pool),
            left: task.left - 1,
        }));
        TASKS_SUBMITTED.fetch_add(1, SeqCst);
        if sb_pool_submit(task.pool, Some(task_fn), next.cast()) != SB_OK {
            fail("a task could not submit to its own group");
        }
    }
    sb_pool_unref(task.pool);
    TASKS_RUN.fetch_add(1, SeqCst);
}

#[derive(Clone, Copy)]
struct SubSlot {
    p: *mut sb_subscription,
    ctx: *const Ctx,
}

#[derive(Clone, Copy)]
struct RouterSlot {
    p: *mut sb_router,
    ctx: *const Ctx,
}

#[derive(Default)]
struct State {
    topics: [Option<*mut sb_topic>; N_TOPICS],
    types: [Option<*mut sb_message_type>; N_TYPES],
    msgs: [Option<*mut sb_message>; N_MSGS],
    subs: [Option<SubSlot>; N_SUBS],
    fwds: [Option<*mut sb_forward>; N_FWDS],
    pools: [Option<*mut sb_topic_pool>; N_POOLS],
    caches: [Option<*mut sb_cache>; N_CACHES],
    cts: [Option<*mut sb_caching_topic>; N_CTS],
    routers: [Option<RouterSlot>; N_ROUTERS],
    lists: [Option<*mut sb_message_list>; N_LISTS],
    groups: [Option<*mut sb_pool>; N_GROUPS],
    timers: [Option<*mut sb_timer>; N_TIMERS],
    /// An extra reference to every timer, so teardown cancels all of them.
    shadow_timers: Vec<*mut sb_timer>,
    /// An extra reference to every subscription / router ever created, so teardown can
    /// unsubscribe and join all of them, whatever the ops did with their own references.
    shadow_subs: Vec<(*mut sb_subscription, *const Ctx)>,
    shadow_routers: Vec<(*mut sb_router, *const Ctx)>,
    ctxs: Vec<Box<Ctx>>,
}

fn opt<T>(p: Option<*mut T>) -> *mut T {
    p.unwrap_or(null_mut())
}

impl State {
    fn topic(&self, s: u8) -> *mut sb_topic {
        opt(pick(&self.topics, s))
    }
    fn ty(&self, s: u8) -> *mut sb_message_type {
        opt(pick(&self.types, s))
    }
    fn msg(&self, s: u8) -> *mut sb_message {
        opt(pick(&self.msgs, s))
    }

    // Storing a new reference into a slot drops whatever reference it held.
    fn put_topic(&mut self, s: u8, p: *mut sb_topic) {
        let i = idx(N_TOPICS, s);
        if let Some(old) = self.topics[i].take() {
            sb_topic_unref(old);
        }
        self.topics[i] = (!p.is_null()).then_some(p);
    }
    fn put_type(&mut self, s: u8, p: *mut sb_message_type) {
        let i = idx(N_TYPES, s);
        if let Some(old) = self.types[i].take() {
            sb_message_type_unref(old);
        }
        self.types[i] = (!p.is_null()).then_some(p);
    }
    fn put_msg(&mut self, s: u8, p: *mut sb_message) {
        let i = idx(N_MSGS, s);
        if let Some(old) = self.msgs[i].take() {
            sb_message_unref(old);
        }
        self.msgs[i] = (!p.is_null()).then_some(p);
    }
    fn put_sub(&mut self, s: u8, v: Option<SubSlot>) {
        let i = idx(N_SUBS, s);
        if let Some(old) = self.subs[i].take() {
            sb_subscription_unref(old.p);
        }
        self.subs[i] = v;
    }
    fn put_router(&mut self, s: u8, v: Option<RouterSlot>) {
        let i = idx(N_ROUTERS, s);
        if let Some(old) = self.routers[i].take() {
            sb_router_unref(old.p);
        }
        self.routers[i] = v;
    }
    fn put_fwd(&mut self, s: u8, p: *mut sb_forward) {
        let i = idx(N_FWDS, s);
        if let Some(old) = self.fwds[i].take() {
            check!(sb_forward_cancel(old).is_null(), "cancel returned non-NULL");
        }
        self.fwds[i] = (!p.is_null()).then_some(p);
    }
    fn put_pool(&mut self, s: u8, p: *mut sb_topic_pool) {
        let i = idx(N_POOLS, s);
        if let Some(old) = self.pools[i].take() {
            sb_topic_pool_unref(old);
        }
        self.pools[i] = (!p.is_null()).then_some(p);
    }
    fn put_cache(&mut self, s: u8, p: *mut sb_cache) {
        let i = idx(N_CACHES, s);
        if let Some(old) = self.caches[i].take() {
            sb_cache_unref(old);
        }
        self.caches[i] = (!p.is_null()).then_some(p);
    }
    fn put_ct(&mut self, s: u8, p: *mut sb_caching_topic) {
        let i = idx(N_CTS, s);
        if let Some(old) = self.cts[i].take() {
            check!(
                sb_caching_unsubscribe(old).is_null(),
                "caching unsubscribe returned non-NULL"
            );
        }
        self.cts[i] = (!p.is_null()).then_some(p);
    }
    fn put_timer(&mut self, s: u8, p: *mut sb_timer) {
        let i = idx(N_TIMERS, s);
        if let Some(old) = self.timers[i].take() {
            sb_timer_unref(old);
        }
        self.timers[i] = (!p.is_null()).then_some(p);
    }
    fn put_list(&mut self, s: u8, p: *mut sb_message_list) {
        let i = idx(N_LISTS, s);
        if let Some(old) = self.lists[i].take() {
            sb_message_list_free(old);
        }
        self.lists[i] = (!p.is_null()).then_some(p);
    }

    fn new_ctx(
        &mut self,
        mode: u8,
        unsub_after: u8,
        is_router: bool,
        synchronous: bool,
        publish_to: u8,
    ) -> *const Ctx {
        let t = self.topic(publish_to);
        let pt = if t.is_null() {
            null_mut()
        } else {
            sb_topic_ref(t)
        };
        let ctx = Ctx::new(mode, unsub_after, is_router, synchronous, pt);
        let p = &*ctx as *const Ctx;
        self.ctxs.push(ctx);
        p
    }

    fn run(&mut self, op: Op) {
        match op {
            // ---------------------------------------------------------------- topics
            Op::TopicCreate { slot, name, detail } => {
                let n = name.to_c();
                let t = match &detail {
                    None => sb_topic_create(c_ptr(&n)),
                    Some(d) => {
                        let d = d.to_c();
                        sb_topic_create_with_detail(c_ptr(&n), c_ptr(&d))
                    }
                };
                if let (false, Some(n)) = (t.is_null(), &n) {
                    let got = unsafe { CStr::from_ptr(sb_topic_name(t)) };
                    check!(got == n.as_c_str(), "topic name {got:?} != {n:?}");
                    let again = sb_topic_get(n.as_ptr());
                    check!(
                        again == t,
                        "sb_topic_get of a live topic returned {again:p}, not {t:p}"
                    );
                    sb_topic_unref(again);
                    let _ = cstr_len(sb_topic_detail(t));
                    let _ = cstr_len(sb_topic_uniqueid(t));
                } else {
                    last_error_checked();
                }
                self.put_topic(slot, t);
            }
            Op::TopicGet { slot, name } => {
                let n = name.to_c();
                let t = sb_topic_get(c_ptr(&n));
                self.put_topic(slot, t);
            }
            Op::TopicRef { from, to } => {
                let t = self.topic(from);
                let r = sb_topic_ref(t);
                check!(r == t, "sb_topic_ref({t:p}) returned {r:p}");
                self.put_topic(to, r);
            }
            Op::TopicUnref { slot } => {
                let i = idx(N_TOPICS + 1, slot);
                match self.topics.get_mut(i).and_then(Option::take) {
                    Some(t) => sb_topic_unref(t),
                    None => sb_topic_unref(null_mut()),
                }
            }
            Op::TopicQuery { topic, ty } => {
                let t = self.topic(topic);
                let _ = cstr_len(sb_topic_name(t));
                let _ = cstr_len(sb_topic_detail(t));
                let _ = cstr_len(sb_topic_uniqueid(t));
                let n = sb_topic_subscribers(t);
                let tyv = self.ty(ty);
                let w = sb_topic_wants(t, tyv);
                if t.is_null() || tyv.is_null() {
                    check!(w == SB_E_INVAL, "sb_topic_wants of NULL returned {w}");
                } else {
                    check!(w == 0 || w == 1, "sb_topic_wants returned {w}");
                }
                if t.is_null() {
                    check!(n == 0, "subscribers of NULL = {n}");
                }
            }
            // ---------------------------------------------------------------- types
            Op::TypeCreate { slot, name, vtable } => {
                let n = name.to_c();
                let vt: *const sb_message_vtable = match vtable % 4 {
                    0 => null(),
                    1 => &VT_NONE,
                    _ => &VT_JSON,
                };
                let mut out: *mut sb_message_type = 0x10 as *mut sb_message_type;
                if vtable % 7 == 6 {
                    let r = sb_message_type_create(c_ptr(&n), vt, null_mut());
                    check!(r == SB_E_INVAL, "type_create with NULL out returned {r}");
                    return;
                }
                let r = sb_message_type_create(c_ptr(&n), vt, &mut out);
                match r {
                    SB_OK => {
                        check!(!out.is_null(), "type_create OK with NULL out");
                        let got = unsafe { CStr::from_ptr(sb_message_type_name(out)) };
                        check!(Some(got) == n.as_deref(), "type name {got:?} != {n:?}");
                        check!(sb_message_type_id(out) >= 0, "negative type id");
                    }
                    SB_E_DECLINED | SB_E_INVAL => {
                        check!(out.is_null(), "type_create failed ({r}) but set *out");
                        last_error_checked();
                    }
                    other => fail(&format!("type_create returned {other}")),
                }
                self.put_type(slot, out);
            }
            Op::TypeRef { from, to } => {
                let t = self.ty(from);
                let r = sb_message_type_ref(t);
                check!(r == t, "sb_message_type_ref({t:p}) returned {r:p}");
                self.put_type(to, r);
            }
            Op::TypeUnref { slot } => {
                let i = idx(N_TYPES + 1, slot);
                match self.types.get_mut(i).and_then(Option::take) {
                    Some(t) => sb_message_type_unref(t),
                    None => sb_message_type_unref(null_mut()),
                }
            }
            Op::TypeQuery { slot } => {
                let t = self.ty(slot);
                let _ = cstr_len(sb_message_type_name(t));
                let id = sb_message_type_id(t);
                check!(t.is_null() == (id < 0), "type id {id} for {t:p}");
            }
            Op::TypeDecline { name } => {
                let n = name.to_c();
                let r = sb_message_type_decline(c_ptr(&n));
                let d = sb_message_type_declined(c_ptr(&n));
                if r == SB_OK {
                    check!(d == 1, "declined name is not reported declined");
                    let mut out = null_mut();
                    let c = sb_message_type_create(c_ptr(&n), null(), &mut out);
                    check!(
                        c == SB_E_DECLINED && out.is_null(),
                        "create of a declined name returned {c}"
                    );
                } else {
                    check!(r == SB_E_INVAL, "decline returned {r}");
                }
            }
            // ---------------------------------------------------------------- messages
            Op::MsgBytes {
                slot,
                ty,
                bytes,
                null_ptr,
            } => {
                let t = self.ty(ty);
                let bytes: Vec<u8> = bytes.into_iter().take(64).collect();
                let m = if null_ptr {
                    sb_message_create_bytes(t, null(), bytes.len())
                } else {
                    sb_message_create_bytes(t, bytes.as_ptr() as *const c_void, bytes.len())
                };
                if !m.is_null() {
                    check!(!t.is_null(), "message created with a NULL type");
                    let n = sb_message_data_len(m);
                    check!(n == bytes.len(), "bytes message len {n} != {}", bytes.len());
                    if n > 0 {
                        let d = unsafe {
                            std::slice::from_raw_parts(sb_message_data(m) as *const u8, n)
                        };
                        check!(d == &bytes[..], "bytes message data differs");
                    }
                    check!(sb_message_get_type(m) == t, "message type differs");
                    let e = sb_message_eid(m);
                    check!(!e.is_null(), "bytes message without eid");
                }
                self.put_msg(slot, m);
            }
            Op::MsgRaw {
                slot,
                ty,
                id,
                data,
                eid,
            } => {
                let t = self.ty(ty);
                let (d, dtor): (*mut c_void, sb_data_dtor) = match data % 3 {
                    0 => (null_mut(), None),
                    1 => (
                        &STATIC_RAW[id as usize % 4] as *const RawData as *mut c_void,
                        None,
                    ),
                    _ => (new_heap_raw(id), Some(raw_dtor)),
                };
                let m = match eid {
                    None => sb_message_create(t, d, dtor),
                    Some(e) => {
                        let e = e.value();
                        sb_message_create_full(t, d, dtor, eid_ptr(&e))
                    }
                };
                if m.is_null() {
                    last_error_checked();
                    if dtor.is_some() {
                        free_heap_raw(d);
                    }
                } else {
                    check!(sb_message_data(m) == d, "raw message data differs");
                    check!(sb_message_data_len(m) == 0, "raw message has a length");
                }
                self.put_msg(slot, m);
            }
            Op::MsgRef { from, to } => {
                let m = self.msg(from);
                let r = sb_message_ref(m);
                check!(r == m, "sb_message_ref({m:p}) returned {r:p}");
                self.put_msg(to, r);
            }
            Op::MsgUnref { slot } => {
                let i = idx(N_MSGS + 1, slot);
                match self.msgs.get_mut(i).and_then(Option::take) {
                    Some(m) => sb_message_unref(m),
                    None => sb_message_unref(null_mut()),
                }
            }
            Op::MsgQuery { slot } => {
                let m = self.msg(slot);
                let t = sb_message_get_type(m);
                check!(m.is_null() == t.is_null(), "message type of {m:p} is {t:p}");
                let _ = sb_message_data(m);
                let _ = sb_message_data_len(m);
                let ts = sb_message_timestamp_ns(m);
                check!(m.is_null() == (ts == 0), "timestamp {ts} of {m:p}");
                let e = sb_message_eid(m);
                if !e.is_null() {
                    let mut buf = [0 as c_char; 18];
                    check!(
                        sb_eid_to_str(e, buf.as_mut_ptr(), buf.len()) == SB_OK,
                        "eid_to_str failed"
                    );
                }
                let j = sb_message_to_json(m);
                let _ = cstr_len(j);
                sb_string_free(j);
            }
            Op::CacheClearCreate { from, to } => {
                let m = self.msg(from);
                let c = sb_cache_clear_create(m);
                check!(m.is_null() == c.is_null(), "clear_create({m:p}) = {c:p}");
                if !c.is_null() {
                    check!(
                        sb_message_get_type(c) == sb_cache_clear_type(),
                        "clear message has another type"
                    );
                }
                self.put_msg(to, c);
            }
            // ---------------------------------------------------------------- publishing
            Op::Publish { topic, msg } => {
                let (t, m) = (self.topic(topic), self.msg(msg));
                let r = sb_publish(t, m);
                if t.is_null() || m.is_null() {
                    check!(r == SB_E_INVAL, "publish with NULL returned {r}");
                    last_error_checked();
                } else {
                    check!(r >= 0, "publish returned {r}");
                }
            }
            Op::PublishBurst { topic, msg, n } => {
                let (t, m) = (self.topic(topic), self.msg(msg));
                for _ in 0..(n % 33) {
                    let r = sb_publish(t, m);
                    check!(r >= 0 || t.is_null() || m.is_null(), "publish returned {r}");
                }
            }
            Op::PublishSync { sub, msg } => {
                let s = pick(&self.subs, sub);
                let m = self.msg(msg);
                match s {
                    None => {
                        let r = sb_publish_sync(null_mut(), m);
                        check!(r == SB_E_INVAL, "publish_sync(NULL) returned {r}");
                    }
                    Some(s) => {
                        let ctx = unsafe { &*s.ctx };
                        if m.is_null() {
                            let r = sb_publish_sync(s.p, m);
                            check!(r == SB_E_INVAL, "publish_sync(sub, NULL) returned {r}");
                            return;
                        }
                        ctx.sync_seen.store(false, SeqCst);
                        ctx.sync_target.store(m, SeqCst);
                        let dropped = sb_subscription_dropped(s.p);
                        let was_subscribed = sb_subscription_is_subscribed(s.p);
                        let r = sb_publish_sync(s.p, m);
                        let subscribed = sb_subscription_is_subscribed(s.p);
                        ctx.sync_target.store(null_mut(), SeqCst);
                        if was_subscribed == 0 {
                            check!(
                                r == SB_E_STATE,
                                "publish_sync on an unsubscribed subscription returned {r}"
                            );
                        }
                        let accepts = ctx.filter.lock().unwrap().accepts(sb_message_get_type(m));
                        if r >= 0
                            && subscribed == 1
                            && accepts
                            && sb_subscription_dropped(s.p) == dropped
                        {
                            check!(
                                ctx.sync_seen.load(SeqCst),
                                "sb_publish_sync returned {r} before the subscription handled the message"
                            );
                        }
                    }
                }
            }
            // ---------------------------------------------------------------- subscriptions
            Op::Subscribe {
                slot,
                topic,
                kind,
                group,
                mode,
                unsub_after,
                publish_to,
                null_cb,
            } => {
                let t = self.topic(topic);
                let g = self.group(group);
                let kind = kind % 4;
                let ctx = self.new_ctx(mode, unsub_after, false, kind == 2, publish_to);
                if kind == 2 && !t.is_null() {
                    SHARED.sync_exists.store(true, SeqCst);
                }
                let cb: sb_subscription_cb = if null_cb { None } else { Some(sub_cb) };
                let data = ctx as *mut c_void;
                let s = match kind {
                    0 => sb_subscribe(t, cb, data),
                    1 => sb_subscribe_pool(t, cb, data),
                    2 => sb_subscribe_synchronous(t, cb, data),
                    _ => sb_subscribe_pool_in(t, g, cb, data),
                };
                if s.is_null() {
                    last_error_checked();
                    self.put_sub(slot, None);
                    return;
                }
                check!(
                    !t.is_null() && !null_cb && (kind != 3 || !g.is_null()),
                    "subscribe succeeded with NULL argument"
                );
                let shadow = sb_subscription_ref(s);
                check!(shadow == s, "sb_subscription_ref returned another pointer");
                unsafe { &*ctx }.shadow.store(shadow, SeqCst);
                self.shadow_subs.push((shadow, ctx));
                self.put_sub(slot, Some(SubSlot { p: s, ctx }));
            }
            Op::Unsubscribe { sub } => {
                let i = idx(N_SUBS + 1, sub);
                let p = self
                    .subs
                    .get_mut(i)
                    .and_then(Option::take)
                    .map_or(null_mut(), |s| s.p);
                check!(
                    sb_unsubscribe(p).is_null(),
                    "sb_unsubscribe returned non-NULL"
                );
            }
            Op::UnsubscribeAndJoin { sub } => {
                let i = idx(N_SUBS + 1, sub);
                match self.subs.get_mut(i).and_then(Option::take) {
                    None => {
                        check!(
                            sb_unsubscribe_and_join(null_mut()).is_null(),
                            "non-NULL return"
                        );
                    }
                    Some(s) => {
                        check!(sb_unsubscribe_and_join(s.p).is_null(), "non-NULL return");
                        let ctx = unsafe { &*s.ctx };
                        ctx.joined.store(true, SeqCst);
                        let sh = ctx.shadow.load(SeqCst);
                        check!(
                            sb_subscription_is_done(sh) == 1,
                            "not done after unsubscribe_and_join"
                        );
                        check!(
                            sb_subscription_is_subscribed(sh) == 0,
                            "subscribed after unsubscribe_and_join"
                        );
                    }
                }
            }
            Op::Join { sub } => match pick(&self.subs, sub) {
                None => {
                    let r = sb_subscription_join(null_mut());
                    check!(r == SB_E_INVAL, "join of NULL returned {r}");
                }
                Some(s) => {
                    // Joining a live subscription waits for an unsubscribe nobody will
                    // make (a caller bug); join only once it was unsubscribed.
                    if sb_subscription_is_subscribed(s.p) == 0 {
                        let r = sb_subscription_join(s.p);
                        check!(r == SB_OK, "join returned {r}");
                        unsafe { &*s.ctx }.joined.store(true, SeqCst);
                        check!(sb_subscription_is_done(s.p) == 1, "not done after join");
                        check!(
                            sb_subscription_queue_length(s.p) == 0,
                            "queue not empty after join"
                        );
                    }
                }
            },
            Op::SubRef { from, to } => {
                let s = pick(&self.subs, from);
                let p = s.map_or(null_mut(), |s| s.p);
                let r = sb_subscription_ref(p);
                check!(r == p, "sb_subscription_ref({p:p}) returned {r:p}");
                self.put_sub(to, s);
            }
            Op::SubUnref { sub } => {
                let i = idx(N_SUBS + 1, sub);
                let p = self
                    .subs
                    .get_mut(i)
                    .and_then(Option::take)
                    .map_or(null_mut(), |s| s.p);
                sb_subscription_unref(p);
            }
            Op::SubQuery { sub, msg } => {
                let p = pick(&self.subs, sub).map_or(null_mut(), |s| s.p);
                let done = sb_subscription_is_done(p);
                let subscribed = sb_subscription_is_subscribed(p);
                if p.is_null() {
                    // A bad handle is a negative code, never "no".
                    check!(
                        done == SB_E_INVAL && subscribed == SB_E_INVAL,
                        "booleans of NULL: {done} {subscribed}"
                    );
                } else {
                    check!(
                        done <= 1 && subscribed <= 1 && done >= 0 && subscribed >= 0,
                        "bad booleans"
                    );
                }
                check!(!(done == 1 && subscribed == 1), "done while subscribed");
                let m = self.msg(msg);
                let f = sb_subscription_final_message(p, m);
                if p.is_null() || m.is_null() {
                    check!(f == SB_E_INVAL, "final_message of NULL returned {f}");
                } else {
                    check!(f == 0 || f == 1, "final_message returned {f}");
                }
                let u = sb_subscription_uniqueid(p);
                check!(p.is_null() == u.is_null(), "uniqueid of {p:p}");
                let _ = cstr_len(u);
                let _ = sb_subscription_dropped(p);
                let _ = sb_subscription_congestion_warnings(p);
                let _ = sb_subscription_queue_length(p);
            }
            Op::Accept { sub, ty } => {
                let s = pick(&self.subs, sub);
                let t = self.ty(ty);
                let r = sb_subscription_accept_message_type(s.map_or(null_mut(), |s| s.p), t);
                match s {
                    Some(s) if !t.is_null() => {
                        check!(r == SB_OK, "accept returned {r}");
                        let mut f = unsafe { &*s.ctx }.filter.lock().unwrap();
                        f.accepted.insert(t as usize);
                        f.declined.remove(&(t as usize));
                        f.selective = true;
                    }
                    _ => check!(r == SB_E_INVAL, "accept with NULL returned {r}"),
                }
            }
            Op::AcceptFormatters { sub, bits } => {
                let s = pick(&self.subs, sub);
                let bits: c_uint = match bits % 4 {
                    0 => 0,
                    1 => SB_FORMATTER_JSON,
                    2 => 2,
                    _ => c_uint::MAX,
                };
                let r = sb_subscription_accept_formatters(s.map_or(null_mut(), |s| s.p), bits);
                match s {
                    Some(s) if bits <= SB_FORMATTER_JSON => {
                        check!(r == SB_OK, "accept_formatters({bits}) returned {r}");
                        if bits != 0 {
                            unsafe { &*s.ctx }.filter.lock().unwrap().selective = true;
                        }
                    }
                    _ => check!(r == SB_E_INVAL, "accept_formatters({bits}) returned {r}"),
                }
            }
            Op::Decline { sub, ty } => {
                let s = pick(&self.subs, sub);
                let t = self.ty(ty);
                let r = sb_subscription_decline_message_type(s.map_or(null_mut(), |s| s.p), t);
                match s {
                    Some(s) if !t.is_null() => {
                        check!(r == SB_OK, "decline returned {r}");
                        let mut f = unsafe { &*s.ctx }.filter.lock().unwrap();
                        f.accepted.remove(&(t as usize));
                        f.declined.insert(t as usize);
                    }
                    _ => check!(r == SB_E_INVAL, "decline with NULL returned {r}"),
                }
            }
            Op::SetFilter { sub, filter } => {
                let s = pick(&self.subs, sub);
                let f = match filter % 4 {
                    0 => SB_FILTER_NONE,
                    1 => SB_FILTER_SELECTIVE,
                    2 => 2,
                    _ => u32::MAX,
                };
                let r = sb_subscription_set_filter(s.map_or(null_mut(), |s| s.p), f);
                match s {
                    Some(s) if f <= 1 => {
                        check!(r == SB_OK, "set_filter returned {r}");
                        unsafe { &*s.ctx }.filter.lock().unwrap().selective = f == 1;
                    }
                    _ => check!(r == SB_E_INVAL, "set_filter({f}) returned {r}"),
                }
            }
            Op::Congestion { sub, low, high } => {
                let p = pick(&self.subs, sub).map_or(null_mut(), |s| s.p);
                let (low, high) = (c_long::from(low), c_long::from(high));
                let r = sb_subscription_set_congestion_limits(p, low, high);
                let valid = !p.is_null() && low >= 0 && high > 0 && low <= high;
                check!(
                    (r == SB_OK) == valid,
                    "congestion({low}, {high}) returned {r}"
                );
            }
            Op::Overflow { sub, policy, limit } => {
                let p = pick(&self.subs, sub).map_or(null_mut(), |s| s.p);
                let policy = u32::from(policy % 5);
                let limit = usize::from(limit % 6);
                if policy == SB_OVERFLOW_BLOCK {
                    SHARED.block_used.store(true, SeqCst);
                }
                let r = sb_subscription_set_overflow(p, policy, limit);
                let valid = !p.is_null() && policy <= 3 && (policy == 0 || limit > 0);
                check!(
                    (r == SB_OK) == valid,
                    "set_overflow({policy}, {limit}) returned {r}"
                );
            }
            Op::TakeCaptured { ctx, slot } => {
                if self.ctxs.is_empty() {
                    return;
                }
                let c = &self.ctxs[ctx as usize % self.ctxs.len()];
                let m = c.captured.lock().unwrap().pop();
                if let Some(m) = m {
                    self.put_msg(slot, m as *mut sb_message);
                }
            }
            // ---------------------------------------------------------------- forwards, pools
            Op::Forward { slot, from, to } => {
                let (f, t) = (self.topic(from), self.topic(to));
                let fw = sb_forward_all(f, t);
                if fw.is_null() {
                    last_error_checked();
                } else {
                    check!(f != t, "a topic was forwarded to itself");
                }
                self.put_fwd(slot, fw);
            }
            Op::ForwardCancel { slot } => {
                let i = idx(N_FWDS + 1, slot);
                let p = self
                    .fwds
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or(null_mut());
                check!(sb_forward_cancel(p).is_null(), "cancel returned non-NULL");
            }
            Op::PoolCreate { slot, topic } => {
                let t = self.topic(topic);
                let p = sb_topic_pool_create(t);
                check!(t.is_null() == p.is_null(), "pool_create({t:p}) = {p:p}");
                self.put_pool(slot, p);
            }
            Op::PoolGet { pool, name, slot } => {
                let p = opt(pick(&self.pools, pool));
                let n = name.to_c();
                let t = sb_topic_pool_get_topic(p, c_ptr(&n));
                if !t.is_null() {
                    let e = sb_topic_pool_topic_exists(p, c_ptr(&n));
                    check!(e == 1, "pool topic does not exist after get");
                } else {
                    last_error_checked();
                }
                self.put_topic(slot, t);
            }
            Op::PoolDelete { pool, name } => {
                let p = opt(pick(&self.pools, pool));
                let n = name.to_c();
                let r = sb_topic_pool_delete_topic(p, c_ptr(&n));
                check!(r == SB_OK || r == SB_E_INVAL, "pool delete returned {r}");
                if r == SB_OK {
                    check!(
                        sb_topic_pool_topic_exists(p, c_ptr(&n)) == 0,
                        "exists after delete"
                    );
                }
            }
            Op::PoolExists { pool, name } => {
                let p = opt(pick(&self.pools, pool));
                let n = name.to_c();
                let e = sb_topic_pool_topic_exists(p, c_ptr(&n));
                check!(e == 0 || e == 1 || e == SB_E_INVAL, "exists returned {e}");
                if p.is_null() {
                    check!(e == SB_E_INVAL, "exists on a NULL pool returned {e}");
                }
            }
            Op::PoolUnref { slot } => {
                let i = idx(N_POOLS + 1, slot);
                let p = self
                    .pools
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or(null_mut());
                sb_topic_pool_unref(p);
            }
            // ---------------------------------------------------------------- caches
            Op::CacheCreate { slot, kind } => {
                let c = match kind % 6 {
                    0 => sb_cache_create(Some(id_fn)),
                    1 => sb_cache_create(None),
                    2 => sb_cache_create_full(Some(id_fn), Some(calc_fn), None),
                    3 => sb_cache_create_full(Some(id_fn), Some(calc_fn), Some(agg_publish_fn)),
                    4 => sb_cache_create_full(Some(id_fn), None, None),
                    _ => sb_cache_create_full(None, Some(calc_fn), Some(agg_publish_fn)),
                };
                check!(
                    c.is_null() == (kind % 6 == 1 || kind % 6 == 5),
                    "cache_create kind {kind}"
                );
                self.put_cache(slot, c);
            }
            Op::CacheRef { from, to } => {
                let c = opt(pick(&self.caches, from));
                let r = sb_cache_ref(c);
                check!(r == c, "sb_cache_ref({c:p}) returned {r:p}");
                self.put_cache(to, r);
            }
            Op::CacheUnref { slot } => {
                let i = idx(N_CACHES + 1, slot);
                let p = self
                    .caches
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or(null_mut());
                sb_cache_unref(p);
            }
            Op::CachingCreate { slot, topic, cache } => {
                let t = self.topic(topic);
                let c = opt(pick(&self.caches, cache));
                if !t.is_null() && !c.is_null() {
                    SHARED.sync_exists.store(true, SeqCst);
                    SHARED.caching_exists.store(true, SeqCst);
                }
                let ct = sb_caching_topic_create(t, c);
                if ct.is_null() {
                    last_error_checked();
                } else {
                    let ctt = sb_caching_get_topic(ct);
                    check!(!ctt.is_null(), "caching topic without topic");
                }
                self.put_ct(slot, ct);
            }
            Op::CachingGetTopic { ct, slot } => {
                let ct = opt(pick(&self.cts, ct));
                let t = sb_caching_get_topic(ct);
                check!(
                    ct.is_null() == t.is_null(),
                    "caching_get_topic({ct:p}) = {t:p}"
                );
                if !t.is_null() {
                    let r = sb_topic_ref(t);
                    check!(r == t, "ref of the caching topic's topic");
                    self.put_topic(slot, r);
                }
            }
            Op::CachingAccept { ct, ty } => {
                let ct = opt(pick(&self.cts, ct));
                let t = self.ty(ty);
                let r = sb_caching_accept_message_type(ct, t);
                check!(
                    (r == SB_OK) == (!ct.is_null() && !t.is_null()),
                    "caching_accept returned {r}"
                );
            }
            Op::CachingSetFilter { ct, filter } => {
                let ct = opt(pick(&self.cts, ct));
                let f = u32::from(filter % 3);
                let r = sb_caching_set_filter(ct, f);
                check!(
                    (r == SB_OK) == (!ct.is_null() && f <= 1),
                    "caching_set_filter returned {r}"
                );
            }
            Op::CachingUnsubscribe { ct, join } => {
                let i = idx(N_CTS + 1, ct);
                let p = self
                    .cts
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or(null_mut());
                let r = if join {
                    sb_caching_unsubscribe_and_join(p)
                } else {
                    sb_caching_unsubscribe(p)
                };
                check!(r.is_null(), "caching unsubscribe returned non-NULL");
            }
            Op::CacheGet {
                cache,
                ty,
                id,
                eid,
                slot,
            } => {
                let c = opt(pick(&self.caches, cache));
                let t = self.ty(ty);
                let id = id.to_c();
                let m = match eid {
                    None => sb_cache_get(c, t, c_ptr(&id)),
                    Some(e) => {
                        let e = e.value();
                        sb_cache_get_by_eid(c, t, c_ptr(&id), eid_ptr(&e))
                    }
                };
                if !m.is_null() {
                    check!(
                        sb_message_get_type(m) == t,
                        "cache_get returned a message of another type"
                    );
                    check!(
                        !c.is_null() && !id.is_none(),
                        "cache_get with NULL argument returned a message"
                    );
                }
                self.put_msg(slot, m);
            }
            Op::CacheList {
                cache,
                ty,
                id,
                eid,
                which,
                slot,
            } => {
                let c = opt(pick(&self.caches, cache));
                let t = self.ty(ty);
                let l = match which % 4 {
                    0 => {
                        let id = id.to_c();
                        sb_cache_get_all(c, t, c_ptr(&id))
                    }
                    1 => sb_cache_dump(c, t),
                    2 => {
                        let e = eid.value();
                        sb_cache_dump_by_eid(c, t, eid_ptr(&e))
                    }
                    _ => sb_cache_dump_all(c, t),
                };
                if l.is_null() {
                    last_error_checked();
                } else {
                    check!(!c.is_null(), "a list from a NULL cache");
                    let n = sb_message_list_len(l);
                    for i in 0..n {
                        let m = sb_message_list_get(l, i);
                        check!(!m.is_null(), "list item {i} of {n} is NULL");
                        if !t.is_null() {
                            check!(sb_message_get_type(m) == t, "list item of another type");
                        }
                    }
                    check!(
                        sb_message_list_get(l, n).is_null(),
                        "list item past the end"
                    );
                }
                self.put_list(slot, l);
            }
            Op::ListLen { list } => {
                let l = opt(pick(&self.lists, list));
                let n = sb_message_list_len(l);
                check!(!l.is_null() || n == 0, "len of NULL list {n}");
            }
            Op::ListGet { list, i, slot } => {
                let l = opt(pick(&self.lists, list));
                let n = sb_message_list_len(l);
                let i = usize::from(i % 8);
                let m = sb_message_list_get(l, i);
                check!(m.is_null() == (i >= n), "list_get({i}) of {n} = {m:p}");
                if !m.is_null() {
                    let r = sb_message_ref(m);
                    self.put_msg(slot, r);
                }
            }
            Op::ListFree { list } => {
                let i = idx(N_LISTS + 1, list);
                let p = self
                    .lists
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or(null_mut());
                sb_message_list_free(p);
            }
            // ---------------------------------------------------------------- routers
            Op::RouterCreate {
                slot,
                topic,
                pool,
                group,
                mode,
                unsub_after,
                publish_to,
            } => {
                let t = self.topic(topic);
                let ctx = self.new_ctx(mode, unsub_after, true, false, publish_to);
                let r = match group {
                    Some(g) => sb_router_create_in(t, self.group(g)),
                    None if pool => sb_router_create_pool(t),
                    None => sb_router_create(t),
                };
                if r.is_null() {
                    check!(
                        t.is_null() || group.is_some_and(|g| self.group(g).is_null()),
                        "router create failed with valid arguments"
                    );
                    last_error_checked();
                    self.put_router(slot, None);
                    return;
                }
                let shadow = sb_router_ref(r);
                check!(shadow == r, "sb_router_ref returned another pointer");
                self.shadow_routers.push((shadow, ctx));
                unsafe { &*ctx }.router.store(sb_router_ref(r), SeqCst);
                self.put_router(slot, Some(RouterSlot { p: r, ctx }));
            }
            Op::RouterAdd {
                r,
                ty,
                cache_update,
                null_cb,
            } => {
                let rs = pick(&self.routers, r);
                let t = self.ty(ty);
                let (p, data) =
                    rs.map_or((null_mut(), null_mut()), |s| (s.p, s.ctx as *mut c_void));
                let cb: sb_subscription_cb = if null_cb { None } else { Some(sub_cb) };
                let res = if cache_update {
                    sb_router_add_cache_update(p, t, cb, data)
                } else {
                    sb_router_add(p, t, cb, data)
                };
                check!(
                    (res == SB_OK) == (!p.is_null() && !t.is_null() && !null_cb),
                    "router_add returned {res}"
                );
            }
            Op::RouterRemove {
                r,
                ty,
                cache_update,
            } => {
                let p = pick(&self.routers, r).map_or(null_mut(), |s| s.p);
                let t = self.ty(ty);
                let res = if cache_update {
                    sb_router_remove_cache_update(p, t)
                } else {
                    sb_router_remove(p, t)
                };
                check!(
                    res == SB_OK || res == SB_E_INVAL,
                    "router_remove returned {res}"
                );
            }
            Op::RouterSetDefault { r, null_cb } => {
                let rs = pick(&self.routers, r);
                let (p, data) =
                    rs.map_or((null_mut(), null_mut()), |s| (s.p, s.ctx as *mut c_void));
                let cb: sb_subscription_cb = if null_cb { None } else { Some(sub_cb) };
                let res = sb_router_set_default(p, cb, data);
                check!(
                    (res == SB_OK) == (!p.is_null() && !null_cb),
                    "router_set_default returned {res}"
                );
            }
            Op::RouterCongestion { r, low, high } => {
                let p = pick(&self.routers, r).map_or(null_mut(), |s| s.p);
                let (low, high) = (c_long::from(low), c_long::from(high));
                let res = sb_router_set_congestion_limits(p, low, high);
                let valid = !p.is_null() && low >= 0 && high > 0 && low <= high;
                check!(
                    (res == SB_OK) == valid,
                    "router congestion({low}, {high}) returned {res}"
                );
            }
            Op::RouterPublishSync { r, msg } => {
                let p = pick(&self.routers, r).map_or(null_mut(), |s| s.p);
                let m = self.msg(msg);
                let res = sb_router_publish_sync(p, m);
                check!(
                    res >= 0 || res == SB_E_INVAL || res == SB_E_STATE,
                    "router_publish_sync returned {res}"
                );
                if p.is_null() || m.is_null() {
                    check!(
                        res == SB_E_INVAL,
                        "router_publish_sync with NULL returned {res}"
                    );
                }
            }
            Op::RouterUnsubscribe { r, join } => {
                let i = idx(N_ROUTERS + 1, r);
                match self.routers.get_mut(i).and_then(Option::take) {
                    None => {
                        check!(sb_router_unsubscribe(null_mut()).is_null(), "non-NULL");
                        check!(
                            sb_router_unsubscribe_and_join(null_mut()).is_null(),
                            "non-NULL"
                        );
                    }
                    Some(s) if join => {
                        let keep = sb_router_ref(s.p);
                        check!(sb_router_unsubscribe_and_join(s.p).is_null(), "non-NULL");
                        unsafe { &*s.ctx }.joined.store(true, SeqCst);
                        check!(
                            sb_router_is_done(keep) == 1,
                            "router not done after unsubscribe_and_join"
                        );
                        sb_router_unref(keep);
                    }
                    Some(s) => {
                        check!(sb_router_unsubscribe(s.p).is_null(), "non-NULL");
                    }
                }
            }
            Op::RouterIsDone { r } => {
                let p = pick(&self.routers, r).map_or(null_mut(), |s| s.p);
                let d = sb_router_is_done(p);
                if p.is_null() {
                    check!(d == SB_E_INVAL, "router_is_done of NULL returned {d}");
                } else {
                    check!(d == 0 || d == 1, "router_is_done returned {d}");
                }
            }
            Op::RouterRef { from, to } => {
                let s = pick(&self.routers, from);
                let p = s.map_or(null_mut(), |s| s.p);
                let r = sb_router_ref(p);
                check!(r == p, "sb_router_ref({p:p}) returned {r:p}");
                self.put_router(to, s);
            }
            Op::RouterUnref { slot } => {
                let i = idx(N_ROUTERS + 1, slot);
                let p = self
                    .routers
                    .get_mut(i)
                    .and_then(Option::take)
                    .map_or(null_mut(), |s| s.p);
                sb_router_unref(p);
            }
            // ---------------------------------------------------------------- library
            Op::Misc {
                which,
                code,
                a,
                b,
                text,
            } => match which % 6 {
                0 => {
                    let _ = cstr_len(sb_version());
                    last_error_checked();
                    let s = sb_strerror(c_int::from(code));
                    check!(!s.is_null(), "strerror returned NULL");
                    let _ = cstr_len(s);
                    let _ = sb_warning_count();
                }
                1 => {
                    let ea = a.value();
                    let mut buf = [0x55 as c_char; 40];
                    let len = [0usize, 1, 17, 18, 40][usize::from(which / 6) % 5];
                    let bp = if which & 0x80 != 0 {
                        null_mut()
                    } else {
                        buf.as_mut_ptr()
                    };
                    let r = sb_eid_to_str(eid_ptr(&ea), bp, len);
                    let ok = ea.is_some() && !bp.is_null() && len >= 18;
                    check!((r == SB_OK) == ok, "eid_to_str returned {r}");
                    if ok {
                        let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
                        let mut back = sb_eid { bytes: [9; 6] };
                        check!(
                            sb_eid_from_str(s.as_ptr(), &mut back) == SB_OK,
                            "eid round trip failed"
                        );
                        check!(
                            sb_eid_cmp(&back, eid_ptr(&ea)) == 0,
                            "eid round trip differs"
                        );
                    }
                }
                2 => {
                    let t = text.to_c();
                    let mut out = sb_eid { bytes: [0; 6] };
                    let _ = sb_eid_from_str(c_ptr(&t), &mut out);
                    let _ = sb_eid_from_str(c_ptr(&t), null_mut());
                    let _ = sb_eid_from_str(c"01:02:03:04:05:06".as_ptr(), &mut out);
                }
                3 => {
                    let (ea, eb) = (a.value(), b.value());
                    let x = sb_eid_cmp(eid_ptr(&ea), eid_ptr(&eb));
                    let y = sb_eid_cmp(eid_ptr(&eb), eid_ptr(&ea));
                    check!(
                        x == -y && (-1..=1).contains(&x),
                        "eid_cmp not antisymmetric: {x} {y}"
                    );
                }
                4 => {
                    let t = text.to_c();
                    let d = sb_message_type_declined(c_ptr(&t));
                    // SB_E_INVAL: a name that is not UTF-8.
                    check!(d == 0 || d == 1 || d == SB_E_INVAL, "declined returned {d}");
                }
                _ => {
                    let _ = sb_eid_default();
                    let _ = sb_subscription_change_type();
                    let _ = sb_cache_update_type();
                    let _ = sb_cache_clear_type();
                }
            },
            Op::EidSetDefault { eid } => {
                let e = eid.value();
                let r = sb_eid_set_default(eid_ptr(&e));
                check!((r == SB_OK) == e.is_some(), "eid_set_default returned {r}");
                if let Some(e) = e {
                    check!(sb_eid_default().bytes == e.bytes, "default eid not set");
                }
            }
            Op::TimerAfter {
                slot,
                topic,
                msg,
                delay,
            } => {
                let (t, m) = (self.topic(topic), self.msg(msg));
                // Mostly due at once or within a few ms (racing the other ops and the
                // teardown), some far away (cancelled by the teardown), one never.
                let delay = match delay % 8 {
                    d @ 0..=4 => u64::from(d),
                    5 => 20,
                    6 => 60_000,
                    _ => u64::MAX,
                };
                let tm = sb_publish_after(t, m, delay);
                if t.is_null() || m.is_null() {
                    check!(tm.is_null(), "publish_after with NULL returned a timer");
                    last_error_checked();
                } else {
                    check!(!tm.is_null(), "publish_after failed");
                    self.shadow_timers.push(sb_timer_ref(tm));
                }
                self.put_timer(slot, tm);
            }
            Op::TimerCancel { slot } => {
                let tm = opt(pick(&self.timers, slot));
                let r = sb_timer_cancel(tm);
                if tm.is_null() {
                    check!(r == SB_E_INVAL, "cancel(NULL) returned {r}");
                    last_error_checked();
                } else {
                    check!(r == 0 || r == 1, "cancel returned {r}");
                    let again = sb_timer_cancel(tm);
                    check!(again == 0, "a second cancel returned {again}");
                    if r == 1 {
                        check!(sb_timer_fired(tm) == 0, "a cancelled timer fired");
                    }
                }
            }
            Op::TimerUnref { slot } => {
                self.put_timer(slot, null_mut());
            }
            Op::PoolConfigure { min, max, idle } => {
                let (min, max) = (u32::from(min % 3), u32::from(max % 5));
                let idle = [0u32, 1, 50, 20_000][usize::from(idle % 4)];
                let r = sb_pool_configure(min, max, idle);
                check!(
                    (r == SB_OK) == (max > 0 && min <= max),
                    "pool_configure({min}, {max}) returned {r}"
                );
            }
            Op::GroupCreate {
                slot,
                name,
                min,
                max,
                idle,
            } => {
                let (min, max) = (u32::from(min % 3), u32::from(max % 4));
                let idle = [0u32, 1, 50, 20_000][usize::from(idle % 4)];
                let name = usize::from(name % 5);
                let p = match name {
                    0..=2 => GROUP_NAMES[name].as_ptr(),
                    3 => null(),
                    _ => c"".as_ptr(),
                };
                let g = sb_pool_create(p, min, max, idle);
                if g.is_null() {
                    check!(
                        sb_last_error_code() == SB_E_INVAL,
                        "sb_pool_create failed with another code than SB_E_INVAL"
                    );
                    last_error_checked();
                } else {
                    check!(
                        name <= 2 && max > 0 && min <= max,
                        "sb_pool_create accepted a bad name or bad limits"
                    );
                }
                self.put_group(slot, g);
            }
            Op::GroupGet { slot, name } => {
                let name = usize::from(name % 4);
                let p = GROUP_NAMES.get(name).map_or(null(), |n| n.as_ptr());
                let g = sb_pool_get(p);
                check!(
                    name != 2 || !g.is_null(),
                    "sb_pool_get(\"default\") returned NULL"
                );
                self.put_group(slot, g);
            }
            Op::GroupRef { from, to } => {
                let g = self.group(from);
                let r = sb_pool_ref(g);
                check!(r == g, "sb_pool_ref returned another pointer");
                self.put_group(to, r);
            }
            Op::GroupUnref { slot } => {
                let i = idx(N_GROUPS, slot);
                sb_pool_unref(self.groups[i].take().unwrap_or(null_mut()));
            }
            Op::GroupReconfigure { g, min, max, idle } => {
                let (min, max) = (u32::from(min % 3), u32::from(max % 4));
                let idle = [0u32, 1, 50, 20_000][usize::from(idle % 4)];
                let g = self.group(g);
                let r = sb_pool_reconfigure(g, min, max, idle);
                check!(
                    (r == SB_OK) == (!g.is_null() && max > 0 && min <= max),
                    "sb_pool_reconfigure({min}, {max}) returned {r}"
                );
            }
            Op::GroupSubmit { g, chain, null_fn } => {
                let g = self.group(g);
                let task = Box::into_raw(Box::new(Task {
                    pool: sb_pool_ref(g),
                    left: chain % 4,
                }));
                let f: sb_pool_task_fn = if null_fn { None } else { Some(task_fn) };
                TASKS_SUBMITTED.fetch_add(1, SeqCst);
                let r = sb_pool_submit(g, f, task.cast());
                if r != SB_OK {
                    check!(
                        g.is_null() || null_fn,
                        "sb_pool_submit refused a task with valid arguments"
                    );
                    TASKS_SUBMITTED.fetch_sub(1, SeqCst);
                    // SAFETY: refused, so never run: still ours.
                    let task = unsafe { Box::from_raw(task) };
                    sb_pool_unref(task.pool);
                }
            }
        }
    }

    fn group(&self, s: u8) -> *mut sb_pool {
        opt(pick(&self.groups, s))
    }
    fn put_group(&mut self, s: u8, p: *mut sb_pool) {
        let i = idx(N_GROUPS, s);
        if let Some(old) = self.groups[i].take() {
            sb_pool_unref(old);
        }
        self.groups[i] = (!p.is_null()).then_some(p);
    }

    /// Unsubscribes and joins everything, cancels forwards and drops every reference.
    fn teardown(mut self) {
        SHARED.teardown.store(true, SeqCst);
        for l in self.lists.iter_mut().filter_map(Option::take) {
            sb_message_list_free(l);
        }
        // Every timer cancelled (or already fired): nothing of this input is published
        // after the teardown but what is under way, which check_nothing_left waits for.
        for tm in self.shadow_timers.drain(..) {
            let r = sb_timer_cancel(tm);
            check!(r == 0 || r == 1, "teardown cancel returned {r}");
            check!(
                r == 0 || sb_timer_fired(tm) == 0,
                "a timer both fired and cancelled"
            );
            sb_timer_unref(tm);
        }
        for tm in self.timers.iter_mut().filter_map(Option::take) {
            sb_timer_unref(tm);
        }
        for ct in self.cts.iter_mut().filter_map(Option::take) {
            check!(sb_caching_unsubscribe_and_join(ct).is_null(), "non-NULL");
        }
        for r in self.routers.iter_mut().filter_map(Option::take) {
            check!(sb_router_unsubscribe(r.p).is_null(), "non-NULL");
        }
        for s in self.subs.iter_mut().filter_map(Option::take) {
            check!(sb_unsubscribe(s.p).is_null(), "non-NULL");
        }
        for (r, ctx) in self.shadow_routers.drain(..) {
            let dup = sb_router_ref(r);
            check!(sb_router_unsubscribe_and_join(dup).is_null(), "non-NULL");
            check!(
                sb_router_is_done(r) == 1,
                "router not done after teardown join"
            );
            unsafe { &*ctx }.joined.store(true, SeqCst);
            sb_router_unref(r);
        }
        for (s, ctx) in self.shadow_subs.drain(..) {
            let dup = sb_subscription_ref(s);
            check!(sb_unsubscribe_and_join(dup).is_null(), "non-NULL");
            check!(
                sb_subscription_is_done(s) == 1,
                "subscription not done after teardown join"
            );
            check!(
                sb_subscription_is_subscribed(s) == 0,
                "still subscribed after teardown"
            );
            check!(
                sb_subscription_queue_length(s) == 0,
                "queue not empty after join"
            );
            unsafe { &*ctx }.joined.store(true, SeqCst);
            sb_subscription_unref(s);
        }
        for g in self.groups.iter_mut().filter_map(Option::take) {
            sb_pool_unref(g);
        }
        // Every accepted task runs once; then nothing uses the named groups.
        let start = Instant::now();
        while TASKS_RUN.load(SeqCst) != TASKS_SUBMITTED.load(SeqCst) {
            check!(
                start.elapsed() < Duration::from_secs(5),
                "submitted tasks did not run"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        for name in &GROUP_NAMES[..2] {
            let start = Instant::now();
            loop {
                let g = sb_pool_get(name.as_ptr());
                if g.is_null() {
                    break;
                }
                sb_pool_unref(g);
                check!(
                    start.elapsed() < Duration::from_secs(5),
                    "a worker group outlived every use"
                );
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        for f in self.fwds.iter_mut().filter_map(Option::take) {
            check!(sb_forward_cancel(f).is_null(), "non-NULL");
        }
        for p in self.pools.iter_mut().filter_map(Option::take) {
            sb_topic_pool_unref(p);
        }
        for c in self.caches.iter_mut().filter_map(Option::take) {
            sb_cache_unref(c);
        }
        for m in self.msgs.iter_mut().filter_map(Option::take) {
            sb_message_unref(m);
        }
        for t in self.types.iter_mut().filter_map(Option::take) {
            sb_message_type_unref(t);
        }
        for t in self.topics.iter_mut().filter_map(Option::take) {
            sb_topic_unref(t);
        }
        for c in self.ctxs.drain(..) {
            check!(
                !c.in_cb.load(SeqCst),
                "a callback is still running after teardown"
            );
            c.release();
        }
    }
}

/// Known bugs the target steers around (README.md, "Masks"). SB_FUZZ_MASK lists the
/// masks to apply (comma-separated numbers, e.g. "1,2,4"; empty: none); the default is
/// the masks of bugs still open. SB_FUZZ_STRICT=1 turns every mask off.
fn masked(bug: u32) -> bool {
    static MASKS: OnceLock<Vec<u32>> = OnceLock::new();
    MASKS
        .get_or_init(|| {
            if std::env::var_os("SB_FUZZ_STRICT").is_some_and(|v| v != "0") {
                return Vec::new();
            }
            let list = std::env::var("SB_FUZZ_MASK").unwrap_or_else(|_| DEFAULT_MASKS.into());
            list.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        })
        .contains(&bug)
}

/// Bugs 1 and 2 were fixed in 28f111c, bug 4 by deferring publishes made from callbacks
/// and refusing waits that would close a cycle: no mask is on by default.
const DEFAULT_MASKS: &str = "";

struct Init {
    eid: sb_eid,
    /// Threads of the process before the library started any (libFuzzer's own).
    base_threads: usize,
}

/// Threads of this process, from /proc/self/status.
fn thread_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The library's threads alive now, by name: (dedicated "sb-sub-*", pool "sb-pool").
fn library_threads() -> (usize, usize) {
    let (mut dedicated, mut pool) = (0, 0);
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for task in dir.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with("sb-sub") {
                dedicated += 1;
            } else if comm.starts_with("sb-pool") {
                pool += 1;
            }
        }
    }
    (dedicated, pool)
}

/// Starts the library's timer thread (it lives as long as the process) before the
/// threads of the process are counted.
fn start_timer_thread() {
    let name = CString::new("fuzz-timer-start").unwrap();
    let t = sb_topic_create(name.as_ptr());
    let mut ty = null_mut();
    check!(
        sb_message_type_create(name.as_ptr(), null(), &mut ty) == SB_OK,
        "type create failed"
    );
    let m = sb_message_create_bytes(ty, null(), 0);
    sb_message_type_unref(ty);
    let tm = sb_publish_after(t, m, u64::MAX);
    check!(sb_timer_cancel(tm) == 1, "the start timer did not cancel");
    sb_timer_unref(tm);
    sb_message_unref(m);
    sb_topic_unref(t);
    std::thread::sleep(Duration::from_millis(20));
}

static INIT: OnceLock<Init> = OnceLock::new();

fn init() -> &'static Init {
    INIT.get_or_init(|| {
        sb_set_log_handler(Some(log_fn), null_mut());
        sb_pool_configure(POOL_BETWEEN_INPUTS, POOL_BETWEEN_INPUTS, 20_000);
        start_timer_thread();
        Init {
            eid: sb_eid_default(),
            base_threads: thread_count(),
        }
    })
}

/// Waits (a little) for the last references held by library threads to go, then
/// checks that nothing of this input is left alive. Also waits until every thread the
/// library let go (joined dedicated threads, pool workers past their idle timeout or
/// above the maximum) has really exited: LeakSanitizer runs right after the input, and
/// the per-thread allocations of a thread caught half-way through its exit look leaked.
/// Pool size between inputs (the most `PoolConfigure` sets).
const POOL_BETWEEN_INPUTS: u32 = 4;

fn check_nothing_left(init: &Init) {
    let start = Instant::now();
    loop {
        let topics = switchboard::topic::live_topic_count();
        let raw = LIVE_RAW.lock().unwrap().len();
        let threads = thread_count();
        let workers = switchboard::pool::thread_count();
        // A worker counts (and shows in /proc) from its spawn, before its thread runs and
        // registers with LeakSanitizer: wait until every one has started.
        let starting = workers.saturating_sub(switchboard::pool::started_thread_count());
        let (dedicated, pool_threads) = library_threads();
        // Every subscription was joined: no dedicated thread may be left, and no pool
        // thread beyond the workers the pool counts.
        let exiting = threads.saturating_sub(init.base_threads + workers)
            + dedicated
            + pool_threads.saturating_sub(workers);
        if topics == 0
            && raw == 0
            && exiting == 0
            && starting == 0
            && workers <= POOL_BETWEEN_INPUTS as usize
        {
            return;
        }
        if workers > POOL_BETWEEN_INPUTS as usize {
            // A worker the pool spawned to replace a blocked one sleeps its idle timeout
            // before it notices it is surplus; configuring wakes it up.
            sb_pool_configure(POOL_BETWEEN_INPUTS, POOL_BETWEEN_INPUTS, 20_000);
        }
        if start.elapsed() > Duration::from_secs(5) {
            fail(&format!(
                "after teardown {topics} topic(s) and {raw} message data block(s) are still alive (reference leak), \
                 and {exiting} thread(s) beyond the {workers} pool worker(s) (thread leak; at most \
                 {POOL_BETWEEN_INPUTS} workers may stay)"
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fuzz_target!(|data: &[u8]| {
    let init = init();
    SHARED.block_used.store(false, SeqCst);
    SHARED.teardown.store(false, SeqCst);
    SHARED.budget.store(64, SeqCst);
    SHARED.sync_exists.store(false, SeqCst);
    SHARED.caching_exists.store(false, SeqCst);

    let mut u = Unstructured::new(data);
    let mut state = State::default();
    let mut n = 0;
    while !u.is_empty() && n < MAX_OPS {
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        if std::env::var_os("SB_FUZZ_TRACE").is_some() {
            eprintln!("op {n}: {op:?}");
        }
        state.run(op);
        last_error_checked();
        n += 1;
    }
    state.teardown();

    check!(
        sb_eid_set_default(&init.eid) == SB_OK,
        "restoring the eid failed"
    );
    // Between inputs the pool runs with min == max, so no worker has a reason to exit
    // (idle timeout or surplus) while LeakSanitizer looks after this input.
    check!(
        sb_pool_configure(POOL_BETWEEN_INPUTS, POOL_BETWEEN_INPUTS, 20_000) == SB_OK,
        "restoring the pool failed"
    );
    check_nothing_left(init);
});
