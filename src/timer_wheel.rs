//! A hierarchical timing wheel: the data structure behind timed publishing.
//!
//! Time is counted in ticks (the timer service uses milliseconds). Level `l` has 64
//! slots of 64^l ticks each; an entry sits at the level given by the highest bit in
//! which its due tick differs from the wheel's current tick (`elapsed`), in the slot its
//! due tick names at that level. When `elapsed` reaches the start of a slot above level
//! 0, the slot's entries are moved down (cascaded) to where they now belong; level-0
//! slots hold entries due at exactly one tick, which fire. So:
//! - inserting and removing are O(1) (a slot is a doubly linked list of slab indices,
//!   each level keeps a bitmap of its occupied slots);
//! - the next due tick is found from the bitmaps (a few bit operations per level), so an
//!   idle wheel costs nothing per tick and its thread sleeps until that tick;
//! - an entry is moved at most once per level on its way down (a few times in all).
//!
//! Entries of equal due tick always sit in the same slot, appended in insertion order
//! and moved in that order, so they come out in insertion order.
//!
//! Entries live in one slab (`Vec`) with a free list: no allocation per entry once the
//! slab has grown, and a `Key` (index + reuse generation) finds one in O(1) and never
//! names a later occupant of the same index. The slab is released whole when the wheel
//! empties, so a burst of timers does not keep its memory.

/// Bits of a tick per level: 64 slots.
const LEVEL_BITS: u32 = 6;
const SLOTS: usize = 1 << LEVEL_BITS;
/// Levels: 10 x 6 bits cover due ticks below 2^60.
const LEVELS: usize = 10;
/// The latest due tick the wheel holds (later ones are held at this one): 2^60 - 1
/// milliseconds is about 36 million years.
pub(crate) const MAX_DUE: u64 = (1 << (LEVEL_BITS as u64 * LEVELS as u64)) - 1;
/// "No entry" in links and slot heads.
const NIL: u32 = u32::MAX;

/// Names an entry of the wheel: its slab index and the generation of that index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    /// A key that names no entry of any wheel (generations start at 1).
    #[cfg(all(test, not(loom)))]
    pub(crate) const NONE: Key = Key {
        index: NIL,
        generation: 0,
    };
}

struct Entry<T> {
    due: u64,
    prev: u32,
    next: u32,
    generation: u32,
    /// level * SLOTS + slot while in the wheel.
    place: u16,
    /// `None` while the slab entry is free (then `next` links the free list).
    value: Option<T>,
}

#[derive(Clone, Copy)]
struct Slot {
    head: u32,
    tail: u32,
}

const EMPTY_SLOT: Slot = Slot {
    head: NIL,
    tail: NIL,
};

struct Level {
    /// Bit s set: slot s holds entries.
    occupied: u64,
    slots: [Slot; SLOTS],
}

const EMPTY_LEVEL: Level = Level {
    occupied: 0,
    slots: [EMPTY_SLOT; SLOTS],
};

pub(crate) struct Wheel<T> {
    /// The current tick: every entry is due at or after it.
    elapsed: u64,
    levels: [Level; LEVELS],
    slab: Vec<Entry<T>>,
    free: u32,
    len: usize,
}

impl<T> Default for Wheel<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Which level an entry due at `due` belongs to when the wheel is at `elapsed`.
fn level_for(elapsed: u64, due: u64) -> usize {
    // The low level's bits are or'ed in so an entry due now lands in level 0.
    let masked = (elapsed ^ due) | (SLOTS as u64 - 1);
    let significant = 63 - masked.leading_zeros();
    (significant / LEVEL_BITS) as usize
}

fn slot_for(level: usize, due: u64) -> usize {
    ((due >> (level as u32 * LEVEL_BITS)) & (SLOTS as u64 - 1)) as usize
}

impl<T> Wheel<T> {
    pub(crate) const fn new() -> Self {
        Wheel {
            elapsed: 0,
            levels: [EMPTY_LEVEL; LEVELS],
            slab: Vec::new(),
            free: NIL,
            len: 0,
        }
    }

