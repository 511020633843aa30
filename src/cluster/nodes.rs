//! The node table: who is in the cluster, as heartbeats tell. Pure bookkeeping with the
//! time passed in, so every transition is unit-tested without a network.
//!
//! A node is up while heartbeats arrive; down once none came for `heartbeat_ms x
//! down_after_missed` (its own heartbeat period, our count); left when it said so. A
//! heartbeat with a new session is a restart; a new `asserted_ns` means its stored
//! snapshots changed wholesale (a reconnect): both tell the others to re-read them.
//! Live heartbeats also carry how far the node's store writes got (`StoreMarks`, for
//! `catch_up`); presence records read from the store do not count for that.

#[cfg(test)]
use super::wire::NODE_UP;
use super::wire::{Heartbeat, StoreMarks, NODE_LEFT};
use crate::eid::Eid;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub(crate) const STATE_UP: i32 = 1;
pub(crate) const STATE_DOWN: i32 = 2;
pub(crate) const STATE_LEFT: i32 = 3;

/// How long a down or left node stays listed.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub struct Node {
    pub eid: Eid,
    pub name: String,
    pub state: i32,
    pub session: u32,
    pub heartbeat_ms: u32,
    pub asserted_ns: u64,
    /// CLOCK_REALTIME of the last heartbeat, for `sb_cluster_node.last_seen_ns`.
    pub last_seen_ns: u64,
    /// Live heartbeats heard from this session, and the store marks of the last one.
    pub beats: u64,
    pub store: Option<StoreMarks>,
    last_seen: Instant,
    changed: Instant,
}

/// What a heartbeat or a tick changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The node's state changed (to `state`), or it restarted while up.
    StateChanged { eid: Eid, state: i32 },
    /// The node's stored snapshots must be (re-)read: a node seen for the first time,
    /// back from down, a new session (`restarted`) or a new assertion.
    Reread { eid: Eid, restarted: bool },
}

pub struct NodeTable {
    me: Eid,
    down_after_missed: u32,
    nodes: HashMap<Eid, Node>,
}

impl NodeTable {
    pub fn new(me: Eid, down_after_missed: u32) -> NodeTable {
        NodeTable {
            me,
            down_after_missed,
            nodes: HashMap::new(),
        }
    }

    pub fn get(&self, eid: &Eid) -> Option<&Node> {
        self.nodes.get(eid)
    }

    pub fn is_up(&self, eid: &Eid) -> bool {
        self.nodes.get(eid).is_some_and(|n| n.state == STATE_UP)
    }

    pub fn up_count(&self) -> usize {
        self.nodes.values().filter(|n| n.state == STATE_UP).count()
    }

    pub fn all(&self) -> Vec<Node> {
        let mut v: Vec<Node> = self.nodes.values().cloned().collect();
        v.sort_by_key(|n| n.eid);
        v
    }

    /// Records our own entry (always up while joined).
    pub fn set_self(&mut self, hb: &Heartbeat, now: Instant, now_ns: u64) {
        self.apply(hb, now, now_ns);
    }

    /// A heartbeat arrived (live, on the heartbeat subject).
    pub fn on_heartbeat(&mut self, hb: &Heartbeat, now: Instant, now_ns: u64) -> Vec<Event> {
        if hb.eid == self.me {
            return Vec::new();
        }
        let events = self.apply(hb, now, now_ns);
        if let Some(n) = self.nodes.get_mut(&hb.eid) {
            if n.session == hb.session && n.state == STATE_UP {
                n.beats += 1;
                // Both counts only grow within a session; a heartbeat that left the
                // sender before the one heard last (the presence record's, published once
                // written) must not take them back.
                n.store = match (n.store, hb.store) {
                    (Some(was), Some(now)) => Some(StoreMarks {
                        queued: was.queued.max(now.queued),
                        stored: was.stored.max(now.stored),
                    }),
                    (_, now) => now,
                };
            }
        }
        events
    }

    /// A presence record was read from the store: a node not heard from yet is taken as
    /// a heartbeat of it (its store marks do not count: they are as old as the record).
    /// A node already known is left alone: its live heartbeats are newer than any record
    /// (a record read before a heartbeat was handled would take its assertion time back,
    /// or bring a node taken for down back up), and a new assertion or session of it
    /// must come from the heartbeat that reports it, which asks for its re-read.
    pub fn on_presence(&mut self, hb: &Heartbeat, now: Instant, now_ns: u64) -> Vec<Event> {
        if hb.eid == self.me || self.nodes.contains_key(&hb.eid) {
            return Vec::new();
        }
        self.apply(hb, now, now_ns)
    }

