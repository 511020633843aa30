//! The delivery thread: turns arrivals into local publishes, and keeps shared caches in
//! line with what the store and the node table say.
//!
//! Everything that changes local state because of the network happens here, in one
//! order: messages, node events, loads and clears are applied in the order the io
//! thread saw them.

use super::nodes::{Node, STATE_DOWN, STATE_LEFT};
use super::wire::{self, Envelope, FLAG_BYTES, FLAG_CLEAR};
use super::{codec, Inner, NodeMessage, SharedTopic};
use crate::caching_topic::{clear_message, CachingTopic};
use crate::eid::Eid;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Message, MessageRef, Payload};
use crate::message_type::{MessageType, TypeRef};
use crate::topic::Topic;
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

/// One stored snapshot read from the store.
pub(crate) struct StoredEntry {
    pub key: wire::SnapshotKey,
    pub value: bytes::Bytes,
}

pub(crate) enum Inbound {
    /// A NATS message on a `m` or `d` subject, as it arrived (the subject still starts
    /// with `P.`; kept in the client's buffer rather than copied).
    Msg {
        subject: async_nats::Subject,
        body: bytes::Bytes,
    },
    /// A node changed state: publish it; clear its entries when it is gone. (Boxed: a
    /// rare item, kept from growing every slot of the arrival queue.)
    Node(Box<Node>),
    /// Make the remote entries of `eid` (every eid in `asserted` when `eid` is None) in
    /// the shared cache(s) equal what the store holds. `topic`: one cache, else all.
    Reconcile {
        topic: Option<String>,
        asserted: HashMap<Eid, u64>,
        entries: Vec<StoredEntry>,
        done: Option<std::sync::mpsc::Sender<Result<()>>>,
    },
    /// Leaving: clear every remote entry of these topics' caches, then give back the
    /// claims of the cluster (its `Inner::owner`) on them.
    ClearRemote(Vec<SharedTopic>, usize),
    Stop,
}

/// Bounded: when delivery falls behind this far, arrivals are dropped and counted
/// (`dropped_in`) by the forwarders, which never wait for room.
const CAPACITY: usize = 65_536;

#[derive(Clone)]
pub(crate) struct InboundTx(tokio::sync::mpsc::Sender<Inbound>);
pub(crate) type InboundRx = tokio::sync::mpsc::Receiver<Inbound>;

pub(crate) fn channel() -> (InboundTx, InboundRx) {
    let (tx, rx) = tokio::sync::mpsc::channel(CAPACITY);
    (InboundTx(tx), rx)
}

impl InboundTx {
    /// From the async side: waits for room.
    pub async fn send(&self, item: Inbound) -> bool {
        self.0.send(item).await.is_ok()
    }
    /// From the async side, never waiting: Err(false) when full, Err(true) when closed.
    pub fn try_send(&self, item: Inbound) -> std::result::Result<(), bool> {
        match self.0.try_send(item) {
            Ok(()) => Ok(()),
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Err(false),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Err(true),
        }
    }
    pub fn stop(&self) {
        // try_send: never block a leave on a full queue; a closed queue stops anyway.
        let _ = self.0.try_send(Inbound::Stop).or_else(|_| {
            if is_delivery_thread() {
                Ok(())
            } else {
                self.0.blocking_send(Inbound::Stop)
            }
        });
    }
    /// The leave's last word: clears the remote entries of `topics`' caches, then gives
    /// back their claims (`owner`'s; only then may another cluster take them, or these
    /// clears would wipe its entries).
    pub fn clear_remote(&self, topics: Vec<SharedTopic>, owner: usize) {
        if is_delivery_thread() {
            // Called from a callback running on a delivery thread (this one's, or
            // another cluster's that may be waiting for us): do it now.
            clear_remote_and_unclaim(&topics, owner);
        } else if let Err(e) = self.0.blocking_send(Inbound::ClearRemote(topics, owner)) {
            // The delivery thread is gone: no clears, but the claims must go.
            if let Inbound::ClearRemote(topics, owner) = e.0 {
                unclaim(&topics, owner);
            }
        }
    }
}

thread_local! {
    /// On a delivery thread, its cluster's `Inner::owner` (0 elsewhere): a thread never
    /// waits for its own queue, while another cluster's delivery thread may.
    static DELIVERY_OF: Cell<usize> = const { Cell::new(0) };
}

/// Whether the calling thread is the delivery thread of the cluster `owner`, which runs
/// the synchronous callbacks of what arrives: it cannot wait for work of its own queue.
pub(crate) fn is_delivery_thread_of(owner: usize) -> bool {
    DELIVERY_OF.with(Cell::get) == owner
}

