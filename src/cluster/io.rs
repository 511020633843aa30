//! The io thread: one single-threaded async runtime that owns the NATS connection.
//!
//! Tasks on it: the main loop (commands, heartbeats in and out, node liveness, interest),
//! the sender (drains the outgoing queue), the store writer (the sender's store writes, so
//! that messages never wait for the store), one forwarder per subscribed subject (hands
//! arrivals to the delivery thread in order), and store jobs (assert, load, purge) that
//! run beside the main loop so that heartbeats never wait for the store.

use super::catch_up::CatchUp;
use super::inbound::{Inbound, InboundTx as InSender, StoredEntry};
use super::nodes::{Event, STATE_DOWN, STATE_LEFT, STATE_UP};
use super::wire::{
    self, Envelope, Heartbeat, StoreMarks, FLAG_BYTES, FLAG_CLEAR, NODE_LEFT, NODE_UP,
};
use super::{codec, refusals, Inner, Out};
use crate::eid::Eid;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{now_realtime_ns, Message, MessageRef};
use crate::message_type::{MessageType, TypeRef};
use async_nats::client::PublishErrorKind as ClientPublishErrorKind;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind as JsPublishErrorKind;
use async_nats::Subject;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

type Reply = std::sync::mpsc::Sender<Result<()>>;

pub(crate) enum Cmd {
    /// Re-check interest now; answer once the subscriptions are in place, with the
    /// server's refusal of one of the topic's whose subject token is given, if any.
    Interest(Option<(Arc<str>, Reply)>),
    ShareCache {
        topic: String,
        done: Reply,
    },
    Leave(std::sync::mpsc::Sender<()>),
    Stop,
    Connection(ConnEvent),
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum ConnEvent {
    Connected,
    Disconnected,
    SlowConsumer,
}

/// A type no subscription accepts by name: a topic that wants it wants every type.
fn any_type() -> &'static Arc<MessageType> {
    static TYPE: LazyLock<Arc<MessageType>> =
        LazyLock::new(|| MessageType::builtin("sb_cluster_any_type"));
    &TYPE
}

/// See `connect`: messages a subscription's queue inside the client may hold.
const SUBSCRIPTION_CAPACITY: usize = 1 << 20;

/// Keeps SIGPIPE from this thread (and the threads it starts, which inherit its mask).
/// The client writes to its socket with `writev`, which, unlike the `send` of a plain
/// write, raises SIGPIPE on a connection the server broke (killed, crashed, restarted):
/// a C host leaves SIGPIPE at its default action, which ends the whole process (a node's
/// process died that way when its server was killed during a burst). Blocked here, the
/// write fails with EPIPE and the client reconnects; the signal stays pending on this
/// thread alone, never delivered, and the host's own disposition is left as it is.
fn block_sigpipe() {
    // SAFETY: `set` is initialised by sigemptyset before use; pthread_sigmask changes
    // the calling thread's mask only, and a null old-mask pointer is allowed.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        crate::log::warn(
            "cluster: cannot block SIGPIPE on the cluster thread: a server that breaks the connection may end the process unless it ignores SIGPIPE",
        );
    }
}

pub(crate) fn run(
    inner: Arc<Inner>,
    cmds: UnboundedReceiver<Cmd>,
    in_tx: InSender,
    ready: std::sync::mpsc::Sender<Result<()>>,
    abort: Arc<tokio::sync::Notify>,
) {
    block_sigpipe();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(Error::new(
                ErrorKind::NoMemory,
                format!("cannot start the cluster runtime: {e}"),
            )));
            return;
        }
    };
    let stats_of = Arc::clone(&inner);
    rt.block_on(async move {
        let work = async move {
            let client = match connect(&inner).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let io = Io::new(inner, client, in_tx);
            io.main(cmds, ready).await;
        };
        // The thread that joins this one gave up waiting (see `Cluster::leave`): whatever
        // this loop awaits (a client whose buffer is full while no server answers, a
        // store request), it is dropped here, so the join returns.
        tokio::select! {
            biased;
            () = abort.notified() => {}
            () = work => {}
        }
    });
    stats_of.stats.connected.store(false, Ordering::Relaxed);
    // Cancels what is left (forwarders, the connection). A blocking task the client may
    // have started (a host name's lookup) is not waited for beyond this bound.
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
}

/// The server's own words (the client's `Display` adds a "nats: " of its own).
fn server_error_text(e: &async_nats::ServerError) -> String {
    match e {
        async_nats::ServerError::AuthorizationViolation => "Authorization Violation".to_owned(),
        async_nats::ServerError::SlowConsumer(sid) => format!("Slow Consumer (subscription {sid})"),
        async_nats::ServerError::Other(text) => text.clone(),
    }
}

/// A server's `-ERR` (see `refusals`): counted, logged once per text, and kept for the
/// operations waiting on the server.
fn on_server_error(inner: &Inner, text: &str) {
    if inner.refusals.record(text) {
        let hint = if refusals::is_permission(text) {
            ": the account this node connects as lacks that permission, so the node cannot send or receive there (the README lists the subjects a node uses)"
        } else {
            ""
        };
        crate::log::log(
            crate::log::Level::Error,
            &format!("cluster: the server refused: '{text}'{hint}"),
        );
    }
}

/// Yields after a round trip before looking for refusals (see `Io::flush`).
const REFUSAL_YIELDS: usize = 4;

/// Where the client receives the answers to its requests (its default inbox prefix).
const INBOX: &str = "_INBOX.";

/// The error of an operation the server refused.
fn refused(text: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("the server refused: '{text}'"),
    )
}

/// How long the io thread's end waits for blocking work its runtime started.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(500);

async fn connect(inner: &Arc<Inner>) -> Result<async_nats::Client> {
    let cfg = &inner.cfg;
    let timeout = Duration::from_millis(u64::from(cfg.connect_timeout_ms));
    let events = inner.cmd.clone();
    let refused = Arc::clone(inner);
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("switchboard {}", cfg.node_name))
        .no_echo()
        // Each subscription's queue inside the client: our forwarders drain it at once
        // into the delivery queue (bounded, drops counted), so this one only has to
        // absorb a burst read from the socket before a forwarder runs; past it the client
        // would drop without a trace.
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .connection_timeout(timeout)
        .retain_servers_order()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 100).clamp(50, 2000))
        })
        .event_callback(move |ev| {
            let events = events.clone();
            let inner = Arc::clone(&refused);
            async move {
                let ev = match ev {
                    async_nats::Event::Connected => Some(ConnEvent::Connected),
                    async_nats::Event::Disconnected => Some(ConnEvent::Disconnected),
                    async_nats::Event::SlowConsumer(_) => Some(ConnEvent::SlowConsumer),
                    async_nats::Event::ServerError(e) => {
                        on_server_error(&inner, &server_error_text(&e));
                        None
                    }
                    async_nats::Event::LameDuckMode => {
                        crate::log::log(
                            crate::log::Level::Notice,
                            "cluster: the server is shutting down (lame duck mode): the node reconnects to another server of 'servers' when it closes the connection",
                        );
                        None
                    }
                    async_nats::Event::ClientError(e) => {
                        let text = format!("cluster: {e}");
                        if inner.refusals.first_log(&text) {
                            crate::log::warn(&text);
                        }
                        None
                    }
                    _ => None,
                };
                if let Some(ev) = ev {
                    let _ = events.send(Cmd::Connection(ev));
                }
            }
        });
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(f) = &cfg.creds_file {
        opts = opts
            .credentials_file(f)
            .await
            .map_err(|e| Error::invalid(format!("cluster config 'creds_file' = '{f}': {e}")))?;
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.into());
    }
    if let (Some(c), Some(k)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(c.into(), k.into());
    }
    if cfg.wants_tls() {
        opts = opts.require_tls(true);
    }
    let servers: Vec<async_nats::ServerAddr> = cfg
        .servers
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|e| Error::invalid(format!("cluster config 'servers': '{s}': {e}")))
        })
        .collect::<Result<_>>()?;
    // One bound for the whole attempt, however many servers are listed.
    match tokio::time::timeout(timeout, opts.connect(servers)).await {
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "could not connect to {} within connect_timeout_ms ({} ms)",
                cfg.servers.join(","),
                cfg.connect_timeout_ms
            ),
        )),
        Ok(Err(e)) => {
            let kind = match e.kind() {
                async_nats::ConnectErrorKind::TimedOut => ErrorKind::Timeout,
                _ => ErrorKind::Unavailable,
            };
            Err(Error::new(
                kind,
                format!("cannot join the cluster at {}: {e}", cfg.servers.join(",")),
            ))
        }
        Ok(Ok(c)) => Ok(c),
    }
}

/// State the main loop and the store jobs share.
struct Shared {
    inner: Arc<Inner>,
    client: async_nats::Client,
    js: jetstream::Context,
    in_tx: InSender,
    /// When we last wrote all of our snapshots (our clock, ns); in every heartbeat.
    asserted_ns: AtomicU64,
    /// The store bucket was created or found (a shared cache exists).
    bucket_ready: AtomicBool,
    /// Names of shared-cache topics whose state we keep in the store.
    cache_topics: parking_lot::Mutex<HashSet<String>>,
    /// +1 each time a store write failed (its acknowledgement did not come).
    store_failures: AtomicU64,
    /// A re-assertion task is running (see `schedule_reassert`).
    reasserting: AtomicBool,
    /// Held by the one pass of `assert_own` that writes (see `STORE_ACKS_IN_FLIGHT`).
    assert_pass: tokio::sync::Mutex<()>,
    /// Cuts a re-assertion's pause short (a reconnect: the store may answer now).
    reassert_now: tokio::sync::Notify,
    /// The sender is handing queued items to the client (see `sender`).
    sending: AtomicBool,
    /// The sender's store writes, for `store_writer`.
    store_writes: StoreWrites,
    /// Our presence has been written to the store at least once (see `check_presence`).
    present: AtomicBool,
    /// A presence check is running.
    checking: AtomicBool,
    /// The node is leaving: its keys are being removed on purpose.
    leaving: AtomicBool,
    /// Stored snapshots still to be read again (see `request_reread`).
    rereads: parking_lot::Mutex<Rereads>,
    /// A re-read task is running.
    rereading: AtomicBool,
    /// Cuts a failed re-read's pause short (a new request: the store may answer now).
    reread_now: tokio::sync::Notify,
    /// When an arrival was last dropped (see `arrival_dropped`).
    last_arrival_drop: parking_lot::Mutex<Option<Instant>>,
    /// A repair of dropped arrivals is waiting for them to stop (`repair_dropped_arrivals`).
    arrival_repair: AtomicBool,
    /// What was warned about as never sendable (see `unsendable`).
    unsendable_warned: parking_lot::Mutex<HashSet<(u32, Sent, Unsendable)>>,
}

