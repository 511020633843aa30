//! Library-wide functions: version, errors, pool, logging, entity ids.

use super::{boundary, fail_code, ref_arg, str_arg, to_code, UserData};
use crate::eid::Eid;
use crate::error::{self, Error};
use crate::log::{self, Level};
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::Arc;
use std::time::Duration;

pub use crate::error::{
    SB_E_DEADLOCK, SB_E_DECLINED, SB_E_INTERNAL, SB_E_INVAL, SB_E_NOMEM, SB_E_STATE, SB_E_TIMEOUT,
    SB_E_UNAVAILABLE, SB_OK,
};

/// Log levels passed to an `sb_log_fn`.
pub const SB_LOG_ERROR: c_int = 1;
pub const SB_LOG_WARNING: c_int = 2;
pub const SB_LOG_NOTICE: c_int = 3;
pub const SB_LOG_DEBUG: c_int = 4;

const _: () = assert!(
    SB_LOG_ERROR == Level::Error as c_int
        && SB_LOG_WARNING == Level::Warning as c_int
        && SB_LOG_NOTICE == Level::Notice as c_int
        && SB_LOG_DEBUG == Level::Debug as c_int
);

/// An entity id: which node of a cluster a message comes from.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct sb_eid {
    pub bytes: [u8; 6],
}

const _: () = assert!(std::mem::size_of::<sb_eid>() == std::mem::size_of::<Eid>());

impl super::FailureValue for sb_eid {
    fn failure() -> Self {
        sb_eid { bytes: [0; 6] }
    }
}

impl From<Eid> for sb_eid {
    fn from(e: Eid) -> sb_eid {
        sb_eid { bytes: e.bytes }
    }
}
impl From<&sb_eid> for Eid {
    fn from(e: &sb_eid) -> Eid {
        Eid { bytes: e.bytes }
    }
}

/// Receives every log line of the library (warnings such as congestion, errors such as
/// a panicking callback). `text` is borrowed for the call. Called on a thread of the
/// library (the log thread), one line at a time in the order they were logged, never on
/// the thread that logged: a slow handler delays other log lines, not publishers (lines
/// beyond a queue of 1024 are dropped and counted, see sb_log_dropped; lines still queued
/// when the process exits are not delivered). It may call the library, including
/// sb_set_log_handler. It must return normally: no C++ exception may propagate out of it
/// and no longjmp may leave it.
pub type sb_log_fn =
    Option<unsafe extern "C" fn(data: *mut c_void, level: c_int, text: *const c_char)>;

/// The library version, e.g. "0.1.0": SB_VERSION_MAJOR.SB_VERSION_MINOR.SB_VERSION_PATCH
/// of the library actually loaded (compare with the macros of the header you compiled
/// against). Static string: never NULL, never freed.
/// Ownership: borrowed (static).
#[no_mangle]
pub extern "C" fn sb_version() -> *const c_char {
    boundary(|| concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast())
}

/// Why the last failing call on this thread failed. Never NULL. Borrowed: a per-thread
/// buffer whose text changes only when a call on this thread fails (a successful call
/// leaves the text alone; sb_last_error_code() says whether the latest call failed).
/// Does not change the last error itself.
/// Ownership: borrowed (per-thread buffer; never free it).
#[no_mangle]
pub extern "C" fn sb_last_error() -> *const c_char {
    // No `boundary`: that would reset the code this function must leave alone. Reading
    // a thread-local cannot panic (a thread being torn down gets "").
    error::last_error_ptr()
}

/// The SB_E_* code of the latest call made on this thread, or 0 (SB_OK) when it
/// succeeded. Every exported function sets it: to 0 when it succeeds, to its failure's
/// code when it fails (including the functions that return NULL, void or a count, and
/// sb_unsubscribe_and_join and friends refused with SB_E_DEADLOCK). The two exceptions
/// are sb_last_error() and sb_last_error_code() themselves, which leave it alone. A NULL
/// from a lookup that found nothing (sb_cache_get of an unknown id, ...) is a success.
/// Calls made by a callback are calls of their own: once the library call that ran the
/// callback returns, the code is that call's.
/// Ownership: no pointers.
#[no_mangle]
pub extern "C" fn sb_last_error_code() -> c_int {
    // No `boundary`, which would reset the code: a thread-local read cannot panic.
    error::last_error_code()
}

/// Static name of an `SB_*` code. Never NULL; not to be freed.
/// Ownership: borrowed (static).
#[no_mangle]
pub extern "C" fn sb_strerror(code: c_int) -> *const c_char {
    boundary(|| error::strerror(code).as_ptr())
}

/// Configures the shared worker pool (the worker group "default", see sb_pool_create):
/// at least `min_threads` kept alive, at most
/// `max_threads` running callbacks (workers blocked in a join don't count), idle workers
/// above the minimum exit after `idle_timeout_ms`. Defaults: 1, CPUs (>= 2), 20000.
/// A worker blocked in a library wait (join, sb_publish_sync, a full SB_OVERFLOW_BLOCK
/// queue) gets a stand-in, up to max(64, 8 x max_threads) stand-ins; past that, queued
/// work waits for a blocked worker to return. Takes effect at once.
/// Returns SB_OK, or SB_E_INVAL when max_threads is 0 or below min_threads.
/// Ownership: no pointers.
#[no_mangle]
pub extern "C" fn sb_pool_configure(
    min_threads: c_uint,
    max_threads: c_uint,
    idle_timeout_ms: c_uint,
) -> c_int {
    boundary(|| {
        to_code(crate::pool::configure(
            min_threads as usize,
            max_threads as usize,
            Duration::from_millis(u64::from(idle_timeout_ms)),
        ))
    })
}

