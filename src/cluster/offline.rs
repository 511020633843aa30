//! The delivery path without a network: hostile arrivals handed straight to a delivery
//! loop of a cluster that never connected. The fuzzer (`fuzz/fuzz_targets/cluster_wire.rs`)
//! and the unit tests below drive it; nothing else uses it.

use super::inbound::{Delivery, StoredEntry};
use super::nodes::NodeTable;
use super::wire;
use super::{codec, config::Config, Inner, SharedTopic, Stats};
use crate::cache::Cache;
use crate::caching_topic::CachingTopic;
use crate::eid::Eid;
use crate::message::{MessageRef, Payload};
use crate::message_type::MessageType;
use crate::topic::Topic;
use crossbeam_queue::ArrayQueue;
use parking_lot::Mutex;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What one arrival is.
pub enum Arrival<'a> {
    /// A message: the subject after `<prefix>.`, and the body.
    Message { subject: &'a str, body: &'a [u8] },
    /// A stored snapshot read back from the store: its key and value.
    Stored { key: &'a str, value: &'a [u8] },
    /// A heartbeat body.
    Heartbeat { body: &'a [u8] },
    /// Topic "t" is shared from here on, or not (`sb_cluster_share_topic`, `_unshare_topic`).
    Shared { on: bool },
}

/// Counters after a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub received: u64,
    pub dropped_in: u64,
    /// Messages the local subscription of the shared topic got.
    pub delivered: usize,
}

fn id_of(msg: &MessageRef) -> Option<Cow<'_, str>> {
    let Payload::Bytes(b) = msg.payload() else {
        return None;
    };
    let end = b.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&b[..end]).ok().map(Cow::Borrowed)
}