impl Shared {
    fn heartbeat(&self, state: u8) -> Heartbeat {
        let inner = &self.inner;
        Heartbeat {
            state,
            eid: inner.me,
            session: inner.session,
            heartbeat_ms: inner.cfg.heartbeat_ms,
            asserted_ns: self.asserted_ns.load(Ordering::Acquire),
            name: inner.cfg.node_name.clone(),
            store: Some(self.store_writes.marks()),
        }
    }

    async fn send_heartbeat(&self, state: u8) {
        let subject = format!("{}.hb", self.inner.cfg.prefix);
        let _ = self
            .client
            .publish(subject, Bytes::from(self.heartbeat(state).encode()))
            .await;
    }
}

/// How long one store request may go unanswered.
const STORE_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Every this many heartbeats, a node that keeps snapshots in the store checks that its
/// presence is still there (`check_presence`).
const PRESENCE_CHECK_EVERY: u32 = 5;

/// Sends a heartbeat every heartbeat_ms while connected (one went out at join).
async fn heartbeats(s: Arc<Shared>) {
    let period = Duration::from_millis(u64::from(s.inner.cfg.heartbeat_ms));
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beats: u32 = 0;
    loop {
        every.tick().await;
        if s.inner.stats.connected.load(Ordering::Relaxed) {
            s.send_heartbeat(NODE_UP).await;
            beats = beats.wrapping_add(1);
            if beats.is_multiple_of(PRESENCE_CHECK_EVERY)
                && s.present.load(Ordering::Acquire)
                && !s.checking.swap(true, Ordering::AcqRel)
            {
                // A task of its own: a slow store must never delay a heartbeat.
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    // Room for its two store requests at their own bound, whatever
                    // heartbeat_ms: a check cut short every time would never find
                    // our presence gone.
                    let bound = (Duration::from_millis(u64::from(s.inner.cfg.heartbeat_ms)) * 4)
                        .max(STORE_REQUEST_TIMEOUT * 3);
                    let _ = tokio::time::timeout(bound, check_presence(&s)).await;
                    s.checking.store(false, Ordering::Release);
                });
            }
        }
    }
}

/// A node the others took for down (it missed their patience's worth of heartbeats: a
/// pause, an overloaded machine) has had its keys purged from the store by them, so that
/// late joiners do not load a gone node's snapshots. Alive all along, it still holds its
/// snapshots: when its presence has gone from the store, it writes everything again
/// (`reassert`, as after a reconnect to an emptied store), and the new assertion in its
/// heartbeat makes the others read them back.
async fn check_presence(s: &Arc<Shared>) {
    if s.leaving.load(Ordering::Acquire) || s.reasserting.load(Ordering::Acquire) {
        return;
    }
    let Ok(kv) = bucket(s).await else {
        return;
    };
    let got = kv
        .get(wire::presence_key(&s.inner.me))
        .await
        .map_err(|e| store_error(s, "read", e));
    if let Ok(None) = got {
        if !s.leaving.load(Ordering::Acquire) && !s.reasserting.load(Ordering::Acquire) {
            crate::log::warn(
                "cluster: this node's stored snapshots were removed (another node took it for down): writing them again",
            );
            schedule_reassert(s);
        }
    }
}

struct Io {
    s: Arc<Shared>,
    /// Subscribed subject -> its forwarder.
    subs: HashMap<String, tokio::task::AbortHandle>,
    interest_epoch: u64,
    connected: bool,
    ever_disconnected: bool,
    /// Sessions of other processes heard using our eid (warned once each).
    eid_clashes: HashSet<u32>,
    /// Subjects subscribed and not yet judged (see `refresh_interest`), each with the
    /// refusal count before its subscription (re-made at every reconnect).
    unchecked: Vec<(String, u64)>,
    /// Subjects subscribed whose subscription the server refused, with its words.
    refused: HashMap<String, String>,
}

impl Io {
    fn new(inner: Arc<Inner>, client: async_nats::Client, in_tx: InSender) -> Io {
        let mut js = jetstream::new(client.clone());
        // Short tries: callers retry within their own bounds (see `bucket`).
        js.set_timeout(STORE_REQUEST_TIMEOUT);
        Io {
            s: Arc::new(Shared {
                inner,
                client,
                js,
                in_tx,
                asserted_ns: AtomicU64::new(0),
                bucket_ready: AtomicBool::new(false),
                cache_topics: parking_lot::Mutex::new(HashSet::new()),
                store_failures: AtomicU64::new(0),
                reasserting: AtomicBool::new(false),
                assert_pass: tokio::sync::Mutex::new(()),
                reassert_now: tokio::sync::Notify::new(),
                sending: AtomicBool::new(false),
                store_writes: StoreWrites::default(),
                present: AtomicBool::new(false),
                checking: AtomicBool::new(false),
                leaving: AtomicBool::new(false),
                rereads: parking_lot::Mutex::new(Rereads::default()),
                rereading: AtomicBool::new(false),
                reread_now: tokio::sync::Notify::new(),
                last_arrival_drop: parking_lot::Mutex::new(None),
                arrival_repair: AtomicBool::new(false),
                unsendable_warned: parking_lot::Mutex::new(HashSet::new()),
            }),
            subs: HashMap::new(),
            interest_epoch: u64::MAX,
            connected: true,
            ever_disconnected: false,
            eid_clashes: HashSet::new(),
            unchecked: Vec::new(),
            refused: HashMap::new(),
        }
    }

    fn prefix(&self) -> &str {
        &self.s.inner.cfg.prefix
    }

