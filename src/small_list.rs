//! Immutable list snapshots (a topic's subscribers and forwards past the first, see
//! `split_list`) that hold a single element inline.
//!
//! Most topics have one subscription and forward to at most one topic; as an
//! `Arc<Vec<T>>` each such list cost two allocations (the `Arc` and the vector's buffer).
//! `SmallList` stores zero or one element inside the `Arc` allocation itself; longer lists
//! use one boxed slice. Lists are never mutated: writers build a new one and swap it in.
//!
//! Removal uses tombstones (`retire`): an element that leaves (an unsubscribed
//! subscription, a cancelled forward) carries its own flag, readers skip flagged elements,
//! and the list is rebuilt without them only once they are half of it. A rebuild costs
//! O(len) and comes after len/2 removals, so a removal costs O(1) amortized; removing each
//! element at once cost O(len) per removal, and tearing down the n subscriptions of one
//! topic (or the n forwards out of one) took quadratic time.

use arc_swap::ArcSwap;
use std::ops::Deref;
use std::sync::Arc;

/// Lists this short are rebuilt at every removal: the copy is cheap, and a topic's few
/// subscriptions are not kept alive a moment longer than needed.
#[cfg(not(fuzzing))]
const REBUILD_UP_TO: usize = 16;
/// The fuzzer's handle tables are small: with the production length its lists would
/// never hold flagged elements.
#[cfg(fuzzing)]
const REBUILD_UP_TO: usize = 1;

/// Records that one more element of `list` is flagged as gone (`is_gone` now holds for
/// it). `gone` counts the flagged elements still in the list; it may count too many (a
/// flagged element that was never added, or that an earlier rebuild already dropped),
/// which only brings the next rebuild forward, but never too few. When the flagged
/// elements are at least half of the list, or the list is short, stores the list without
/// them and returns the replaced one, for the caller to drop once it holds no lock (the
/// last reference to an element may go with it). Callers serialize calls per list.
pub(crate) fn retire<T: Clone>(
    list: &ArcSwap<SmallList<T>>,
    gone: &mut u32,
    is_gone: impl Fn(&T) -> bool,
    empty: &Arc<SmallList<T>>,
) -> Option<Arc<SmallList<T>>> {
    *gone = gone.saturating_add(1);
    let current = list.load();
    if current.len() > REBUILD_UP_TO && (*gone as usize) * 2 < current.len() {
        return None;
    }
    let rebuilt = current.without(is_gone);
    drop(current);
    *gone = 0;
    Some(list.swap(if rebuilt.is_empty() {
        Arc::clone(empty)
    } else {
        Arc::new(rebuilt)
    }))
}

pub(crate) enum SmallList<T> {
    Empty,
    One(T),
    Many(Box<[T]>),
}

impl<T> SmallList<T> {
    pub(crate) fn from_vec(mut v: Vec<T>) -> SmallList<T> {
        match v.len() {
            0 => SmallList::Empty,
            1 => SmallList::One(v.pop().expect("one element")),
            _ => SmallList::Many(v.into_boxed_slice()),
        }
    }
}

impl<T: Clone> SmallList<T> {
    /// A copy of this list with `extra` appended.
    pub(crate) fn pushed(&self, extra: T) -> SmallList<T> {
        let mut v = Vec::with_capacity(self.len() + 1);
        v.extend_from_slice(self);
        v.push(extra);
        SmallList::from_vec(v)
    }

    /// A copy of this list without the elements `drop_it` selects.
    pub(crate) fn without(&self, drop_it: impl Fn(&T) -> bool) -> SmallList<T> {
        SmallList::from_vec(self.iter().filter(|t| !drop_it(t)).cloned().collect())
    }
}

