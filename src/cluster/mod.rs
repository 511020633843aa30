//! Cluster mode: nodes share topics and caches through NATS servers.
//!
//! A layer above the core: the core never learns about the network. What it sees of the
//! cluster is what any module could do: taps (inline observers of the publish walk, see
//! `tap`) on shared topics and on shared caches' update topics, and ordinary publishes of
//! what arrives, with the sender's eid and timestamp.
//!
//! Threads (per joined cluster):
//! - `sb-cluster-io`: a single-threaded async runtime owning the NATS connection: the
//!   sender task (drains the outgoing queue, encodes, publishes), heartbeats, the node
//!   table, interest (which subjects to subscribe), the key-value store;
//! - `sb-cluster-in`: delivery: decodes arrivals (user decoders run here) and publishes
//!   them on the local topics, applies loads and clears to shared caches, publishes node
//!   events. Kept apart from the io thread so that a slow local subscriber (a synchronous
//!   one runs inside that publish) delays deliveries, never heartbeats.
//!
//! Publishers never wait for the network: a tap pushes into a bounded queue (the oldest
//! item is dropped when it is full, counted in `dropped_out`) and wakes the sender.

mod catch_up;
pub mod codec;
pub mod config;
mod inbound;
mod io;
pub mod nodes;
#[doc(hidden)]
pub mod offline;
mod refusals;
mod topic_map;
pub mod wire;

use crate::cache::Cache;
use crate::caching_topic::{clear_type, update_type, CacheClear, CacheUpdate, CachingTopic};
use crate::eid::Eid;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Message, MessageRef};
use crate::message_type::MessageType;
use crate::tap::{self, Tap};
use crate::topic::Topic;
use config::Config;
use crossbeam_queue::ArrayQueue;
use nodes::NodeTable;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::thread::JoinHandle;
use std::time::Duration;
use topic_map::TopicMapWrite;

pub(crate) const CLUSTER_MAGIC: u32 = 0x5342_434c; // "SBCL"

/// Every cluster joined in this process (several may be), for the bus-wide statistics.
static LIVE: Mutex<Vec<std::sync::Weak<Cluster>>> = Mutex::new(Vec::new());

/// The clusters joined and not yet left, with their figures. The registry's lock is held
/// only to collect the references.
pub fn live_stats() -> Vec<(Arc<Cluster>, StatsSnapshot)> {
    let live: Vec<Arc<Cluster>> = LIVE.lock().iter().filter_map(|w| w.upgrade()).collect();
    live.into_iter()
        .filter_map(|c| {
            let s = c.stats().ok()?;
            (!c.left.load(Ordering::Acquire)).then_some((c, s))
        })
        .collect()
}

/// Type of node messages on the cluster topic.
pub fn node_type() -> &'static Arc<MessageType> {
    static TYPE: LazyLock<Arc<MessageType>> =
        LazyLock::new(|| MessageType::builtin("sb_cluster_node"));
    &TYPE
}

/// C view of a node (`sb_cluster_node`).
#[repr(C)]
pub struct NodeView {
    pub eid: Eid,
    pub name: *const c_char,
    pub state: i32,
    pub last_seen_ns: u64,
}

/// Payload of a node message; `view` first, so the payload's address is the C view's.
#[repr(C)]
pub struct NodeMessage {
    view: NodeView,
    name: CString,
}

// SAFETY: the view's name points into `name`, owned by the same immutable value.
unsafe impl Send for NodeMessage {}
// SAFETY: as above.
unsafe impl Sync for NodeMessage {}

impl NodeMessage {
    pub fn message(node: &nodes::Node) -> MessageRef {
        let name = CString::new(node.name.replace('\0', "?")).expect("NULs replaced");
        let value = NodeMessage {
            view: NodeView {
                eid: node.eid,
                name: name.as_ptr(),
                state: node.state,
                last_seen_ns: node.last_seen_ns,
            },
            name,
        };
        Message::with_eid(
            node_type(),
            crate::message::Payload::Value(Box::new(value)),
            Some(node.eid),
        )
    }
}

