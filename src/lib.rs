//! switchboard: a typed, refcounted message bus for telephony software.
//!
//! The safe Rust core lives in the modules below; `ffi` is the thin C skin over it
//! (`include/switchboard.h`). See README.md for the C API and its guarantees.

pub mod cache;
pub mod caching_topic;
pub mod eid;
pub mod error;
pub mod filter;
mod fork;
pub mod forward;
pub mod log;
mod mailbox;
pub mod message;
pub mod message_type;
mod names;
pub mod pool;
pub mod router;
mod small_list;
pub mod subscription;
mod sync;
pub mod topic;
pub mod topic_pool;
mod waits;

pub mod ffi;

pub use cache::{Cache, CacheEntry};
pub use caching_topic::{CacheUpdate, CachingTopic};
pub use eid::Eid;
pub use error::{Error, ErrorKind, Result};
pub use forward::Forward;
pub use mailbox::{Kind, Overflow};
pub use message::{Message, Payload};
pub use message_type::MessageType;
pub use router::Router;
pub use subscription::{Callback, Subscription, SubscriptionChange};
pub use topic::Topic;
pub use topic_pool::TopicPool;