/// Runs `arrivals` through a delivery loop whose node shares topic "t" (with a cache).
/// Known types there: "bytes" (none needed), "codec" (decodes exactly 4 bytes).
pub fn deliver(arrivals: &[Arrival<'_>]) -> Outcome {
    // Topic "t" is process-wide: one run at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock();
    let codec_ty = MessageType::create("offline-codec", None).expect("valid name");
    codec::set(
        &codec_ty,
        Some(codec::Codec {
            encode: None,
            decode: Some(Box::new(|b: &[u8]| {
                (b.len() == 4).then(|| Payload::Bytes(b.to_vec().into_boxed_slice()))
            })),
        }),
    );
    let me = Eid {
        bytes: [0xfe, 0, 0, 0, 0, 1],
    };
    let topic = Topic::create("t").expect("valid name");
    let cache = Cache::new(Box::new(id_of));
    let ct = CachingTopic::create(&topic, &cache).expect("caching topic");
    let delivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d2 = Arc::clone(&delivered);
    let sub = crate::subscription::Subscription::subscribe(
        &topic,
        crate::Kind::Synchronous,
        Box::new(move |_, msg: &MessageRef| {
            if !Arc::ptr_eq(msg.message_type(), crate::subscription::change_type()) {
                d2.fetch_add(1, Ordering::Relaxed);
            }
        }),
    )
    .expect("subscribe");
    let (cmd, _rx) = tokio::sync::mpsc::unbounded_channel();
    let mut topics = HashMap::new();
    topics.insert(
        "t".to_owned(),
        SharedTopic {
            topic: Arc::clone(&topic),
            token: wire::escaped("t").into(),
            shared: true,
            export_json: false,
            caching: Some(Arc::clone(&ct)),
        },
    );
    let inner = Arc::new(Inner {
        cfg: Config::default(),
        me,
        session: 1,
        fork_gen: crate::fork::generation(),
        bucket: "sb_state".into(),
        cluster_topic: Topic::create("cluster:offline").expect("valid name"),
        out: ArrayQueue::new(16),
        out_notify: tokio::sync::Notify::new(),
        cache_change_dropped: Default::default(),
        stats: Stats::default(),
        nodes: Mutex::new(NodeTable::new(me, 3)),
        topics: super::topic_map::TopicMap::new(topics),
        cmd,
        refusals: Default::default(),
    });
    let mut delivery = Delivery::new(Arc::clone(&inner));
    let mut stored = Vec::new();
    for a in arrivals {
        match a {
            Arrival::Message { subject, body } => delivery.on_message(subject, body),
            Arrival::Stored { key, value } => match wire::parse_snapshot_key(key) {
                Ok(key) => stored.push(StoredEntry {
                    key,
                    value: bytes::Bytes::copy_from_slice(value),
                }),
                Err(_) => {
                    inner.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
                }
            },
            Arrival::Heartbeat { body } => {
                if let Ok(hb) = wire::Heartbeat::decode(body) {
                    let now = std::time::Instant::now();
                    inner.nodes.lock().on_heartbeat(&hb, now, 0);
                }
            }
            Arrival::Shared { on } => {
                if let Some(st) = inner.topics.write().get_mut("t") {
                    st.shared = *on;
                }
            }
        }
    }
    if !stored.is_empty() {
        let asserted: HashMap<Eid, u64> = stored.iter().map(|e| (e.key.eid, u64::MAX)).collect();
        // A re-read applies the nodes up when it ends: those whose records were read.
        let now = std::time::Instant::now();
        for eid in asserted.keys() {
            let hb = wire::Heartbeat {
                state: wire::NODE_UP,
                eid: *eid,
                session: 0,
                heartbeat_ms: 1000,
                asserted_ns: u64::MAX,
                name: String::new(),
                store: None,
            };
            inner.nodes.lock().on_heartbeat(&hb, now, 0);
        }
        delivery.reconcile(None, &asserted, &stored);
    }
    let out = Outcome {
        received: inner.stats.received.load(Ordering::Relaxed),
        dropped_in: inner.stats.dropped_in.load(Ordering::Relaxed),
        delivered: delivered.load(Ordering::Relaxed),
    };
    let _ = sub.unsubscribe_and_join();
    let _ = ct.subscription().unsubscribe_and_join();
    inner.topics.write().clear();
    codec::set(&codec_ty, None);
    out
}

/// A well-formed message body from `eid` (for tests and the fuzzer's seeds).
pub fn body(eid: [u8; 6], session: u32, seq: u64, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    wire::Envelope {
        flags,
        eid: Eid { bytes: eid },
        session,
        seq,
        timestamp_ns: 1,
    }
    .write(&mut b);
    b.extend_from_slice(payload);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::{FLAG_BYTES, FLAG_CLEAR};

    const OTHER: [u8; 6] = [0, 0, 0, 0, 0, 2];

    #[test]
    fn hostile_arrivals_are_counted_not_fatal() {
        let good = body(OTHER, 1, 1, FLAG_BYTES, b"x\0hello");
        let dup = good.clone();
        let mut bad_flags = body(OTHER, 1, 2, FLAG_BYTES, b"x");
        bad_flags[1] = 0x80;
        let short = &good[..10];
        let out = deliver(&[
            Arrival::Message {
                subject: "m.t.bytes",
                body: &good,
            },
            Arrival::Message {
                subject: "m.t.bytes",
                body: &dup,
            }, // duplicate: ignored
            Arrival::Message {
                subject: "m.t.bytes",
                body: &bad_flags,
            },
            Arrival::Message {
                subject: "m.t.bytes",
                body: short,
            },
            Arrival::Message {
                subject: "m.t",
                body: &good,
            },
            Arrival::Message {
                subject: "m.t.=ZZ",
                body: &good,
            },
            Arrival::Message {
                subject: "m.unshared.bytes",
                body: &body(OTHER, 1, 7, FLAG_BYTES, b"x\0"),
            },
            Arrival::Message {
                subject: "q.t.bytes",
                body: &good,
            },
            Arrival::Message {
                subject: "m.t.nosuchcodectype",
                body: &body(OTHER, 1, 3, 0, b"abc"),
            },
            Arrival::Message {
                subject: "m.t.offline-codec",
                body: &body(OTHER, 1, 4, 0, b"abc"), // decoder refuses 3 bytes
            },
            Arrival::Message {
                subject: "m.t.offline-codec",
                body: &body(OTHER, 1, 5, 0, b"abcd"), // decodes
            },
            Arrival::Message {
                subject: "m.t.bytes",
                body: &body(OTHER, 1, 6, FLAG_BYTES | FLAG_CLEAR, b"x\0"),
            },
            Arrival::Stored {
                key: "not a key",
                value: b"",
            },
            Arrival::Stored {
                key: "000000000002.c.t.bytes.y",
                value: &body([9; 6], 0, 0, FLAG_BYTES, b"y\0"), // another node's value
            },
            Arrival::Stored {
                key: "000000000002.c.t.bytes.z",
                value: b"\x01",
            },
            Arrival::Heartbeat {
                body: b"\x01\x01garbage",
            },
        ]);
        assert_eq!(out.received, 3, "{out:?}"); // good, codec, clear
        assert_eq!(out.dropped_in, 11, "{out:?}");
        assert_eq!(out.delivered, 3, "{out:?}"); // the clear reaches the subscriber too
    }

    /// The delivery keeps what each subject resolved to: a topic shared, unshared and
    /// shared again in between arrivals on one subject is seen each time.
    #[test]
    fn a_topic_shared_or_not_is_seen_between_arrivals() {
        let msg = |seq| body(OTHER, 1, seq, FLAG_BYTES, b"x\0");
        let (m1, m2, m3, m4) = (msg(1), msg(2), msg(3), msg(4));
        let on = |subject, body| Arrival::Message { subject, body };
        let out = deliver(&[
            on("m.t.bytes", &m1),
            Arrival::Shared { on: false },
            on("m.t.bytes", &m2), // not shared here: dropped
            Arrival::Shared { on: true },
            on("m.t.bytes", &m3),
            Arrival::Shared { on: false },
            on("m.t.bytes", &m4), // dropped
        ]);
        assert_eq!((out.received, out.dropped_in), (2, 2), "{out:?}");
    }

    #[test]
    fn own_eid_and_other_addressees_are_ignored() {
        let me = [0xfe, 0, 0, 0, 0, 1];
        let out = deliver(&[
            Arrival::Message {
                subject: "m.t.bytes",
                body: &body(me, 1, 1, FLAG_BYTES, b"x\0"),
            },
            Arrival::Message {
                subject: "d.000000000099.t.bytes",
                body: &body(OTHER, 1, 1, FLAG_BYTES, b"x\0"),
            },
            Arrival::Message {
                subject: "d.fe0000000001.t.bytes",
                body: &body(OTHER, 1, 2, FLAG_BYTES, b"x\0"),
            },
        ]);
        assert_eq!((out.received, out.dropped_in), (1, 0), "{out:?}");
    }
}
