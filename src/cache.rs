//! Caches: the latest snapshot of every object, per node (eid), with an optional
//! aggregate across nodes.
//!
//! Entries are immutable values (`Arc<CacheEntry>`) replaced whole on every change, in a
//! map split into shards, each behind a short `RwLock`. A lookup holds a shard's read lock
//! only to clone an `Arc`; no lock is ever held while user code (id, calc, publish
//! functions) runs. Aggregates are computed on a snapshot of the entry and installed only
//! if the entry did not change meanwhile (else recomputed), so concurrent updates through
//! several caching topics never install a stale aggregate.

use crate::eid::Eid;
use crate::message::Message;
use crate::message_type::{MessageType, DEAD_MAGIC};
use crate::topic::Topic;
use parking_lot::RwLock;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

pub(crate) const CACHE_MAGIC: u32 = 0x5342_4341; // "SBCA"
pub(crate) const ENTRY_MAGIC: u32 = 0x5342_4345; // "SBCE"

/// Extracts an object's id from a snapshot; None: not cacheable.
pub type IdFn = Box<dyn Fn(&Arc<Message>) -> Option<String> + Send + Sync>;
/// Computes the aggregate of an entry after a change (`new_snapshot` None on a clear).
/// Returning the entry's current aggregate means "unchanged"; None means "no aggregate".
pub type CalcFn =
    Box<dyn Fn(&Arc<CacheEntry>, Option<&Arc<Message>>) -> Option<Arc<Message>> + Send + Sync>;
/// Publishes a changed aggregate to the original topic.
pub type AggregatePublishFn = Box<dyn Fn(&Arc<Topic>, &Arc<Message>) + Send + Sync>;

const SHARDS: usize = 16;

/// Every snapshot of one (type, id): the local one, remote ones by eid, the aggregate.
#[repr(C)]
pub struct CacheEntry {
    magic: u32,
    local: Option<Arc<Message>>,
    /// Sorted by eid.
    remote: Vec<Arc<Message>>,
    aggregate: Option<Arc<Message>>,
}

impl CacheEntry {
    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == ENTRY_MAGIC
    }
    pub fn local(&self) -> Option<&Arc<Message>> {
        self.local.as_ref()
    }
    pub fn remote(&self, idx: usize) -> Option<&Arc<Message>> {
        self.remote.get(idx)
    }
    pub fn remote_count(&self) -> usize {
        self.remote.len()
    }
    pub fn aggregate(&self) -> Option<&Arc<Message>> {
        self.aggregate.as_ref()
    }
    fn is_empty(&self) -> bool {
        self.local.is_none() && self.remote.is_empty()
    }
    fn snapshot_of(&self, eid: &Eid, local: bool) -> Option<&Arc<Message>> {
        if local {
            self.local.as_ref()
        } else {
            self.remote.iter().find(|m| m.eid() == Some(eid))
        }
    }
    /// Snapshots of every eid: local first, then remote.
    fn all(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.local.iter().chain(self.remote.iter())
    }

    /// A copy with the snapshot of `eid` replaced by `new` (None removes it).
    fn with(&self, eid: &Eid, local: bool, new: Option<Arc<Message>>) -> CacheEntry {
        let mut e = CacheEntry {
            magic: ENTRY_MAGIC,
            local: self.local.clone(),
            remote: self.remote.clone(),
            aggregate: self.aggregate.clone(),
        };
        if local {
            e.local = new;
        } else {
            e.remote.retain(|m| m.eid() != Some(eid));
            if let Some(m) = new {
                let at = e.remote.partition_point(|r| r.eid() < Some(eid));
                e.remote.insert(at, m);
            }
        }
        e
    }

    fn empty() -> CacheEntry {
        CacheEntry {
            magic: ENTRY_MAGIC,
            local: None,
            remote: Vec::new(),
            aggregate: None,
        }
    }
}

impl Drop for CacheEntry {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    type_id: u32,
    id: Box<str>,
}

type Shard = RwLock<HashMap<Key, Arc<CacheEntry>>>;

/// (old aggregate, new aggregate).
pub type AggregateChange = (Option<Arc<Message>>, Option<Arc<Message>>);

