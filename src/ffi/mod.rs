//! The C skin over the safe core. Every exported function:
//! - runs its body inside [`boundary`], so no panic unwinds into C (a panic becomes the
//!   function's failure value plus a last-error text);
//! - turns handles into Rust references through [`Handle`], the one place that knows a
//!   C handle is an `Arc` (a `MessageRef` for messages) and checks its magic tag, so NULL, freed or wrong-type
//!   pointers get a clear error instead of a crash (best effort for freed memory);
//! - reports failures through `sb_last_error()`.

#![allow(non_camel_case_types)]
// Exported functions take raw pointers by nature of the C ABI; each dereference is
// checked (NULL, alignment, magic) and carries its own SAFETY note.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use crate::error::{set_last_error, Error, ErrorKind, Result};
use std::ffi::{c_char, c_int, CStr};
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

pub mod cache;
pub mod cluster;
pub mod library;
pub mod message;
pub mod pool;
pub mod router;
pub mod stats;
pub mod subscription;
pub mod timer;
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
        crate::error::SB_E_INTERNAL
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

/// Runs an exported function's body; a panic becomes a failure value and a last error
/// (`SB_E_INTERNAL`). The calling thread's last error code is this call's: 0 unless the
/// body recorded a failure (calls that callbacks make inside it have their own).
pub(crate) fn boundary<R: FailureValue>(body: impl FnOnce() -> R) -> R {
    crate::error::in_call(|| match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let err = Error::new(
                ErrorKind::Internal,
                format!("internal error (please report): {what}"),
            );
            crate::log::log(crate::log::Level::Error, &err.message);
            set_last_error(&err);
            R::failure()
        }
    })
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

/// The counted pointer behind a C handle: `Arc<T>` for most objects, `MessageRef` for
/// messages (a cheaper count in a recycled block).
pub(crate) trait Counted: Clone + Deref {
    /// Hands a reference over as the object's address.
    fn into_raw(this: Self) -> *const Self::Target;
    /// The object's address, the reference staying with `this`.
    fn as_ptr(this: &Self) -> *const Self::Target;
    /// Takes back a reference `into_raw` handed over.
    ///
    /// # Safety
    /// `p` came from `into_raw` of this type, and the reference is not used again.
    unsafe fn from_raw(p: *const Self::Target) -> Self;
}

impl<T> Counted for Arc<T> {
    fn into_raw(this: Self) -> *const T {
        Arc::into_raw(this)
    }
    fn as_ptr(this: &Self) -> *const T {
        Arc::as_ptr(this)
    }
    unsafe fn from_raw(p: *const T) -> Self {
        // SAFETY: the caller's promise.
        unsafe { Arc::from_raw(p) }
    }
}

impl Counted for crate::message::MessageRef {
    fn into_raw(this: Self) -> *const crate::Message {
        crate::message::MessageRef::into_raw(this)
    }
    fn as_ptr(this: &Self) -> *const crate::Message {
        crate::message::MessageRef::as_ptr(this)
    }
    unsafe fn from_raw(p: *const crate::Message) -> Self {
        // SAFETY: the caller's promise.
        unsafe { crate::message::MessageRef::from_raw(p) }
    }
}

/// A C handle type whose pointers are `Counted::into_raw` of `Self::Ptr`.
pub(crate) trait Handle: Sized {
    type Rust;
    /// The counted pointer C holds references of (`Arc<Self::Rust>` but for messages).
    type Ptr: Counted<Target = Self::Rust>;
    /// For error messages: "sb_topic".
    const WHAT: &'static str;
    fn magic_ok(r: &Self::Rust) -> bool;

    /// Checks `p` and borrows the object it points to. The caller's reference keeps it
    /// alive for the duration of the call.
    fn borrow<'a>(p: *const Self) -> Result<Borrowed<'a, Self::Ptr>> {
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
        let ptr = ManuallyDrop::new(unsafe { <Self::Ptr as Counted>::from_raw(rp) });
        if !Self::magic_ok(&ptr) {
            return Err(Error::invalid(format!(
                "{} pointer is not a live {} (freed, or another type)",
                Self::WHAT,
                Self::WHAT
            )));
        }
        Ok(Borrowed {
            ptr,
            _life: std::marker::PhantomData,
        })
    }