    fn apply(&mut self, hb: &Heartbeat, now: Instant, now_ns: u64) -> Vec<Event> {
        let new_state = if hb.state == NODE_LEFT {
            STATE_LEFT
        } else {
            STATE_UP
        };
        let mut events = Vec::new();
        match self.nodes.get_mut(&hb.eid) {
            None => {
                if new_state == STATE_LEFT {
                    return events; // never knew it
                }
                self.nodes.insert(
                    hb.eid,
                    Node {
                        eid: hb.eid,
                        name: hb.name.clone(),
                        state: STATE_UP,
                        session: hb.session,
                        heartbeat_ms: hb.heartbeat_ms,
                        asserted_ns: hb.asserted_ns,
                        last_seen_ns: now_ns,
                        beats: 0,
                        store: None,
                        last_seen: now,
                        changed: now,
                    },
                );
                events.push(Event::StateChanged {
                    eid: hb.eid,
                    state: STATE_UP,
                });
                events.push(Event::Reread {
                    eid: hb.eid,
                    restarted: false,
                });
            }
            Some(n) => {
                let restarted = n.session != hb.session;
                if n.state == STATE_LEFT && !restarted && new_state == STATE_UP {
                    // A late heartbeat of a session that already said goodbye.
                    return events;
                }
                let reasserted = n.asserted_ns != hb.asserted_ns;
                let was = n.state;
                n.name.clone_from(&hb.name);
                if restarted {
                    n.beats = 0;
                    n.store = None;
                }
                n.session = hb.session;
                n.heartbeat_ms = hb.heartbeat_ms;
                n.asserted_ns = hb.asserted_ns;
                n.last_seen_ns = now_ns;
                n.last_seen = now;
                if was != new_state {
                    n.state = new_state;
                    n.changed = now;
                    events.push(Event::StateChanged {
                        eid: hb.eid,
                        state: new_state,
                    });
                } else if restarted && new_state == STATE_UP {
                    // Restarted before we noticed it was gone: a change of session is
                    // reported as "up again".
                    n.changed = now;
                    events.push(Event::StateChanged {
                        eid: hb.eid,
                        state: STATE_UP,
                    });
                }
                if new_state == STATE_UP && (restarted || reasserted || was != STATE_UP) {
                    events.push(Event::Reread {
                        eid: hb.eid,
                        restarted,
                    });
                }
            }
        }
        events
    }

    /// Restarts every up node's silence count (after we were disconnected: not hearing
    /// anyone then says nothing about them).
    pub fn grace(&mut self, now: Instant) {
        for n in self.nodes.values_mut() {
            n.last_seen = now;
        }
    }

    /// Marks silent nodes down and forgets long-gone ones.
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let missed = self.down_after_missed;
        let me = self.me;
        for n in self.nodes.values_mut() {
            if n.eid == me || n.state != STATE_UP {
                continue;
            }
            let limit = Duration::from_millis(u64::from(n.heartbeat_ms) * u64::from(missed));
            if now.saturating_duration_since(n.last_seen) > limit {
                n.state = STATE_DOWN;
                n.changed = now;
                events.push(Event::StateChanged {
                    eid: n.eid,
                    state: STATE_DOWN,
                });
            }
        }
        self.nodes
            .retain(|_, n| n.state == STATE_UP || now.duration_since(n.changed) < FORGET_AFTER);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(eid: u8, session: u32, asserted: u64, state: u8) -> Heartbeat {
        Heartbeat {
            state,
            eid: Eid {
                bytes: [0, 0, 0, 0, 0, eid],
            },
            session,
            heartbeat_ms: 100,
            asserted_ns: asserted,
            name: format!("n{eid}"),
            store: None,
        }
    }

