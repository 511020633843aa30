//! Message types and messages.

use super::library::{sb_eid, SB_OK};
use super::{boundary, fail_code, fail_null, str_arg, to_code, Handle};
use crate::eid::Eid;
use crate::error::{Error, ErrorKind};
use crate::message::{DataDtor, Message, Payload};
use crate::message_type::{MessageType, ToJsonFn};
use std::ffi::{c_char, c_int, c_void, CStr};

/// A message type (opaque, refcounted).
pub struct sb_message_type {
    _opaque: [u8; 0],
}
/// An immutable message (opaque, refcounted).
pub struct sb_message {
    _opaque: [u8; 0],
}

impl Handle for sb_message_type {
    type Rust = MessageType;
    type Ptr = std::sync::Arc<MessageType>;
    const WHAT: &'static str = "sb_message_type";
    fn magic_ok(r: &MessageType) -> bool {
        r.magic_ok()
    }
}
impl Handle for sb_message {
    type Rust = Message;
    type Ptr = crate::message::MessageRef;
    const WHAT: &'static str = "sb_message";
    fn magic_ok(r: &Message) -> bool {
        r.magic_ok()
    }
}

/// Destructor of a message's data; runs exactly once, when the last reference goes, on
/// whichever thread drops it (also with NULL data). Takes ownership of `data`. Must
/// return normally (no C++ exception, no longjmp out).
pub type sb_data_dtor = Option<unsafe extern "C" fn(data: *mut c_void)>;

/// Per-type functions.
#[repr(C)]
pub struct sb_message_vtable {
    /// Optional: renders a message as malloc()'d JSON text, which the library takes over
    /// (and frees); `msg` is borrowed for the call. Must return normally (no C++
    /// exception, no longjmp out).
    pub to_json: Option<unsafe extern "C" fn(msg: *const sb_message) -> *mut c_char>,
}

/// Copies a malloc()'d C string into a Rust String and frees it.
///
/// # Safety
/// `text` is NULL or a NUL-terminated string from malloc().
unsafe fn take_c_string(text: *mut c_char) -> Option<String> {
    if text.is_null() {
        return None;
    }
    // SAFETY: per the contract above.
    let s = unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: malloc()'d per the vtable contract.
    unsafe { libc::free(text.cast()) };
    Some(s)
}

