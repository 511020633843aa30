//! switchboard: a typed, refcounted message bus for telephony software.
//!
//! The safe Rust core lives in the modules below; `ffi` is the thin C skin over it
//! (`include/switchboard.h`). See README.md for the C API and its guarantees.

mod aggregate_outbox;
pub mod cache;
mod cache_index;
pub mod caching_topic;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod eid;
pub mod error;
pub mod filter;
mod fork;
pub mod forward;
pub mod log;
mod mailbox;
pub mod message;
mod message_block;
mod message_ref;
pub mod message_type;
mod names;
pub mod pool;
mod ring;
pub mod router;
mod small_list;
mod split_list;
pub mod stats;
pub mod subscription;
mod sync;
pub mod tap;
// A `no-stats` build times no callbacks.
#[cfg_attr(feature = "no-stats", allow(dead_code))]
mod tick_clock;
pub mod timer;
mod timer_wheel;
pub mod topic;
pub mod topic_pool;
#[cfg(not(loom))]
mod valgrind;
mod waits;
pub mod worker_group;

pub mod ffi;

pub use cache::{Cache, CacheEntry};
pub use caching_topic::{CacheUpdate, CachingTopic};
pub use eid::Eid;
pub use error::{Error, ErrorKind, Result};
pub use forward::Forward;
pub use mailbox::{Kind, Overflow};
pub use message::{Message, MessageRef, Payload};
pub use message_type::MessageType;
pub use router::Router;
pub use subscription::{Callback, Subscription, SubscriptionChange};
pub use timer::Timer;
pub use topic::Topic;
pub use topic_pool::TopicPool;

/// The sizes W8's memory figure rests on (one topic, one forward, one subscription per
/// unit): glibc serves an `Arc` of n bytes (n + 16 with the counts) from a block of
/// n + 24 rounded up to 16, so crossing one of these bounds costs 16 bytes per object.
#[cfg(all(test, not(loom), target_pointer_width = "64"))]
mod layout_sizes {
    use std::mem::size_of;

    #[test]
    fn objects_stay_within_their_allocator_classes() {
        assert!(
            size_of::<crate::Topic>() <= 72,
            "{}",
            size_of::<crate::Topic>()
        );
        assert!(
            size_of::<crate::Forward>() <= 24,
            "{}",
            size_of::<crate::Forward>()
        );
        assert!(
            size_of::<crate::Subscription>() <= 168,
            "{}",
            size_of::<crate::Subscription>()
        );
    }
}