    /// A new reference (for storing beyond the call).
    fn clone_arc(p: *const Self) -> Result<Self::Ptr> {
        Self::borrow(p).map(|b| Self::Ptr::clone(&b))
    }

    /// Hands a reference to C.
    fn into_raw(ptr: Self::Ptr) -> *mut Self {
        Counted::into_raw(ptr) as *mut Self
    }

    /// A borrowed pointer to an object the library keeps alive.
    fn as_ptr(ptr: &Self::Ptr) -> *mut Self {
        Counted::as_ptr(ptr) as *mut Self
    }

    /// Drops the caller's reference. NULL is a no-op.
    fn release(p: *const Self) -> Result<()> {
        if p.is_null() {
            return Ok(());
        }
        let b = Self::borrow(p)?;
        drop(ManuallyDrop::into_inner(b.ptr));
        Ok(())
    }
}

/// Runs `f` on the object behind `p`, then drops the caller's reference; returns NULL
/// (the `x = sb_unsubscribe(x)` idiom). Failures become the last error.
pub(crate) fn act_and_release<H: Handle>(
    p: *mut H,
    f: impl FnOnce(&H::Ptr) -> Result<()>,
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

/// A checked, borrowed handle; derefs to the counted pointer so `self: &Arc<Self>`
/// methods work.
pub(crate) struct Borrowed<'a, P: Deref> {
    ptr: ManuallyDrop<P>,
    _life: std::marker::PhantomData<&'a P::Target>,
}

impl<P: Deref> Deref for Borrowed<'_, P> {
    type Target = P;
    fn deref(&self) -> &P {
        &self.ptr
    }
}

/// Reads a name argument: non-NULL, UTF-8.
pub(crate) fn str_arg<'a>(what: &str, p: *const c_char) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null; the caller promises a NUL-terminated string valid for the call.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    // Names and ids are almost always ASCII, and short: checking that is a fraction of
    // the general UTF-8 validation, which was a tenth of a cache get's instructions.
    if bytes.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::error::{last_error_code, SB_E_INTERNAL, SB_E_INVAL, SB_OK};

    fn last_text() -> String {
        // SAFETY: last_error_ptr is never NULL and NUL-terminated.
        unsafe { CStr::from_ptr(crate::error::last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_caught_panic_is_an_internal_error() {
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let code: c_int = boundary(|| panic!("boom"));
        let ptr: *mut u8 = boundary(|| panic!("boom"));
        std::panic::set_hook(quiet);
        assert_eq!(code, SB_E_INTERNAL);
        assert!(ptr.is_null());
        assert_eq!(last_error_code(), SB_E_INTERNAL);
        assert!(last_text().contains("boom"), "{}", last_text());
    }

    #[test]
    fn the_code_is_that_of_the_latest_call() {
        let failed: c_int = boundary(|| fail_code(Error::invalid("bad")));
        assert_eq!(failed, SB_E_INVAL);
        assert_eq!(last_error_code(), SB_E_INVAL);
        let ok: c_int = boundary(|| SB_OK);
        assert_eq!(ok, SB_OK);
        assert_eq!(last_error_code(), SB_OK);
        // The text stays until the next failure.
        assert_eq!(last_text(), "bad");
    }

    #[test]
    fn a_nested_call_reports_its_own_outcome_and_keeps_the_outer_one() {
        // An outer call fails, then runs user code (a dtor, a callback) that calls the
        // library successfully: inside, the code is the nested call's; once the outer call
        // returns, its own failure.
        let outer: c_int = boundary(|| {
            set_last_error(&Error::invalid("outer"));
            let _: c_int = boundary(|| SB_OK);
            assert_eq!(last_error_code(), SB_OK);
            SB_E_INVAL
        });
        assert_eq!(outer, SB_E_INVAL);
        assert_eq!(last_error_code(), SB_E_INVAL);
        // An outer call succeeds around a nested failure: success.
        let _: c_int = boundary(|| {
            let _: c_int = boundary(|| fail_code(Error::invalid("inner")));
            assert_eq!(last_error_code(), SB_E_INVAL);
            SB_OK
        });
        assert_eq!(last_error_code(), SB_OK);
    }
}