    async fn main(mut self, mut cmds: UnboundedReceiver<Cmd>, ready: Reply) {
        let inner = Arc::clone(&self.s.inner);
        inner.stats.connected.store(true, Ordering::Relaxed);
        let since = inner.refusals.count();
        let hb_subject = format!("{}.hb", self.prefix());
        let direct = format!("{}.d.{}.>", self.prefix(), wire::eid_token(&inner.me));
        let mut hb_sub = match self.s.client.subscribe(hb_subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(Error::new(ErrorKind::Unavailable, format!("{e}"))));
                return;
            }
        };
        if let Err(e) = self.subscribe(direct.clone()).await {
            let _ = ready.send(Err(e));
            return;
        }
        {
            let now = Instant::now();
            inner
                .nodes
                .lock()
                .set_self(&self.heartbeat(NODE_UP), now, now_realtime_ns());
        }
        self.send_heartbeat(NODE_UP).await;
        if let Err(e) = self.flush(since, &[hb_subject, direct]).await {
            let _ = ready.send(Err(e));
            return;
        }
        let _ = ready.send(Ok(()));

        let (acks_tx, acks_rx) = tokio::sync::mpsc::channel(ACKS_IN_FLIGHT);
        let sender = tokio::spawn(sender(Arc::clone(&self.s)));
        let writer = tokio::spawn(store_writer(Arc::clone(&self.s), acks_tx));
        let acks = tokio::spawn(check_acks(Arc::clone(&self.s), acks_rx));
        // Heartbeats have a task of their own: this loop may wait for the delivery thread
        // (a slow synchronous subscriber), which must never make the others take this
        // node for down.
        let heartbeats = tokio::spawn(heartbeats(Arc::clone(&self.s)));
        let hb_period = Duration::from_millis(u64::from(inner.cfg.heartbeat_ms));
        let tick_period =
            (hb_period / 4).clamp(Duration::from_millis(5), Duration::from_millis(50));
        let mut ticker = tokio::time::interval(tick_period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None | Some(Cmd::Stop) => break,
                    Some(Cmd::Leave(done)) => {
                        self.leave().await;
                        let _ = done.send(());
                        break;
                    }
                    Some(Cmd::Interest(None)) => {
                        let _ = self.refresh_interest(None).await;
                    }
                    Some(Cmd::Interest(Some((token, reply)))) => {
                        let _ = reply.send(self.refresh_interest(Some(&token)).await);
                    }
                    Some(Cmd::ShareCache { topic, done }) => {
                        self.s.cache_topics.lock().insert(topic.clone());
                        tokio::spawn(share_cache(Arc::clone(&self.s), topic, done));
                    }
                    Some(Cmd::Connection(ev)) => self.on_connection(ev).await,
                },
                msg = hb_sub.next() => {
                    if let Some(msg) = msg {
                        self.on_heartbeat(&msg.payload).await;
                    }
                }
                _ = ticker.tick() => {
                    if self.interest_epoch != crate::tap::interest_epoch() {
                        let _ = self.refresh_interest(None).await;
                    }
                    if self.connected {
                        let now = Instant::now();
                        if now.saturating_duration_since(last_tick) > hb_period {
                            // This loop did not run for a heartbeat period (the process
                            // was stopped or starved, or the delivery thread held us):
                            // the heartbeats it did not read say nothing about the
                            // others. Give every node a fresh period before judging it.
                            inner.nodes.lock().grace(now);
                        }
                        last_tick = now;
                        let events = inner.nodes.lock().tick(now);
                        self.on_events(events).await;
                    }
                }
            }
        }
        sender.abort();
        writer.abort();
        acks.abort();
        heartbeats.abort();
        for (_, h) in self.subs.drain() {
            h.abort();
        }
        inner.stats.connected.store(false, Ordering::Relaxed);
    }

    fn heartbeat(&self, state: u8) -> Heartbeat {
        self.s.heartbeat(state)
    }

    async fn send_heartbeat(&self, state: u8) {
        self.s.send_heartbeat(state).await;
    }

    /// Returns once the server has processed everything this connection sent before
    /// (subscriptions included). The client's own flush only writes the socket: a
    /// publisher on another connection could still beat our subscription to the server.
    /// A request nobody answers makes the server itself reply ("no responders") once it
    /// reached it, in order after what came before.
    ///
    /// Fails at once when the server refused (`refusals`) one of `used` (the subjects the
    /// caller subscribed or published to since it noted `since`) or the round trip's own.
    async fn flush(&self, since: u64, used: &[String]) -> Result<()> {
        let limit = Duration::from_millis(u64::from(self.s.inner.cfg.connect_timeout_ms));
        let subject = format!(
            "{}._sync.{}",
            self.prefix(),
            wire::eid_token(&self.s.inner.me)
        );
        let mut watched = used.to_vec();
        watched.push(subject.clone());
        let refusals = &self.s.inner.refusals;
        let request = async_nats::Request::new().timeout(Some(limit));
        let round_trip = async {
            match self.s.client.send_request(subject, request).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
                Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => Err(Error::new(
                    ErrorKind::Timeout,
                    "the server did not answer in time",
                )),
                Err(e) => Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("server round trip: {e}"),
                )),
            }
        };
        // The answer comes to the client's inbox, which it subscribes on first use.
        let concerns = |text: &str| {
            refusals::names_any(text, &watched) || refusals::names_under(text, &[INBOX])
        };
        let done = tokio::select! {
            r = round_trip => r,
            text = refusals.wait_for(since, concerns) => return Err(refused(&text)),
        };
        // The server sent its refusals before the round trip's answer, but the client
        // hands them to another task of this runtime: let it run before looking.
        for _ in 0..REFUSAL_YIELDS {
            tokio::task::yield_now().await;
        }
        match refusals.first_after(since, concerns) {
            Some(text) => Err(refused(&text)),
            None => done,
        }
    }

    async fn subscribe(&mut self, subject: String) -> Result<()> {
        let mut sub = self
            .s
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("subscribe {subject}: {e}")))?;
        let in_tx = self.s.in_tx.clone();
        let s = Arc::clone(&self.s);
        // Never waits for the delivery thread: an arrival it has no room for is dropped
        // and counted here. (Waiting would only move the drop into the client library,
        // whose own per-subscription queue then drops without telling.)
        let task = tokio::spawn(async move {
            let mut warned = false;
            while let Some(m) = sub.next().await {
                match in_tx.try_send(Inbound::Msg {
                    subject: m.subject,
                    body: m.payload,
                }) {
                    Ok(()) => {}
                    Err(false) => {
                        s.inner.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
                        arrival_dropped(&s);
                        if !warned {
                            warned = true;
                            crate::log::warn(
                                "cluster: arrivals come faster than this node delivers them: \
                                 dropping (counted in dropped_in)",
                            );
                        }
                    }
                    Err(true) => break,
                }
            }
        });
        self.subs.insert(subject, task.abort_handle());
        Ok(())
    }

    /// The subjects the shared topics' local subscribers want.
    fn wanted_subjects(&self) -> HashSet<String> {
        let p = self.prefix();
        let mut want = HashSet::new();
        let topics = self.s.inner.topics.read();
        let types = MessageType::all();
        for st in topics.values().filter(|st| st.shared) {
            if st.topic.wants(any_type()) {
                want.insert(format!("{p}.m.{}.>", st.token));
                continue;
            }
            // A type whose name makes no subject token never crosses (`encode_item`).
            for ty in &types {
                if st.topic.wants(ty) && wire::token_fits(ty.name()) {
                    want.insert(format!("{p}.m.{}.{}", st.token, wire::escaped(ty.name())));
                }
            }
        }
        want
    }

    /// Subscribes to what the node's shared topics and their local subscribers want, and
    /// drops the rest. `report`: a caller waits (a share of the topic whose subject token
    /// this is) and hears of the server's refusal of any of that topic's subscriptions,
    /// whichever refresh made it (the io loop's tick may see a share's new interest, and
    /// subscribe, before the share's own request arrives; a topic shared again may keep
    /// the subscription it had).
    async fn refresh_interest(&mut self, report: Option<&str>) -> Result<()> {
        self.interest_epoch = crate::tap::interest_epoch();
        let want = self.wanted_subjects();
        let direct_prefix = format!("{}.d.", self.prefix());
        // Subscribe the new ones first: for a moment both deliver, and the receiver's
        // duplicate window drops the second copy; the other order could lose messages.
        let mut first_error = None;
        let since = self.s.inner.refusals.count();
        for subject in &want {
            if !self.subs.contains_key(subject) {
                if let Err(e) = self.subscribe(subject.clone()).await {
                    first_error.get_or_insert(e);
                }
                self.unchecked.push((subject.clone(), since));
            }
        }
        self.subs.retain(|subject, task| {
            let keep = want.contains(subject) || subject.starts_with(&direct_prefix);
            if !keep {
                task.abort();
            }
            keep
        });
        let subs = &self.subs;
        self.unchecked
            .retain(|(subject, _)| subs.contains_key(subject));
        self.refused.retain(|subject, _| subs.contains_key(subject));
        if let Some(e) = first_error {
            return Err(e);
        }
        self.flush(since, &[]).await?;
        // The round trip just made came after every subscription still unchecked: the
        // server's refusals of them have arrived.
        let refusals = &self.s.inner.refusals;
        for (subject, at) in std::mem::take(&mut self.unchecked) {
            let named = |text: &str| refusals::names_any(text, std::slice::from_ref(&subject));
            if let Some(text) = refusals.first_after(at, named) {
                self.refused.insert(subject, text);
            }
        }
        let Some(token) = report else {
            return Ok(());
        };
        let of_topic = format!("{}.m.{token}.", self.prefix());
        match self.refused.iter().find(|(s, _)| s.starts_with(&of_topic)) {
            Some((_, text)) => Err(refused(text)),
            None => Ok(()),
        }
    }

    async fn on_heartbeat(&mut self, body: &[u8]) {
        let hb = match Heartbeat::decode(body) {
            Ok(hb) => hb,
            Err(_) => {
                self.s
                    .inner
                    .stats
                    .dropped_in
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let inner = &self.s.inner;
        if hb.eid == inner.me && hb.session != inner.session && hb.state == NODE_UP {
            // Our connection never hears its own heartbeats (no echo): another process
            // uses this eid (a second process on this host, a cloned host, a container
            // sharing the host's network: the default eid is a network card's address).
            // Both ignore each other's messages as their own and overwrite each other's
            // stored snapshots; nothing works right until one of them changes its eid.
            if self.eid_clashes.len() < 64 && self.eid_clashes.insert(hb.session) {
                crate::log::log(
                    crate::log::Level::Error,
                    &format!(
                        "cluster: another node ('{}') uses this node's eid {}: the two ignore each other's messages and overwrite each other's stored snapshots; give each node its own eid (sb_eid_set_default)",
                        hb.name, inner.me
                    ),
                );
            }
            return;
        }
        let events = inner
            .nodes
            .lock()
            .on_heartbeat(&hb, Instant::now(), now_realtime_ns());
        self.on_events(events).await;
    }

    async fn on_events(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::StateChanged { eid, state } => {
                    let node = self.s.inner.nodes.lock().get(&eid).cloned();
                    if let Some(node) = node {
                        self.s.in_tx.send(Inbound::Node(Box::new(node))).await;
                    }
                    if (state == STATE_DOWN || state == STATE_LEFT)
                        && self.s.bucket_ready.load(Ordering::Acquire)
                    {
                        tokio::spawn(purge_gone(Arc::clone(&self.s), eid));
                    }
                }
                Event::Reread { eid, .. } => {
                    if self.s.bucket_ready.load(Ordering::Acquire) {
                        request_reread(&self.s, Some(eid));
                    }
                }
            }
        }
    }

    async fn on_connection(&mut self, ev: ConnEvent) {
        let inner = &self.s.inner;
        match ev {
            ConnEvent::Disconnected => {
                self.connected = false;
                self.ever_disconnected = true;
                inner.stats.connected.store(false, Ordering::Relaxed);
            }
            ConnEvent::Connected => {
                if self.connected {
                    return;
                }
                self.connected = true;
                inner.stats.connected.store(true, Ordering::Relaxed);
                inner.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                // The client subscribes everything again: judged again (a server whose
                // permissions changed may take what it refused).
                let since = inner.refusals.count();
                self.refused.clear();
                self.unchecked = self.subs.keys().map(|s| (s.clone(), since)).collect();
                // We heard nobody while away: that says nothing about them. Give every
                // node a fresh period before judging it.
                inner.nodes.lock().grace(Instant::now());
                self.send_heartbeat(NODE_UP).await;
                if self.s.bucket_ready.load(Ordering::Acquire) {
                    tokio::spawn(after_reconnect(Arc::clone(&self.s)));
                }
            }
            ConnEvent::SlowConsumer => {
                inner.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
                arrival_dropped(&self.s);
            }
        }
    }

    async fn leave(&mut self) {
        self.s.leaving.store(true, Ordering::Release);
        let inner = Arc::clone(&self.s.inner);
        let deadline = Instant::now() + super::LEAVE_DRAIN;
        // Store writes count until the store confirmed them: one still on its way could
        // land after the removal of our keys below (the store takes writes and removals
        // through different queues).
        while (inner.queued() > 0
            || self.s.sending.load(Ordering::SeqCst)
            || !self.s.store_writes.all_done())
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Once the server has them, nothing queued is lost when the connection closes
        // (still within the 1 s the leave may spend on them).
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, self.flush(0, &[])).await;
        // A pass writing all of our snapshots again (after a reconnect, a failed write)
        // ends at its next write now that we are leaving, once the writes it made are
        // confirmed: it must not write after the removal, and none may start meanwhile.
        // A bound of its own: a slow store, the very case in which a pass runs, may have
        // used up the drain's.
        let _no_pass = tokio::time::timeout(super::LEAVE_DRAIN, self.s.assert_pass.lock()).await;
        if self.s.bucket_ready.load(Ordering::Acquire) {
            let own = format!("{}.>", wire::eid_token(&inner.me));
            let _ = tokio::time::timeout(super::LEAVE_DRAIN, purge(Arc::clone(&self.s), own)).await;
        }
        // Every step is bounded: with no server to take them, the client's buffer fills
        // and a publish into it waits for a reconnect that may never come.
        let _ = tokio::time::timeout(super::LEAVE_DRAIN, self.send_heartbeat(NODE_LEFT)).await;
        let _ = tokio::time::timeout(super::LEAVE_DRAIN, self.s.client.flush()).await;
    }
}

