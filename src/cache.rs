//! Caches: the latest snapshot of every object, per node (eid), with an optional
//! aggregate across nodes.
//!
//! Entries (`Arc<CacheEntry>`) live in a map split into shards, each behind a short
//! `RwLock`. An entry that nobody else holds is updated in place under its shard's write
//! lock; one that is shared (a calc function is running on it) is copied first
//! (`Arc::make_mut`), so a holder never sees it change. Lookups hold a shard's read lock
//! only to clone the message they return; no lock is ever held while user code (id, calc,
//! publish functions, message destructors) runs. Aggregates are computed on a snapshot of
//! the entry and installed only if the entry did not change meanwhile (else recomputed),
//! so concurrent updates through several caching topics never install a stale aggregate;
//! installed aggregates are published in install order (`aggregate_outbox`). Each shard
//! also indexes its entries by type at stable positions (`cache_index`), which dumps walk
//! a chunk at a time, so no dump holds a lock for long and a dump of one type skips the
//! others.
//!
//! Keys are hashed once per operation, with a small seeded FxHash-style function rather
//! than SipHash: the hash picks the shard (from bits the map does not use) and is stored
//! in the key, and the map's hasher just passes it through. Lookups go by a borrowed
//! `(type, &str)` view of the key, so only a new id allocates. Short ids live inside
//! the key and the local snapshot is referenced again beside it (`Slot`), so a `get`
//! touches the shard's lock, one bucket and the message it returns: no pointer chase to
//! the id's bytes or to the entry.

use crate::aggregate_outbox::AggregateOutbox;
use crate::cache_index::TypeIndexes;
use crate::eid::Eid;
use crate::message::MessageRef;
use crate::message_type::{MessageType, DEAD_MAGIC};
use crate::topic::Topic;
use parking_lot::RwLock;
use std::borrow::{Borrow, Cow};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(crate) const CACHE_MAGIC: u32 = 0x5342_4341; // "SBCA"
pub(crate) const ENTRY_MAGIC: u32 = 0x5342_4345; // "SBCE"

/// Extracts an object's id from a snapshot; None: not cacheable. The id may borrow from
/// the snapshot (the C id function's string usually points into the message's data): it
/// is used only during the call, and copied only when a new object is cached.
pub type IdFn = Box<dyn for<'m> Fn(&'m MessageRef) -> Option<Cow<'m, str>> + Send + Sync>;
/// Computes the aggregate of an entry after a change (`new_snapshot` None on a clear).
/// Returning the entry's current aggregate means "unchanged"; None means "no aggregate".
pub type CalcFn =
    Box<dyn Fn(&Arc<CacheEntry>, Option<&MessageRef>) -> Option<MessageRef> + Send + Sync>;
/// Publishes a changed aggregate to the original topic.
pub type AggregatePublishFn = Box<dyn Fn(&Arc<Topic>, &MessageRef) + Send + Sync>;

/// A power of two. Readers on different cores mostly hit different shards.
const SHARDS: usize = 64;
/// The shard comes from hash bits 48..54: hashbrown indexes buckets with the low bits
/// and tags them with the top 7 (57..64), so the keys of one shard still spread over its
/// whole table.
const SHARD_SHIFT: u32 = 48;

/// Every snapshot of one (type, id): the local one, remote ones by eid, the aggregate.
#[repr(C)]
#[derive(Clone)]
pub struct CacheEntry {
    magic: u32,
    local: Option<MessageRef>,
    /// Sorted by eid, at most one per eid.
    remote: Vec<MessageRef>,
    aggregate: Option<MessageRef>,
}

