//! A cache shard's per-type index: every entry of one message type at a stable position.
//!
//! Dumps walk it a few entries at a time, taking the shard's read lock for each chunk
//! only, so a publisher waits for one chunk at most, whatever the cache's size; and a
//! dump of one type walks that type's positions only, not the other types' entries.
//!
//! Positions are what make a chunked walk see every entry that stays in the cache: an
//! entry keeps its position from insertion to removal (a removal frees it, a later
//! insertion may reuse it; nothing ever moves). Each position also carries the insertion
//! number of its entry, so a walk can skip entries inserted after it started: a key
//! removed and inserted again during a walk, at a position the walk has not reached yet,
//! is then not listed twice.

/// One type's positions.
struct TypeIndex<K> {
    /// (insertion number, key) by position; None: free.
    slots: Vec<Option<(u64, K)>>,
    /// Free positions, reused first.
    free: Vec<u32>,
    live: usize,
}

/// The per-type indexes of one shard. Most caches hold one or a few types, so a short
/// list is searched rather than a map.
pub(crate) struct TypeIndexes<K> {
    by_type: Vec<(u32, TypeIndex<K>)>,
}

impl<K> Default for TypeIndexes<K> {
    fn default() -> Self {
        TypeIndexes {
            by_type: Vec::new(),
        }
    }
}

impl<K> TypeIndexes<K> {
    fn find(&self, type_id: u32) -> Option<&TypeIndex<K>> {
        self.by_type
            .iter()
            .find(|(t, _)| *t == type_id)
            .map(|(_, i)| i)
    }

    /// Places `key` (inserted as number `seq`) in the index of `type_id`; returns its
    /// position.
    pub(crate) fn insert(&mut self, type_id: u32, seq: u64, key: K) -> u32 {
        let at = match self.by_type.iter().position(|(t, _)| *t == type_id) {
            Some(at) => at,
            None => {
                self.by_type.push((
                    type_id,
                    TypeIndex {
                        slots: Vec::new(),
                        free: Vec::new(),
                        live: 0,
                    },
                ));
                self.by_type.len() - 1
            }
        };
        let index = &mut self.by_type[at].1;
        index.live += 1;
        match index.free.pop() {
            Some(pos) => {
                index.slots[pos as usize] = Some((seq, key));
                pos
            }
            None => {
                index.slots.push(Some((seq, key)));
                // Positions are u32: a shard holding 2^32 entries of one type is beyond
                // any memory this runs in.
                (index.slots.len() - 1) as u32
            }
        }
    }

    /// Frees the position `pos` of `type_id`; returns the key that was there. A type
    /// left with no entry loses its index (a walk in progress then finds none, or a new
    /// one whose entries are all newer than the walk).
    pub(crate) fn remove(&mut self, type_id: u32, pos: u32) -> Option<K> {
        let at = self.by_type.iter().position(|(t, _)| *t == type_id)?;
        let index = &mut self.by_type[at].1;
        let (_, key) = index.slots.get_mut(pos as usize)?.take()?;
        index.live -= 1;
        if index.live == 0 {
            self.by_type.swap_remove(at);
        } else {
            index.free.push(pos);
        }
        Some(key)
    }

    /// The value at `pos` of `type_id`.
    pub(crate) fn get(&self, type_id: u32, pos: u32) -> Option<&K> {
        let (_, v) = self.find(type_id)?.slots.get(pos as usize)?.as_ref()?;
        Some(v)
    }

    /// The value at `pos` of `type_id`, to change it.
    pub(crate) fn get_mut(&mut self, type_id: u32, pos: u32) -> Option<&mut K> {
        let index = &mut self.by_type.iter_mut().find(|(t, _)| *t == type_id)?.1;
        index.slots.get_mut(pos as usize)?.as_mut().map(|(_, k)| k)
    }

    /// The types present.
    pub(crate) fn types(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_type.iter().map(|(t, _)| *t)
    }

    /// Entries of `type_id`.
    pub(crate) fn len_of(&self, type_id: u32) -> usize {
        self.find(type_id).map_or(0, |i| i.live)
    }

    /// The positions of `type_id` (an empty slice when it has none).
    pub(crate) fn positions(&self, type_id: u32) -> &[Option<(u64, K)>] {
        self.find(type_id).map_or(&[], |i| &i.slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_stable_and_reused() {
        let mut ix = TypeIndexes::default();
        let a = ix.insert(7, 1, "a");
        let b = ix.insert(7, 2, "b");
        let c = ix.insert(7, 3, "c");
        let other = ix.insert(9, 4, "x");
        assert_eq!((a, b, c, other), (0, 1, 2, 0));
        assert_eq!(ix.remove(7, b), Some("b"));
        assert_eq!(ix.remove(7, b), None, "already free");
        // a and c did not move
        assert_eq!(ix.positions(7)[a as usize], Some((1, "a")));
        assert_eq!(ix.positions(7)[c as usize], Some((3, "c")));
        assert_eq!(ix.insert(7, 5, "d"), b, "a free position is reused");
        assert_eq!(ix.len_of(7), 3);
        assert_eq!(ix.len_of(9), 1);
        assert_eq!(ix.remove(9, other), Some("x"));
        assert_eq!(ix.len_of(9), 0);
        assert!(ix.positions(9).is_empty());
        assert_eq!(ix.types().collect::<Vec<_>>(), [7]);
    }
}
