//! The counted reference to a message: what `Arc<Message>` would be, minus the weak
//! count nothing uses, in a block from the message block cache (`message_block`) instead
//! of a fresh allocation per message.
//!
//! Layout: the count, then the message. A C `sb_message *` points at the message, so
//! the block starts `MESSAGE_OFFSET` bytes before it.
//!
//! The library's own messages (cache updates, cache clears, subscription changes) carry
//! a small Rust value: it goes in the same block, in room after the message (a block of
//! a second cache, `WIDE_BLOCKS`), so the publisher writes one block and the subscriber
//! reads one, instead of a message block and a value block each (`InlineValue`).

use crate::message::{Message, Payload};
use crate::message_block::block_cache;
use std::alloc::Layout;
use std::any::Any;
use std::ops::Deref;
use std::ptr::{addr_of_mut, NonNull};
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

/// Room for an inline value: the largest kept there (a cache update is 48 bytes).
#[repr(C, align(16))]
struct Room([u8; 64]);

/// A message block with room for its payload's value after the message.
#[repr(C)]
struct CountedWithRoom {
    counted: Counted,
    room: Room,
}

block_cache!(
    static WIDE_BLOCKS: CountedWithRoom;
);

/// Whether a `T` fits in a wide block's room.
pub(crate) const fn fits_inline<T>() -> bool {
    std::mem::size_of::<T>() <= std::mem::size_of::<Room>()
        && std::mem::align_of::<T>() <= std::mem::align_of::<Room>()
}

/// A message's value in the room of its own block (`Payload::Inline`): dropped in place
/// with the message; the block goes back to `WIDE_BLOCKS` with it.
pub struct InlineValue {
    ptr: NonNull<dyn Any + Send + Sync>,
}

// SAFETY: the value is Send + Sync (`MessageRef::with_inline`'s bound) and owned by this
// handle alone.
unsafe impl Send for InlineValue {}
// SAFETY: as above; shared access is to an immutable `dyn Any + Sync`.
unsafe impl Sync for InlineValue {}

impl Deref for InlineValue {
    type Target = dyn Any + Send + Sync;
    fn deref(&self) -> &Self::Target {
        // SAFETY: the value was written before the message was made and lives, in the
        // message's own block, until the message is dropped.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for InlineValue {
    fn drop(&mut self) {
        // SAFETY: the value is initialised and owned by this handle; only its memory's
        // release is left to the message's last reference (`MessageRef::drop`).
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) }
    }
}

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

    /// A message whose payload is `value`, kept in the message's own block
    /// (`Payload::Inline`); `make` builds the message around that payload. `value` comes
    /// back when it does not fit (`fits_inline`).
    pub(crate) fn with_inline<T: Any + Send + Sync>(
        value: T,
        make: impl FnOnce(Payload) -> Message,
    ) -> Result<MessageRef, T> {
        if !fits_inline::<T>() {
            return Err(value);
        }
        let block = WIDE_BLOCKS
            .alloc()
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Layout::new::<CountedWithRoom>()))
            .cast::<CountedWithRoom>();
        // SAFETY: a fresh block of CountedWithRoom's layout, owned by nobody else; the
        // room is large and aligned enough for T (`fits_inline`). The value is written
        // first, so the payload that points at it is never dangling; `make` builds a
        // message and runs no user code.
        unsafe {
            let room = addr_of_mut!((*block.as_ptr()).room).cast::<T>();
            room.write(value);
            let ptr: NonNull<dyn Any + Send + Sync> = NonNull::new_unchecked(room);
            let msg = make(Payload::Inline(InlineValue { ptr }));
            addr_of_mut!((*block.as_ptr()).counted).write(Counted {
                refs: AtomicUsize::new(1),
                msg,
            });
        }
        Ok(MessageRef { ptr: block.cast() })
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
        // An inline payload lives in a wide block (`with_inline`), every other message
        // in a plain one.
        let wide = matches!(self.counted().msg.payload(), Payload::Inline(_));
        // SAFETY: this was the last reference: nobody else can reach the block. The
        // message (its payload's dtor or inline value included) is dropped exactly once,
        // then the block goes back to the cache it came from.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            if wide {
                WIDE_BLOCKS.free(self.ptr.cast());
            } else {
                BLOCKS.free(self.ptr.cast());
            }
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
    use crate::message_type::MessageType;
    use std::sync::Arc;

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

    struct Tracked(Arc<AtomicUsize>, [u64; 4]);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_inline_value_is_read_in_the_message_block_and_dropped_once() {
        let ty = MessageType::builtin("test/message_ref/inline");
        let drops = Arc::new(AtomicUsize::new(0));
        let m = Message::with_value(&ty, Tracked(Arc::clone(&drops), [1, 2, 3, 4]));
        assert!(matches!(m.payload(), Payload::Inline(_)));
        let v = m.value::<Tracked>().expect("same type");
        assert_eq!(v.1, [1, 2, 3, 4]);
        assert!(m.value::<u32>().is_none());
        // What C reads is the value, right after the message in the same block.
        let msg_at = MessageRef::as_ptr(&m) as usize;
        let data_at = m.data_ptr() as usize;
        assert_eq!(data_at, v as *const Tracked as usize);
        assert!(data_at > msg_at);
        assert!(data_at + std::mem::size_of::<Tracked>() <= msg_at + 128);
        let copy = m.clone();
        drop(m);
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        // dropped on another thread, as a subscriber drops an update
        std::thread::spawn(move || drop(copy)).join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_value_too_large_for_the_room_is_boxed() {
        assert!(fits_inline::<[u8; 64]>());
        assert!(!fits_inline::<[u8; 65]>());
        let ty = MessageType::builtin("test/message_ref/large");
        let small = Message::with_value(&ty, [3u64; 8]);
        assert!(matches!(small.payload(), Payload::Inline(_)));
        assert_eq!(small.value::<[u64; 8]>(), Some(&[3u64; 8]));
        let large = Message::with_value(&ty, [5u64; 9]);
        assert!(matches!(large.payload(), Payload::Value(_)));
        assert_eq!(large.value::<[u64; 9]>(), Some(&[5u64; 9]));
        assert_eq!(
            large.data_ptr().cast_const(),
            large.value::<[u64; 9]>().unwrap() as *const _ as *const _
        );
    }
}