/// Frees a string the library returned (e.g. by `sb_message_to_json`). NULL-safe.
/// Such strings are malloc()'d, so free() works as well.
/// Ownership: takes ownership of `s`.
#[no_mangle]
pub extern "C" fn sb_string_free(s: *mut c_char) {
    boundary(|| {
        // SAFETY: the library returns malloc()'d strings; free(NULL) is a no-op.
        unsafe { libc::free(s.cast()) }
    })
}

/// Routes the library's log lines to `fn` (NULL: back to stderr). `data` is passed back
/// untouched (borrowed: the library never frees it).
///
/// Replacing or removing a handler waits: lines logged before this call are delivered to
/// the previous handler (on this thread if the log thread has not taken them yet), and
/// the call of the previous handler in flight on the log thread, if any, returns first.
/// Once this returns, the previous handler is never called again, so the module that
/// installed it may be unloaded (dlclose) and its `data` freed. Do not call it while
/// holding a lock the handler takes. Called from inside the handler itself it does not
/// wait; the change applies when that call returns.
/// Ownership: `data` stays the caller's (borrowed by the library until the handler is
/// replaced and this call returned).
#[no_mangle]
pub extern "C" fn sb_set_log_handler(handler: sb_log_fn, data: *mut c_void) {
    boundary(|| match handler {
        None => log::set_handler(None),
        Some(f) => {
            let data = UserData(data);
            log::set_handler(Some(Arc::new(move |level: Level, text: &str| {
                let text = std::ffi::CString::new(text.replace('\0', "?")).unwrap_or_default();
                let data = data;
                // SAFETY: the host installed `f` for exactly this call.
                unsafe { f(data.0, level as c_int, text.as_ptr()) }
            })));
        }
    })
}

/// Log lines dropped since the process started because the handler fell more than 1024
/// lines behind (a warning line saying how many is delivered once it catches up).
/// Ownership: no pointers.
#[no_mangle]
pub extern "C" fn sb_log_dropped() -> u64 {
    boundary(log::dropped_count)
}

/// Number of warnings the library has logged since the process started.
/// Ownership: no pointers.
#[no_mangle]
pub extern "C" fn sb_warning_count() -> u64 {
    boundary(log::warning_count)
}

/// This node's entity id (set by `sb_eid_set_default`, else derived from the host).
/// Ownership: returned by value.
#[no_mangle]
pub extern "C" fn sb_eid_default() -> sb_eid {
    boundary(|| Eid::default_eid().into())
}

/// Sets this node's entity id. SB_E_INVAL when `eid` is NULL.
/// Ownership: `eid` is borrowed for the call (copied).
#[no_mangle]
pub extern "C" fn sb_eid_set_default(eid: *const sb_eid) -> c_int {
    boundary(|| match ref_arg("eid", eid) {
        Ok(e) => {
            Eid::set_default(e.into());
            SB_OK
        }
        Err(e) => fail_code(e),
    })
}

/// Writes "aa:bb:cc:dd:ee:ff" and a NUL into `buf` (needs len >= 18).
/// Returns SB_OK, or SB_E_INVAL for a NULL argument or a short buffer. Ownership: both
/// pointers are borrowed for the call.
#[no_mangle]
pub extern "C" fn sb_eid_to_str(eid: *const sb_eid, buf: *mut c_char, len: usize) -> c_int {
    boundary(|| {
        let e = match ref_arg("eid", eid) {
            Ok(e) => Eid::from(e),
            Err(e) => return fail_code(e),
        };
        if buf.is_null() {
            return fail_code(Error::invalid("buf is NULL"));
        }
        let text = e.to_string();
        if len < text.len() + 1 {
            return fail_code(Error::invalid(format!(
                "buffer of {len} bytes is too small for an eid (need {})",
                text.len() + 1
            )));
        }
        // SAFETY: buf has room for len >= text.len() + 1 bytes, checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
            *buf.add(text.len()) = 0;
        }
        SB_OK
    })
}

/// Parses "aa:bb:cc:dd:ee:ff" into `*out`.
/// Returns SB_OK, or SB_E_INVAL (and `*out` unchanged) for a NULL argument or malformed
/// text. Ownership: both pointers are borrowed for the call.
#[no_mangle]
pub extern "C" fn sb_eid_from_str(s: *const c_char, out: *mut sb_eid) -> c_int {
    boundary(|| {
        let text = match str_arg("eid text", s) {
            Ok(t) => t,
            Err(e) => return fail_code(e),
        };
        if out.is_null() {
            return fail_code(Error::invalid("out is NULL"));
        }
        match Eid::parse(text) {
            Ok(e) => {
                // SAFETY: out is non-null and the caller promises it is writable.
                unsafe { *out = e.into() };
                SB_OK
            }
            Err(e) => fail_code(e),
        }
    })
}

/// Compares two eids like memcmp (<0, 0, >0). NULL sorts first.
/// Ownership: both borrowed for the call.
#[no_mangle]
pub extern "C" fn sb_eid_cmp(a: *const sb_eid, b: *const sb_eid) -> c_int {
    boundary(|| {
        let a = ref_arg("a", a).ok().map(|e| e.bytes);
        let b = ref_arg("b", b).ok().map(|e| e.bytes);
        match a.cmp(&b) {
            std::cmp::Ordering::Less => -1,
            std::cmp::Ordering::Equal => 0,
            std::cmp::Ordering::Greater => 1,
        }
    })
}