/// Store writes whose acknowledgement is awaited at once, at most.
const ACKS_IN_FLIGHT: usize = 4096;

/// Drains the outgoing queue for as long as the io thread runs. Messages are published
/// as they are; store writes go to `store_writer` (through JetStream), and their
/// acknowledgements are checked by `check_acks` (a write the store never confirmed is
/// repaired by writing all of our snapshots again).
async fn sender(s: Arc<Shared>) {
    let mut seq = 0u64;
    let mut subjects = SubjectCache::default();
    let p = s.inner.cfg.prefix.clone();
    loop {
        // Busy from before the first pop until the last item is handed to the client, so
        // that `leave` (queue empty and not busy) knows nothing is on its way.
        s.sending.store(true, Ordering::SeqCst);
        while let Some(item) = s.inner.pop() {
            repair_dropped_cache_changes(&s);
            // A panic here (a bug of ours, or a client assertion we did not foresee) would
            // end this task, and with it everything this node sends, without a word:
            // the item is lost, counted and reported, and the next one goes.
            let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                encode_item(&s, &p, item, &mut seq, &mut subjects)
            }));
            let Ok(encoded) = encoded else {
                s.inner.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
                crate::log::log(
                    crate::log::Level::Error,
                    "cluster: preparing a message to send failed inside the library (a bug: please report it); the message was dropped",
                );
                continue;
            };
            let Some(e) = encoded else {
                continue;
            };
            match e.kind {
                Sent::Store => {
                    // The store writer waits for the client's grants, which a store that
                    // does not answer holds for seconds: messages never wait behind it.
                    if s.store_writes.push(e, s.inner.cfg.out_queue_limit) {
                        s.inner.dropped(true); // its oldest write
                    }
                }
                Sent::Message | Sent::Json => {
                    let r = match e.headers {
                        Some(h) => s.client.publish_with_headers(e.subject, h, e.body).await,
                        None => s.client.publish(e.subject, e.body).await,
                    };
                    match r {
                        Ok(()) if e.kind == Sent::Message => {
                            s.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) if err.kind() == ClientPublishErrorKind::MaxPayloadExceeded => {
                            unsendable(
                                &s,
                                e.type_id,
                                e.kind,
                                Unsendable::TooLarge,
                                &err.to_string(),
                            );
                        }
                        _ => {}
                    }
                }
            }
        }
        repair_dropped_cache_changes(&s);
        s.sending.store(false, Ordering::SeqCst);
        s.inner.out_notify.notified().await;
    }
}

/// The full outgoing queue (or the store writes' queue) dropped changes of a shared
/// cache (`Inner::push`): nothing would send them again, so the store and the other nodes
/// would keep the old values for good. Writing all our snapshots again repairs both: the
/// store gets them, and the new assertion in our heartbeat makes the others re-read them.
/// What is still in the outgoing queue is newer than anything dropped (it drops its
/// oldest), so it cannot undo the repair; the store writes queued behind it are older,
/// and are dropped here.
fn repair_dropped_cache_changes(s: &Arc<Shared>) {
    let dropped = &s.inner.cache_change_dropped;
    if !dropped.load(Ordering::Relaxed) || !dropped.swap(false, Ordering::AcqRel) {
        return;
    }
    if s.leaving.load(Ordering::Acquire) {
        // Our snapshots are about to be removed everywhere.
        return;
    }
    // The store writes still queued are older than what the outgoing queue dropped: one
    // of them, written after the re-assertion's newer value of its key, would leave the
    // store behind for good. The re-assertion writes every current value instead.
    s.store_writes.clear();
    if !s.reasserting.load(Ordering::Acquire) {
        crate::log::warn(
            "cluster: the outgoing queue was full and dropped changes of a shared cache (out_queue_limit): writing this node's snapshots again so that the other nodes catch up",
        );
    }
    schedule_reassert(s);
}

/// The sender's store writes, oldest first, for `store_writer`: as long as the outgoing
/// queue at most, past which the oldest is dropped (so what stays queued is newer than
/// anything dropped, and the re-assertion a drop triggers cannot be undone by it).
/// Writes are numbered in the order queued, for the store marks of our heartbeats.
#[derive(Default)]
struct StoreWrites {
    state: parking_lot::Mutex<WriteState>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct WriteState {
    /// Queued writes and their numbers.
    queue: std::collections::VecDeque<(u64, Encoded)>,
    /// Writes queued so far (the next one's number).
    queued: u64,
    /// Numbers of the writes taken from the queue whose acknowledgement is awaited.
    in_flight: std::collections::BTreeSet<u64>,
}

impl StoreWrites {
    /// Queues a write; true when the queue was full and its oldest was dropped.
    fn push(&self, e: Encoded, limit: usize) -> bool {
        let dropped = {
            let mut st = self.state.lock();
            let n = st.queued;
            st.queued += 1;
            st.queue.push_back((n, e));
            if st.queue.len() > limit {
                st.queue.pop_front()
            } else {
                None
            }
        };
        self.ready.notify_one();
        dropped.is_some()
    }

    /// The oldest write and its number; the caller calls `done` with the number once the
    /// store answered or the write failed (until then it is in flight).
    fn pop(&self) -> Option<(u64, Encoded)> {
        let mut st = self.state.lock();
        let e = st.queue.pop_front();
        if let Some((n, _)) = &e {
            st.in_flight.insert(*n);
        }
        if st.queue.is_empty() && st.queue.capacity() > 1024 {
            // A backlog drained (a store that stopped answering): give its room back.
            st.queue.shrink_to(1024);
        }
        e
    }

    /// Write `n` is behind us: confirmed, or failed (a failure has a re-assertion write
    /// everything again).
    fn done(&self, n: u64) {
        self.state.lock().in_flight.remove(&n);
    }

    /// Drops every queued write (a re-assertion is about to write the current values).
    fn clear(&self) {
        // Freed after the lock is released: a backlog can be thousands of writes.
        let old = std::mem::take(&mut self.state.lock().queue);
        drop(old);
    }

    /// Every write queued so far is behind us.
    fn all_done(&self) -> bool {
        let m = self.marks();
        m.stored == m.queued
    }

    /// Writes queued so far, and how many of the first of them are behind us (done,
    /// dropped or cleared): the store marks of our heartbeats (see `catch_up`).
    fn marks(&self) -> StoreMarks {
        let st = self.state.lock();
        // The oldest write not behind us, queued or in flight; none: all of them are.
        let stored = (st.queue.front().map(|(n, _)| *n))
            .into_iter()
            .chain(st.in_flight.first().copied())
            .min()
            .unwrap_or(st.queued);
        StoreMarks {
            queued: st.queued,
            stored,
        }
    }
}

/// Publishes the sender's store writes in their order. A write waits for one of the
/// client's grants of an unacknowledged write (5,000), which a store that stopped
/// answering holds until their acknowledgements time out (2 s each, thousands at once):
/// done in the sender, that held every message queued behind it (2.5 s after a server
/// loss, longer for a bigger backlog).
async fn store_writer(s: Arc<Shared>, acks: tokio::sync::mpsc::Sender<NumberedAck>) {
    loop {
        while let Some((n, e)) = s.store_writes.pop() {
            let r = match e.headers {
                Some(h) => s.js.publish_with_headers(e.subject, h, e.body).await,
                None => s.js.publish(e.subject, e.body).await,
            };
            match r {
                Ok(ack) => {
                    if acks.send((n, ack)).await.is_err() {
                        s.store_writes.done(n); // shutting down
                    }
                }
                // Never storable, so never retried.
                Err(err) if err.kind() == JsPublishErrorKind::MaxPayloadExceeded => {
                    s.store_writes.done(n);
                    unsendable(
                        &s,
                        e.type_id,
                        Sent::Store,
                        Unsendable::TooLarge,
                        &err.to_string(),
                    );
                }
                Err(_) => {
                    s.store_writes.done(n);
                    store_failed(&s);
                    schedule_reassert(&s);
                }
            }
        }
        s.store_writes.ready.notified().await;
    }
}

/// Awaits store acknowledgements, all at once (up to ACKS_IN_FLIGHT); a missing one
/// schedules a re-assertion. Each wait's bound starts when it is awaited: awaited one
/// after the other, the writes a killed server never answered (thousands at full
/// speed) took 2 s each, and the sender, which waits for this task, sent nothing (not
/// even plain messages) for hours.
async fn check_acks(s: Arc<Shared>, mut acks: tokio::sync::mpsc::Receiver<NumberedAck>) {
    let mut waiting = futures_util::stream::FuturesUnordered::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        tokio::select! {
            ack = acks.recv(), if open && waiting.len() < ACKS_IN_FLIGHT => match ack {
                Some((n, ack)) => {
                    let ack = std::future::IntoFuture::into_future(ack);
                    waiting.push(async move { (n, ack.await) });
                }
                None => open = false,
            },
            Some((n, result)) = waiting.next(), if !waiting.is_empty() => {
                s.store_writes.done(n);
                if result.is_err() {
                    store_failed(&s);
                    schedule_reassert(&s);
                }
            }
        }
    }
}

/// A store write's acknowledgement to await, with the write's number (`StoreWrites`).
type NumberedAck = (u64, jetstream::context::PublishAckFuture);

/// The store may have missed some of our writes: write all of our snapshots again, until
/// a complete pass ran with no new failure in between.
fn schedule_reassert(s: &Arc<Shared>) {
    s.store_failures.fetch_add(1, Ordering::AcqRel);
    if !s.reasserting.swap(true, Ordering::AcqRel) {
        tokio::spawn(reassert(Arc::clone(s)));
    }
}