/// Whether the calling thread is any cluster's delivery thread: it does not wait for
/// another one (which may be waiting for it, each in a callback leaving the other).
pub(crate) fn is_delivery_thread() -> bool {
    DELIVERY_OF.with(Cell::get) != 0
}

pub(crate) fn start(inner: Arc<Inner>, rx: InboundRx) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("sb-cluster-in".into())
        .spawn(move || {
            DELIVERY_OF.with(|c| c.set(inner.owner()));
            Delivery::new(inner).run(rx)
        })
        .map_err(|e| Error::new(ErrorKind::NoMemory, format!("cannot start a thread: {e}")))
}

/// Duplicate detection per sender: the highest sequence number seen and a bitmap of the
/// 64 below it. A message arrives twice only while a subscription is being replaced by
/// a narrower or wider one (both deliver for a moment).
struct SeenWindow {
    session: u32,
    highest: u64,
    bits: u64,
}

impl SeenWindow {
    /// True when (session, seq) is new.
    fn admit(&mut self, session: u32, seq: u64) -> bool {
        if session != self.session {
            *self = SeenWindow {
                session,
                highest: seq,
                bits: 1,
            };
            return true;
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            self.bits = if shift >= 64 { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.highest = seq;
            return true;
        }
        let back = self.highest - seq;
        if back >= 64 {
            return true; // too old to tell: let it through rather than lose it
        }
        let mask = 1u64 << back;
        let fresh = self.bits & mask == 0;
        self.bits |= mask;
        fresh
    }
}

/// What an arrival's subject resolved to: parsing the subject and looking up its topic
/// and its type cost more than the rest of a delivery, and a node receives a few
/// subjects over and over.
#[derive(Clone)]
struct Route {
    /// For this node (every node's, or addressed to it).
    mine: bool,
    /// The topic of that name here, when shared.
    topic: Option<Arc<Topic>>,
    /// The type of that name, once it exists (the registry keeps every type for good).
    /// Uncounted: a count held here would keep the type from going dormant.
    ty: Option<TypeRef>,
}

/// Routes by subject (after `P.`), good while the topic map's change count is `at`.
#[derive(Default)]
struct Routes {
    by_subject: HashMap<Box<str>, Route>,
    at: u64,
}

/// Subjects whose routes are kept at most; past that the routes start over.
const ROUTES_KEPT: usize = 4096;

/// The topic and type names in a message subject that parsed before (for warnings and
/// a type not known yet, off the path of a delivery).
fn names_of(rest: &str) -> (String, String) {
    wire::parse_message_subject(rest)
        .map(|a| (a.topic.into_owned(), a.type_name.into_owned()))
        .unwrap_or_default()
}

pub(crate) struct Delivery {
    inner: Arc<Inner>,
    seen: HashMap<Eid, SeenWindow>,
    /// Types already warned about (once each).
    warned: HashSet<String>,
    routes: Routes,
}

impl Delivery {
    pub(crate) fn new(inner: Arc<Inner>) -> Delivery {
        Delivery {
            inner,
            seen: HashMap::new(),
            warned: HashSet::new(),
            routes: Routes::default(),
        }
    }

    fn run(mut self, mut rx: InboundRx) {
        while let Some(item) = rx.blocking_recv() {
            match item {
                Inbound::Msg { subject, body } => {
                    let rest = subject.get(self.inner.cfg.prefix.len() + 1..);
                    self.on_message(rest.unwrap_or(""), &body);
                }
                Inbound::Node(node) => self.on_node(&node),
                Inbound::Reconcile {
                    topic,
                    asserted,
                    entries,
                    done,
                } => {
                    self.reconcile(topic.as_deref(), &asserted, &entries);
                    if let Some(done) = done {
                        let _ = done.send(Ok(()));
                    }
                }
                Inbound::ClearRemote(topics, owner) => clear_remote_and_unclaim(&topics, owner),
                Inbound::Stop => break,
            }
        }
    }

    fn drop_in(&mut self, type_name: &str, why: &str) {
        self.inner.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
        if self.warned.len() < 1024 && self.warned.insert(type_name.to_owned()) {
            crate::log::warn(&format!(
                "cluster: dropped an arrival of type '{type_name}': {why} (warned once per type)"
            ));
        }
    }