/// malloc()'d copy of `s`, so callers may release it with free() or sb_string_free().
pub(crate) fn malloc_string(s: &str) -> *mut c_char {
    let bytes = s.as_bytes();
    // SAFETY: allocation of len + 1 bytes, filled and terminated below.
    unsafe {
        let p = libc::malloc(bytes.len() + 1).cast::<u8>();
        if p.is_null() {
            return std::ptr::null_mut();
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *p.add(bytes.len()) = 0;
        p.cast()
    }
}

/// Creates (or finds) the message type `name`. On success `*out` is a new reference and
/// SB_OK is returned; SB_E_DECLINED (with `*out` = NULL) when the name was declined.
/// `vtable` may be NULL; it is copied. A live type of the same name is returned as is.
/// A type's name and id stay with the process once created (ids are never reused), so
/// names form a bounded set: one per kind of event, never one per call or channel.
/// Ownership: `name` and `vtable` are borrowed for the call (both copied); `*out`
/// receives a new reference (sb_message_type_unref).
#[no_mangle]
pub extern "C" fn sb_message_type_create(
    name: *const c_char,
    vtable: *const sb_message_vtable,
    out: *mut *mut sb_message_type,
) -> c_int {
    boundary(|| {
        if out.is_null() {
            return fail_code(Error::invalid("out is NULL"));
        }
        // SAFETY: out is non-null; the caller promises it is writable.
        unsafe { *out = std::ptr::null_mut() };
        let name = match str_arg("message type name", name) {
            Ok(n) => n,
            Err(e) => return fail_code(e),
        };
        let to_json: Option<ToJsonFn> = if vtable.is_null() {
            None
        } else {
            // SAFETY: non-null; the caller promises a valid vtable for this call.
            unsafe { (*vtable).to_json }.map(|f| {
                Box::new(move |msg: &Message| {
                    // SAFETY: `f` is the type's to_json, called with a live message; it
                    // returns malloc()'d text or NULL.
                    unsafe { take_c_string(f((msg as *const Message).cast())) }
                }) as ToJsonFn
            })
        };
        match MessageType::create(name, to_json) {
            Ok(ty) => {
                // SAFETY: checked non-null above.
                unsafe { *out = sb_message_type::into_raw(ty) };
                SB_OK
            }
            Err(e) => fail_code(e),
        }
    })
}

/// The type's name (borrowed).
/// Ownership: `ty` is borrowed; the name is borrowed from the type (types live until
/// the process ends).
#[no_mangle]
pub extern "C" fn sb_message_type_name(ty: *const sb_message_type) -> *const c_char {
    boundary(|| match sb_message_type::borrow(ty) {
        Ok(t) => t.name_cstr().as_ptr(),
        Err(e) => fail_null::<c_char>(e),
    })
}

/// The type's small dense id (>= 0), or a negative code.
/// Ownership: `ty` is borrowed.
#[no_mangle]
pub extern "C" fn sb_message_type_id(ty: *const sb_message_type) -> c_int {
    boundary(|| match sb_message_type::borrow(ty) {
        Ok(t) => t.id() as c_int,
        Err(e) => fail_code(e),
    })
}

/// Takes a new reference; returns `ty`.
/// Ownership: returns a new reference to the same type; `ty` is borrowed.
#[no_mangle]
pub extern "C" fn sb_message_type_ref(ty: *mut sb_message_type) -> *mut sb_message_type {
    boundary(|| match sb_message_type::clone_arc(ty) {
        Ok(t) => sb_message_type::into_raw(t),
        Err(e) => fail_null(e),
    })
}

/// Drops a reference. NULL-safe.
/// Ownership: takes ownership of (releases) one reference.
#[no_mangle]
pub extern "C" fn sb_message_type_unref(ty: *mut sb_message_type) {
    boundary(|| {
        let _ = sb_message_type::release(ty).map_err(|e| crate::error::set_last_error(&e));
    })
}

/// Declines `name`: later creates of it fail with SB_E_DECLINED, even while a live type
/// holds the name (handles already out keep working: their messages are still created
/// and delivered). A decline cannot be undone.
/// Ownership: `name` is borrowed for the call (copied).
#[no_mangle]
pub extern "C" fn sb_message_type_decline(name: *const c_char) -> c_int {
    boundary(|| to_code(str_arg("message type name", name).and_then(MessageType::decline)))
}

/// 1 when `name` was declined, else 0; SB_E_INVAL (negative) for a NULL or non-UTF-8
/// name. `name` is borrowed for the call.
/// Ownership: `name` is borrowed for the call.
#[no_mangle]
pub extern "C" fn sb_message_type_declined(name: *const c_char) -> c_int {
    boundary(|| match str_arg("message type name", name) {
        Ok(n) => MessageType::is_declined(n) as c_int,
        Err(e) => fail_code(e),
    })
}

/// The message as JSON (malloc()'d; free with sb_string_free), or NULL when its type
/// has no to_json or to_json returned NULL.
/// Ownership: `msg` is borrowed; the caller owns the returned string (sb_string_free).
#[no_mangle]
pub extern "C" fn sb_message_to_json(msg: *const sb_message) -> *mut c_char {
    boundary(|| {
        let m = match sb_message::borrow(msg) {
            Ok(m) => m,
            Err(e) => return fail_null(e),
        };
        match m.message_type().to_json(&m) {
            Some(text) => malloc_string(&text),
            None => fail_null(Error::invalid(format!(
                "message type '{}' has no to_json, or it returned NULL",
                m.message_type().name()
            ))),
        }
    })
}

/// The types whose messages only the library makes: their data is a struct the library
/// lays out (`sb_subscription_change`, `sb_cache_update`) and their subscribers read it
/// as such, or a marker the cache acts on (`sb_cache_clear_create`).
fn library_owned(t: &MessageType) -> bool {
    [
        crate::subscription::change_type(),
        crate::caching_topic::update_type(),
        crate::caching_topic::clear_type(),
    ]
    .iter()
    .any(|owned| std::ptr::eq(owned.as_ref(), t))
}

fn create(
    ty: *mut sb_message_type,
    payload: impl FnOnce() -> Payload,
    eid: Option<Eid>,
) -> *mut sb_message {
    match sb_message_type::borrow(ty) {
        Ok(t) if library_owned(&t) => fail_null(Error::invalid(format!(
            "message type '{}' belongs to the library: its messages are made by the library \
             only (sb_cache_clear_create for a clear)",
            t.name()
        ))),
        Ok(t) => sb_message::into_raw(Message::with_eid(&t, payload(), eid)),
        Err(e) => fail_null(e),
    }
}

fn raw_payload(data: *mut c_void, dtor: sb_data_dtor) -> Payload {
    Payload::Raw {
        data,
        dtor: dtor.map(|d| d as DataDtor),
    }
}

/// A message of `type` carrying `data` from this node (default eid). The message owns
/// `data`: `dtor(data)` runs exactly once when the last reference goes (dtor may be
/// NULL). On failure (NULL) the caller still owns `data` and dtor is not called.
/// `data` may be NULL: a message without payload is fine (sb_message_data() then
/// returns NULL, and a non-NULL dtor is still called once, with NULL). Messages of the
/// library's own types (sb_subscription_change_type(), sb_cache_update_type(),
/// sb_cache_clear_type()) cannot be made here: NULL with SB_E_INVAL. Ownership: `type`
/// is borrowed (the message keeps a reference); on success the message takes ownership
/// of `data` and the caller gets a new reference (sb_message_unref).
#[no_mangle]
pub extern "C" fn sb_message_create(
    ty: *mut sb_message_type,
    data: *mut c_void,
    dtor: sb_data_dtor,
) -> *mut sb_message {
    boundary(|| create(ty, || raw_payload(data, dtor), Some(Eid::default_eid())))
}

/// As sb_message_create, from node `eid`; a NULL eid makes an aggregate message.
/// NULL data is allowed and library-owned types are refused, as in sb_message_create.
/// Ownership: `eid` is borrowed for the call (copied); otherwise as sb_message_create.
#[no_mangle]
pub extern "C" fn sb_message_create_full(
    ty: *mut sb_message_type,
    data: *mut c_void,
    dtor: sb_data_dtor,
    eid: *const sb_eid,
) -> *mut sb_message {
    boundary(|| {
        // SAFETY: NULL or a valid eid, per the contract.
        let eid = unsafe { eid.as_ref() }.map(Eid::from);
        create(ty, || raw_payload(data, dtor), eid)
    })
}

/// A message carrying a private copy of `len` bytes (`bytes` may be NULL when len is 0).
/// NULL with SB_E_INVAL for a length above PTRDIFF_MAX, SB_E_NOMEM when the copy cannot
/// be allocated.
/// Messages of the library's own types are refused (SB_E_INVAL), as by
/// sb_message_create. Ownership: `type` and `bytes` are borrowed for the call (the
/// bytes are copied); returns a new reference (sb_message_unref).
#[no_mangle]
pub extern "C" fn sb_message_create_bytes(
    ty: *mut sb_message_type,
    bytes: *const c_void,
    len: usize,
) -> *mut sb_message {
    boundary(|| {
        if bytes.is_null() && len > 0 {
            return fail_null(Error::invalid("bytes is NULL but len is not 0"));
        }
        // No object is larger than isize::MAX bytes: such a length is a caller's error
        // (a negative length cast to size_t, say), never a buffer to read.
        if len > isize::MAX as usize {
            return fail_null(Error::invalid(format!(
                "len {len} is not a buffer's length"
            )));
        }
        // The copy is allocated fallibly: out of memory is SB_E_NOMEM, not an abort.
        let mut buf = Vec::new();
        if buf.try_reserve_exact(len).is_err() {
            return fail_null(Error::new(
                ErrorKind::NoMemory,
                format!("cannot allocate {len} bytes for the message"),
            ));
        }
        if len > 0 {
            // SAFETY: non-null, at most isize::MAX, and the caller promises len readable
            // bytes.
            buf.extend_from_slice(unsafe { std::slice::from_raw_parts(bytes.cast::<u8>(), len) });
        }
        let copy: Box<[u8]> = buf.into_boxed_slice();
        create(ty, || Payload::Bytes(copy), Some(Eid::default_eid()))
    })
}

/// The message's type (borrowed).
/// Ownership: borrowed from the message (and types live until the process ends).
#[no_mangle]
pub extern "C" fn sb_message_get_type(msg: *const sb_message) -> *mut sb_message_type {
    boundary(|| match sb_message::borrow(msg) {
        Ok(m) => sb_message_type::as_ptr(m.message_type()),
        Err(e) => fail_null(e),
    })
}

/// The message's data pointer (for bytes messages, the copy).
/// NULL when the message was created with NULL data (check sb_last_error_code() to tell
/// it from a bad handle). Ownership: borrowed: valid while the message lives; the
/// library never writes through it.
#[no_mangle]
pub extern "C" fn sb_message_data(msg: *const sb_message) -> *mut c_void {
    boundary(|| match sb_message::borrow(msg) {
        Ok(m) => m.data_ptr(),
        Err(e) => fail_null(e),
    })
}

/// Length of a bytes message's data; 0 for other messages.
/// Ownership: `msg` is borrowed. A NULL or dead handle also gives 0, with
/// sb_last_error_code() SB_E_INVAL.
#[no_mangle]
pub extern "C" fn sb_message_data_len(msg: *const sb_message) -> usize {
    boundary(|| match sb_message::borrow(msg) {
        Ok(m) => m.data_len(),
        Err(e) => {
            crate::error::set_last_error(&e);
            0
        }
    })
}

/// CLOCK_REALTIME at creation, in ns since the epoch (0 on bad input).
/// Ownership: `msg` is borrowed.
#[no_mangle]
pub extern "C" fn sb_message_timestamp_ns(msg: *const sb_message) -> u64 {
    boundary(|| match sb_message::borrow(msg) {
        Ok(m) => m.timestamp_ns(),
        Err(e) => {
            crate::error::set_last_error(&e);
            0
        }
    })
}

/// The node the message comes from (borrowed), or NULL for an aggregate.
/// Ownership: borrowed from the message: valid while it lives.
#[no_mangle]
pub extern "C" fn sb_message_eid(msg: *const sb_message) -> *const sb_eid {
    boundary(|| match sb_message::borrow(msg) {
        // SAFETY (cast): sb_eid and Eid are both repr(C) [u8; 6] (asserted in library.rs).
        Ok(m) => m
            .eid()
            .map_or(std::ptr::null(), |e| (e as *const Eid).cast::<sb_eid>()),
        Err(e) => {
            crate::error::set_last_error(&e);
            std::ptr::null()
        }
    })
}

/// Takes a new reference; returns `msg`.
/// Ownership: returns a new reference to the same message; `msg` is borrowed.
#[no_mangle]
pub extern "C" fn sb_message_ref(msg: *mut sb_message) -> *mut sb_message {
    boundary(|| match sb_message::clone_arc(msg) {
        Ok(m) => sb_message::into_raw(m),
        Err(e) => fail_null(e),
    })
}

/// Drops a reference; the last one runs the dtor. NULL-safe.
/// Ownership: takes ownership of (releases) one reference.
#[no_mangle]
pub extern "C" fn sb_message_unref(msg: *mut sb_message) {
    boundary(|| {
        let _ = sb_message::release(msg).map_err(|e| crate::error::set_last_error(&e));
    })
}
