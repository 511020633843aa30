//! When a node that dropped arrivals re-reads each other node's stored snapshots. Pure
//! bookkeeping over the node table, so every step is unit-tested without a network.
//!
//! Other nodes' cache changes among the dropped arrivals reach this node only through
//! the store, and a sender's store writes can lag its messages by seconds (a burst of
//! changes, a store that answers slowly): a re-read before they land misses them, and
//! nothing reads them again. So each sender is re-read only once its heartbeats say that
//! its store writes made before the drops are behind it. Live heartbeats carry two
//! counts of the sender's store writes (`StoreMarks`): made (`queued`) and done
//! (`stored`). Once this node sees two more heartbeats of a sender after the drops
//! ended, the second one was read after every dropped message of that sender was
//! published (the first was published after them: a sender's messages reach us in the
//! order it published them), and a cache change's store write is queued before the
//! message that carries it goes out (the cache's tap runs before the topic's). The
//! sender is ready once its `stored` reaches that heartbeat's `queued`.
//!
//! Not covered: a change whose store write was queued after its message (two threads
//! publishing to one cached topic at once, one running the other's cache update later)
//! and later than that heartbeat; a node re-asserts (and is re-read) after any store
//! write that failed.

use super::nodes::{NodeTable, STATE_UP};
use crate::eid::Eid;
use std::collections::HashMap;

/// Heartbeats of a sender awaited after the drops (see the module's comment).
const BEATS_AFTER: u64 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// For the sender's `BEATS_AFTER`th heartbeat after `base`.
    Beats { session: u32, base: u64 },
    /// For the sender's store writes up to `target` to be done.
    Stored { session: u32, target: u64 },
}

/// The senders still to be re-read after a run of dropped arrivals.
#[derive(Debug, Default)]
pub(crate) struct CatchUp {
    waiting: HashMap<Eid, Wait>,
}

impl CatchUp {
    /// Starts once the drops ended: every other node up. Returns those to re-read at
    /// once: nodes whose heartbeats carry no store marks (older nodes, or none heard
    /// yet), for which there is nothing to wait for.
    pub(crate) fn start(nodes: &NodeTable, me: Eid) -> (CatchUp, Vec<Eid>) {
        let mut wait = CatchUp::default();
        let mut now = Vec::new();
        for n in nodes.all() {
            if n.eid == me || n.state != STATE_UP {
                continue;
            }
            if n.store.is_none() {
                now.push(n.eid);
            } else {
                wait.waiting.insert(
                    n.eid,
                    Wait::Beats {
                        session: n.session,
                        base: n.beats,
                    },
                );
            }
        }
        (wait, now)
    }

