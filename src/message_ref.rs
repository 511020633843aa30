//! The counted reference to a message: what `Arc<Message>` would be, minus the weak
//! count nothing uses, in a block from the message block cache (`message_block`) instead
//! of a fresh allocation per message.
//!
//! Layout: the count, then the message. A C `sb_message *` points at the message, so
//! the block starts `MESSAGE_OFFSET` bytes before it.

use crate::message::Message;
use crate::message_block::block_cache;
use std::alloc::Layout;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

#[repr(C)]
struct Counted {
    refs: AtomicUsize,
    msg: Message,
}

const MESSAGE_OFFSET: usize = std::mem::offset_of!(Counted, msg);

block_cache!(
    static BLOCKS: Counted;
);

/// Above this many references a clone aborts, as `Arc` does: a count that could wrap
/// would free a message still in use.
const MAX_REFS: usize = isize::MAX as usize;

/// A counted reference to an immutable message.
pub struct MessageRef {
    ptr: NonNull<Counted>,
}

// SAFETY: the message is immutable and Send + Sync (see `Message`); the count is atomic.
unsafe impl Send for MessageRef {}
// SAFETY: as above.
unsafe impl Sync for MessageRef {}

impl MessageRef {
    /// Moves `msg` into a block of its own, with one reference (the returned one).
    pub(crate) fn new(msg: Message) -> MessageRef {
        let layout = Layout::new::<Counted>();
        let block = BLOCKS
            .alloc()
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let ptr = block.cast::<Counted>();
        // SAFETY: a fresh block with Counted's layout, owned by nobody else.
        unsafe {
            ptr.as_ptr().write(Counted {
                refs: AtomicUsize::new(1),
                msg,
            })
        };
        MessageRef { ptr }
    }

    fn counted(&self) -> &Counted {
        // SAFETY: this reference keeps the block alive and initialised.
        unsafe { self.ptr.as_ref() }
    }

    /// Whether both refer to the same message.
    pub fn ptr_eq(a: &MessageRef, b: &MessageRef) -> bool {
        a.ptr == b.ptr
    }

    /// The message's address (what C sees), without touching the count.
    pub fn as_ptr(this: &MessageRef) -> *const Message {
        &this.counted().msg
    }

    /// Hands this reference over as the message's address (for C, or a ring slot).
    pub fn into_raw(this: MessageRef) -> *const Message {
        let p = MessageRef::as_ptr(&this);
        std::mem::forget(this);
        p
    }

    /// Takes back a reference `into_raw` handed over.
    ///
    /// # Safety
    /// `p` came from `into_raw` (or is `as_ptr` of a message whose reference the caller
    /// owns and gives up), and that reference is not used again.
    pub unsafe fn from_raw(p: *const Message) -> MessageRef {
        // SAFETY: `p` points at the `msg` field of a live Counted (the caller's promise),
        // which starts MESSAGE_OFFSET bytes earlier in the same block.
        let c = unsafe { p.cast::<u8>().sub(MESSAGE_OFFSET) }.cast::<Counted>();
        MessageRef {
            // SAFETY: derived from a non-null message pointer within its block.
            ptr: unsafe { NonNull::new_unchecked(c.cast_mut()) },
        }
    }

    /// Adds a reference to the message at `p`, returning it as a MessageRef.
    ///
    /// # Safety
    /// `p` points at a live message (some reference keeps it alive during the call).
    pub unsafe fn clone_from_raw(p: *const Message) -> MessageRef {
        // SAFETY: the caller's promise; ManuallyDrop keeps the borrowed reference's
        // count untouched.
        let borrowed = std::mem::ManuallyDrop::new(unsafe { MessageRef::from_raw(p) });
        MessageRef::clone(&borrowed)
    }

    /// The number of references (tests and diagnostics; racy by nature).
    pub fn ref_count(this: &MessageRef) -> usize {
        this.counted().refs.load(Ordering::Relaxed)
    }
}

impl Clone for MessageRef {
    fn clone(&self) -> MessageRef {
        // Relaxed, as Arc: a new reference is made from an existing one, which already
        // orders everything the new holder may read.
        let old = self.counted().refs.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFS {
            std::process::abort();
        }
        MessageRef { ptr: self.ptr }
    }
}

impl Drop for MessageRef {
    fn drop(&mut self) {
        if self.counted().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Pairs with the other holders' Release decrements: their uses of the message
        // happen before its destruction. An acquire load of the count rather than a
        // fence, as std's Arc does under ThreadSanitizer, which does not model fences;
        // on x86 neither costs an instruction.
        self.counted().refs.load(Ordering::Acquire);
        // SAFETY: this was the last reference: nobody else can reach the block. The
        // message (its payload's dtor included) is dropped exactly once, then the block
        // goes back to the cache it came from.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            BLOCKS.free(self.ptr.cast());
        }
    }
}

impl Deref for MessageRef {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.counted().msg
    }
}

impl std::fmt::Debug for MessageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::message::Payload;
    use crate::message_type::MessageType;
    use std::sync::atomic::AtomicUsize;

    static DTORS: AtomicUsize = AtomicUsize::new(0);
    unsafe extern "C" fn count_dtor(_: *mut std::ffi::c_void) {
        DTORS.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_message_block_is_64_bytes_at_most() {
        // The count and the message: what a subscriber reads fits in one cache line's size.
        assert!(
            std::mem::size_of::<Counted>() <= 64,
            "{}",
            std::mem::size_of::<Counted>()
        );
    }

    #[test]
    fn the_last_reference_runs_the_dtor_once_on_any_thread() {
        let ty = MessageType::builtin("test/message_ref");
        let before = DTORS.load(Ordering::SeqCst);
        let m = Message::new(
            &ty,
            Payload::Raw {
                data: std::ptr::null_mut(),
                dtor: Some(count_dtor),
            },
        );
        let copies: Vec<MessageRef> = (0..8).map(|_| m.clone()).collect();
        assert_eq!(MessageRef::ref_count(&m), 9);
        let raw = MessageRef::into_raw(m);
        let threads: Vec<_> = copies
            .into_iter()
            .map(|c| std::thread::spawn(move || drop(c)))
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(DTORS.load(Ordering::SeqCst), before);
        // SAFETY: `raw` is the reference into_raw handed over.
        let back = unsafe { MessageRef::from_raw(raw) };
        assert_eq!(MessageRef::ref_count(&back), 1);
        assert!(std::ptr::eq(MessageRef::as_ptr(&back), raw));
        drop(back);
        assert_eq!(DTORS.load(Ordering::SeqCst), before + 1);
    }
}
