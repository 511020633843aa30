//! Lists split in two: the first element in a slot of its owner, the others in a
//! `SmallList` snapshot kept elsewhere (a topic's subscribers and forwards).
//!
//! Most topics have one subscription and forward to at most one topic. Even with one
//! element inline, a `SmallList` behind an `ArcSwap` costs an allocation (48 bytes with
//! the `Arc`'s counts and the allocator's header), per list and per topic: W8 holds
//! 100,000 of each. Here the first element sits in an `ArcSwapOption` of the owner (a
//! pointer it had anyway), and only a second element makes a list, which the owner keeps
//! in a part it allocates on demand. Readers load the slot, and the list only when the
//! owner's `has_more` flag says there is one: the common publish still makes one
//! arc-swap load.
//!
//! Elements never move between the slot and the list, so a reader that loads the two
//! one after the other sees each element at most once; an element added before the load
//! began is seen. A freed slot takes the next element added, whatever the list holds.
//! Removal is by flag, as for `SmallList` (`small_list::retire`): a flagged element in
//! the slot leaves it at once; one in the list leaves with the others later.
//!
//! Writers are serialized by the owner.

use crate::small_list::{retire, SmallList};
use arc_swap::{ArcSwap, ArcSwapOption, Guard};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The list part of a split list.
pub(crate) type More<E> = ArcSwap<SmallList<Arc<E>>>;

/// Adds `item`: into the slot when it is free, else to the list (`more` gives the list,
/// creating the owner's part that holds it if needed).
pub(crate) fn push<'a, E: 'a>(
    first: &ArcSwapOption<E>,
    has_more: &AtomicBool,
    more: impl FnOnce() -> &'a More<E>,
    item: Arc<E>,
) {
    if first.load().is_none() {
        first.store(Some(item));
        return;
    }
    let more = more();
    let list = more.load().pushed(item);
    more.store(Arc::new(list));
    has_more.store(true, Ordering::Release);
}

/// What a removal replaced, to be dropped by the caller once it holds no lock (the last
/// reference to an element may go with it).
#[must_use]
pub(crate) struct Replaced<E> {
    _first: Option<Arc<E>>,
    _more: Option<Arc<SmallList<Arc<E>>>>,
}

/// Records that one more element is flagged as gone (see `small_list::retire`, whose
/// counting rules `gone` follows): a flagged element in the slot leaves it now;
/// otherwise the list is rebuilt when its flagged elements are many enough. Counting
/// the slot's removal against the call of another element (two flagged at once) only
/// brings the list's rebuild forward.
pub(crate) fn retire_one<E>(
    first: &ArcSwapOption<E>,
    has_more: &AtomicBool,
    more: Option<&More<E>>,
    gone: &mut u32,
    is_gone: impl Fn(&Arc<E>) -> bool,
    empty: &Arc<SmallList<Arc<E>>>,
) -> Replaced<E> {
    if first.load().as_ref().is_some_and(&is_gone) {
        return Replaced {
            _first: first.swap(None),
            _more: None,
        };
    }
    let replaced = more.and_then(|more| {
        let replaced = retire(more, gone, &is_gone, empty);
        if replaced.is_some() && more.load().is_empty() {
            has_more.store(false, Ordering::Release);
        }
        replaced
    });
    Replaced {
        _first: None,
        _more: replaced,
    }
}

/// True when neither part holds an element (flagged ones count).
pub(crate) fn is_empty<E>(first: &ArcSwapOption<E>, more: Option<&More<E>>) -> bool {
    first.load().is_none() && more.is_none_or(|m| m.load().is_empty())
}

/// A reader's view of both parts; holds them (and so their elements) alive.
pub(crate) struct Snapshot<E> {
    first: Guard<Option<Arc<E>>>,
    more: Option<Guard<Arc<SmallList<Arc<E>>>>>,
}

impl<E> Snapshot<E> {
    #[inline]
    pub(crate) fn load<'a>(
        first: &ArcSwapOption<E>,
        has_more: &AtomicBool,
        more: impl FnOnce() -> Option<&'a More<E>>,
    ) -> Snapshot<E>
    where
        E: 'a,
    {
        let first = first.load();
        let more = if has_more.load(Ordering::Acquire) {
            more().map(|m| m.load())
        } else {
            None
        };
        Snapshot { first, more }
    }

    /// Slot `i` in order (the owner's slot is 0): None past the end, Some(None) for an
    /// empty owner's slot.
    #[inline]
    pub(crate) fn slot(&self, i: usize) -> Option<Option<&Arc<E>>> {
        match i {
            0 => Some(self.first.as_ref()),
            _ => self.more.as_ref()?.get(i - 1).map(Some),
        }
    }

    #[inline]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<E>> {
        self.first
            .as_ref()
            .into_iter()
            .chain(self.more.iter().flat_map(|m| m.iter()))
    }
}