    /// The senders ready to be re-read now (no longer waited for). A sender gone down or
    /// left, or restarted, is no longer waited for either: a node is re-read whenever it
    /// comes back up or restarts.
    pub(crate) fn poll(&mut self, nodes: &NodeTable) -> Vec<Eid> {
        let mut ready = Vec::new();
        self.waiting.retain(|eid, w| {
            let Some(n) = nodes.get(eid) else {
                return false;
            };
            let session = match *w {
                Wait::Beats { session, .. } | Wait::Stored { session, .. } => session,
            };
            if n.state != STATE_UP || n.session != session {
                return false;
            }
            let Some(marks) = n.store else {
                // The same session stopped sending marks: nothing to wait for.
                ready.push(*eid);
                return false;
            };
            if let Wait::Beats { base, .. } = *w {
                if n.beats < base + BEATS_AFTER {
                    return true;
                }
                *w = Wait::Stored {
                    session,
                    target: marks.queued,
                };
            }
            match *w {
                Wait::Stored { target, .. } if marks.stored >= target => {
                    ready.push(*eid);
                    false
                }
                _ => true,
            }
        });
        ready.sort();
        ready
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The senders still waited for (when the wait is given up).
    pub(crate) fn rest(self) -> Vec<Eid> {
        let mut v: Vec<Eid> = self.waiting.into_keys().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::{Heartbeat, StoreMarks, NODE_LEFT, NODE_UP};
    use std::time::{Duration, Instant};

    fn eid(n: u8) -> Eid {
        Eid {
            bytes: [0, 0, 0, 0, 0, n],
        }
    }

    fn hb(n: u8, session: u32, marks: Option<(u64, u64)>) -> Heartbeat {
        Heartbeat {
            state: NODE_UP,
            eid: eid(n),
            session,
            heartbeat_ms: 100,
            asserted_ns: 0,
            name: format!("n{n}"),
            store: marks.map(|(queued, stored)| StoreMarks { queued, stored }),
        }
    }

    struct Clock(Instant);
    impl Clock {
        fn next(&mut self) -> Instant {
            self.0 += Duration::from_millis(10);
            self.0
        }
    }

    #[test]
    fn waits_for_two_beats_then_for_the_writes_queued_by_then() {
        let mut t = NodeTable::new(eid(9), 3);
        let mut c = Clock(Instant::now());
        t.on_heartbeat(&hb(1, 1, Some((100, 40))), c.next(), 0);
        let (mut w, now) = CatchUp::start(&t, eid(9));
        assert!(now.is_empty());
        // One beat: not yet, even with everything stored.
        t.on_heartbeat(&hb(1, 1, Some((100, 100))), c.next(), 0);
        assert!(w.poll(&t).is_empty());
        // The second beat sets the target (150 queued by then); 120 are stored.
        t.on_heartbeat(&hb(1, 1, Some((150, 120))), c.next(), 0);
        assert!(w.poll(&t).is_empty());
        // Later writes move `queued` on; the target stays.
        t.on_heartbeat(&hb(1, 1, Some((400, 149))), c.next(), 0);
        assert!(w.poll(&t).is_empty());
        t.on_heartbeat(&hb(1, 1, Some((500, 150))), c.next(), 0);
        assert_eq!(w.poll(&t), vec![eid(1)]);
        assert!(w.is_empty());
    }

    #[test]
    fn presence_records_do_not_count_as_beats() {
        let mut t = NodeTable::new(eid(9), 3);
        let mut c = Clock(Instant::now());
        t.on_heartbeat(&hb(1, 1, Some((10, 10))), c.next(), 0);
        let (mut w, _) = CatchUp::start(&t, eid(9));
        t.on_presence(&hb(1, 1, Some((0, 0))), c.next(), 0);
        t.on_presence(&hb(1, 1, Some((0, 0))), c.next(), 0);
        assert!(w.poll(&t).is_empty());
        t.on_heartbeat(&hb(1, 1, Some((10, 10))), c.next(), 0);
        t.on_heartbeat(&hb(1, 1, Some((10, 10))), c.next(), 0);
        assert_eq!(w.poll(&t), vec![eid(1)]);
    }

    #[test]
    fn older_nodes_at_once_gone_or_restarted_nodes_dropped() {
        let mut t = NodeTable::new(eid(9), 3);
        let mut c = Clock(Instant::now());
        let t0 = c.next();
        t.on_heartbeat(&hb(1, 1, None), t0, 0); // an older node: no marks
        t.on_heartbeat(&hb(2, 1, Some((5, 0))), t0, 0);
        t.on_heartbeat(&hb(3, 1, Some((5, 0))), t0, 0);
        t.on_heartbeat(&hb(4, 1, Some((5, 0))), t0, 0);
        t.on_heartbeat(&hb(9, 1, Some((5, 0))), t0, 0); // ourselves: never listed
        let (mut w, now) = CatchUp::start(&t, eid(9));
        assert_eq!(now, vec![eid(1)]);
        // 2 restarts (its new session is re-read on its own), 3 leaves, 4 stays.
        t.on_heartbeat(&hb(2, 2, Some((0, 0))), c.next(), 0);
        let mut left = hb(3, 1, Some((5, 0)));
        left.state = NODE_LEFT;
        t.on_heartbeat(&left, c.next(), 0);
        assert!(w.poll(&t).is_empty());
        assert_eq!(w.waiting.len(), 1);
        // 4 goes silent and is taken for down.
        t.tick(c.next() + Duration::from_secs(1));
        assert!(w.poll(&t).is_empty());
        assert!(w.is_empty());
    }

    #[test]
    fn given_up_waits_are_listed() {
        let mut t = NodeTable::new(eid(9), 3);
        let now = Instant::now();
        t.on_heartbeat(&hb(2, 1, Some((5, 0))), now, 0);
        t.on_heartbeat(&hb(1, 1, Some((5, 0))), now, 0);
        let (w, _) = CatchUp::start(&t, eid(9));
        assert_eq!(w.rest(), vec![eid(1), eid(2)]);
    }
}