/// What one put or clear changed.
pub struct Change {
    pub snapshot_type: Arc<MessageType>,
    pub old: Option<Arc<Message>>,
    pub new: Option<Arc<Message>>,
    /// (old aggregate, new aggregate) when the aggregate changed.
    pub aggregate: Option<AggregateChange>,
}

#[repr(C)]
pub struct Cache {
    magic: u32,
    id_fn: IdFn,
    calc: Option<CalcFn>,
    publish: Option<AggregatePublishFn>,
    shards: Box<[Shard]>,
}

fn key_for(ty: &MessageType, id: &str) -> Key {
    Key {
        type_id: ty.id(),
        id: id.into(),
    }
}

impl Cache {
    pub fn new(id_fn: IdFn) -> Arc<Cache> {
        Cache::with_aggregate(id_fn, None, None)
    }

    pub fn with_aggregate(
        id_fn: IdFn,
        calc: Option<CalcFn>,
        publish: Option<AggregatePublishFn>,
    ) -> Arc<Cache> {
        Arc::new(Cache {
            magic: CACHE_MAGIC,
            id_fn,
            calc,
            publish,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        })
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == CACHE_MAGIC
    }

    fn shard(&self, key: &Key) -> &Shard {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    pub(crate) fn id_of(&self, msg: &Arc<Message>) -> Option<String> {
        (self.id_fn)(msg)
    }

    fn entry(&self, key: &Key) -> Option<Arc<CacheEntry>> {
        self.shard(key).read().get(key).cloned()
    }

    /// Stores `snapshot` (or, with `clear`, removes the snapshot of its eid). Returns what
    /// changed, or None when the message is not cacheable or nothing was there to clear.
    pub(crate) fn update(
        &self,
        snapshot: &Arc<Message>,
        clear: bool,
        original: &Arc<Topic>,
    ) -> Option<Change> {
        let eid = *snapshot.eid()?; // aggregates (no eid) are never cached
        let id = self.id_of(snapshot)?;
        let ty = snapshot.message_type();
        let key = key_for(ty, &id);
        let local = eid == Eid::default_eid();
        let (old, entry) = {
            let mut shard = self.shard(&key).write();
            let current = shard.get(&key).cloned();
            let base = current.as_deref();
            let old = base.and_then(|e| e.snapshot_of(&eid, local)).cloned();
            if clear && old.is_none() {
                return None;
            }
            let empty = CacheEntry::empty();
            let new_entry =
                base.unwrap_or(&empty)
                    .with(&eid, local, (!clear).then(|| Arc::clone(snapshot)));
            let new_entry = Arc::new(new_entry);
            if new_entry.is_empty() && self.calc.is_none() {
                shard.remove(&key);
            } else {
                shard.insert(key.clone(), Arc::clone(&new_entry));
            }
            (old, new_entry)
        };
        let aggregate = self.calc.as_ref().and_then(|calc| {
            self.recompute_aggregate(calc, &key, entry, (!clear).then_some(snapshot))
        });
        if let (Some((_, Some(agg))), Some(publish)) = (&aggregate, &self.publish) {
            publish(original, agg);
        } else if let (Some((_, Some(agg))), None) = (&aggregate, &self.publish) {
            original.publish(agg);
        }
        Some(Change {
            snapshot_type: Arc::clone(ty),
            old,
            new: (!clear).then(|| Arc::clone(snapshot)),
            aggregate,
        })
    }

    /// Runs `calc` outside any lock and installs its result if the entry is unchanged.
    fn recompute_aggregate(
        &self,
        calc: &CalcFn,
        key: &Key,
        mut entry: Arc<CacheEntry>,
        new_snapshot: Option<&Arc<Message>>,
    ) -> Option<AggregateChange> {
        loop {
            let old_agg = entry.aggregate.clone();
            let new_agg = calc(&entry, new_snapshot);
            let unchanged = match (&old_agg, &new_agg) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            let mut shard = self.shard(key).write();
            let current = shard.get(key).cloned();
            let same = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &entry));
            if !same {
                // Changed while calc ran: recompute on the newer entry (if any is left).
                drop(shard);
                entry = current?;
                continue;
            }
            if unchanged {
                if entry.is_empty() && entry.aggregate.is_none() {
                    shard.remove(key);
                }
                return None;
            }
            let next = CacheEntry {
                magic: ENTRY_MAGIC,
                local: entry.local.clone(),
                remote: entry.remote.clone(),
                aggregate: new_agg.clone(),
            };
            if next.is_empty() && next.aggregate.is_none() {
                shard.remove(key);
            } else {
                shard.insert(key.clone(), Arc::new(next));
            }
            return Some((old_agg, new_agg));
        }
    }

    /// Removes the snapshot of `eid` for (type, id) without publishing anything.
    pub(crate) fn remove(&self, ty: &MessageType, id: &str, eid: &Eid) {
        let key = key_for(ty, id);
        let mut shard = self.shard(&key).write();
        let Some(current) = shard.get(&key).cloned() else {
            return;
        };
        let next = current.with(eid, *eid == Eid::default_eid(), None);
        if next.is_empty() && next.aggregate.is_none() {
            shard.remove(&key);
        } else {
            shard.insert(key, Arc::new(next));
        }
    }

    /// The local snapshot (default eid) of (type, id).
    pub fn get(&self, ty: &MessageType, id: &str) -> Option<Arc<Message>> {
        self.entry(&key_for(ty, id))?.local.clone()
    }

    /// The snapshot of one eid, or the aggregate when `eid` is None.
    pub fn get_by_eid(
        &self,
        ty: &MessageType,
        id: &str,
        eid: Option<&Eid>,
    ) -> Option<Arc<Message>> {
        let entry = self.entry(&key_for(ty, id))?;
        match eid {
            None => entry.aggregate.clone(),
            Some(e) => entry.snapshot_of(e, *e == Eid::default_eid()).cloned(),
        }
    }

    /// Every snapshot (local and remote) of (type, id).
    pub fn get_all(&self, ty: &MessageType, id: &str) -> Vec<Arc<Message>> {
        self.entry(&key_for(ty, id))
            .map(|e| e.all().cloned().collect())
            .unwrap_or_default()
    }

    /// A point-in-time copy: every shard's read lock is held while the entries are
    /// copied out (a put changes one shard under its write lock, so no put is half-seen
    /// and none is seen out of order), then `pick` runs with no lock held.
    fn collect(
        &self,
        ty: Option<&MessageType>,
        mut pick: impl FnMut(&CacheEntry, &mut Vec<Arc<Message>>),
    ) -> Vec<Arc<Message>> {
        let entries: Vec<Arc<CacheEntry>> = {
            let guards: Vec<_> = self.shards.iter().map(|s| s.read()).collect();
            guards
                .iter()
                .flat_map(|g| g.iter())
                .filter(|(k, _)| ty.is_none_or(|t| t.id() == k.type_id))
                .map(|(_, e)| Arc::clone(e))
                .collect()
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in &entries {
            pick(e, &mut out);
        }
        out
    }

    /// Local snapshots of `ty` (all types when None).
    pub fn dump(&self, ty: Option<&MessageType>) -> Vec<Arc<Message>> {
        self.collect(ty, |e, out| out.extend(e.local.iter().cloned()))
    }

    /// Snapshots of one eid.
    pub fn dump_by_eid(&self, ty: Option<&MessageType>, eid: &Eid) -> Vec<Arc<Message>> {
        let local = *eid == Eid::default_eid();
        self.collect(ty, |e, out| out.extend(e.snapshot_of(eid, local).cloned()))
    }

    /// Every snapshot of every eid (no aggregates).
    pub fn dump_all(&self, ty: Option<&MessageType>) -> Vec<Arc<Message>> {
        self.collect(ty, |e, out| out.extend(e.all().cloned()))
    }

    /// Aggregates of `ty` (all types when None).
    pub fn dump_aggregates(&self, ty: Option<&MessageType>) -> Vec<Arc<Message>> {
        self.collect(ty, |e, out| out.extend(e.aggregate.iter().cloned()))
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}
