//! Error codes and the per-thread "last error" text that the C API reports.

use std::cell::{Cell, RefCell};
use std::fmt;

/// Success.
pub const SB_OK: i32 = 0;
/// NULL or otherwise invalid argument.
pub const SB_E_INVAL: i32 = -1;
/// Out of memory.
pub const SB_E_NOMEM: i32 = -2;
/// The message type was declined.
pub const SB_E_DECLINED: i32 = -3;
/// The object is in the wrong state (already unsubscribed, cancelled, ...).
pub const SB_E_STATE: i32 = -4;
/// A join would wait on the calling thread itself.
pub const SB_E_DEADLOCK: i32 = -5;
/// A cluster call waited longer than its configured time.
pub const SB_E_TIMEOUT: i32 = -6;
/// The cluster's servers are unreachable, refused us, or authentication / TLS failed.
pub const SB_E_UNAVAILABLE: i32 = -7;
/// A bug of the library caught at the boundary (a panic); please report it.
pub const SB_E_INTERNAL: i32 = -8;

/// What went wrong, as a code the C side can switch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    NoMemory,
    Declined,
    State,
    Deadlock,
    Timeout,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn code(self) -> i32 {
        match self {
            ErrorKind::Invalid => SB_E_INVAL,
            ErrorKind::NoMemory => SB_E_NOMEM,
            ErrorKind::Declined => SB_E_DECLINED,
            ErrorKind::State => SB_E_STATE,
            ErrorKind::Deadlock => SB_E_DEADLOCK,
            ErrorKind::Timeout => SB_E_TIMEOUT,
            ErrorKind::Unavailable => SB_E_UNAVAILABLE,
            ErrorKind::Internal => SB_E_INTERNAL,
        }
    }
}

/// An error of the safe API: a kind plus a human-readable reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Invalid, message)
    }
    pub fn state(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::State, message)
    }
    pub fn code(&self) -> i32 {
        self.kind.code()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Static name of a code, for `sb_strerror`.
pub fn strerror(code: i32) -> &'static std::ffi::CStr {
    match code {
        SB_OK => c"success",
        SB_E_INVAL => c"invalid argument",
        SB_E_NOMEM => c"out of memory",
        SB_E_DECLINED => c"message type declined",
        SB_E_STATE => c"object in the wrong state",
        SB_E_DEADLOCK => c"operation would deadlock",
        SB_E_TIMEOUT => c"timed out",
        SB_E_UNAVAILABLE => c"cluster servers unavailable",
        SB_E_INTERNAL => c"internal error of the library",
        _ => c"unknown error code",
    }
}

/// Room for the last error text. A fixed per-thread buffer, so the pointer
/// `sb_last_error()` returns stays valid for the thread's life; only its text changes.
const LAST_ERROR_CAP: usize = 512;

thread_local! {
    static LAST_ERROR: RefCell<[u8; LAST_ERROR_CAP]> = const { RefCell::new([0; LAST_ERROR_CAP]) };
}

/// The calling thread's error codes, in one thread-local cell: an exported call's start
/// and end each cost one lookup (in a shared library every thread-local access is a
/// call into the dynamic loader, and three exported calls per message add up).
#[derive(Clone, Copy)]
struct Codes {
    /// What `sb_last_error_code()` returns: the code of the latest exported call on this
    /// thread (0 when it succeeded).
    last: i32,
    /// The failure recorded by the exported call running right now on this thread (the
    /// innermost one, when a callback calls the library from inside a library call).
    own: i32,
}

const NO_FAILURE: Codes = Codes {
    last: SB_OK,
    own: SB_OK,
};

thread_local! {
    static CODES: Cell<Codes> = const { Cell::new(NO_FAILURE) };
}

/// The calling thread's last error code (0 after a call that succeeded).
pub fn last_error_code() -> i32 {
    CODES.try_with(|c| c.get().last).unwrap_or(SB_OK)
}

/// Runs an exported call's `body`: its outcome starts as success, and afterwards the
/// last error code is the call's own failure (0 when it recorded none, whatever the calls
/// nested in it did, e.g. from a callback); the enclosing call's own failure, if any, is
/// kept for when that one returns. One lookup of the thread-local cell for both ends: in
/// a shared library each lookup is a call into the loader, and a publish makes three
/// exported calls.
#[inline]
pub(crate) fn in_call<R>(body: impl FnOnce() -> R) -> R {
    // The cell is const-initialised and has no destructor, so it is never torn down and
    // `with` cannot fail, even while the thread exits.
    CODES.with(|c| {
        let saved = c.replace(NO_FAILURE).own;
        let r = body();
        let mine = c.get().own;
        c.set(Codes {
            last: mine,
            own: saved,
        });
        r
    })
}

/// Records `err` as the calling thread's last error (truncated to the buffer).
pub fn set_last_error(err: &Error) {
    let code = err.code();
    let _ = CODES.try_with(|c| {
        c.set(Codes {
            last: code,
            own: code,
        })
    });
    let text = err.message.as_bytes();
    // try_with: a thread being torn down has no TLS left; losing the text is harmless.
    let _ = LAST_ERROR.try_with(|slot| {
        let mut buf = slot.borrow_mut();
        let mut n = text.len().min(LAST_ERROR_CAP - 1);
        while n > 0 && !err.message.is_char_boundary(n) {
            n -= 1;
        }
        buf[..n].copy_from_slice(&text[..n]);
        buf[n] = 0;
        // NULs inside the text would cut it short; make them visible instead.
        buf[..n]
            .iter_mut()
            .filter(|b| **b == 0)
            .for_each(|b| *b = b'?');
    });
}

/// Pointer to the calling thread's last error text (never NULL).
pub fn last_error_ptr() -> *const std::ffi::c_char {
    LAST_ERROR
        .try_with(|slot| slot.as_ptr().cast::<std::ffi::c_char>().cast_const())
        .unwrap_or(c"".as_ptr())
}
