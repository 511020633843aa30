//! Per-subscription message type filters, read on every publish without a lock.
//!
//! A selective filter delivers the types it accepted by name and, as Stasis's formatter
//! filters do, every type that has an accepted formatter (`FORMATTER_JSON`: the type
//! has `to_json`), including types created or given a formatter later: the type's
//! formatter bits are read at publish time. An explicit decline wins over a formatter:
//! a declined type is not delivered even when it has an accepted formatter (a consumer
//! that takes "every JSON type but this noisy one" says so with one decline). Stasis's
//! decline only clears the type's accept bit, so there the formatter would still let it
//! through; here decline keeps meaning what it means without a selective filter.

use crate::error::{Error, Result};
use crate::message_type::{MessageType, FORMATTERS_KNOWN};
use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Deliver every type (except declined ones).
pub(crate) const FILTER_NONE: u32 = 0;
/// Deliver accepted types only.
pub(crate) const FILTER_SELECTIVE: u32 = 1;

/// Bit sets by type id (ids are never reused: types live as long as the process).
#[derive(Clone, Default)]
struct TypeSets {
    accepted: Vec<u64>,
    declined: Vec<u64>,
    /// Accepted formatter bits (`FORMATTER_JSON`...), used in selective mode.
    formatters: u8,
}

fn bit(set: &[u64], id: u32) -> bool {
    set.get((id / 64) as usize)
        .is_some_and(|w| w & (1 << (id % 64)) != 0)
}

fn set_bit(set: &mut Vec<u64>, id: u32, on: bool) {
    let word = (id / 64) as usize;
    if set.len() <= word {
        if !on {
            return;
        }
        set.resize(word + 1, 0);
    }
    if on {
        set[word] |= 1 << (id % 64);
    } else {
        set[word] &= !(1 << (id % 64));
    }
}

/// Fast path: mode ALL means "no selective filter and nothing declined", decided with one
/// relaxed load and no pointer chase.
const MODE_ALL: u8 = 0;
const MODE_EXCEPT_DECLINED: u8 = 1;
const MODE_SELECTIVE: u8 = 2;

pub(crate) struct Filter {
    mode: AtomicU8,
    sets: ArcSwapOption<TypeSets>,
    /// Serializes writers (readers never take it).
    write: Mutex<()>,
}

impl Filter {
    pub(crate) fn new() -> Filter {
        Filter {
            mode: AtomicU8::new(MODE_ALL),
            sets: ArcSwapOption::const_empty(),
            write: Mutex::new(()),
        }
    }

    pub(crate) fn accepts(&self, ty: &MessageType) -> bool {
        match self.mode.load(Ordering::Acquire) {
            MODE_ALL => true,
            mode => {
                let sets = self.sets.load();
                let Some(sets) = sets.as_ref() else {
                    return mode != MODE_SELECTIVE;
                };
                if mode == MODE_SELECTIVE {
                    // The formatter test runs only for types not accepted by name, so a
                    // filter without formatters pays nothing more than its bit test.
                    bit(&sets.accepted, ty.id())
                        || (sets.formatters & ty.formatters() != 0 && !bit(&sets.declined, ty.id()))
                } else {
                    !bit(&sets.declined, ty.id())
                }
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut TypeSets, &mut bool)) {
        let _w = self.write.lock();
        let mut sets = self
            .sets
            .load_full()
            .map(|s| (*s).clone())
            .unwrap_or_default();
        let mut selective = self.mode.load(Ordering::Relaxed) == MODE_SELECTIVE;
        f(&mut sets, &mut selective);
        let any_declined = sets.declined.iter().any(|w| *w != 0);
        self.sets.store(Some(Arc::new(sets)));
        let mode = if selective {
            MODE_SELECTIVE
        } else if any_declined {
            MODE_EXCEPT_DECLINED
        } else {
            MODE_ALL
        };
        self.mode.store(mode, Ordering::Release);
        crate::tap::interest_changed();
    }

    /// Accepts `ty` and switches to selective filtering.
    pub(crate) fn accept(&self, ty: &Arc<MessageType>) {
        self.update(|sets, selective| {
            set_bit(&mut sets.accepted, ty.id(), true);
            set_bit(&mut sets.declined, ty.id(), false);
            *selective = true;
        });
    }

    /// Stops delivering `ty`, whatever the filter mode.
    pub(crate) fn decline(&self, ty: &Arc<MessageType>) {
        self.update(|sets, _| {
            set_bit(&mut sets.accepted, ty.id(), false);
            set_bit(&mut sets.declined, ty.id(), true);
        });
    }

    /// Accepts exactly `types` (selective mode); declines are kept.
    pub(crate) fn replace_accepted<'a>(&self, types: impl Iterator<Item = &'a Arc<MessageType>>) {
        self.update(|sets, selective| {
            sets.accepted.clear();
            for ty in types {
                set_bit(&mut sets.accepted, ty.id(), true);
            }
            *selective = true;
        });
    }

    /// Also accepts every type that has one of the `formatters` bits, and switches to
    /// selective filtering (nothing changes for 0). Unknown bits are refused.
    pub(crate) fn accept_formatters(&self, formatters: u32) -> Result<()> {
        if formatters & !u32::from(FORMATTERS_KNOWN) != 0 {
            return Err(Error::invalid(format!(
                "unknown formatter bits {:#x} (known: {:#x})",
                formatters & !u32::from(FORMATTERS_KNOWN),
                FORMATTERS_KNOWN
            )));
        }
        if formatters == 0 {
            return Ok(());
        }
        self.update(|sets, selective| {
            sets.formatters |= formatters as u8;
            *selective = true;
        });
        Ok(())
    }

    pub(crate) fn set_selective(&self, on: bool) {
        self.update(|_, selective| *selective = on);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::message_type::ToJsonFn;

    fn json() -> Option<ToJsonFn> {
        Some(Box::new(|_| Some("{}".into())))
    }

    #[test]
    fn formatters_or_types_and_decline_wins() {
        let j = MessageType::create("unit/filter/json", json()).unwrap();
        let p = MessageType::create("unit/filter/plain", None).unwrap();
        let f = Filter::new();
        assert!(f.accepts(&j) && f.accepts(&p));
        assert!(f.accept_formatters(2).is_err());
        assert!(f.accepts(&p), "a refused call changes nothing");
        f.accept_formatters(u32::from(FORMATTERS_KNOWN)).unwrap();
        assert!(f.accepts(&j) && !f.accepts(&p));
        f.accept(&p);
        assert!(f.accepts(&j) && f.accepts(&p));
        f.decline(&j);
        assert!(!f.accepts(&j) && f.accepts(&p));
        // A type created after the filter, with a formatter.
        let epoch = crate::tap::interest_epoch();
        let later = MessageType::create("unit/filter/json-later", json()).unwrap();
        assert!(
            crate::tap::interest_epoch() > epoch,
            "cluster interest looks again"
        );
        assert!(f.accepts(&later));
    }
}
