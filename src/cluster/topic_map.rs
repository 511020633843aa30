//! The node's shared topics by name, counting its changes: the delivery thread keeps
//! what each arrival's subject resolved to (`inbound::Routes`) and starts over when the
//! count moved, instead of looking the topic up under the lock for every arrival.

use super::SharedTopic;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) struct TopicMap {
    map: RwLock<HashMap<String, SharedTopic>>,
    changes: AtomicU64,
}

impl TopicMap {
    pub(crate) fn new(map: HashMap<String, SharedTopic>) -> TopicMap {
        TopicMap {
            map: RwLock::new(map),
            changes: AtomicU64::new(0),
        }
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, HashMap<String, SharedTopic>> {
        self.map.read()
    }

    /// The map to change; the change count moves when the guard goes (every write
    /// counts, changed or not).
    pub(crate) fn write(&self) -> TopicMapWrite<'_> {
        TopicMapWrite {
            guard: self.map.write(),
            changes: &self.changes,
        }
    }

    /// How many writes there were. A reader that saw the same count before and after
    /// looking something up may keep what it found until the count moves.
    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }
}

pub(crate) struct TopicMapWrite<'a> {
    guard: RwLockWriteGuard<'a, HashMap<String, SharedTopic>>,
    changes: &'a AtomicU64,
}

impl Deref for TopicMapWrite<'_> {
    type Target = HashMap<String, SharedTopic>;
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl DerefMut for TopicMapWrite<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}

impl Drop for TopicMapWrite<'_> {
    fn drop(&mut self) {
        // Still under the lock: a reader that looks up after taking the count either
        // sees the change or finds the count moved when it next looks.
        self.changes.fetch_add(1, Ordering::Release);
    }
}
