//! The small Rust values that the library's own messages carry (cache updates, cache
//! clears, subscription changes), in blocks of a block cache (`message_block`) instead of
//! a `Box` each.
//!
//! A cache update is made by the publishing thread and dropped by the subscriber's, like
//! the message around it: through the system allocator its value cost a malloc on one
//! side and a cross-thread free on the other for every update, on top of the message's
//! own block. From a block cache both sides take and give back blocks a magazine at a
//! time, as messages do. Values too large or too aligned for a block stay boxed
//! (`Message::with_value` decides, at compile time).

use crate::message_block::block_cache;
use std::any::Any;
use std::ops::Deref;
use std::ptr::NonNull;

/// A block's room: the largest value kept here (a cache update is 48 bytes).
#[repr(C, align(16))]
struct Room([u8; 64]);

block_cache!(
    static VALUE_BLOCKS: Room;
);

/// Whether a `T` fits in a block.
pub(crate) const fn fits<T>() -> bool {
    std::mem::size_of::<T>() <= std::mem::size_of::<Room>()
        && std::mem::align_of::<T>() <= std::mem::align_of::<Room>()
}

/// An owned value in a block: what `Box<dyn Any + Send + Sync>` is, for values that fit.
pub struct PooledValue {
    ptr: NonNull<dyn Any + Send + Sync>,
}

// SAFETY: the value is Send + Sync (the constructor's bound) and owned by this handle
// alone; the block cache may be given blocks back from any thread.
unsafe impl Send for PooledValue {}
// SAFETY: as above; shared access is to an immutable `dyn Any + Sync`.
unsafe impl Sync for PooledValue {}

impl PooledValue {
    /// Moves `value` into a block; gives it back when it does not fit.
    pub(crate) fn new<T: Any + Send + Sync>(value: T) -> Result<PooledValue, T> {
        if !fits::<T>() {
            return Err(value);
        }
        let block = VALUE_BLOCKS
            .alloc()
            .unwrap_or_else(|| std::alloc::handle_alloc_error(std::alloc::Layout::new::<Room>()));
        let typed = block.cast::<T>();
        // SAFETY: a fresh block of Room's layout, owned by nobody else, large and aligned
        // enough for T (`fits`).
        unsafe { typed.as_ptr().write(value) };
        Ok(PooledValue { ptr: typed })
    }
}

impl Deref for PooledValue {
    type Target = dyn Any + Send + Sync;
    fn deref(&self) -> &Self::Target {
        // SAFETY: the value was written in `new` and lives until `drop`.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for PooledValue {
    fn drop(&mut self) {
        // SAFETY: the value is initialised and owned by this handle; after dropping it in
        // place, the block (which `new` took from VALUE_BLOCKS) is not used again.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            VALUE_BLOCKS.free(self.ptr.cast::<u8>());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counted(Arc<AtomicUsize>, [u64; 4]);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_value_that_fits_is_kept_read_and_dropped_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let v = PooledValue::new(Counted(Arc::clone(&drops), [1, 2, 3, 4]))
            .unwrap_or_else(|_| panic!("fits"));
        let c = v.downcast_ref::<Counted>().expect("same type");
        assert_eq!(c.1, [1, 2, 3, 4]);
        assert!(v.downcast_ref::<u32>().is_none());
        // dropped on another thread, as a subscriber drops an update
        std::thread::spawn(move || drop(v)).join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn messages_carry_small_values_in_blocks_and_large_ones_boxed() {
        use crate::message::{Message, Payload};
        use crate::message_type::MessageType;
        let ty = MessageType::create("value_block/test", None).unwrap();
        let small = Message::with_value(&ty, [3u64; 6]);
        assert!(matches!(small.payload(), Payload::Pooled(_)));
        assert_eq!(small.value::<[u64; 6]>(), Some(&[3u64; 6]));
        assert_eq!(
            small.data_ptr().cast_const(),
            small.value::<[u64; 6]>().unwrap() as *const _ as *const _
        );
        let large = Message::with_value(&ty, [5u64; 9]);
        assert!(matches!(large.payload(), Payload::Value(_)));
        assert_eq!(large.value::<[u64; 9]>(), Some(&[5u64; 9]));
    }

    #[test]
    fn a_value_too_large_is_given_back() {
        let big = [7u8; 65];
        assert!(!fits::<[u8; 65]>());
        assert!(fits::<[u8; 64]>());
        let back = PooledValue::new(big).err().expect("does not fit");
        assert_eq!(back, [7u8; 65]);
    }
}
