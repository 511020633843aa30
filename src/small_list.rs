//! Immutable list snapshots (a topic's subscribers, its forwards) that hold a single
//! element inline.
//!
//! Most topics have one subscription and forward to at most one topic; as an
//! `Arc<Vec<T>>` each such list cost two allocations (the `Arc` and the vector's buffer).
//! `SmallList` stores zero or one element inside the `Arc` allocation itself; longer lists
//! use one boxed slice. Lists are never mutated: writers build a new one and swap it in.

use std::ops::Deref;

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
    use super::SmallList;

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
}
