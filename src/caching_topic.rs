//! Caching topics: a synchronous subscription to an original topic that keeps a cache
//! current and republishes each change as an `sb_cache_update` on a topic of its own.

use crate::cache::{Cache, Change};
use crate::error::Result;
use crate::mailbox::Kind;
use crate::message::{Message, MessageRef};
use crate::message_type::{MessageType, TypeRef, DEAD_MAGIC};
use crate::subscription::{change_type, Subscription, SubscriptionChange};
use crate::topic::Topic;
use std::sync::{Arc, LazyLock};

pub(crate) const CACHING_TOPIC_MAGIC: u32 = 0x5342_4354; // "SBCT"

/// Type of the (old, new) updates a caching topic publishes.
pub fn update_type() -> &'static Arc<MessageType> {
    static TYPE: LazyLock<Arc<MessageType>> =
        LazyLock::new(|| MessageType::builtin("sb_cache_update"));
    &TYPE
}

/// Type of clear messages (`sb_cache_clear_create`).
pub fn clear_type() -> &'static Arc<MessageType> {
    static TYPE: LazyLock<Arc<MessageType>> =
        LazyLock::new(|| MessageType::builtin("sb_cache_clear"));
    &TYPE
}

/// C view of an update (`sb_cache_update`).
#[repr(C)]
pub struct UpdateView {
    pub snapshot_type: *const MessageType,
    pub old_snapshot: *const Message,
    pub new_snapshot: *const Message,
}

/// Payload of an update message; `view` first, so the payload's address is the C view's.
#[repr(C)]
pub struct CacheUpdate {
    view: UpdateView,
    /// Not counted, like a message's own type: types live as long as the process (see
    /// `message_type`), and a count bumped here by the publisher and dropped by the
    /// subscriber's thread would bounce a shared cache line on every update.
    snapshot_type: TypeRef,
    old: Option<MessageRef>,
    new: Option<MessageRef>,
}

// Every update is made on the publishing thread and dropped on the subscriber's: it must
// stay small enough for the room of its message's block (`message_ref`), not a malloc
// each.
const _: () = assert!(crate::message_ref::fits_inline::<CacheUpdate>());

// SAFETY: the view points into the Arcs owned by the same immutable value.
unsafe impl Send for CacheUpdate {}
// SAFETY: as above.
unsafe impl Sync for CacheUpdate {}

fn opt_ptr(m: &Option<MessageRef>) -> *const Message {
    m.as_ref().map_or(std::ptr::null(), MessageRef::as_ptr)
}

impl CacheUpdate {
    pub fn message(
        snapshot_type: &Arc<MessageType>,
        old: Option<MessageRef>,
        new: Option<MessageRef>,
    ) -> MessageRef {
        let update = CacheUpdate {
            view: UpdateView {
                snapshot_type: Arc::as_ptr(snapshot_type),
                old_snapshot: opt_ptr(&old),
                new_snapshot: opt_ptr(&new),
            },
            snapshot_type: TypeRef::new(snapshot_type),
            old,
            new,
        };
        Message::with_value(update_type(), update)
    }
    pub fn snapshot_type(&self) -> &Arc<MessageType> {
        &self.snapshot_type
    }
    pub fn old(&self) -> Option<&MessageRef> {
        self.old.as_ref()
    }
    pub fn new_snapshot(&self) -> Option<&MessageRef> {
        self.new.as_ref()
    }
}

/// Payload of a clear message: the snapshot whose entry goes.
pub struct CacheClear {
    snapshot: MessageRef,
}

impl CacheClear {
    /// The snapshot whose entry goes.
    pub fn snapshot(&self) -> &MessageRef {
        &self.snapshot
    }
}

/// A message that, published to an original topic, removes `snapshot`'s entry.
pub fn clear_message(snapshot: &MessageRef) -> MessageRef {
    Message::with_value(
        clear_type(),
        CacheClear {
            snapshot: MessageRef::clone(snapshot),
        },
    )
}

#[repr(C)]
pub struct CachingTopic {
    magic: u32,
    topic: Arc<Topic>,
    cache: Arc<Cache>,
    sub: Arc<Subscription>,
}

impl CachingTopic {
    /// Subscribes synchronously to `original`, so `cache` is current when a publish
    /// returns. Changes are republished on a topic of its own, named "<original>-cached"
    /// ("<original>-cached-2", ... while other caching topics of `original` live).
    pub fn create(original: &Arc<Topic>, cache: &Arc<Cache>) -> Result<Arc<CachingTopic>> {
        let topic = Topic::create_distinct(&format!("{}-cached", original.name()))?;
        let (t, c, o) = (Arc::clone(&topic), Arc::clone(cache), Arc::clone(original));
        let callback = Box::new(move |sub: &Arc<Subscription>, msg: &MessageRef| {
            handle(sub, msg, &t, &c, &o);
        });
        let sub = Subscription::subscribe(original, Kind::Synchronous, callback)?;
        Ok(Arc::new(CachingTopic {
            magic: CACHING_TOPIC_MAGIC,
            topic,
            cache: Arc::clone(cache),
            sub,
        }))
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == CACHING_TOPIC_MAGIC
    }
    /// The topic updates are published on.
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }
    pub fn subscription(&self) -> &Arc<Subscription> {
        &self.sub
    }
}

impl Drop for CachingTopic {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

fn publish_change(topic: &Topic, change: Change<'_>) {
    if change.old.is_some() || change.new.is_some() {
        topic.publish(&CacheUpdate::message(
            change.snapshot_type,
            change.old,
            change.new,
        ));
    }
    if let Some((old, new)) = change.aggregate {
        topic.publish(&CacheUpdate::message(change.snapshot_type, old, new));
    }
}

/// The caching subscription's callback.
fn handle(
    sub: &Arc<Subscription>,
    msg: &MessageRef,
    topic: &Topic,
    cache: &Cache,
    original: &Arc<Topic>,
) {
    let ty = msg.message_type();
    if Arc::ptr_eq(ty, change_type()) {
        if sub.is_final_message(msg) {
            return;
        }
        // An Unsubscribe retires the Subscribe snapshot cached under the same id, so the
        // cache does not grow with every subscription ever made.
        if let Some(change) = msg.value::<SubscriptionChange>() {
            if change.is_unsubscribe() {
                if let (Some(id), Some(eid)) = (cache.id_of(msg), msg.eid()) {
                    cache.remove(ty, &id, eid, original);
                }
                return;
            }
        }
    } else if Arc::ptr_eq(ty, clear_type()) {
        if let Some(clear) = msg.value::<CacheClear>() {
            if let Some(change) = cache.update(&clear.snapshot, true, original) {
                publish_change(topic, change);
            }
        }
        return;
    }
    if let Some(change) = cache.update(msg, false, original) {
        publish_change(topic, change);
    }
}