impl CacheEntry {
    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == ENTRY_MAGIC
    }
    pub fn local(&self) -> Option<&MessageRef> {
        self.local.as_ref()
    }
    pub fn remote(&self, idx: usize) -> Option<&MessageRef> {
        self.remote.get(idx)
    }
    pub fn remote_count(&self) -> usize {
        self.remote.len()
    }
    pub fn aggregate(&self) -> Option<&MessageRef> {
        self.aggregate.as_ref()
    }
    fn is_empty(&self) -> bool {
        self.local.is_none() && self.remote.is_empty()
    }
    /// Nothing left worth keeping: no snapshot and no aggregate.
    fn is_vacant(&self) -> bool {
        self.is_empty() && self.aggregate.is_none()
    }
    fn snapshot_of(&self, eid: &Eid, local: bool) -> Option<&MessageRef> {
        if local {
            self.local.as_ref()
        } else {
            self.remote.iter().find(|m| m.eid() == Some(eid))
        }
    }
    /// Snapshots of every eid: local first, then remote.
    fn all(&self) -> impl Iterator<Item = &MessageRef> {
        self.local.iter().chain(self.remote.iter())
    }

    /// Replaces the snapshot of `eid` by `new` (None removes it); returns the old one.
    fn replace(&mut self, eid: &Eid, local: bool, new: Option<MessageRef>) -> Option<MessageRef> {
        if local {
            return std::mem::replace(&mut self.local, new);
        }
        let at = self.remote.partition_point(|r| r.eid() < Some(eid));
        let present = self.remote.get(at).is_some_and(|r| r.eid() == Some(eid));
        match (present, new) {
            (true, Some(m)) => Some(std::mem::replace(&mut self.remote[at], m)),
            (true, None) => Some(self.remote.remove(at)),
            (false, Some(m)) => {
                self.remote.insert(at, m);
                None
            }
            (false, None) => None,
        }
    }

    fn new(eid: &Eid, local: bool, snapshot: MessageRef) -> CacheEntry {
        let mut e = CacheEntry {
            magic: ENTRY_MAGIC,
            local: None,
            remote: Vec::new(),
            aggregate: None,
        };
        e.replace(eid, local, Some(snapshot));
        e
    }
}

impl Drop for CacheEntry {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

// ---- keys and hashing ----

/// FxHash's multiplier (as in rustc): odd, with well spread bits.
const FX_K: u64 = 0x517c_c1b7_2722_0a95;

fn fx_step(h: u64, word: u64) -> u64 {
    (h.rotate_left(5) ^ word).wrapping_mul(FX_K)
}

/// A fast, non-cryptographic hash of (type, id), seeded per cache. Ids are short, so it
/// reads whole words (overlapping at the end) instead of byte by byte. The final mix
/// folds the high bits down: FxHash alone leaves the low bits (the map's bucket index)
/// depending only on the low bits of the input, which would make collisions easy to
/// craft whatever the seed.
fn hash_key(seed: u64, type_id: u32, b: &[u8]) -> u64 {
    let n = b.len();
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| {
        u64::from(u32::from_le_bytes(
            b[at..at + 4].try_into().expect("4 bytes"),
        ))
    };
    let mut h = fx_step(seed, (u64::from(type_id) << 32) | n as u64);
    if n >= 8 {
        let mut at = 0;
        while at + 8 < n {
            h = fx_step(h, word(at));
            at += 8;
        }
        h = fx_step(h, word(n - 8));
    } else if n >= 4 {
        h = fx_step(h, (half(0) << 32) | half(n - 4));
    } else if n > 0 {
        let w = (u64::from(b[0]) << 16) | (u64::from(b[n / 2]) << 8) | u64::from(b[n - 1]);
        h = fx_step(h, w);
    }
    // murmur3's fmix64 finalizer.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// A stored key, with its hash.
struct Key {
    hash: u64,
    type_id: u32,
    id: StoredId,
}

/// Bytes of an id kept inside the key itself (longer ones go to the heap).
const INLINE_ID: usize = 22;

/// An id as stored in a key. Most ids (channel names, unique ids) are short and live in
/// the key, so comparing a key during a lookup does not chase a pointer to another cache
/// line: in W7's profile that miss was a sixth of every `get`.
#[derive(Clone)]
enum StoredId {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<[u8]>),
}

impl StoredId {
    fn new(id: &[u8]) -> StoredId {
        if id.len() <= INLINE_ID {
            let mut bytes = [0; INLINE_ID];
            bytes[..id.len()].copy_from_slice(id);
            StoredId::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            StoredId::Heap(id.into())
        }
    }
    fn as_bytes(&self) -> &[u8] {
        match self {
            StoredId::Inline { len, bytes } => &bytes[..usize::from(*len)],
            StoredId::Heap(b) => b,
        }
    }
}

/// A key to look up with, borrowing the id: lookups do not allocate.
struct KeyRef<'a> {
    hash: u64,
    type_id: u32,
    id: &'a [u8],
}

/// What `Key` and `KeyRef` share, so the map (keyed by `Key`) can be searched with a
/// `KeyRef` through `Borrow<dyn KeyView>` (std's HashMap has no raw-entry API).
trait KeyView {
    fn view(&self) -> KeyRef<'_>;
}