/// Counters of `sb_cluster_get_stats`.
#[derive(Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub dropped_out: AtomicU64,
    pub dropped_in: AtomicU64,
    pub reconnects: AtomicU64,
    pub connected: AtomicBool,
    /// Store requests (writes, reads, removals) that failed or were never confirmed;
    /// each is tried again.
    pub store_errors: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsSnapshot {
    pub sent: u64,
    pub received: u64,
    pub dropped_out: u64,
    pub dropped_in: u64,
    pub reconnects: u64,
    pub connected: bool,
    pub nodes_up: u32,
    pub store_errors: u64,
    pub server_errors: u64,
}

/// What the sender task publishes.
pub(crate) enum Out {
    /// A message of a shared topic, to every node (`clear`: a cache clear of `msg`;
    /// `cached`: the topic feeds a shared cache, so the others' caches need it).
    Broadcast {
        token: Arc<str>,
        msg: MessageRef,
        clear: bool,
        cached: bool,
    },
    /// A message for one node.
    Direct {
        to: Eid,
        token: Arc<str>,
        msg: MessageRef,
    },
    /// JSON export of a local message.
    Json { token: Arc<str>, msg: MessageRef },
    /// A change of one of our snapshots in a shared cache: store it (or delete it).
    Snapshot {
        token: Arc<str>,
        cache: Arc<Cache>,
        old: Option<MessageRef>,
        new: Option<MessageRef>,
    },
}

impl Out {
    /// Whether losing this item leaves the store or the other nodes' copy of a shared
    /// cache behind (nothing else would send that change again).
    fn carries_cache_state(&self) -> bool {
        matches!(
            self,
            Out::Snapshot { .. } | Out::Broadcast { cached: true, .. }
        )
    }
}

/// A topic this node shares, exports, or both.
pub(crate) struct SharedTopic {
    pub topic: Arc<Topic>,
    /// The topic name as a subject token.
    pub token: Arc<str>,
    pub shared: bool,
    pub export_json: bool,
    /// Set when shared through `share_cache`.
    pub caching: Option<Arc<CachingTopic>>,
}

impl SharedTopic {
    /// Removes the taps of this entry's topics and gives back `owner`'s claims on them.
    pub(crate) fn unclaim(&self, owner: usize) {
        tap::unclaim(&self.topic, owner);
        if let Some(ct) = &self.caching {
            tap::unclaim(ct.topic(), owner);
        }
    }

    /// Removes the taps of this entry's topics, keeping the claims.
    fn remove_taps(&self) {
        tap::set_tap(&self.topic, None);
        if let Some(ct) = &self.caching {
            tap::set_tap(ct.topic(), None);
        }
    }
}

/// The error of a topic shared or exported by another cluster handle of this process.
fn taken_by_another(topic: &Topic) -> Error {
    Error::state(format!(
        "topic '{}' is shared or exported through another cluster handle of this process",
        topic.name()
    ))
}

pub(crate) struct Inner {
    pub cfg: Config,
    pub me: Eid,
    pub session: u32,
    fork_gen: u64,
    pub bucket: String,
    pub cluster_topic: Arc<Topic>,
    out: ArrayQueue<Out>,
    pub out_notify: tokio::sync::Notify,
    /// Set when the full outgoing queue dropped a change of a shared cache (its store
    /// write, or the message that carries it to the others): the sender has this node
    /// write all its snapshots again, which makes the others re-read them, so the caches
    /// converge after an overload as after a reconnect.
    pub cache_change_dropped: AtomicBool,
    pub stats: Stats,
    pub nodes: Mutex<NodeTable>,
    /// By topic name.
    pub topics: topic_map::TopicMap,
    pub cmd: tokio::sync::mpsc::UnboundedSender<io::Cmd>,
    /// What the servers refused (see `refusals`).
    pub refusals: refusals::Refusals,
}

impl Inner {
    /// Queues an item for the sender; never blocks (drops the oldest when full).
    fn push(&self, item: Out) {
        if let Some(old) = self.out.force_push(item) {
            self.dropped(old.carries_cache_state());
            drop(old);
        }
        self.out_notify.notify_one();
    }

    /// Counts an item a full queue dropped (the outgoing one, or the store writes'), and
    /// has the sender repair what it leaves behind when it carried a shared cache's
    /// change (see `cache_change_dropped`).
    pub(crate) fn dropped(&self, carried_cache_state: bool) {
        self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
        if carried_cache_state {
            self.cache_change_dropped.store(true, Ordering::Release);
        }
    }