impl<T> Deref for SmallList<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            SmallList::Empty => &[],
            SmallList::One(t) => std::slice::from_ref(t),
            SmallList::Many(b) => b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{retire, SmallList, REBUILD_UP_TO};
    use arc_swap::ArcSwap;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;

    #[test]
    fn push_and_remove_keep_order() {
        let empty: SmallList<u32> = SmallList::Empty;
        let one = empty.pushed(1);
        assert!(matches!(one, SmallList::One(1)));
        let three = one.pushed(2).pushed(3);
        assert_eq!(&*three, &[1, 2, 3]);
        assert_eq!(&*three.without(|&x| x == 2), &[1, 3]);
        assert!(matches!(three.without(|&x| x != 3), SmallList::One(3)));
        assert!(three.without(|_| true).is_empty());
    }

    /// Elements are (value, gone flag); the flag is what readers test.
    fn flagged(list: &ArcSwap<SmallList<(u32, Arc<AtomicBool>)>>) -> Vec<u32> {
        list.load().iter().map(|(v, _)| *v).collect()
    }

    #[test]
    fn retire_rebuilds_short_lists_at_once_and_long_ones_when_half_is_gone() {
        let empty = Arc::new(SmallList::Empty);
        let gone = |(_, f): &(u32, Arc<AtomicBool>)| f.load(Relaxed);
        for n in [1u32, 2, 16, 17, 100, 1000] {
            let flags: Vec<Arc<AtomicBool>> = (0..n).map(|_| Arc::default()).collect();
            let items = (0..n)
                .map(|i| (i, Arc::clone(&flags[i as usize])))
                .collect();
            let list = ArcSwap::new(Arc::new(SmallList::from_vec(items)));
            let mut count = 0;
            let mut rebuilds = 0;
            let mut copied = 0;
            for i in 0..n {
                flags[i as usize].store(true, Relaxed);
                let before = flagged(&list);
                let replaced = retire(&list, &mut count, gone, &empty);
                let after = flagged(&list);
                if let Some(old) = replaced {
                    rebuilds += 1;
                    copied += before.len();
                    assert_eq!(old.iter().map(|(v, _)| *v).collect::<Vec<_>>(), before);
                    // Every flagged element is gone, every other one kept in order.
                    assert_eq!(after, ((i + 1)..n).collect::<Vec<_>>());
                    assert_eq!(count, 0);
                } else {
                    assert_eq!(after, before, "no rebuild: the list is untouched");
                    assert!(n as usize > REBUILD_UP_TO, "short lists rebuild every time");
                    // Never more than half of a long list is flagged.
                    assert!(2 * (count as usize) < before.len());
                }
            }
            assert!(list.load().is_empty(), "the last removal empties the list");
            assert!(Arc::ptr_eq(&list.load_full(), &empty));
            if n as usize <= REBUILD_UP_TO {
                assert_eq!(rebuilds, n);
            }
            // O(1) amortized: the rebuilds copy O(n) elements in all, not O(n) each.
            let bound = 2 * n as usize + REBUILD_UP_TO * REBUILD_UP_TO;
            assert!(copied <= bound, "{copied} elements copied for {n} removals");
        }
    }

    #[test]
    fn retire_counting_too_many_only_rebuilds_sooner() {
        let empty = Arc::new(SmallList::Empty);
        let flags: Vec<Arc<AtomicBool>> = (0..40).map(|_| Arc::default()).collect();
        let items = (0..40u32)
            .map(|i| (i, Arc::clone(&flags[i as usize])))
            .collect();
        let list = ArcSwap::new(Arc::new(SmallList::from_vec(items)));
        // Nine removals counted for elements that were never in the list (unsubscribed
        // before being added): nothing in the list is flagged for them.
        let mut count = 9;
        let gone = |(_, f): &(u32, Arc<AtomicBool>)| f.load(Relaxed);
        flags[0].store(true, Relaxed);
        assert!(retire(&list, &mut count, gone, &empty).is_none());
        assert_eq!(count, 10);
        for f in &flags[1..10] {
            f.store(true, Relaxed);
            assert!(retire(&list, &mut count, gone, &empty).is_none());
        }
        flags[10].store(true, Relaxed);
        assert!(retire(&list, &mut count, gone, &empty).is_some());
        assert_eq!(flagged(&list), (11..40).collect::<Vec<_>>());
    }
}