    #[test]
    fn lifecycle() {
        let me = hb(9, 0, 0, NODE_UP).eid;
        let mut t = NodeTable::new(me, 3);
        let t0 = Instant::now();
        let ev = t.on_heartbeat(&hb(1, 1, 0, NODE_UP), t0, 0);
        assert_eq!(ev.len(), 2);
        assert!(t.is_up(&hb(1, 1, 0, NODE_UP).eid));
        // steady heartbeats: nothing
        assert!(t
            .on_heartbeat(&hb(1, 1, 0, NODE_UP), t0 + Duration::from_millis(100), 0)
            .is_empty());
        // 300 ms of silence is not yet down, 301+ is
        assert!(t.tick(t0 + Duration::from_millis(399)).is_empty());
        let ev = t.tick(t0 + Duration::from_millis(402));
        assert_eq!(
            ev,
            vec![Event::StateChanged {
                eid: hb(1, 1, 0, 0).eid,
                state: STATE_DOWN
            }]
        );
        // back up: state change and a re-read
        let ev = t.on_heartbeat(&hb(1, 1, 0, NODE_UP), t0 + Duration::from_millis(500), 0);
        assert_eq!(ev.len(), 2);
        // new assertion: re-read only
        let ev = t.on_heartbeat(&hb(1, 1, 5, NODE_UP), t0 + Duration::from_millis(600), 0);
        assert_eq!(
            ev,
            vec![Event::Reread {
                eid: hb(1, 1, 0, 0).eid,
                restarted: false
            }]
        );
        // restart (new session) while up: up again + re-read as restarted
        let ev = t.on_heartbeat(&hb(1, 2, 5, NODE_UP), t0 + Duration::from_millis(700), 0);
        assert_eq!(ev.len(), 2);
        assert!(matches!(
            ev[1],
            Event::Reread {
                restarted: true,
                ..
            }
        ));
        // leave, then a stale heartbeat of the same session is ignored
        let ev = t.on_heartbeat(&hb(1, 2, 5, NODE_LEFT), t0 + Duration::from_millis(800), 0);
        assert_eq!(ev.len(), 1);
        assert!(t
            .on_heartbeat(&hb(1, 2, 5, NODE_UP), t0 + Duration::from_millis(810), 0)
            .is_empty());
        // forgotten after ten minutes
        t.tick(t0 + FORGET_AFTER + Duration::from_secs(1));
        assert!(t.get(&hb(1, 0, 0, 0).eid).is_none());
        // our own heartbeats never count
        assert!(t.on_heartbeat(&hb(9, 1, 0, NODE_UP), t0, 0).is_empty());
        assert!(t.get(&me).is_none());
    }

    #[test]
    fn presence_records_tell_only_of_nodes_not_heard_yet() {
        let me = hb(9, 0, 0, NODE_UP).eid;
        let mut t = NodeTable::new(me, 3);
        let t0 = Instant::now();
        let one = hb(1, 1, 0, NODE_UP).eid;
        // unknown: up, and its stored snapshots to be read
        let ev = t.on_presence(&hb(1, 1, 5, NODE_UP), t0, 0);
        assert_eq!(
            ev,
            vec![
                Event::StateChanged {
                    eid: one,
                    state: STATE_UP
                },
                Event::Reread {
                    eid: one,
                    restarted: false
                }
            ]
        );
        // a newer assertion heard live, then an older record read: kept, no event
        assert_eq!(t.on_heartbeat(&hb(1, 1, 7, NODE_UP), t0, 0).len(), 1);
        assert!(t.on_presence(&hb(1, 1, 5, NODE_UP), t0, 0).is_empty());
        assert_eq!(t.get(&one).map(|n| n.asserted_ns), Some(7));
        // a record newer than the heartbeats: the heartbeat that brings it asks for the
        // re-read (a record that took it first would have swallowed that)
        assert!(t.on_presence(&hb(1, 1, 9, NODE_UP), t0, 0).is_empty());
        assert_eq!(
            t.on_heartbeat(&hb(1, 1, 9, NODE_UP), t0, 0),
            vec![Event::Reread {
                eid: one,
                restarted: false
            }]
        );
        // a node taken for down stays down until it is heard again
        t.tick(t0 + Duration::from_secs(1));
        assert!(!t.is_up(&one));
        assert!(t
            .on_presence(&hb(1, 1, 9, NODE_UP), t0 + Duration::from_secs(1), 0)
            .is_empty());
        assert!(!t.is_up(&one));
    }

    #[test]
    fn store_marks_never_go_back_within_a_session() {
        let me = hb(9, 0, 0, NODE_UP).eid;
        let mut t = NodeTable::new(me, 3);
        let t0 = Instant::now();
        let with = |session, queued, stored| Heartbeat {
            store: Some(StoreMarks { queued, stored }),
            ..hb(1, session, 0, NODE_UP)
        };
        let marks = |t: &NodeTable| t.get(&hb(1, 0, 0, 0).eid).and_then(|n| n.store);
        t.on_heartbeat(&with(1, 10, 8), t0, 0);
        t.on_heartbeat(&with(1, 7, 9), t0, 0); // older queued, newer stored
        assert_eq!(
            marks(&t),
            Some(StoreMarks {
                queued: 10,
                stored: 9
            })
        );
        // a sender that stops sending marks: none
        t.on_heartbeat(&hb(1, 1, 0, NODE_UP), t0, 0);
        assert_eq!(marks(&t), None);
        // a new session starts from its own
        t.on_heartbeat(&with(1, 12, 3), t0, 0);
        t.on_heartbeat(&with(2, 2, 1), t0, 0);
        assert_eq!(
            marks(&t),
            Some(StoreMarks {
                queued: 2,
                stored: 1
            })
        );
    }
}