impl KeyView for Key {
    fn view(&self) -> KeyRef<'_> {
        KeyRef {
            hash: self.hash,
            type_id: self.type_id,
            id: self.id.as_bytes(),
        }
    }
}

impl KeyView for KeyRef<'_> {
    fn view(&self) -> KeyRef<'_> {
        KeyRef {
            hash: self.hash,
            type_id: self.type_id,
            id: self.id,
        }
    }
}

impl<'a> Borrow<dyn KeyView + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

fn same_key(a: &KeyRef<'_>, b: &KeyRef<'_>) -> bool {
    a.hash == b.hash && a.type_id == b.type_id && a.id == b.id
}

// Hash and Eq of `Key` and of `dyn KeyView` agree, as `Borrow` requires.
impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.view().hash);
    }
}
impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        same_key(&self.view(), &other.view())
    }
}
impl Eq for dyn KeyView + '_ {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        same_key(&self.view(), &other.view())
    }
}
impl Eq for Key {}

/// The map's hasher: keys arrive already hashed (`write_u64`), which is passed through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by the keys above; kept correct rather than panicking.
        for &b in bytes {
            self.0 = fx_step(self.0, u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Key -> the entry's position in the shard's index of its type (`ShardData`).
type Map = HashMap<Key, u32, BuildHasherDefault<PassThrough>>;

/// An entry as a shard keeps it (in its index, see `ShardData`): the entry, and beside it
/// a second reference to the entry's local snapshot, so that `get` and `dump`, the common
/// reads, find the snapshot in the slot they already loaded instead of following the
/// entry pointer to another cache line. Every change of an entry goes through `modify`,
/// which keeps the copy in step.
struct Slot {
    local: Option<MessageRef>,
    entry: Arc<CacheEntry>,
}

impl Slot {
    fn new(entry: Arc<CacheEntry>) -> Slot {
        Slot {
            local: entry.local.clone(),
            entry,
        }
    }

    /// Changes the entry (in place unless shared, see the module comment) and refreshes
    /// the local copy. The caller keeps any replaced snapshot alive until it has let go
    /// of the lock, so dropping the copy's reference frees nothing here.
    fn modify<R>(&mut self, f: impl FnOnce(&mut CacheEntry) -> R) -> R {
        let r = f(Arc::make_mut(&mut self.entry));
        if !same_message(&self.local, &self.entry.local) {
            self.local = self.entry.local.clone();
        }
        r
    }
}

/// Both None, or the same message.
fn same_message(a: &Option<MessageRef>, b: &Option<MessageRef>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => MessageRef::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// A shard's entries: each in the index of its type at a stable position
/// (`cache_index`), which dumps walk in order, and the map from key to position.
#[derive(Default)]
struct ShardData {
    map: Map,
    index: TypeIndexes<Slot>,
}

impl ShardData {
    fn get(&self, key: &KeyRef<'_>) -> Option<&Slot> {
        let pos = *self.map.get(key as &dyn KeyView)?;
        self.index.get(key.type_id, pos)
    }

    fn get_mut(&mut self, key: &KeyRef<'_>) -> Option<&mut Slot> {
        let pos = *self.map.get(key as &dyn KeyView)?;
        self.index.get_mut(key.type_id, pos)
    }

    /// Adds a new entry, inserted as number `seq` (see `Cache::inserted`).
    fn insert(&mut self, key: &KeyRef<'_>, seq: u64, slot: Slot) {
        let pos = self.index.insert(key.type_id, seq, slot);
        let stored = Key {
            hash: key.hash,
            type_id: key.type_id,
            id: StoredId::new(key.id),
        };
        self.map.insert(stored, pos);
    }

    /// Removes an entry. The caller drops the slot after letting go of the lock (it may
    /// hold a message's last reference).
    fn remove(&mut self, key: &KeyRef<'_>) -> Option<Slot> {
        let pos = self.map.remove(key as &dyn KeyView)?;
        self.index.remove(key.type_id, pos)
    }
}

/// One shard, on cache lines of its own: readers on different cores take different
/// shards' locks without bouncing a shared line (128: adjacent-line prefetch on x86).
#[repr(align(128))]
struct Shard(RwLock<ShardData>);

/// What a dump takes from an entry (see `Cache::collect`).
type Pick<'a> = &'a dyn Fn(&Slot, &mut Vec<MessageRef>);

/// Index positions a dump walks under one hold of a shard's read lock: a publisher
/// writing to that shard waits for one such chunk at most (a few microseconds).
const DUMP_CHUNK: usize = 64;

/// (old aggregate, new aggregate).
pub type AggregateChange = (Option<MessageRef>, Option<MessageRef>);

/// What one put or clear changed.
pub struct Change<'a> {
    /// The snapshot's type (borrowed from the snapshot: no shared count to bump).
    pub snapshot_type: &'a Arc<MessageType>,
    pub old: Option<MessageRef>,
    pub new: Option<MessageRef>,
    /// (old aggregate, new aggregate) when the aggregate changed.
    pub aggregate: Option<AggregateChange>,
}

#[repr(C)]
pub struct Cache {
    magic: u32,
    id_fn: IdFn,
    calc: Option<CalcFn>,
    publish: Option<AggregatePublishFn>,
    /// Changed aggregates waiting to be published, in install order.
    aggregates: AggregateOutbox,
    /// Seeds the key hash, so collisions cannot be precomputed.
    seed: u64,
    /// Entries inserted so far: each new entry is numbered, so a dump skips the entries
    /// inserted after it started (see `cache_index`).
    inserted: AtomicU64,
    shards: Box<[Shard]>,
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
            aggregates: AggregateOutbox::default(),
            seed: RandomState::new().hash_one(CACHE_MAGIC),
            inserted: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Shard(RwLock::default())).collect(),
        })
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == CACHE_MAGIC
    }

    fn key<'a>(&self, ty: &MessageType, id: &'a str) -> KeyRef<'a> {
        KeyRef {
            hash: hash_key(self.seed, ty.id(), id.as_bytes()),
            type_id: ty.id(),
            id: id.as_bytes(),
        }
    }

    fn shard(&self, hash: u64) -> &RwLock<ShardData> {
        &self.shards[(hash >> SHARD_SHIFT) as usize & (SHARDS - 1)].0
    }

    /// The id the cache keys `msg` under (the id function's answer; user code).
    pub fn id_of<'m>(&self, msg: &'m MessageRef) -> Option<Cow<'m, str>> {
        (self.id_fn)(msg)
    }

    /// Runs `f` on the slot of (type, id) under its shard's read lock. `f` must be quick
    /// and must not drop messages (a destructor is user code).
    fn read<R>(&self, ty: &MessageType, id: &str, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        let key = self.key(ty, id);
        let shard = self.shard(key.hash).read();
        shard.get(&key).map(f)
    }

    /// Stores `snapshot` (or, with `clear`, removes the snapshot of its eid). Returns what
    /// changed, or None when the message is not cacheable or nothing was there to clear.
    pub(crate) fn update<'s>(
        &self,
        snapshot: &'s MessageRef,
        clear: bool,
        original: &Arc<Topic>,
    ) -> Option<Change<'s>> {
        let eid = *snapshot.eid()?; // aggregates (no eid) are never cached
        let id = self.id_of(snapshot)?;
        let ty = snapshot.message_type();
        let key = self.key(ty, &id);
        let local = eid == Eid::default_eid();
        let new = (!clear).then(|| MessageRef::clone(snapshot));
        let mut removed = None;
        let (old, entry) = {
            let mut shard = self.shard(key.hash).write();
            match shard.get_mut(&key) {
                Some(slot) => {
                    if clear && slot.entry.snapshot_of(&eid, local).is_none() {
                        return None;
                    }
                    // In place unless shared (see the module comment). `old` keeps the
                    // replaced snapshot alive, so nothing is freed under the lock.
                    let old = slot.modify(|e| e.replace(&eid, local, new.clone()));
                    let entry = self.calc.is_some().then(|| Arc::clone(&slot.entry));
                    if slot.entry.is_empty() && self.calc.is_none() {
                        removed = shard.remove(&key);
                    }
                    (old, entry)
                }
                None => {
                    let new = new.clone()?; // nothing to clear
                    let entry = Arc::new(CacheEntry::new(&eid, local, new));
                    let seq = self.inserted.fetch_add(1, Ordering::SeqCst) + 1;
                    shard.insert(&key, seq, Slot::new(Arc::clone(&entry)));
                    (None, self.calc.is_some().then_some(entry))
                }
            }
        };
        drop(removed); // outside the lock: may free the last snapshot of a cleared entry
        let aggregate = entry.and_then(|entry| {
            self.refresh_aggregate(&key, entry, (!clear).then_some(snapshot), original)
        });
        Some(Change {
            snapshot_type: ty,
            old,
            new,
            aggregate,
        })
    }

    /// After a change of `entry` (the snapshot `new_snapshot` stored, or None for a
    /// removal): recomputes the aggregate when the cache has a calc function, installs
    /// it, and publishes it to `original` when it changed. Publications follow install
    /// order (`aggregate_outbox`): this one may be made by another thread's drain, which
    /// is publishing an aggregate of the same cache right now, and then shortly after
    /// this call returns.
    fn refresh_aggregate(
        &self,
        key: &KeyRef<'_>,
        entry: Arc<CacheEntry>,
        new_snapshot: Option<&MessageRef>,
        original: &Arc<Topic>,
    ) -> Option<AggregateChange> {
        let calc = self.calc.as_ref()?;
        let aggregate = self.recompute_aggregate(calc, key, entry, new_snapshot, original);
        if let Some((_, Some(_))) = &aggregate {
            self.aggregates.drain(|original, agg| match &self.publish {
                Some(publish) => publish(original, agg),
                None => {
                    original.publish(agg);
                }
            });
        }
        aggregate
    }

    /// Runs `calc` outside any lock and installs its result if the entry is unchanged.
    ///
    /// If the entry changed while calc ran, this gives up: whoever changed it recomputes
    /// the aggregate itself (every change does, `update` and `remove`), on an entry that
    /// includes this change. Retrying here instead would hand calc `new_snapshot` with an
    /// entry that may no longer hold it (another update replaced it), which the calc
    /// contract does not allow, and would compute the same aggregate twice.
    fn recompute_aggregate(
        &self,
        calc: &CalcFn,
        key: &KeyRef<'_>,
        entry: Arc<CacheEntry>,
        new_snapshot: Option<&MessageRef>,
        original: &Arc<Topic>,
    ) -> Option<AggregateChange> {
        let old_agg = entry.aggregate.clone();
        let new_agg = calc(&entry, new_snapshot);
        let unchanged = same_message(&old_agg, &new_agg);
        let mut shard = self.shard(key.hash).write();
        let Some(slot) = shard.get_mut(key) else {
            // Cleared and removed while calc ran: nothing to install.
            drop(shard);
            return None;
        };
        if !Arc::ptr_eq(&slot.entry, &entry) {
            // Changed while calc ran (a shared entry is never changed in place, so
            // pointer equality means "unchanged"): the changer recomputes. `new_agg`
            // and `entry` are dropped after the lock.
            drop(shard);
            return None;
        }
        if unchanged {
            // `entry` still holds what is removed: nothing is freed under the lock.
            let removed = if entry.is_vacant() {
                shard.remove(key)
            } else {
                None
            };
            drop(shard);
            drop(removed);
            return None;
        }
        // Let go of our copy first, so the aggregate is set in place when no one else
        // holds the entry. `old_agg` keeps the replaced aggregate alive.
        drop(entry);
        slot.modify(|e| e.aggregate = new_agg.clone());
        if let Some(agg) = &new_agg {
            // Under the shard's lock: queued in install order (see `refresh_aggregate`).
            self.aggregates.push(original, MessageRef::clone(agg));
        }
        let removed = (slot.entry.is_vacant()).then(|| shard.remove(key));
        drop(shard);
        drop(removed);
        Some((old_agg, new_agg))
    }

    /// Removes the snapshot of `eid` for (type, id) without publishing an update of it.
    /// With a calc function, the aggregate is recomputed (and published when it
    /// changed), as for a clear, so an entry left without snapshots does not keep a
    /// stale aggregate (nor its place in the cache) forever.
    pub(crate) fn remove(&self, ty: &MessageType, id: &str, eid: &Eid, original: &Arc<Topic>) {
        let key = self.key(ty, id);
        let local = *eid == Eid::default_eid();
        let mut removed = None;
        let (old, entry) = {
            let mut shard = self.shard(key.hash).write();
            let Some(slot) = shard.get_mut(&key) else {
                return;
            };
            if slot.entry.snapshot_of(eid, local).is_none() {
                return;
            }
            let old = slot.modify(|e| e.replace(eid, local, None));
            let entry = self.calc.is_some().then(|| Arc::clone(&slot.entry));
            if slot.entry.is_vacant() {
                removed = shard.remove(&key);
            }
            (old, entry)
        };
        // Outside the lock: dropping the last reference runs the message's destructor.
        drop(removed);
        drop(old);
        if let Some(entry) = entry {
            self.refresh_aggregate(&key, entry, None, original);
        }
    }

    /// The local snapshot (default eid) of (type, id).
    pub fn get(&self, ty: &MessageType, id: &str) -> Option<MessageRef> {
        self.read(ty, id, |s| s.local.clone()).flatten()
    }

    /// The snapshot of one eid, or the aggregate when `eid` is None.
    pub fn get_by_eid(&self, ty: &MessageType, id: &str, eid: Option<&Eid>) -> Option<MessageRef> {
        let local = eid.is_some_and(|e| *e == Eid::default_eid());
        self.read(ty, id, |s| match eid {
            None => s.entry.aggregate.clone(),
            Some(eid) => s.entry.snapshot_of(eid, local).cloned(),
        })
        .flatten()
    }

    /// Every snapshot (local and remote) of (type, id).
    pub fn get_all(&self, ty: &MessageType, id: &str) -> Vec<MessageRef> {
        self.read(ty, id, |s| s.entry.all().cloned().collect())
            .unwrap_or_default()
    }

    /// A copy made a chunk at a time (see `cache_index`): each shard's read lock is held
    /// for at most `DUMP_CHUNK` index positions, so a publisher never waits for more than
    /// one chunk, however large the cache. What the copy guarantees (README, "Caches"):
    ///
    /// - each entry is read whole, under its shard's lock: the snapshots taken from it are
    ///   ones it held together at one instant (a put or clear is never half-seen);
    /// - every entry present for the whole dump is in it, exactly once (positions never
    ///   move, and each is walked once);
    /// - entries inserted after the dump started are left out, so no key is listed twice
    ///   (removed, then inserted again at a position not walked yet); entries removed
    ///   during the dump may or may not be in it.
    ///
    /// Unlike a copy under every lock at once, two entries may be read at different
    /// instants. `pick` only clones, so no user code runs under a lock, and the result has
    /// room for a chunk before each lock is taken, so no allocation happens under one.
    /// `every_eid`: `pick` may take every snapshot of an entry (else one message at most).
    fn collect(
        &self,
        ty: Option<&MessageType>,
        every_eid: bool,
        pick: Pick<'_>,
    ) -> Vec<MessageRef> {
        self.collect_in_chunks(ty, every_eid, pick, || {})
    }

    /// `collect`, calling `between` after each chunk, with no lock held (tests change the
    /// cache there).
    fn collect_in_chunks(
        &self,
        ty: Option<&MessageType>,
        every_eid: bool,
        pick: Pick<'_>,
        mut between: impl FnMut(),
    ) -> Vec<MessageRef> {
        let started = self.inserted.load(Ordering::SeqCst);
        let guess: usize = self
            .shards
            .iter()
            .map(|s| {
                let g = s.0.read();
                ty.map_or(g.map.len(), |t| g.index.len_of(t.id()))
            })
            .sum();
        let mut out = Vec::with_capacity(guess);
        let mut types = Vec::new();
        for shard in self.shards.iter() {
            types.clear();
            match ty {
                Some(t) => types.push(t.id()),
                None => types.extend(shard.0.read().index.types()),
            }
            for &type_id in &types {
                let mut pos = 0;
                // Room an entry needs: its local snapshot and every remote one.
                let mut room = DUMP_CHUNK;
                loop {
                    out.reserve(room);
                    room = DUMP_CHUNK;
                    let g = shard.0.read();
                    let positions = g.index.positions(type_id);
                    let end = positions.len().min(pos + DUMP_CHUNK);
                    while pos < end {
                        let Some((seq, slot)) = &positions[pos] else {
                            pos += 1;
                            continue;
                        };
                        if *seq > started {
                            pos += 1;
                            continue;
                        }
                        // Only a dump of every eid takes more than one message per entry
                        // (the others need not load the entry to know).
                        let need = if every_eid {
                            1 + slot.entry.remote_count()
                        } else {
                            1
                        };
                        if out.capacity() - out.len() < need {
                            room = DUMP_CHUNK + need; // reserved without the lock
                            break;
                        }
                        pick(slot, &mut out);
                        pos += 1;
                    }
                    let done = pos >= positions.len();
                    drop(g);
                    between();
                    if done {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Local snapshots of `ty` (all types when None).
    pub fn dump(&self, ty: Option<&MessageType>) -> Vec<MessageRef> {
        self.collect(ty, false, &|s, out| out.extend(s.local.iter().cloned()))
    }

    /// Snapshots of one eid.
    pub fn dump_by_eid(&self, ty: Option<&MessageType>, eid: &Eid) -> Vec<MessageRef> {
        if *eid == Eid::default_eid() {
            return self.dump(ty);
        }
        self.collect(ty, false, &|s, out| {
            out.extend(s.entry.snapshot_of(eid, false).cloned())
        })
    }

    /// Every snapshot of every eid (no aggregates).
    pub fn dump_all(&self, ty: Option<&MessageType>) -> Vec<MessageRef> {
        self.collect(ty, true, &|s, out| out.extend(s.entry.all().cloned()))
    }

    /// Aggregates of `ty` (all types when None).
    pub fn dump_aggregates(&self, ty: Option<&MessageType>) -> Vec<MessageRef> {
        self.collect(ty, false, &|s, out| {
            out.extend(s.entry.aggregate.iter().cloned())
        })
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.magic = DEAD_MAGIC;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[test]
    fn hash_depends_on_every_part_of_the_key() {
        let ids = [
            "",
            "a",
            "b",
            "ab",
            "ba",
            "abc",
            "abcd",
            "abcde",
            "abcdefgh",
            "abcdefghi",
        ];
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            for ty in [0, 1] {
                assert!(
                    seen.insert(hash_key(7, ty, id.as_bytes())),
                    "collision on ({ty}, {id:?})"
                );
            }
        }
        assert_ne!(
            hash_key(1, 0, b"x"),
            hash_key(2, 0, b"x"),
            "the seed matters"
        );
        // Long ids: a change in any byte, including the overlapped tail, shows.
        let base = b"0123456789abcdefXYZ";
        for i in 0..base.len() {
            let mut other = base.to_vec();
            other[i] ^= 1;
            assert_ne!(hash_key(3, 0, base), hash_key(3, 0, &other), "byte {i}");
        }
    }

    #[test]
    fn lookups_by_borrowed_key_find_stored_keys() {
        let mut map = Map::default();
        let k = |id: &str| Key {
            hash: hash_key(9, 1, id.as_bytes()),
            type_id: 1,
            id: StoredId::new(id.as_bytes()),
        };
        // Inline (short) and heap (long) ids, and ids that differ only past the inline
        // length or in length.
        let long = "x".repeat(INLINE_ID + 5);
        let stored = ["x", "", &long[..INLINE_ID], &long[..INLINE_ID + 1], &long];
        for id in stored {
            map.insert(k(id), 0);
        }
        assert!(matches!(
            StoredId::new(&long.as_bytes()[..INLINE_ID]),
            StoredId::Inline { .. }
        ));
        assert!(matches!(StoredId::new(long.as_bytes()), StoredId::Heap(_)));
        let found = |ty: u32, id: &str| {
            let r = KeyRef {
                hash: hash_key(9, ty, id.as_bytes()),
                type_id: ty,
                id: id.as_bytes(),
            };
            map.contains_key(&r as &dyn KeyView)
        };
        for id in stored {
            assert!(found(1, id), "{id:?}");
            assert!(!found(2, id), "{id:?} of another type");
        }
        assert!(!found(1, "y"));
        assert!(!found(1, "xx"));
        assert!(!found(1, &long[..INLINE_ID - 1]));
        assert!(!found(1, &long[..INLINE_ID + 2]));
        assert_eq!(map.len(), stored.len());
    }

    #[test]
    fn remote_snapshots_stay_sorted_and_unique() {
        let ty = crate::caching_topic::update_type();
        let eid = |n: u8| Eid {
            bytes: [0, 0, 0, 0, 0, n],
        };
        let snap = |n: u8| {
            let bytes = crate::message::Payload::Bytes(Box::new([]));
            Message::with_eid(ty, bytes, Some(eid(n)))
        };
        let mut e = CacheEntry::new(&eid(5), false, snap(5));
        for n in [3, 9, 5, 1] {
            e.replace(&eid(n), false, Some(snap(n)));
        }
        let eids: Vec<_> = e.remote.iter().map(|m| *m.eid().unwrap()).collect();
        assert_eq!(eids, [1, 3, 5, 9].map(eid));
        assert!(e.replace(&eid(3), false, None).is_some());
        assert!(e.replace(&eid(3), false, None).is_none());
        assert_eq!(e.remote_count(), 3);
    }

    #[test]
    fn a_dump_walked_in_chunks_lists_each_key_once_and_every_stable_entry() {
        let ty = MessageType::builtin("test/cache/dump-walk");
        let other = MessageType::builtin("test/cache/dump-walk-other");
        let topic = Topic::create("test/cache/dump-walk").unwrap();
        // The id is the payload's bytes.
        let cache = Cache::new(Box::new(|m: &MessageRef| match m.payload() {
            crate::message::Payload::Bytes(b) => {
                Some(Cow::Owned(String::from_utf8_lossy(b).into_owned()))
            }
            _ => None,
        }));
        let snap = |ty: &Arc<MessageType>, id: String| {
            let bytes = crate::message::Payload::Bytes(id.into_bytes().into_boxed_slice());
            Message::with_eid(ty, bytes, Some(Eid::default_eid()))
        };
        // Stable entries and churning ones, interleaved so the churning ones' positions
        // are spread over every shard's index, then the churning ones cleared.
        let n = 64 * DUMP_CHUNK * 3;
        let mut churn = Vec::new();
        for i in 0..n {
            cache.update(&snap(&ty, format!("s{i}")), false, &topic);
            if i % 16 == 0 {
                let m = snap(&ty, format!("c{i}"));
                cache.update(&m, false, &topic);
                churn.push(m);
            }
            cache.update(&snap(&other, format!("o{i}")), false, &topic);
        }
        for m in &churn {
            cache.update(m, true, &topic);
        }
        // Between chunks, every churning entry is inserted again and cleared again in
        // the same order: freed positions are reused last-freed first, so each lands
        // where another was, ahead of the walk or behind it.
        let mut rounds = 0;
        let listed = cache.collect_in_chunks(
            Some(&ty),
            false,
            &|s, out| out.extend(s.local.iter().cloned()),
            || {
                rounds += 1;
                for m in &churn {
                    cache.update(m, false, &topic);
                }
                if rounds % 2 == 0 {
                    for m in &churn {
                        cache.update(m, true, &topic);
                    }
                }
            },
        );
        assert!(rounds > 64, "several chunks per shard");
        let mut seen = std::collections::HashSet::new();
        let mut stable = 0;
        for m in &listed {
            assert!(Arc::ptr_eq(m.message_type(), &ty), "another type listed");
            let crate::message::Payload::Bytes(b) = m.payload() else {
                panic!("payload")
            };
            assert!(seen.insert(b.clone()), "listed twice");
            stable += usize::from(b[0] == b's');
        }
        assert_eq!(stable, n, "every stable entry is listed");
        // The index holds each type's entries only.
        let in_index: usize = cache
            .shards
            .iter()
            .map(|s| s.0.read().index.len_of(other.id()))
            .sum();
        assert_eq!(in_index, n);
        assert_eq!(cache.dump(Some(&other)).len(), n);
    }

    #[test]
    fn an_entry_someone_holds_is_copied_not_changed() {
        let ty = MessageType::builtin("test/cache/cow");
        let topic = Topic::create("test/cache/cow").unwrap();
        let cache = Cache::new(Box::new(|_| Some("x".into())));
        let snap = |v: u8| {
            let bytes = crate::message::Payload::Bytes(Box::new([v]));
            Message::with_eid(&ty, bytes, Some(Eid::default_eid()))
        };
        let (m1, m2) = (snap(1), snap(2));
        assert!(cache.update(&m1, false, &topic).unwrap().old.is_none());
        // Hold the entry, as a calc function or a dump would.
        let key = cache.key(&ty, "x");
        let entry = || {
            let shard = cache.shard(key.hash).read();
            Arc::clone(&shard.get(&key).unwrap().entry)
        };
        let held = entry();
        let change = cache.update(&m2, false, &topic).unwrap();
        assert!(MessageRef::ptr_eq(change.old.as_ref().unwrap(), &m1));
        assert!(
            MessageRef::ptr_eq(held.local().unwrap(), &m1),
            "the held entry did not change"
        );
        assert!(MessageRef::ptr_eq(&cache.get(&ty, "x").unwrap(), &m2));
        // Nobody holds it now: updated in place, same allocation.
        drop(held);
        let before = Arc::as_ptr(&entry());
        cache.update(&m1, false, &topic);
        let after = Arc::as_ptr(&entry());
        assert_eq!(before, after);
        assert!(MessageRef::ptr_eq(&cache.get(&ty, "x").unwrap(), &m1));
        // A clear of the last snapshot removes the entry.
        assert!(cache.update(&m1, true, &topic).is_some());
        assert!(cache.get(&ty, "x").is_none());
        assert!(
            cache.update(&m1, true, &topic).is_none(),
            "nothing left to clear"
        );
        assert!(cache.dump(None).is_empty());
    }
}
