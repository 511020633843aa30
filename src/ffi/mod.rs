//! The C skin over the safe core. Every exported function:
//! - runs its body inside [`boundary`], so no panic unwinds into C (a panic becomes the
//!   function's failure value plus a last-error text);
//! - turns handles into Rust references through [`Handle`], the one place that knows a
//!   C handle is an `Arc` and checks its magic tag, so NULL, freed or wrong-type
//!   pointers get a clear error instead of a crash (best effort for freed memory);
//! - reports failures through `sb_last_error()`.

#![allow(non_camel_case_types)]
// Exported functions take raw pointers by nature of the C ABI; each dereference is
// checked (NULL, alignment, magic) and carries its own SAFETY note.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use crate::error::{set_last_error, Error, Result};
use std::ffi::{c_char, c_int, CStr};
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

pub mod cache;
pub mod cluster;
pub mod library;
pub mod message;
pub mod router;
pub mod subscription;
pub mod topic;

/// The value an exported function returns when its body panicked.
pub(crate) trait FailureValue {
    fn failure() -> Self;
}
impl<T> FailureValue for *mut T {
    fn failure() -> Self {
        std::ptr::null_mut()
    }
}
impl<T> FailureValue for *const T {
    fn failure() -> Self {
        std::ptr::null()
    }
}
impl FailureValue for c_int {
    fn failure() -> Self {
        crate::error::SB_E_STATE
    }
}
impl FailureValue for usize {
    fn failure() -> Self {
        0
    }
}
impl FailureValue for u64 {
    fn failure() -> Self {
        0
    }
}
impl FailureValue for () {
    fn failure() -> Self {}
}

/// Runs an exported function's body; a panic becomes a failure value and a last error.
pub(crate) fn boundary<R: FailureValue>(body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let err = Error::state(format!("internal error (please report): {what}"));
            crate::log::log(crate::log::Level::Error, &err.message);
            set_last_error(&err);
            R::failure()
        }
    }
}

/// Maps a `Result` to the C convention for int-returning functions.
pub(crate) fn to_code(r: Result<()>) -> c_int {
    match r {
        Ok(()) => crate::error::SB_OK,
        Err(e) => fail_code(e),
    }
}

pub(crate) fn fail_code(e: Error) -> c_int {
    set_last_error(&e);
    e.code()
}

pub(crate) fn fail_null<T>(e: Error) -> *mut T {
    set_last_error(&e);
    std::ptr::null_mut()
}

/// A C handle type whose pointers are `Arc::into_raw` of `Self::Rust`.
pub(crate) trait Handle: Sized {
    type Rust;
    /// For error messages: "sb_topic".
    const WHAT: &'static str;
    fn magic_ok(r: &Self::Rust) -> bool;

    /// Checks `p` and borrows the object it points to. The caller's reference keeps it
    /// alive for the duration of the call.
    fn borrow<'a>(p: *const Self) -> Result<Borrowed<'a, Self::Rust>> {
        if p.is_null() {
            return Err(Error::invalid(format!("{} is NULL", Self::WHAT)));
        }
        if !(p as usize).is_multiple_of(std::mem::align_of::<Self::Rust>()) {
            return Err(Error::invalid(format!(
                "{} pointer is misaligned: not a {}",
                Self::WHAT,
                Self::WHAT
            )));
        }
        let rp = p.cast::<Self::Rust>();
        // SAFETY: `p` is non-null and aligned; the caller promises it came from this
        // library and holds a reference. The magic check below catches most freed or
        // wrong-type pointers before anything else is read.
        let arc = ManuallyDrop::new(unsafe { Arc::from_raw(rp) });
        if !Self::magic_ok(&arc) {
            return Err(Error::invalid(format!(
                "{} pointer is not a live {} (freed, or another type)",
                Self::WHAT,
                Self::WHAT
            )));
        }
        Ok(Borrowed {
            arc,
            _life: std::marker::PhantomData,
        })
    }

    /// A new reference (for storing beyond the call).
    fn clone_arc(p: *const Self) -> Result<Arc<Self::Rust>> {
        Self::borrow(p).map(|b| Arc::clone(&b))
    }

    /// Hands a reference to C.
    fn into_raw(arc: Arc<Self::Rust>) -> *mut Self {
        Arc::into_raw(arc) as *mut Self
    }

    /// A borrowed pointer to an object the library keeps alive.
    fn as_ptr(arc: &Arc<Self::Rust>) -> *mut Self {
        Arc::as_ptr(arc) as *mut Self
    }

    /// Drops the caller's reference. NULL is a no-op.
    fn release(p: *const Self) -> Result<()> {
        if p.is_null() {
            return Ok(());
        }
        let b = Self::borrow(p)?;
        drop(ManuallyDrop::into_inner(b.arc));
        Ok(())
    }
}

/// Runs `f` on the object behind `p`, then drops the caller's reference; returns NULL
/// (the `x = sb_unsubscribe(x)` idiom). Failures become the last error.
pub(crate) fn act_and_release<H: Handle>(
    p: *mut H,
    f: impl FnOnce(&Arc<H::Rust>) -> Result<()>,
) -> *mut H {
    match H::borrow(p) {
        Ok(obj) => {
            if let Err(e) = f(&obj) {
                set_last_error(&e);
            }
            let _ = H::release(p);
        }
        Err(e) => set_last_error(&e),
    }
    std::ptr::null_mut()
}

/// A checked, borrowed handle; derefs to the `Arc` so `self: &Arc<Self>` methods work.
pub(crate) struct Borrowed<'a, T> {
    arc: ManuallyDrop<Arc<T>>,
    _life: std::marker::PhantomData<&'a T>,
}

impl<T> Deref for Borrowed<'_, T> {
    type Target = Arc<T>;
    fn deref(&self) -> &Arc<T> {
        &self.arc
    }
}

/// Reads a name argument: non-NULL, UTF-8.
pub(crate) fn str_arg<'a>(what: &str, p: *const c_char) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null; the caller promises a NUL-terminated string valid for the call.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// Pointer arguments C passes for output or input structs.
pub(crate) fn ref_arg<'a, T>(what: &str, p: *const T) -> Result<&'a T> {
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null; the caller promises a valid, aligned T for the call.
    Ok(unsafe { &*p })
}

/// `void *` user data, carried across threads untouched.
#[derive(Clone, Copy)]
pub(crate) struct UserData(pub(crate) *mut std::ffi::c_void);
// SAFETY: the library never dereferences it; API.md makes thread-safety of what it points
// to the owner's business (callbacks on other threads are the documented contract).
unsafe impl Send for UserData {}
// SAFETY: as above.
unsafe impl Sync for UserData {}