async fn reassert(s: Arc<Shared>) {
    // Each try writes every snapshot of ours: a store that keeps refusing them (full, or
    // answering slowly) gets them less and less often, up to every RETRY_PAUSE_MAX.
    let mut backoff = Backoff::new(&s);
    let mut run = FailureRun::default();
    loop {
        if s.leaving.load(Ordering::Acquire) {
            // A pass after the leave's removal of our snapshots would store them again,
            // for late joiners to load from a node that is gone.
            s.reasserting.store(false, Ordering::Release);
            return;
        }
        let failures = s.store_failures.load(Ordering::Acquire);
        let topics: Vec<String> = s.cache_topics.lock().iter().cloned().collect();
        match assert_own(&s, &topics).await {
            Ok(()) if s.store_failures.load(Ordering::Acquire) == failures => {
                run.ended(|| "cluster: this node's snapshots are in the store again".to_owned());
                s.reasserting.store(false, Ordering::Release);
                // A failure recorded just now, after the check, finds the flag clear.
                if s.store_failures.load(Ordering::Acquire) == failures
                    || s.reasserting.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
            Ok(()) => {}
            // Cut short by the leave (see `pass_write`): nothing to retry.
            Err(_) if s.leaving.load(Ordering::Acquire) => {
                s.reasserting.store(false, Ordering::Release);
                return;
            }
            Err(e) => run.failed(|| {
                format!(
                    "cluster: writing this node's snapshots to the store failed (retrying): {e}"
                )
            }),
        }
        tokio::select! {
            () = backoff.wait() => {}
            () = s.reassert_now.notified() => backoff.reset(),
        }
    }
}

/// The sender's subject parts made once instead of per message: each type's escaped name,
/// and each (topic, type)'s broadcast subject, whose copies share one buffer (a subject
/// made per message cost a `format!` and the client's copy of it).
#[derive(Default)]
struct SubjectCache {
    type_tokens: HashMap<u32, String>,
    /// By the topic token's address and the type's id. The token is kept with its
    /// subject, so that its address is not reused by another topic while it is listed.
    broadcast: HashMap<(usize, u32), (Arc<str>, Subject)>,
}

/// Broadcast subjects kept at most; past that the cache starts over (topics come and go).
const SUBJECTS_KEPT: usize = 4096;

impl SubjectCache {
    fn type_token(&mut self, ty: &MessageType) -> &str {
        self.type_tokens
            .entry(ty.id())
            .or_insert_with(|| wire::escaped(ty.name()))
    }

    /// `P.m.<topic>.<type>` for topic token `token`.
    fn broadcast(&mut self, p: &str, token: &Arc<str>, ty: &MessageType) -> Subject {
        let key = (Arc::as_ptr(token) as *const u8 as usize, ty.id());
        if let Some((_, subject)) = self.broadcast.get(&key) {
            return subject.clone();
        }
        if self.broadcast.len() >= SUBJECTS_KEPT {
            self.broadcast.clear();
        }
        let subject = Subject::from(format!("{p}.m.{token}.{}", self.type_token(ty)));
        self.broadcast
            .insert(key, (Arc::clone(token), subject.clone()));
        subject
    }
}

/// A header value for a name: the name itself, or its escaped token when it holds a line
/// break (which no header value may: the client refuses it, by a panic).
fn header_value(name: &str) -> async_nats::HeaderValue {
    name.parse()
        .unwrap_or_else(|_| async_nats::HeaderValue::from(wire::escaped(name).as_str()))
}

/// The envelope plus encoded data of `msg`; None when it cannot be encoded.
fn body_of(msg: &Message, me: Eid, session: u32, seq: u64, clear: bool) -> Option<Vec<u8>> {
    let (data, is_bytes) = codec::encode(msg)?;
    let mut body = Vec::with_capacity(wire::ENVELOPE_LEN + data.len());
    let mut flags = 0;
    if is_bytes {
        flags |= FLAG_BYTES;
    }
    if clear {
        flags |= FLAG_CLEAR;
    }
    Envelope {
        flags,
        eid: me,
        session,
        seq,
        timestamp_ns: msg.timestamp_ns(),
    }
    .write(&mut body);
    body.extend_from_slice(&data);
    Some(body)
}

/// What the sender publishes for one queued item.
struct Encoded {
    subject: Subject,
    body: Bytes,
    headers: Option<async_nats::HeaderMap>,
    kind: Sent,
    /// The id of the message's (or snapshot's) type, for a warning (an id, not a counted
    /// reference: publishers count their publishes beside the type's reference count).
    type_id: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Sent {
    /// To the other nodes (counted in `sent`).
    Message,
    Json,
    /// A store write.
    Store,
}

fn encoded(
    subject: impl Into<Subject>,
    body: Bytes,
    headers: Option<async_nats::HeaderMap>,
    kind: Sent,
    ty: &MessageType,
) -> Encoded {
    Encoded {
        subject: subject.into(),
        body,
        headers,
        kind,
        type_id: ty.id(),
    }
}

fn encode_item(
    s: &Shared,
    p: &str,
    item: Out,
    seq: &mut u64,
    subjects: &mut SubjectCache,
) -> Option<Encoded> {
    let inner = &s.inner;
    // A type whose name makes no subject token, or a snapshot whose id makes no key
    // token, never crosses: a server would refuse the subject, or close the connection
    // on a protocol line that long (and the client would send it again on reconnecting).
    // (The type's token is escaped once per type, not per message.)
    let mut fits = |ty: &MessageType, kind: Sent| {
        let token = subjects.type_token(ty);
        let ok = !token.is_empty() && token.len() <= wire::MAX_TOKEN;
        if !ok {
            unsendable(s, ty.id(), kind, Unsendable::TypeName, "");
        }
        ok
    };
    match item {
        Out::Broadcast {
            token, msg, clear, ..
        } => {
            if !fits(msg.message_type(), Sent::Message) {
                return None;
            }
            let body = body_of(&msg, inner.me, inner.session, *seq + 1, clear)?;
            *seq += 1;
            let subject = subjects.broadcast(p, &token, msg.message_type());
            Some(encoded(
                subject,
                body.into(),
                None,
                Sent::Message,
                msg.message_type(),
            ))
        }
        Out::Direct { to, token, msg } => {
            if !fits(msg.message_type(), Sent::Message) {
                return None;
            }
            let body = body_of(&msg, inner.me, inner.session, *seq + 1, false)?;
            *seq += 1;
            let subject = format!(
                "{p}.d.{}.{token}.{}",
                wire::eid_token(&to),
                subjects.type_token(msg.message_type())
            );
            Some(encoded(
                subject,
                body.into(),
                None,
                Sent::Message,
                msg.message_type(),
            ))
        }
        Out::Json { token, msg } => {
            if !fits(msg.message_type(), Sent::Json) {
                return None;
            }
            let json = msg.message_type().to_json(&msg)?;
            let subject = format!(
                "{p}.json.{token}.{}",
                subjects.type_token(msg.message_type())
            );
            let mut h = async_nats::HeaderMap::new();
            h.insert("Sb-Eid", inner.me.to_string().as_str());
            h.insert("Sb-Timestamp", msg.timestamp_ns().to_string().as_str());
            h.insert("Sb-Type", header_value(msg.message_type().name()));
            h.insert("Sb-Node", header_value(&inner.cfg.node_name));
            Some(encoded(
                subject,
                json.into(),
                Some(h),
                Sent::Json,
                msg.message_type(),
            ))
        }
        Out::Snapshot {
            token,
            cache,
            old,
            new,
        } => {
            let snap = new.as_ref().or(old.as_ref())?;
            let id = cache.id_of(snap)?.into_owned();
            if let Some(why) = key_problem(snap, &id) {
                // Never stored, so never removed either (a removal of that key would
                // fail like the write, and be retried forever).
                if new.is_some() {
                    unsendable(s, snap.message_type().id(), Sent::Store, why, "");
                }
                return None;
            }
            let key = wire::snapshot_key(&inner.me, &token, snap.message_type().name(), &id);
            let subject = format!("$KV.{}.{key}", inner.bucket);
            let ty = snap.message_type();
            match &new {
                Some(n) => {
                    let body = body_of(n, inner.me, inner.session, 0, false)?;
                    Some(encoded(subject, body.into(), None, Sent::Store, ty))
                }
                None => Some(encoded(
                    subject,
                    Bytes::new(),
                    Some(del_headers()),
                    Sent::Store,
                    ty,
                )),
            }
        }
    }
}

/// The headers of a key-value delete marker.
fn del_headers() -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("KV-Operation", "DEL");
    h
}

/// Counts a store request that failed or was never confirmed (`store_errors`).
fn store_failed(s: &Shared) {
    s.inner.stats.store_errors.fetch_add(1, Ordering::Relaxed);
}

/// The error of a failed store request, counted (every one is made here).
fn store_error(s: &Shared, what: &str, e: impl std::fmt::Display) -> Error {
    store_failed(s);
    Error::new(
        ErrorKind::Unavailable,
        format!("cluster store (JetStream key-value) {what}: {e}"),
    )
}

/// Why a message or snapshot can never cross, however often tried.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Unsendable {
    /// Larger than the servers' `max_payload`.
    TooLarge,
    /// Its type's name makes no subject token (`wire::token_fits`).
    TypeName,
    /// Its cache id makes no store key token (empty, or too long).
    CacheId,
}

/// Counts (in `dropped_out`) a message or snapshot that can never cross, and warns once
/// per type, kind and reason. `detail`: the client's words, if any.
fn unsendable(s: &Shared, type_id: u32, kind: Sent, why: Unsendable, detail: &str) {
    let first = {
        let mut warned = s.unsendable_warned.lock();
        warned.len() < 1024 && warned.insert((type_id, kind, why))
    };
    if first {
        warn_unsendable(type_id, kind, why, detail);
    }
    // Counted once warned: whoever sees the count sees the warning too.
    s.inner.stats.dropped_out.fetch_add(1, Ordering::Release);
}