    /// The route of subject `rest`; None when it is no message subject (dropped).
    fn route(&mut self, rest: &str) -> Option<Route> {
        // The count is read before any lookup below: a change after it moves it, and the
        // next arrival starts over.
        let changes = self.inner.topics.changes();
        let routes = &mut self.routes;
        if routes.at != changes || routes.by_subject.len() >= ROUTES_KEPT {
            routes.by_subject.clear();
            routes.at = changes;
        }
        if let Some(r) = routes.by_subject.get_mut(rest) {
            if r.ty.is_none() {
                // Registered since? (Until then every arrival looks again.)
                r.ty = wire::parse_message_subject(rest)
                    .ok()
                    .and_then(|a| MessageType::find(&a.type_name));
            }
            return Some(r.clone());
        }
        let addr = match wire::parse_message_subject(rest) {
            Ok(a) => a,
            Err(e) => {
                self.drop_in("?", &format!("bad subject: {e}"));
                return None;
            }
        };
        let route = Route {
            mine: addr.to.is_none_or(|to| to == self.inner.me),
            topic: self
                .inner
                .topics
                .read()
                .get(addr.topic.as_ref())
                .filter(|st| st.shared)
                .map(|st| Arc::clone(&st.topic)),
            ty: MessageType::find(&addr.type_name),
        };
        self.routes.by_subject.insert(rest.into(), route.clone());
        Some(route)
    }

    /// Builds the message a body carries (decoded payload), of type `ty`, or else of the
    /// type named `type_name` (a bytes message of a type unknown here creates it).
    fn decode(
        &mut self,
        type_name: &str,
        ty: Option<TypeRef>,
        env: &Envelope,
        payload: &[u8],
    ) -> Option<MessageRef> {
        let ty = ty.or_else(|| MessageType::find(type_name));
        let (ty, payload) = if env.flags & FLAG_BYTES != 0 {
            let ty = match ty {
                Some(t) => t,
                None => match MessageType::create(type_name, None) {
                    Ok(t) => TypeRef::new(&t),
                    Err(e) => {
                        self.drop_in(type_name, &e.message);
                        return None;
                    }
                },
            };
            (ty, Payload::Bytes(payload.into()))
        } else {
            let Some(ty) = ty else {
                self.drop_in(type_name, "no such message type on this node");
                return None;
            };
            let decoded = codec::get(&ty).and_then(|c| c.decode.as_ref().map(|d| d(payload)));
            match decoded {
                Some(Some(p)) => (ty, p),
                Some(None) => {
                    self.drop_in(ty.name(), "its decoder refused the data");
                    return None;
                }
                None => {
                    self.drop_in(ty.name(), "the type has no decoder on this node");
                    return None;
                }
            }
        };
        Some(Message::with_eid_at(
            &ty,
            payload,
            Some(env.eid),
            env.timestamp_ns,
        ))
    }

    pub(crate) fn on_message(&mut self, rest: &str, body: &[u8]) {
        let Some(route) = self.route(rest) else {
            return;
        };
        if !route.mine {
            return;
        }
        let (env, payload) = match Envelope::read(body) {
            Ok(x) => x,
            Err(e) => return self.drop_in(&names_of(rest).1, &format!("bad body: {e}")),
        };
        if env.eid == self.inner.me {
            return; // our own (another process with our eid, or an echo)
        }
        let window = self.seen.entry(env.eid).or_insert(SeenWindow {
            session: env.session,
            highest: 0,
            bits: 0,
        });
        if !window.admit(env.session, env.seq) {
            return;
        }
        let Some(topic) = route.topic else {
            let (topic_name, type_name) = names_of(rest);
            return self.drop_in(
                &type_name,
                &format!("topic '{topic_name}' is not shared here"),
            );
        };
        // The name only matters when the type is not known yet (the route looks again).
        let name = match route.ty {
            Some(_) => String::new(),
            None => names_of(rest).1,
        };
        let Some(msg) = self.decode(&name, route.ty, &env, payload) else {
            return;
        };
        let msg = if env.flags & FLAG_CLEAR != 0 {
            clear_message(&msg)
        } else {
            msg
        };
        self.inner.stats.received.fetch_add(1, Ordering::Relaxed);
        topic.publish(&msg);
    }

    fn on_node(&mut self, node: &Node) {
        self.inner
            .cluster_topic
            .publish(&NodeMessage::message(node));
        if node.state == STATE_DOWN || node.state == STATE_LEFT {
            self.seen.remove(&node.eid);
            // Taken out of the topic map first: the clears run subscribers' callbacks on
            // this thread, and one that shares or unshares a topic takes the map's write
            // lock (a wait on ourselves, had we kept the read lock); nor may the io
            // thread's readers wait behind a writer for as long as the clears take.
            let cached: Vec<(Arc<Topic>, Arc<CachingTopic>)> = {
                let topics = self.inner.topics.read();
                topics
                    .values()
                    .filter_map(|st| {
                        Some((Arc::clone(&st.topic), Arc::clone(st.caching.as_ref()?)))
                    })
                    .collect()
            };
            for (topic, ct) in &cached {
                clear_eid(topic, ct, |eid| *eid == node.eid);
            }
        }
    }