    pub(crate) fn pop(&self) -> Option<Out> {
        self.out.pop()
    }

    pub(crate) fn queued(&self) -> usize {
        self.out.len()
    }

    /// This cluster's name for its claims of topics (`tap::claim`): unique among live
    /// clusters.
    pub(crate) fn owner(self: &Arc<Inner>) -> usize {
        Arc::as_ptr(self) as usize
    }

    fn in_this_process(&self) -> bool {
        self.fork_gen == crate::fork::generation()
    }

    fn is_local(&self, msg: &Message) -> bool {
        msg.eid() == Some(&self.me)
    }
}

/// The tap of a shared or exported topic.
struct TopicTap {
    inner: Arc<Inner>,
    token: Arc<str>,
    shared: bool,
    export_json: bool,
    /// The topic feeds a shared cache (`share_cache`).
    cached: bool,
}

impl Tap for TopicTap {
    fn on_publish(&self, _topic: &Topic, msg: &MessageRef, through_tap: bool) -> bool {
        let inner = &self.inner;
        if !inner.in_this_process() {
            return false;
        }
        if self.shared && !through_tap {
            if Arc::ptr_eq(msg.message_type(), clear_type()) {
                if let Some(snap) = msg.value::<CacheClear>().map(CacheClear::snapshot) {
                    if inner.is_local(snap) && codec::sendable(snap) {
                        inner.push(Out::Broadcast {
                            token: Arc::clone(&self.token),
                            msg: MessageRef::clone(snap),
                            clear: true,
                            cached: self.cached,
                        });
                    }
                }
            } else if inner.is_local(msg) && codec::sendable(msg) {
                inner.push(Out::Broadcast {
                    token: Arc::clone(&self.token),
                    msg: MessageRef::clone(msg),
                    clear: false,
                    cached: self.cached,
                });
            }
        }
        if self.export_json && inner.is_local(msg) && msg.message_type().has_to_json() {
            inner.push(Out::Json {
                token: Arc::clone(&self.token),
                msg: MessageRef::clone(msg),
            });
        }
        self.shared
    }
}

/// The tap of a shared cache's update topic: our own snapshots' changes go to the store.
struct CacheTap {
    inner: Arc<Inner>,
    token: Arc<str>,
    cache: Arc<Cache>,
}

impl Tap for CacheTap {
    fn on_publish(&self, _topic: &Topic, msg: &MessageRef, _through_tap: bool) -> bool {
        let inner = &self.inner;
        if !inner.in_this_process() || !Arc::ptr_eq(msg.message_type(), update_type()) {
            return false;
        }
        let Some(u) = msg.value::<CacheUpdate>() else {
            return false;
        };
        let local = |m: Option<&MessageRef>| m.is_some_and(|m| inner.is_local(m));
        let (old, new) = (u.old(), u.new_snapshot());
        if local(new) || (new.is_none() && local(old)) {
            inner.push(Out::Snapshot {
                token: Arc::clone(&self.token),
                cache: Arc::clone(&self.cache),
                old: old.cloned(),
                new: new.cloned(),
            });
        }
        false
    }
}

/// A topic or type whose name makes a subject token too long for the servers cannot
/// cross (`what`: "topic", "message type").
fn check_subject_name(what: &str, name: &str) -> Result<()> {
    if wire::token_fits(name) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{what} name too long for the cluster: {} bytes, at most {} once escaped for a subject (bytes other than A-Z a-z 0-9 _ - / take 3)",
        name.len(),
        wire::MAX_TOKEN
    )))
}

/// A joined cluster (`sb_cluster`).
#[repr(C)]
pub struct Cluster {
    magic: u32,
    inner: Arc<Inner>,
    io_thread: Mutex<Option<JoinHandle<()>>>,
    in_thread: Mutex<Option<JoinHandle<()>>>,
    in_tx: inbound::InboundTx,
    left: AtomicBool,
    /// Stops the io thread wherever it waits (see `io::run`): a leave or a failed join
    /// that gave up waiting for it.
    abort: Arc<tokio::sync::Notify>,
}

fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::message::now_realtime_ns());
    h.write_u32(std::process::id());
    (h.finish() as u32).max(1)
}

impl Cluster {
    /// Connects and starts the cluster's threads; returns once connected.
    pub fn join(cfg: &Config) -> Result<Arc<Cluster>> {
        cfg.validate()?;
        crate::fork::install();
        let me = Eid::default_eid();
        let cluster_topic = Topic::create(&format!("cluster:{}", cfg.prefix))?;
        let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            me,
            session: random_u32(),
            fork_gen: crate::fork::generation(),
            bucket: format!("{}_state", cfg.prefix),
            cluster_topic,
            out: ArrayQueue::new(cfg.out_queue_limit),
            out_notify: tokio::sync::Notify::new(),
            cache_change_dropped: AtomicBool::new(false),
            stats: Stats::default(),
            nodes: Mutex::new(NodeTable::new(me, cfg.down_after_missed)),
            topics: topic_map::TopicMap::new(HashMap::new()),
            cmd: cmd_tx,
            refusals: refusals::Refusals::default(),
        });
        let (in_tx, in_rx) = inbound::channel();
        let in_thread = inbound::start(Arc::clone(&inner), in_rx)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let io_inner = Arc::clone(&inner);
        let io_in_tx = in_tx.clone();
        let abort = Arc::new(tokio::sync::Notify::new());
        let io_abort = Arc::clone(&abort);
        let io_thread = std::thread::Builder::new()
            .name("sb-cluster-io".into())
            .spawn(move || io::run(io_inner, cmd_rx, io_in_tx, ready_tx, io_abort))
            .map_err(|e| Error::new(ErrorKind::NoMemory, format!("cannot start a thread: {e}")));
        let io_thread = match io_thread {
            Ok(t) => t,
            Err(e) => {
                in_tx.stop();
                let _ = in_thread.join();
                return Err(e);
            }
        };
        // The io thread answers once connected or failed; its own timeout bounds this,
        // with a margin in case it is stuck.
        let limit = Duration::from_millis(u64::from(cfg.connect_timeout_ms) + 5000);
        let outcome = ready_rx.recv_timeout(limit).unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                "cluster connection did not complete in time",
            ))
        });
        if let Err(e) = outcome {
            let _ = inner.cmd.send(io::Cmd::Stop);
            // Stop notices only between steps of the loop; the abort, anywhere.
            abort.notify_one();
            in_tx.stop();
            let _ = io_thread.join();
            let _ = in_thread.join();
            return Err(e);
        }
        let cluster = Arc::new(Cluster {
            magic: CLUSTER_MAGIC,
            inner,
            io_thread: Mutex::new(Some(io_thread)),
            in_thread: Mutex::new(Some(in_thread)),
            in_tx,
            left: AtomicBool::new(false),
            abort,
        });
        let mut live = LIVE.lock();
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&cluster));
        Ok(cluster)
    }

    /// The prefix and node name this cluster was joined with (labels of its figures).
    pub fn labels(&self) -> (&str, &str) {
        (&self.inner.cfg.prefix, &self.inner.cfg.node_name)
    }

    pub(crate) fn magic_ok(&self) -> bool {
        self.magic == CLUSTER_MAGIC
    }

    fn usable(&self) -> Result<&Arc<Inner>> {
        if !self.inner.in_this_process() {
            return Err(Error::state(
                "this cluster handle belongs to the parent process (fork): join again in the child",
            ));
        }
        if self.left.load(Ordering::Acquire) {
            return Err(Error::state("the cluster was left"));
        }
        Ok(&self.inner)
    }

    /// The topic map, for a change. Refused once the cluster was left: `leave` sets
    /// `left` under this lock before it empties the map, so a change that passed
    /// `usable` just before the leave, and gets the lock after it, cannot put back a
    /// topic (and a tap) that nothing would ever take away.
    fn topics_write(&self) -> Result<(&Arc<Inner>, TopicMapWrite<'_>)> {
        let inner = self.usable()?;
        let topics = inner.topics.write();
        if self.left.load(Ordering::Acquire) {
            return Err(Error::state("the cluster was left"));
        }
        Ok((inner, topics))
    }

    pub fn topic(&self) -> &Arc<Topic> {
        &self.inner.cluster_topic
    }

    /// Installs (or refreshes) the tap of `name`'s entry; removes entry and tap when the
    /// topic is neither shared nor exported any more.
    fn retap(inner: &Arc<Inner>, topics: &mut HashMap<String, SharedTopic>, name: &str) {
        let Some(st) = topics.get(name) else { return };
        if !st.shared && !st.export_json {
            let st = topics.remove(name).expect("present");
            st.unclaim(inner.owner());
            return;
        }
        tap::set_tap(
            &st.topic,
            Some(Arc::new(TopicTap {
                inner: Arc::clone(inner),
                token: Arc::clone(&st.token),
                shared: st.shared,
                export_json: st.export_json,
                cached: st.caching.is_some(),
            })),
        );
    }

    /// `topic`'s entry, made (and the topic claimed from other clusters of this
    /// process) when it has none.
    fn entry<'a>(
        inner: &Arc<Inner>,
        topics: &'a mut HashMap<String, SharedTopic>,
        topic: &Arc<Topic>,
    ) -> Result<&'a mut SharedTopic> {
        check_subject_name("topic", topic.name())?;
        let st = match topics.entry(topic.name().to_owned()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                match tap::claim(topic, inner.owner()) {
                    tap::Claim::New => {}
                    tap::Claim::Taken => return Err(taken_by_another(topic)),
                    // Ours without an entry: the caching topic of a cache we share (one
                    // topic has one tap).
                    tap::Claim::Held => {
                        return Err(Error::state(format!(
                            "topic '{}' is the caching topic of a cache this cluster shares",
                            topic.name()
                        )))
                    }
                }
                v.insert(SharedTopic {
                    topic: Arc::clone(topic),
                    token: wire::escaped(topic.name()).into(),
                    shared: false,
                    export_json: false,
                    caching: None,
                })
            }
        };
        if !Arc::ptr_eq(&st.topic, topic) {
            return Err(Error::invalid(format!(
                "another topic named '{}' is already shared",
                topic.name()
            )));
        }
        Ok(st)
    }

    /// Waits (bounded by the connect timeout) until the io thread has subscribed what
    /// the node's interest asks for; fails when the server refused a subscription of
    /// the topic whose subject token is `token`.
    fn sync_interest(inner: &Inner, token: Arc<str>) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        if inner
            .cmd
            .send(io::Cmd::Interest(Some((token, tx))))
            .is_err()
        {
            return Err(Error::state("the cluster's io thread has stopped"));
        }
        match rx.recv_timeout(Duration::from_millis(u64::from(inner.cfg.connect_timeout_ms))) {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                "subscribing to the cluster's subjects took longer than connect_timeout_ms (it goes on in the background)",
            )),
        }
    }

    pub fn share_topic(&self, topic: &Arc<Topic>) -> Result<()> {
        let (inner, token) = {
            let (inner, mut topics) = self.topics_write()?;
            let st = Cluster::entry(inner, &mut topics, topic)?;
            st.shared = true;
            let token = Arc::clone(&st.token);
            Cluster::retap(inner, &mut topics, topic.name());
            (inner, token)
        };
        Cluster::sync_interest(inner, token)
    }

    pub fn unshare_topic(&self, topic: &Arc<Topic>) -> Result<()> {
        let inner = {
            let (inner, mut topics) = self.topics_write()?;
            match topics.get_mut(topic.name()) {
                Some(st) if st.shared && Arc::ptr_eq(&st.topic, topic) => {
                    st.shared = false;
                    if let Some(ct) = st.caching.take() {
                        tap::unclaim(ct.topic(), inner.owner());
                    }
                }
                _ => {
                    return Err(Error::state(format!(
                        "topic '{}' is not shared",
                        topic.name()
                    )))
                }
            }
            Cluster::retap(inner, &mut topics, topic.name());
            inner
        };
        let _ = inner.cmd.send(io::Cmd::Interest(None));
        Ok(())
    }

    pub fn export_json(&self, topic: &Arc<Topic>) -> Result<()> {
        let (inner, mut topics) = self.topics_write()?;
        Cluster::entry(inner, &mut topics, topic)?.export_json = true;
        Cluster::retap(inner, &mut topics, topic.name());
        Ok(())
    }

    pub fn share_cache(&self, ct: &Arc<CachingTopic>) -> Result<()> {
        let original = Arc::clone(ct.subscription().topic());
        let (inner, token) = {
            let (inner, mut topics) = self.topics_write()?;
            // The caching topic is tapped too: claimed first, and given back when the
            // share goes no further (unless it was ours already).
            let claim = tap::claim(ct.topic(), inner.owner());
            if claim == tap::Claim::Taken {
                return Err(taken_by_another(ct.topic()));
            }
            // Ours already: as this very cache's (a second share), or as a topic this
            // cluster shares or exports (one topic has one tap).
            if claim == tap::Claim::Held
                && !topics
                    .get(original.name())
                    .and_then(|st| st.caching.as_ref())
                    .is_some_and(|c| Arc::ptr_eq(c, ct))
            {
                return Err(Error::state(format!(
                    "the caching topic '{}' is shared or exported through this cluster",
                    ct.topic().name()
                )));
            }
            let give_back = |e: Error| {
                if claim == tap::Claim::New {
                    tap::unclaim(ct.topic(), inner.owner());
                }
                e
            };
            let st = Cluster::entry(inner, &mut topics, &original).map_err(give_back)?;
            if let Some(existing) = &st.caching {
                if !Arc::ptr_eq(existing, ct) {
                    return Err(give_back(Error::invalid(format!(
                        "topic '{}' is already shared with another cache",
                        original.name()
                    ))));
                }
            }
            st.shared = true;
            st.caching = Some(Arc::clone(ct));
            let token = Arc::clone(&st.token);
            Cluster::retap(inner, &mut topics, original.name());
            // Under the lock, as every tap change: an unshare or a leave right after
            // must find it there to take it away.
            tap::set_tap(
                ct.topic(),
                Some(Arc::new(CacheTap {
                    inner: Arc::clone(inner),
                    token: Arc::clone(&token),
                    cache: Arc::clone(ct.cache()),
                })),
            );
            (inner, token)
        };
        // The load is asked for even when subscribing failed or timed out: like the
        // topic's sharing, it goes on in the background as far as the server allows
        // (the caller already waited its connect_timeout_ms and gets that error).
        let interest = Cluster::sync_interest(inner, token);
        let (tx, rx) = std::sync::mpsc::channel();
        if inner
            .cmd
            .send(io::Cmd::ShareCache {
                topic: original.name().to_owned(),
                done: tx,
            })
            .is_err()
        {
            return Err(Error::state("the cluster's io thread has stopped"));
        }
        interest?;
        if inbound::is_delivery_thread_of(inner.owner()) {
            // The load ends on this very thread: waiting for it here would only hold
            // every arrival of the cluster for connect_timeout_ms, and then time out.
            return Err(Error::new(
                ErrorKind::Timeout,
                "called on the cluster's delivery thread (a callback of what arrives): the other nodes' snapshots load once the callback returns (sharing goes on in the background)",
            ));
        }
        // The io side answers with its error once connect_timeout_ms has passed: wait a
        // little longer, so that a store that refuses at once (JetStream not enabled)
        // gives its reason rather than a timeout.
        let limit = Duration::from_millis(u64::from(inner.cfg.connect_timeout_ms)) + SHARE_MARGIN;
        match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                "loading the other nodes' snapshots took longer than connect_timeout_ms (sharing goes on in the background)",
            )),
        }
    }

    pub fn publish_to(&self, node: &Eid, topic: &Arc<Topic>, msg: &MessageRef) -> Result<()> {
        let inner = self.usable()?;
        check_subject_name("topic", topic.name())?;
        check_subject_name("message type", msg.message_type().name())?;
        if !inner.nodes.lock().is_up(node) || *node == inner.me {
            return Err(Error::state(format!("node {node} is not up")));
        }
        if !codec::sendable(msg) {
            return Err(Error::invalid(format!(
                "message type '{}' has no codec and is not a bytes message",
                msg.message_type().name()
            )));
        }
        inner.push(Out::Direct {
            to: *node,
            token: wire::escaped(topic.name()).into(),
            msg: MessageRef::clone(msg),
        });
        Ok(())
    }

    /// One node message per known node, this one included.
    pub fn nodes(&self) -> Result<Vec<MessageRef>> {
        let inner = self.usable()?;
        let nodes = inner.nodes.lock().all();
        Ok(nodes.iter().map(NodeMessage::message).collect())
    }

    pub fn stats(&self) -> Result<StatsSnapshot> {
        let inner = self.usable()?;
        let s = &inner.stats;
        Ok(StatsSnapshot {
            sent: s.sent.load(Ordering::Relaxed),
            received: s.received.load(Ordering::Relaxed),
            // Acquire: a drop's warning is logged before it is counted (`unsendable`).
            dropped_out: s.dropped_out.load(Ordering::Acquire),
            dropped_in: s.dropped_in.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            connected: s.connected.load(Ordering::Relaxed),
            nodes_up: inner.nodes.lock().up_count() as u32,
            store_errors: s.store_errors.load(Ordering::Relaxed),
            // Every server error is a refusal recorded (`refusals`): its count.
            server_errors: inner.refusals.count(),
        })
    }

    /// Announces the departure, sends what is queued (at most 1 s), stops sharing, clears
    /// remote entries from local caches and stops the threads.
    pub fn leave(&self) -> Result<()> {
        if !self.inner.in_this_process() {
            // The threads belong to the parent: a forked child has none to join or detach.
            std::mem::forget(self.io_thread.lock().take());
            std::mem::forget(self.in_thread.lock().take());
            return Err(Error::state(
                "this cluster handle belongs to the parent process (fork); it is released without leaving",
            ));
        }
        let inner = &self.inner;
        // No new outgoing traffic from here on. `left` is set under the map's lock: a
        // share waiting for it then finds the cluster left (`topics_write`).
        let topics: Vec<SharedTopic> = {
            let mut map = inner.topics.write();
            if self.left.swap(true, Ordering::AcqRel) {
                return Err(Error::state("the cluster was already left"));
            }
            map.drain().map(|(_, v)| v).collect()
        };
        // The claims stay until the remote entries are cleared (`clear_remote`): another
        // cluster that took one of these caches before those clears ran would lose its
        // entries to them.
        for st in &topics {
            st.remove_taps();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let stuck = inner.cmd.send(io::Cmd::Leave(tx)).is_ok()
            && matches!(
                rx.recv_timeout(LEAVE_LIMIT),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
        if stuck {
            // The io thread is stuck on the network (no server takes what it sends):
            // stop it where it waits, so this call and the join below return.
            crate::log::warn(&format!(
                "cluster: leaving did not complete within {} s (no server answering): the cluster thread was stopped; the other nodes will take this node for down, not left",
                LEAVE_LIMIT.as_secs()
            ));
            self.abort.notify_one();
        }
        // Remote entries go from the caches this node shared.
        self.in_tx.clear_remote(topics, inner.owner());
        self.in_tx.stop();
        // On a delivery thread (ours, or another cluster's whose callback another leave
        // may wait for) the thread is not waited for: it ends on its own at the stop.
        let on_in_thread = inbound::is_delivery_thread();
        if let Some(t) = self.io_thread.lock().take() {
            let _ = t.join();
        }
        if let Some(t) = self.in_thread.lock().take() {
            if !on_in_thread {
                let _ = t.join();
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // This cluster's entry goes (its weak reference would keep the allocation), and
        // the list's memory with the last one.
        let mut live = LIVE.lock();
        live.retain(|w| w.strong_count() > 0);
        if live.is_empty() {
            *live = Vec::new();
        }
        drop(live);
        self.magic = crate::message_type::DEAD_MAGIC;
    }
}

/// How long `leave` waits for queued messages to go out, and for each later step (the
/// end of a re-assertion pass, the removal of our stored snapshots, the announcement,
/// the flush).
pub(crate) const LEAVE_DRAIN: Duration = Duration::from_secs(1);

/// What `share_cache` waits past `connect_timeout_ms` for the io side's own answer.
const SHARE_MARGIN: Duration = Duration::from_millis(1000);

/// How long `leave` waits for the io thread's part (at most five `LEAVE_DRAIN`s, once the
/// io thread reads the request) before stopping it where it is.
const LEAVE_LIMIT: Duration = Duration::from_secs(6);