/// The warning of `unsendable`.
fn warn_unsendable(type_id: u32, kind: Sent, why: Unsendable, detail: &str) {
    let what = match kind {
        Sent::Message => "a message",
        Sent::Json => "a JSON export",
        Sent::Store => "a snapshot",
    };
    let reason = match why {
        Unsendable::TooLarge => format!("is larger than the servers take ({detail})"),
        Unsendable::TypeName => format!(
            "has a type name too long for a subject (at most {} bytes once escaped)",
            wire::MAX_TOKEN
        ),
        Unsendable::CacheId => format!(
            "has a cache id that makes no store key (empty, or over {} bytes once escaped)",
            wire::MAX_TOKEN
        ),
    };
    let outcome = match (kind, why) {
        (Sent::Message, _) => "not sent to the other nodes",
        (Sent::Json, _) => "not exported",
        (Sent::Store, Unsendable::TooLarge) => {
            "not stored (the store keeps its previous value, as the other nodes do)"
        }
        (Sent::Store, _) => "not stored (late joiners do not load it)",
    };
    let name =
        MessageType::by_id(type_id).map_or_else(|| format!("#{type_id}"), |t| t.name().to_owned());
    crate::log::warn(&format!(
        "cluster: {what} of type '{name}' {reason}: {outcome}; counted in dropped_out (warned once per type)"
    ));
}

/// Finds the store's bucket, or creates it. One try: callers retry within their bounds.
async fn bucket(s: &Shared) -> Result<jetstream::kv::Store> {
    let name = s.inner.bucket.clone();
    let kv = match s.js.get_key_value(name.clone()).await {
        Ok(kv) => kv,
        Err(e)
            if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket && !timed_out(&e) =>
        {
            s.js.create_key_value(jetstream::kv::Config {
                bucket: name,
                history: 1,
                num_replicas: s.inner.cfg.store_replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| store_error(s, "unavailable (is JetStream enabled on the servers?)", e))?
        }
        Err(e) => return Err(store_error(s, "did not answer", e)),
    };
    s.bucket_ready.store(true, Ordering::Release);
    Ok(kv)
}

/// Whether a JetStream error is a request that got no answer in time (the bucket may
/// well exist: do not try to create it).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.to_string().contains("timed out") {
            return true;
        }
        cur = x.source();
    }
    false
}