    /// Entries in the wheel.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The wheel's current tick.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// Adds `value`, due at tick `due` (an earlier tick than the current one is due now;
    /// a later one than `MAX_DUE` is held at `MAX_DUE`). None when the slab is full
    /// (2^32 - 1 entries).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn insert(&mut self, due: u64, value: T) -> Option<Key> {
        self.insert_with(due, |_| value).map(|(k, _)| k)
    }

    /// As `insert`, with the value made from its key (a value that must know where it
    /// is); returns the key and a reference to the value.
    pub(crate) fn insert_with(
        &mut self,
        due: u64,
        make: impl FnOnce(Key) -> T,
    ) -> Option<(Key, &T)> {
        let due = due.clamp(self.elapsed, MAX_DUE.max(self.elapsed));
        let index = if self.free != NIL {
            let i = self.free;
            self.free = self.slab[i as usize].next;
            i
        } else {
            let i = u32::try_from(self.slab.len()).ok().filter(|&i| i != NIL)?;
            self.slab.push(Entry {
                due: 0,
                prev: NIL,
                next: NIL,
                generation: 0,
                place: 0,
                value: None,
            });
            i
        };
        let e = &mut self.slab[index as usize];
        e.generation = e.generation.wrapping_add(1).max(1);
        e.due = due;
        let key = Key {
            index,
            generation: e.generation,
        };
        e.value = Some(make(key));
        self.link(index);
        self.len += 1;
        Some((key, self.slab[index as usize].value.as_ref()?))
    }

    /// Takes the entry `key` names out of the wheel; None if it is no longer there.
    pub(crate) fn remove(&mut self, key: Key) -> Option<T> {
        let e = self.slab.get(key.index as usize)?;
        if e.generation != key.generation || e.value.is_none() {
            return None;
        }
        self.unlink(key.index);
        Some(self.release(key.index))
    }

    /// The tick at which the wheel next has work (an entry to fire or to move down), or
    /// None when it is empty.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.next_expiration().map(|(_, _, deadline)| deadline)
    }

    /// Moves the wheel on to tick `now`: appends to `out`, in due order (insertion order
    /// among equal due ticks), the entries due at or before `now`, at most `limit` of
    /// them. When it stops at the limit, the next call goes on where it stopped.
    pub(crate) fn advance(&mut self, now: u64, out: &mut Vec<T>, limit: usize) {
        let mut taken = 0;
        while let Some((level, slot, deadline)) = self.next_expiration() {
            if deadline > now {
                break;
            }
            self.elapsed = self.elapsed.max(deadline);
            if level == 0 {
                // Every entry of a level-0 slot is due at `deadline`.
                while self.levels[0].slots[slot].head != NIL {
                    if taken == limit {
                        return;
                    }
                    let i = self.levels[0].slots[slot].head;
                    self.unlink(i);
                    out.push(self.release(i));
                    taken += 1;
                }
            } else {
                self.cascade(level, slot);
            }
        }
        self.elapsed = self.elapsed.max(now.min(MAX_DUE));
    }

    /// Moves every entry of a slot above level 0 to where it belongs now, in order.
    fn cascade(&mut self, level: usize, slot: usize) {
        let mut i = self.levels[level].slots[slot].head;
        self.levels[level].slots[slot] = EMPTY_SLOT;
        self.levels[level].occupied &= !(1u64 << slot);
        while i != NIL {
            let next = self.slab[i as usize].next;
            self.link(i);
            i = next;
        }
    }

    /// The first (level, slot, deadline) with entries. A lower level's entries are all
    /// due before any higher level's (they share more leading bits with `elapsed`).
    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        for (level, l) in self.levels.iter().enumerate() {
            if l.occupied == 0 {
                continue;
            }
            let shift = level as u32 * LEVEL_BITS;
            let now_slot = ((self.elapsed >> shift) & (SLOTS as u64 - 1)) as u32;
            let slot =
                (l.occupied.rotate_right(now_slot).trailing_zeros() + now_slot) as usize % SLOTS;
            // Entries of this level lie in the current span of the level above, at or
            // after `elapsed`'s slot, so the slot does not wrap past the span.
            let span_bits = shift + LEVEL_BITS;
            let span_start = if span_bits >= 64 {
                0
            } else {
                self.elapsed & !((1u64 << span_bits) - 1)
            };
            let deadline = span_start + ((slot as u64) << shift);
            return Some((level, slot, deadline));
        }
        None
    }

    /// Appends entry `i` to the tail of the slot its due tick names now.
    fn link(&mut self, i: u32) {
        let due = self.slab[i as usize].due;
        let level = level_for(self.elapsed, due);
        let slot = slot_for(level, due);
        let s = self.levels[level].slots[slot];
        {
            let e = &mut self.slab[i as usize];
            e.prev = s.tail;
            e.next = NIL;
            e.place = (level * SLOTS + slot) as u16;
        }
        if s.tail == NIL {
            self.levels[level].slots[slot].head = i;
        } else {
            self.slab[s.tail as usize].next = i;
        }
        self.levels[level].slots[slot].tail = i;
        self.levels[level].occupied |= 1u64 << slot;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next, place) = {
            let e = &self.slab[i as usize];
            (e.prev, e.next, e.place as usize)
        };
        let (level, slot) = (place / SLOTS, place % SLOTS);
        if prev == NIL {
            self.levels[level].slots[slot].head = next;
        } else {
            self.slab[prev as usize].next = next;
        }
        if next == NIL {
            self.levels[level].slots[slot].tail = prev;
        } else {
            self.slab[next as usize].prev = prev;
        }
        if self.levels[level].slots[slot].head == NIL {
            self.levels[level].occupied &= !(1u64 << slot);
        }
    }

    /// Frees slab entry `i` (already unlinked) and returns its value.
    fn release(&mut self, i: u32) -> T {
        let e = &mut self.slab[i as usize];
        let value = e.value.take().expect("a linked wheel entry holds a value");
        e.next = self.free;
        self.free = i;
        self.len -= 1;
        if self.len == 0 {
            // Give the memory of a burst back.
            self.slab = Vec::new();
            self.free = NIL;
        }
        value
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Advances tick by tick (as a thread waking at every deadline would, and beyond),
    /// recording (tick, value) for each fired entry.
    fn run_until(w: &mut Wheel<u32>, until: u64) -> Vec<(u64, u32)> {
        let mut fired = Vec::new();
        while let Some(d) = w.next_deadline() {
            if d > until {
                break;
            }
            let mut out = Vec::new();
            w.advance(d, &mut out, usize::MAX);
            fired.extend(out.into_iter().map(|v| (d, v)));
        }
        fired
    }

    #[test]
    fn fires_each_entry_at_its_due_tick() {
        let mut w = Wheel::new();
        let dues = [
            0u64,
            1,
            5,
            63,
            64,
            65,
            100,
            4095,
            4096,
            4097,
            300_000,
            1 << 25,
        ];
        for (i, &d) in dues.iter().enumerate() {
            w.insert(d, i as u32).unwrap();
        }
        let fired = run_until(&mut w, u64::MAX);
        let expected: Vec<(u64, u32)> = dues
            .iter()
            .enumerate()
            .map(|(i, &d)| (d, i as u32))
            .collect();
        assert_eq!(fired, expected);
        assert_eq!(w.len(), 0);
        assert!(w.next_deadline().is_none());
    }

    #[test]
    fn equal_due_ticks_fire_in_insertion_order_across_cascades() {
        let mut w = Wheel::new();
        // Inserted at different wheel times (so at different levels at first), all due
        // at 5000: they meet in one slot on the way down and keep their order.
        let mut n = 0;
        for now in [0u64, 10, 64, 200, 4095, 4096, 4990, 4999] {
            let mut out = Vec::new();
            w.advance(now, &mut out, usize::MAX);
            assert!(out.is_empty());
            for _ in 0..3 {
                w.insert(5000, n).unwrap();
                n += 1;
            }
        }
        let mut out = Vec::new();
        w.advance(5000, &mut out, usize::MAX);
        assert_eq!(out, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn cascades_move_entries_down_every_level() {
        let mut w = Wheel::new();
        // One entry per level, each due just past a level boundary.
        let dues: Vec<u64> = (0..LEVELS as u32)
            .map(|l| (1u64 << (l * LEVEL_BITS)) + 3)
            .collect();
        for (i, &d) in dues.iter().enumerate() {
            w.insert(d, i as u32).unwrap();
        }
        // Jumping straight to the last due tick fires them all, in due order.
        let mut out = Vec::new();
        w.advance(*dues.last().unwrap(), &mut out, usize::MAX);
        assert_eq!(out, (0..LEVELS as u32).collect::<Vec<_>>());
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn nothing_fires_early_and_a_late_advance_catches_up_in_order() {
        let mut w = Wheel::new();
        for i in 0..1000u32 {
            // Scrambled due ticks between 0 and 9990.
            w.insert(((i * 7919) % 1000) as u64 * 10, i).unwrap();
        }
        let mut out = Vec::new();
        w.advance(4999, &mut out, usize::MAX);
        assert_eq!(out.len(), 500);
        assert!(out.iter().all(|&i| ((i * 7919) % 1000) * 10 <= 4999));
        let dues: Vec<u32> = out.iter().map(|&i| (i * 7919) % 1000).collect();
        assert!(dues.windows(2).all(|p| p[0] <= p[1]));
        out.clear();
        w.advance(1_000_000, &mut out, usize::MAX);
        assert_eq!(out.len(), 500);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn the_limit_stops_and_the_next_advance_goes_on_in_order() {
        let mut w = Wheel::new();
        for i in 0..100u32 {
            w.insert(10 + (i / 30) as u64, i).unwrap();
        }
        let mut all = Vec::new();
        loop {
            let mut out = Vec::new();
            w.advance(50, &mut out, 7);
            if out.is_empty() {
                break;
            }
            assert!(out.len() <= 7);
            all.extend(out);
        }
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn wraps_around_level_spans() {
        // Start near the end of a level-0 and a level-1 span, schedule across them.
        let mut w = Wheel::new();
        let mut out = Vec::new();
        w.advance(4094, &mut out, usize::MAX);
        assert_eq!(w.elapsed(), 4094);
        for (i, d) in [4094u64, 4095, 4096, 4100, 4159, 4160, 8191, 8192, 8200]
            .into_iter()
            .enumerate()
        {
            w.insert(d, i as u32).unwrap();
        }
        let fired = run_until(&mut w, u64::MAX);
        assert_eq!(
            fired,
            vec![
                (4094, 0),
                (4095, 1),
                (4096, 2),
                (4100, 3),
                (4159, 4),
                (4160, 5),
                (8191, 6),
                (8192, 7),
                (8200, 8)
            ]
        );
    }

    #[test]
    fn far_future_entries_neither_overflow_nor_fire() {
        let mut w = Wheel::new();
        let far = w.insert(u64::MAX, 1).unwrap();
        let near = w.insert(10, 2).unwrap();
        assert_eq!(w.len(), 2);
        let mut out = Vec::new();
        w.advance(1_000_000_000, &mut out, usize::MAX);
        assert_eq!(out, vec![2]);
        assert_eq!(w.next_deadline().map(|d| d > 1_000_000_000), Some(true));
        assert_eq!(w.remove(near), None);
        assert_eq!(w.remove(far), Some(1));
        assert_eq!(w.len(), 0);
        // At the very end of time the held entry fires.
        w.insert(u64::MAX, 3).unwrap();
        out.clear();
        w.advance(u64::MAX, &mut out, usize::MAX);
        assert_eq!(out, vec![3]);
    }

    #[test]
    fn removal_is_by_key_and_a_reused_index_is_not_confused() {
        let mut w = Wheel::new();
        let a = w.insert(100, 1).unwrap();
        let b = w.insert(100, 2).unwrap();
        let c = w.insert(100, 3).unwrap();
        assert_eq!(w.remove(b), Some(2));
        assert_eq!(w.remove(b), None);
        // b's index is reused by d: b's key still names nothing.
        let d = w.insert(100, 4).unwrap();
        assert_eq!(w.remove(b), None);
        assert_eq!(w.remove(Key::NONE), None);
        let mut out = Vec::new();
        w.advance(100, &mut out, usize::MAX);
        assert_eq!(out, vec![1, 3, 4]);
        assert_eq!(w.remove(a), None);
        assert_eq!(w.remove(c), None);
        assert_eq!(w.remove(d), None);
    }

    #[test]
    fn many_entries_random_dues_match_a_sorted_reference() {
        let mut w = Wheel::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut reference = Vec::new();
        let mut keys = Vec::new();
        for i in 0..20_000u32 {
            let due = rnd() % 2_000_000;
            keys.push(w.insert(due, i).unwrap());
            reference.push((due, i));
        }
        // Remove every third.
        for (i, k) in keys.iter().enumerate() {
            if i % 3 == 0 {
                assert_eq!(w.remove(*k), Some(i as u32));
            }
        }
        reference.retain(|&(_, i)| i % 3 != 0);
        reference.sort();
        let mut got = Vec::new();
        let mut now = 0;
        while w.len() > 0 {
            now += rnd() % 5000;
            let mut out = Vec::new();
            w.advance(now, &mut out, usize::MAX);
            got.extend(out);
        }
        let expected: Vec<u32> = reference.into_iter().map(|(_, i)| i).collect();
        assert_eq!(got, expected);
    }
}