    /// See `Inbound::Reconcile`. For each eid: a stored snapshot newer than the cached
    /// one (same node's clock) is published; a cached one the store lacks and older
    /// than the node's last assertion is cleared (newer ones came live after it).
    pub(crate) fn reconcile(
        &mut self,
        only: Option<&str>,
        asserted: &HashMap<Eid, u64>,
        entries: &[StoredEntry],
    ) {
        // Only nodes up now. A node taken for down (or gone) while the read was under way
        // had its entries cleared here already (`on_node`, queued before this) and its
        // keys are being removed from the store: applying the read would bring its
        // entries back, and nothing would clear them again. Back up later, it is re-read.
        let asserted: HashMap<Eid, u64> = {
            let nodes = self.inner.nodes.lock();
            asserted
                .iter()
                .filter(|(eid, _)| nodes.is_up(eid))
                .map(|(eid, ns)| (*eid, *ns))
                .collect()
        };
        let asserted = &asserted;
        let shared: Vec<(String, Arc<crate::topic::Topic>, Arc<crate::cache::Cache>)> = {
            let topics = self.inner.topics.read();
            topics
                .iter()
                .filter(|(name, _)| only.is_none_or(|o| o == name.as_str()))
                .filter_map(|(name, st)| {
                    st.caching
                        .as_ref()
                        .map(|ct| (name.clone(), Arc::clone(&st.topic), Arc::clone(ct.cache())))
                })
                .collect()
        };
        for (name, topic, cache) in shared {
            let mut present: HashSet<(Eid, String, String)> = HashSet::new();
            for e in entries.iter().filter(|e| e.key.topic == name) {
                if e.key.eid == self.inner.me || !asserted.contains_key(&e.key.eid) {
                    continue;
                }
                present.insert((e.key.eid, e.key.type_name.clone(), e.key.id.clone()));
                let (env, payload) = match Envelope::read(&e.value) {
                    Ok(x) => x,
                    Err(err) => {
                        self.drop_in(&e.key.type_name, &format!("bad stored value: {err}"));
                        continue;
                    }
                };
                if env.eid != e.key.eid {
                    self.drop_in(&e.key.type_name, "stored value of another node");
                    continue;
                }
                if let Some(ty) = MessageType::find(&e.key.type_name) {
                    if let Some(cur) = cache.get_by_eid(&ty, &e.key.id, Some(&e.key.eid)) {
                        if cur.timestamp_ns() >= env.timestamp_ns {
                            continue;
                        }
                    }
                }
                if let Some(msg) = self.decode(&e.key.type_name, None, &env, payload) {
                    self.inner.stats.received.fetch_add(1, Ordering::Relaxed);
                    topic.publish(&msg);
                }
            }
            for (eid, asserted_ns) in asserted {
                if *eid == self.inner.me {
                    continue;
                }
                for snap in cache.dump_by_eid(None, eid) {
                    let Some(id) = cache.id_of(&snap).map(|c| c.into_owned()) else {
                        continue;
                    };
                    let key = (*eid, snap.message_type().name().to_owned(), id);
                    if !present.contains(&key) && snap.timestamp_ns() < *asserted_ns {
                        topic.publish(&clear_message(&snap));
                    }
                }
            }
        }
    }
}

/// Clears, through the normal clear path, the entries of `st`'s cache whose eid matches.
/// Clears the entries of the eids `matches` from `ct`'s cache, through `topic` (its
/// original), as any clear is made. Runs subscribers' callbacks: never under a lock.
fn clear_eid(topic: &Topic, ct: &CachingTopic, matches: impl Fn(&Eid) -> bool) {
    for snap in ct.cache().dump_all(None) {
        if snap.eid().is_some_and(&matches) {
            topic.publish(&clear_message(&snap));
        }
    }
}

fn clear_remote_and_unclaim(topics: &[SharedTopic], owner: usize) {
    let me = Eid::default_eid();
    for st in topics {
        if let Some(ct) = &st.caching {
            clear_eid(&st.topic, ct, |eid| *eid != me);
        }
    }
    unclaim(topics, owner);
}

fn unclaim(topics: &[SharedTopic], owner: usize) {
    for st in topics {
        st.unclaim(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::SeenWindow;

    #[test]
    fn window_admits_each_sequence_once() {
        let mut w = SeenWindow {
            session: 1,
            highest: 0,
            bits: 0,
        };
        assert!(w.admit(1, 1));
        assert!(w.admit(1, 3));
        assert!(!w.admit(1, 3));
        assert!(w.admit(1, 2)); // late but new
        assert!(!w.admit(1, 2));
        assert!(w.admit(1, 200));
        assert!(w.admit(1, 100)); // too old to tell: let through
        assert!(w.admit(2, 1)); // a new session starts over
        assert!(!w.admit(2, 1));
    }
}