/// Reads the newest value of every key matching `filter` (key syntax, wildcards allowed).
async fn read_keys(s: &Shared, filter: &str) -> Result<Vec<(String, Bytes)>> {
    let stream =
        s.js.get_stream(format!("KV_{}", s.inner.bucket))
            .await
            .map_err(|e| store_error(s, "not found", e))?;
    let prefix = format!("$KV.{}.", s.inner.bucket);
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("{prefix}{filter}"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| store_error(s, "read", e))?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut msgs = consumer
        .messages()
        .await
        .map_err(|e| store_error(s, "read", e))?;
    loop {
        // The client's ordered consumer never gives up by itself: a store that stops
        // answering in the middle of a read has it recreate its consumer forever. A read
        // with no message for a request's time has failed like an unanswered request
        // (the caller retries it); without the bound the reader waits for the server.
        let next = tokio::time::timeout(STORE_REQUEST_TIMEOUT, msgs.next())
            .await
            .map_err(|_| {
                store_error(s, "read", "timed out (no message in the middle of a read)")
            })?;
        let Some(m) = next else { break };
        let m = m.map_err(|e| store_error(s, "read", e))?;
        let pending = m.info().map(|i| i.pending).unwrap_or(0);
        let deleted = m
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some();
        if !deleted {
            if let Some(key) = m.subject.strip_prefix(&prefix) {
                out.push((key.to_owned(), m.payload.clone()));
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// Removes every key matching `filter` (key syntax) from the store.
async fn purge(s: Arc<Shared>, filter: String) -> Result<()> {
    let stream =
        s.js.get_stream(format!("KV_{}", s.inner.bucket))
            .await
            .map_err(|e| store_error(&s, "not found", e))?;
    stream
        .purge()
        .filter(format!("$KV.{}.{filter}", s.inner.bucket))
        .await
        .map_err(|e| store_error(&s, "purge", e))?;
    Ok(())
}

/// Removes a down or departed node's keys from the store: late joiners must not load a
/// gone node's snapshots. Tried again until the store answers, unless the node is back
/// meanwhile (its keys are its own again; should a removal land after all, the node
/// finds its presence gone and writes everything again, see `check_presence`).
async fn purge_gone(s: Arc<Shared>, eid: Eid) {
    let mut backoff = Backoff::new(&s);
    let mut run = FailureRun::default();
    loop {
        if s.inner.nodes.lock().is_up(&eid) || s.leaving.load(Ordering::Acquire) {
            return;
        }
        match purge(Arc::clone(&s), format!("{}.>", wire::eid_token(&eid))).await {
            Ok(()) => {
                run.ended(|| format!("cluster: removed the stored snapshots of gone node {eid}"));
                return;
            }
            Err(e) => run.failed(|| {
                format!("cluster: removing the stored snapshots of gone node {eid} failed (retrying): {e}")
            }),
        }
        backoff.wait().await;
    }
}

/// Writes all of our snapshots of the shared caches named (replacing what the store had
/// of ours there), then our presence with a new assertion time, and tells everyone.
async fn assert_own(s: &Arc<Shared>, topics: &[String]) -> Result<()> {
    let kv = bucket(s).await?;
    let inner = &s.inner;
    let me = inner.me;
    let mut caches = Vec::new();
    {
        let shared = inner.topics.read();
        for name in topics {
            let Some(st) = shared.get(name) else { continue };
            let Some(ct) = &st.caching else { continue };
            caches.push((Arc::clone(&st.token), Arc::clone(ct.cache())));
        }
    }
    // One pass at a time: each holds up to STORE_ACKS_IN_FLIGHT of the client's grants
    // without polling them while it writes (and its assertion time is then the newest).
    let _one_pass = s.assert_pass.lock().await;
    if s.leaving.load(Ordering::Acquire) {
        return Err(leaving());
    }
    let asserted = now_realtime_ns();
    for (token, cache) in &caches {
        // No purge first: a node reading meanwhile must see each key we hold, old or new.
        // Keys we no longer hold are deleted after the writes.
        let ours = format!("{}.c.{token}.>", wire::eid_token(&me));
        let stored: Vec<String> = read_keys(s, &ours)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        // What we wrote, to check afterwards that it is still current: a change made
        // meanwhile may have been stored before our older copy, which then won.
        let mut written: Vec<(String, TypeRef, String, MessageRef)> = Vec::new();
        let mut pending = AckWindow::default();
        for snap in cache.dump_by_eid(None, &me) {
            let Some(id) = cache.id_of(&snap).map(|c| c.into_owned()) else {
                continue;
            };
            if let Some(why) = key_problem(&snap, &id) {
                unsendable(s, snap.message_type().id(), Sent::Store, why, "");
                continue;
            }
            let key = wire::snapshot_key(&me, token, snap.message_type().name(), &id);
            pass_write(s, &mut pending, &key, Some(&snap)).await?;
            written.push((key, TypeRef::new(snap.message_type()), id, snap));
        }
        pending.finish(s).await?;
        let held: HashSet<&str> = written.iter().map(|w| w.0.as_str()).collect();
        let mut pending = AckWindow::default();
        for key in stored.iter().filter(|k| !held.contains(k.as_str())) {
            pass_write(s, &mut pending, key, None).await?;
        }
        pending.finish(s).await?;
        for _round in 0..3 {
            let mut pending = AckWindow::default();
            let mut changed = Vec::new();
            for (key, ty, id, snap) in &written {
                let now = cache.get_by_eid(ty, id, Some(&me));
                if now.as_ref().is_some_and(|n| MessageRef::ptr_eq(n, snap)) {
                    continue;
                }
                pass_write(s, &mut pending, key, now.as_ref()).await?;
                if let Some(n) = now {
                    changed.push((key.clone(), ty.clone(), id.clone(), n));
                }
            }
            pending.finish(s).await?;
            if changed.is_empty() {
                break;
            }
            written = changed;
        }
    }
    if s.leaving.load(Ordering::Acquire) {
        return Err(leaving());
    }
    s.asserted_ns.store(asserted, Ordering::Release);
    kv.put(
        wire::presence_key(&me),
        Bytes::from(s.heartbeat(NODE_UP).encode()),
    )
    .await
    .map_err(|e| store_error(s, "write", e))?;
    s.present.store(true, Ordering::Release);
    // A heartbeat made now, not the record: the write may have taken seconds, and the
    // record's store marks are as old as it is (those who wait for our store writes take
    // the marks of live heartbeats).
    let _ = s
        .client
        .publish(
            format!("{}.hb", inner.cfg.prefix),
            Bytes::from(s.heartbeat(NODE_UP).encode()),
        )
        .await;
    Ok(())
}

/// One store write of a pass of `assert_own`, its acknowledgement awaited in `pending`;
/// unless the node is leaving: the pass then ends here, once the writes it made are
/// confirmed, so that the leave's removal of our keys comes after all of them (a key
/// written after it would have late joiners load a snapshot of a node that is gone).
async fn pass_write(
    s: &Shared,
    pending: &mut AckWindow,
    key: &str,
    snap: Option<&MessageRef>,
) -> Result<()> {
    if s.leaving.load(Ordering::Acquire) {
        std::mem::take(pending).finish(s).await?;
        return Err(leaving());
    }
    if let Some(ack) = store_put(s, key, snap).await? {
        pending.push(s, ack).await?;
    }
    Ok(())
}

/// The error of store work cut short by the leave.
fn leaving() -> Error {
    Error::state("the node is leaving the cluster")
}

/// Why a snapshot of id `id` makes no store key (see `wire::token_fits`), if it does not.
fn key_problem(snap: &MessageRef, id: &str) -> Option<Unsendable> {
    if !wire::token_fits(snap.message_type().name()) {
        Some(Unsendable::TypeName)
    } else if !wire::token_fits(id) {
        Some(Unsendable::CacheId)
    } else {
        None
    }
}

/// Writes (or with None deletes) one of our snapshots; the acknowledgement to await.
async fn store_put(
    s: &Shared,
    key: &str,
    snap: Option<&MessageRef>,
) -> Result<Option<jetstream::context::PublishAckFuture>> {
    let subject = format!("$KV.{}.{key}", s.inner.bucket);
    let r = match snap {
        Some(m) => {
            let Some(body) = body_of(m, s.inner.me, s.inner.session, 0, false) else {
                return Ok(None);
            };
            match s.js.publish(subject, body.into()).await {
                // Never storable (see the sender): left out, as a snapshot without codec.
                Err(e) if e.kind() == JsPublishErrorKind::MaxPayloadExceeded => {
                    unsendable(
                        s,
                        m.message_type().id(),
                        Sent::Store,
                        Unsendable::TooLarge,
                        &e.to_string(),
                    );
                    return Ok(None);
                }
                r => r,
            }
        }
        None => {
            s.js.publish_with_headers(subject, del_headers(), Bytes::new())
                .await
        }
    };
    r.map(Some).map_err(|e| store_error(s, "write", e))
}

/// At most this many of one pass's store writes await their acknowledgement. The client
/// grants 5,000 at a time and makes a write wait until an earlier one is acknowledged:
/// a pass that kept every acknowledgement to await at its end would wait forever on
/// itself once the cache holds more than that. The sender shares the grant, but it
/// awaits its acknowledgements as they come; passes do not, so only one runs at a time
/// (`Shared::assert_pass`): several, each holding a full window while it waits for a
/// grant, could wait for each other forever.
const STORE_ACKS_IN_FLIGHT: usize = 1024;

/// The acknowledgements one pass of store writes awaits, oldest first (they come in order).
#[derive(Default)]
struct AckWindow {
    pending: std::collections::VecDeque<jetstream::context::PublishAckFuture>,
}

impl AckWindow {
    async fn push(&mut self, s: &Shared, ack: jetstream::context::PublishAckFuture) -> Result<()> {
        self.pending.push_back(ack);
        if self.pending.len() >= STORE_ACKS_IN_FLIGHT {
            if let Some(oldest) = self.pending.pop_front() {
                confirmed(s, oldest).await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self, s: &Shared) -> Result<()> {
        while let Some(ack) = self.pending.pop_front() {
            confirmed(s, ack).await?;
        }
        Ok(())
    }
}

async fn confirmed(s: &Shared, ack: jetstream::context::PublishAckFuture) -> Result<()> {
    ack.await
        .map(|_| ())
        .map_err(|e| store_error(s, "write not confirmed", e))
}

/// Presence records: who has state in the store, and when each last asserted it.
async fn presences(s: &Shared) -> Result<Vec<Heartbeat>> {
    Ok(read_keys(s, "*.n")
        .await?
        .into_iter()
        .filter_map(|(_, v)| Heartbeat::decode(&v).ok())
        .collect())
}

fn parse_entries(raw: Vec<(String, Bytes)>, s: &Shared) -> Vec<StoredEntry> {
    raw.into_iter()
        .filter_map(|(key, value)| match wire::parse_snapshot_key(&key) {
            Ok(key) => Some(StoredEntry { key, value }),
            Err(_) => {
                s.inner.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
                None
            }
        })
        .collect()
}

/// Writes our snapshots of `topic`'s cache, then reads every node's: what `share_cache`
/// returns with. Tries again until it works (a store electing a new leader answers
/// nothing for seconds); `done` gets the first success, or the error once
/// connect_timeout_ms has passed (and the tries go on in the background).
async fn share_cache(s: Arc<Shared>, topic: String, done: Reply) {
    let deadline =
        Instant::now() + Duration::from_millis(u64::from(s.inner.cfg.connect_timeout_ms));
    let mut done = Some(done);
    let mut backoff = Backoff::new(&s);
    let mut run = FailureRun::default();
    let js_api = String::from("$JS.API.");
    let kv = format!("$KV.{}.", s.inner.bucket);
    let refusals = &s.inner.refusals;
    loop {
        // A store the server refuses this node (its account lacks the permission) never
        // answers: fail at once with the server's words instead of waiting for timeouts.
        let since = refusals.count();
        let concerns =
            |text: &str| refusals::names_under(text, &[js_api.as_str(), kv.as_str(), INBOX]);
        let attempt = tokio::select! {
            r = load_cache(&s, &topic) => r,
            text = refusals.wait_for(since, concerns) => Err(refused(&text)),
        };
        let refused_now = refusals.first_after(since, concerns).is_some();
        match attempt {
            Ok((entries, asserted)) => {
                run.ended(|| format!("cluster: sharing cache of topic '{topic}' went through"));
                s.in_tx
                    .send(Inbound::Reconcile {
                        topic: Some(topic),
                        asserted,
                        entries,
                        done,
                    })
                    .await;
                return;
            }
            Err(e) if s.leaving.load(Ordering::Acquire) => {
                if let Some(d) = done.take() {
                    let _ = d.send(Err(e));
                }
                return;
            }
            // The caller is waiting: try again soon (unless the server refused).
            Err(_) if Instant::now() < deadline && !refused_now => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                // The caller gets this error (its wait allows for one more try past the
                // deadline); sharing goes on behind it, pausing longer and longer (a
                // store that is not there, e.g. JetStream not enabled, is asked every
                // few seconds, not ten times a second).
                run.failed(|| {
                    format!("cluster: sharing cache of topic '{topic}' failed (retrying): {e}")
                });
                if let Some(d) = done.take() {
                    let _ = d.send(Err(e));
                }
                backoff.wait().await;
            }
        }
    }
}

async fn load_cache(s: &Arc<Shared>, topic: &str) -> Result<(Vec<StoredEntry>, HashMap<Eid, u64>)> {
    assert_own(s, &[topic.to_owned()]).await?;
    // Who has state in the store, read before the snapshots (as `reread` takes the
    // assertion times first): a node that re-asserts in between has its new writes read
    // but not yet its new assertion time, so nothing read is older than what the
    // reconcile clears against, and its heartbeat then asks for its re-read. Read the
    // other way round, a re-assertion in between had the reconcile clear what it wrote,
    // and the record took the heartbeat's news (nothing re-read it).
    let stored = presences(s).await?;
    let now = Instant::now();
    let mut events = Vec::new();
    let asserted: HashMap<Eid, u64> = {
        let mut nodes = s.inner.nodes.lock();
        for p in &stored {
            events.extend(nodes.on_presence(p, now, now_realtime_ns()));
        }
        // Only nodes up here: a node taken for down has its entries cleared here and its
        // keys being removed from the store; loading them would leave them for good.
        stored
            .iter()
            .filter_map(|p| nodes.get(&p.eid))
            .filter(|n| n.state == STATE_UP)
            .map(|n| (n.eid, n.asserted_ns))
            .collect()
    };
    // A task of its own: this load may be cut short at any await (a refusal), and the
    // table already holds these nodes (their records will not tell of them again).
    let s2 = Arc::clone(s);
    tokio::spawn(async move {
        for ev in events {
            match ev {
                Event::StateChanged { eid, .. } => {
                    let node = s2.inner.nodes.lock().get(&eid).cloned();
                    if let Some(node) = node {
                        s2.in_tx.send(Inbound::Node(Box::new(node))).await;
                    }
                }
                // A node first known from its record: its snapshots of the caches shared
                // before this one are read too.
                Event::Reread { eid, .. } => request_reread(&s2, Some(eid)),
            }
        }
    });
    let token = wire::escaped(topic);
    let entries = parse_entries(read_keys(s, &format!("*.c.{token}.>")).await?, s);
    Ok((entries, asserted))
}

/// Whose stored snapshots are still to be read again.
#[derive(Default)]
struct Rereads {
    /// Every node's (after a reconnect).
    all: bool,
    eids: HashSet<Eid>,
}

impl Rereads {
    fn add(&mut self, eid: Option<Eid>) {
        match eid {
            Some(e) => {
                self.eids.insert(e);
            }
            None => self.all = true,
        }
    }

    fn is_empty(&self) -> bool {
        !self.all && self.eids.is_empty()
    }

    /// One read per filter: every node's covers each one's.
    fn filters(&self) -> Vec<Option<Eid>> {
        if self.all {
            vec![None]
        } else {
            self.eids.iter().copied().map(Some).collect()
        }
    }
}

/// The longest pause between two tries of a store read or removal that failed.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);

/// Pauses between tries of a store request that failed: one heartbeat period at first,
/// doubling up to `RETRY_PAUSE_MAX` while the failures go on.
struct Backoff {
    period: Duration,
    pause: Duration,
}

impl Backoff {
    fn new(s: &Shared) -> Backoff {
        let period = Duration::from_millis(u64::from(s.inner.cfg.heartbeat_ms));
        Backoff {
            period,
            pause: period,
        }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(RETRY_PAUSE_MAX.max(self.period));
    }

    fn reset(&mut self) {
        self.pause = self.period;
    }
}

/// A run of failures of one retried store task: the first is warned, and the success
/// that ends the run gets a notice (an operator who saw the warning learns it is over).
#[derive(Default)]
struct FailureRun {
    warned: bool,
}

impl FailureRun {
    fn failed(&mut self, warning: impl FnOnce() -> String) {
        if !self.warned {
            crate::log::warn(&warning());
            self.warned = true;
        }
    }

    fn ended(&mut self, notice: impl FnOnce() -> String) {
        if self.warned {
            crate::log::log(crate::log::Level::Notice, &notice());
            self.warned = false;
        }
    }
}

/// Has one node's stored snapshots (every node's with None) read again and reconciled
/// with the caches. A re-read is the only repair of what a node missed while the store
/// or the network failed (a write made while the store had no leader, re-asserted later):
/// it is tried again until the store answers, not once. One task reads at a time, so a
/// read never overtakes a newer one; requests made meanwhile are merged, and cut the
/// pause after a failed read short (a node that just re-asserted: the store answers).
fn request_reread(s: &Arc<Shared>, eid: Option<Eid>) {
    s.rereads.lock().add(eid);
    if s.rereading.swap(true, Ordering::AcqRel) {
        s.reread_now.notify_one();
    } else {
        tokio::spawn(reread_pending(Arc::clone(s)));
    }
}

async fn reread_pending(s: Arc<Shared>) {
    let mut backoff = Backoff::new(&s);
    let mut run = FailureRun::default();
    loop {
        let batch = std::mem::take(&mut *s.rereads.lock());
        if batch.is_empty() {
            s.rereading.store(false, Ordering::Release);
            // A request made after the take found the flag still set: take it now.
            if s.rereads.lock().is_empty() || s.rereading.swap(true, Ordering::AcqRel) {
                return;
            }
            continue;
        }
        let mut failed = Rereads::default();
        for eid in batch.filters() {
            if let Err(e) = reread(&s, eid).await {
                run.failed(|| {
                    format!("cluster: re-reading stored snapshots failed (retrying): {e}")
                });
                failed.add(eid);
            }
        }
        if failed.is_empty() {
            run.ended(|| "cluster: re-reading stored snapshots succeeded again".to_owned());
            backoff.reset();
            continue;
        }
        {
            let mut pending = s.rereads.lock();
            for eid in failed.filters() {
                pending.add(eid);
            }
        }
        tokio::select! {
            () = backoff.wait() => {}
            () = s.reread_now.notified() => backoff.reset(),
        }
    }
}

/// How long arrivals must have stopped being dropped before the repair starts (a
/// re-read during an overload would only add to it).
const ARRIVAL_SETTLE: Duration = Duration::from_secs(1);

/// How long the repair waits for a sender's store writes (`catch_up`) before it re-reads
/// that sender's snapshots all the same. A store that stopped answering fails the writes
/// within seconds, and the sender then writes everything again (and is re-read for
/// that): this bound is for a store that answers, slowly.
const CATCH_UP_MAX: Duration = Duration::from_secs(30);

/// An arrival was dropped (this node's delivery queue, or the client's, was full). The
/// other nodes' cache changes among such arrivals would be missing here for good:
/// `repair_dropped_arrivals` reads the other nodes' stored snapshots again once the
/// drops stopped and their store writes caught up.
fn arrival_dropped(s: &Arc<Shared>) {
    *s.last_arrival_drop.lock() = Some(Instant::now());
    if !s.arrival_repair.swap(true, Ordering::AcqRel) {
        tokio::spawn(repair_dropped_arrivals(Arc::clone(s)));
    }
}

/// See `arrival_dropped`. Waits until no arrival was dropped for `ARRIVAL_SETTLE`, then
/// re-reads each other node once its store writes of what it sent until then are done
/// (`catch_up`; at most `CATCH_UP_MAX`). Stored snapshots newer than what the cache holds
/// replace it (`Delivery::reconcile`), so an arrival still queued cannot be undone by an
/// older stored one, nor the other way round. Drops that start again meanwhile start
/// the wait over.
async fn repair_dropped_arrivals(s: Arc<Shared>) {
    let mut warned = false;
    'repair: loop {
        let last = loop {
            let last = *s.last_arrival_drop.lock();
            let quiet_from = last.map_or_else(Instant::now, |t| t + ARRIVAL_SETTLE);
            if Instant::now() >= quiet_from {
                break last;
            }
            tokio::time::sleep_until(quiet_from.into()).await;
        };
        if s.bucket_ready.load(Ordering::Acquire) && !s.leaving.load(Ordering::Acquire) {
            if !warned {
                crate::log::warn(
                    "cluster: arrivals were dropped (this node delivers slower than they come): re-reading the other nodes' stored snapshots once their store writes are done, so that the shared caches catch up",
                );
                warned = true;
            }
            let (mut wait, now) = CatchUp::start(&s.inner.nodes.lock(), s.inner.me);
            for eid in now {
                request_reread(&s, Some(eid));
            }
            let give_up = Instant::now() + CATCH_UP_MAX;
            while !wait.is_empty() && !s.leaving.load(Ordering::Acquire) {
                if *s.last_arrival_drop.lock() != last {
                    continue 'repair;
                }
                if Instant::now() >= give_up {
                    for eid in wait.rest() {
                        crate::log::warn(&format!(
                            "cluster: node {eid} did not report its store writes done within {} s of this node's dropped arrivals: re-reading its stored snapshots all the same (changes stored later are missed until its next re-assertion)",
                            CATCH_UP_MAX.as_secs()
                        ));
                        request_reread(&s, Some(eid));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let ready = wait.poll(&s.inner.nodes.lock());
                for eid in ready {
                    request_reread(&s, Some(eid));
                }
            }
        }
        s.arrival_repair.store(false, Ordering::Release);
        // A drop between the last look and the flag found the flag set: repair that one
        // too, unless a new repair has taken the flag.
        if *s.last_arrival_drop.lock() == last || s.arrival_repair.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}

/// Reads one node's snapshots (all nodes' with None) and reconciles the caches.
async fn reread(s: &Shared, eid: Option<Eid>) -> Result<()> {
    let filter = match eid {
        Some(e) => format!("{}.c.>", wire::eid_token(&e)),
        None => "*.c.>".to_owned(),
    };
    // The assertion times are taken before the read: a node's heartbeat carries a new
    // one only once that assertion's writes were confirmed, so the read that follows
    // holds them, and a cached entry it lacks that is older than the assertion is gone.
    let asserted: HashMap<Eid, u64> = {
        let nodes = s.inner.nodes.lock();
        nodes
            .all()
            .into_iter()
            .filter(|n| n.state == STATE_UP && eid.is_none_or(|e| e == n.eid))
            .map(|n| (n.eid, n.asserted_ns))
            .collect()
    };
    let entries = parse_entries(read_keys(s, &filter).await?, s);
    s.in_tx
        .send(Inbound::Reconcile {
            topic: None,
            asserted,
            entries,
            done: None,
        })
        .await;
    Ok(())
}

/// After a reconnect the store may have lost everything (a restarted server): write ours
/// again (until it works), and after a heartbeat period (the others do the same) re-read
/// theirs.
async fn after_reconnect(s: Arc<Shared>) {
    schedule_reassert(&s);
    s.reassert_now.notify_one();
    tokio::time::sleep(Duration::from_millis(u64::from(s.inner.cfg.heartbeat_ms))).await;
    request_reread(&s, None);
}

#[cfg(test)]
mod tests {
    use super::{Encoded, Rereads, Sent, StoreWrites};
    use crate::eid::Eid;

    fn write(subject: &str) -> Encoded {
        Encoded {
            subject: async_nats::Subject::from(subject),
            body: Default::default(),
            headers: None,
            kind: Sent::Store,
            type_id: 0,
        }
    }

    /// The cluster thread's writes never raise SIGPIPE into the host process.
    #[test]
    fn sigpipe_is_blocked_on_the_calling_thread_only() {
        fn blocked() -> bool {
            // SAFETY: a zeroed sigset_t is a valid out-parameter; a null new set only reads.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
                libc::sigismember(&set, libc::SIGPIPE) == 1
            }
        }
        let (here, child) = std::thread::spawn(|| {
            super::block_sigpipe();
            (blocked(), std::thread::spawn(blocked).join().unwrap())
        })
        .join()
        .unwrap();
        assert!(here && child);
        assert!(!blocked());
    }

    /// A full queue of store writes drops its oldest (what stays is newer than anything
    /// dropped), and a write is not done until the store answered (a leave waits for it).
    #[test]
    fn store_writes_drop_the_oldest_and_are_done_once_answered() {
        let w = StoreWrites::default();
        assert!(w.all_done());
        assert!(!w.push(write("k1"), 2));
        assert!(!w.push(write("k2"), 2));
        assert!(w.push(write("k3"), 2));
        assert!(!w.all_done());
        let (n2, e) = w.pop().unwrap();
        assert_eq!(e.subject.as_str(), "k2");
        let (n3, e) = w.pop().unwrap();
        assert_eq!(e.subject.as_str(), "k3");
        assert!(w.pop().is_none());
        assert!(!w.all_done()); // both in flight
        w.done(n3);
        assert!(!w.all_done());
        w.done(n2);
        assert!(w.all_done());
        // a clear drops what is queued, not what is in flight
        assert!(!w.push(write("k4"), 2));
        assert!(!w.push(write("k5"), 2));
        let (n4, _) = w.pop().unwrap();
        w.clear();
        assert!(w.pop().is_none());
        assert!(!w.all_done());
        w.done(n4);
        assert!(w.all_done());
    }

    /// The marks count writes as made when queued, and as behind us once done (in any
    /// order), dropped or cleared: `stored` is the length of the prefix that is.
    #[test]
    fn store_marks_count_the_prefix_of_writes_behind_us() {
        let w = StoreWrites::default();
        let marks = |w: &StoreWrites| {
            let m = w.marks();
            (m.queued, m.stored)
        };
        assert_eq!(marks(&w), (0, 0));
        for k in ["w0", "w1", "w2", "w3"] {
            assert!(!w.push(write(k), 10));
        }
        assert_eq!(marks(&w), (4, 0));
        let (n0, _) = w.pop().unwrap();
        let (n1, _) = w.pop().unwrap();
        assert_eq!((n0, n1), (0, 1));
        // In flight: not stored yet, nor is anything after them.
        assert_eq!(marks(&w), (4, 0));
        w.done(n1); // acknowledged out of order: 0 still holds the prefix
        assert_eq!(marks(&w), (4, 0));
        w.done(n0);
        assert_eq!(marks(&w), (4, 2)); // 2 and 3 are still queued
        let (n2, _) = w.pop().unwrap();
        assert_eq!(marks(&w), (4, 2));
        w.done(n2);
        assert_eq!(marks(&w), (4, 3));
        w.clear(); // 3 is given up to a re-assertion
        assert_eq!(marks(&w), (4, 4));
        // A full queue's dropped oldest is behind us too.
        for k in ["w4", "w5", "w6"] {
            w.push(write(k), 2);
        }
        assert_eq!(marks(&w), (7, 5));
    }

    fn eid(s: &str) -> Eid {
        Eid::parse(s).expect("an eid")
    }

    #[test]
    fn rereads_merge_and_every_node_covers_each_one() {
        let mut r = Rereads::default();
        assert!(r.is_empty());
        let (a, b) = (eid("00:00:00:00:00:0a"), eid("00:00:00:00:00:0b"));
        r.add(Some(a));
        r.add(Some(b));
        r.add(Some(a)); // merged
        let mut f = r.filters();
        f.sort_by_key(|e| e.map(|e| e.to_string()));
        assert_eq!(f, vec![Some(a), Some(b)]);
        r.add(None);
        assert_eq!(r.filters(), vec![None]);
        assert!(!std::mem::take(&mut r).is_empty());
        assert!(r.is_empty());
    }
}
