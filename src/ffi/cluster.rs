//! C API of cluster mode (`sb_cluster_*`). In a build without the `cluster` feature the
//! functions stay exported and fail with SB_E_STATE.

use super::cache::{sb_caching_topic, sb_message_list};
use super::library::sb_eid;
use super::message::{sb_data_dtor, sb_message, sb_message_type};
use super::topic::sb_topic;
use super::{boundary, fail_code, fail_null, str_arg, to_code};
use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, c_void};

/// A joined cluster (opaque). Released by sb_cluster_leave.
pub struct sb_cluster {
    _opaque: [u8; 0],
}

/// Cluster configuration (opaque; string keys, see sb_cluster_config_set).
pub struct sb_cluster_config {
    _opaque: [u8; 0],
}

/// Node states of sb_cluster_node.state (an int, so any value is checked, never UB).
pub type sb_node_state = c_int;
/// The node sends heartbeats.
pub const SB_NODE_UP: sb_node_state = 1;
/// The node missed `down_after_missed` heartbeats.
pub const SB_NODE_DOWN: sb_node_state = 2;
/// The node left the cluster (sb_cluster_leave).
pub const SB_NODE_LEFT: sb_node_state = 3;

/// Data of a node message (type sb_cluster_node_type()). Every field, `name` included,
/// is borrowed from the message and valid while it lives.
#[repr(C)]
pub struct sb_cluster_node {
    pub eid: sb_eid,
    /// The node's configured node_name (UTF-8).
    pub name: *const c_char,
    /// An sb_node_state.
    pub state: sb_node_state,
    /// When its last heartbeat arrived here (CLOCK_REALTIME, ns).
    pub last_seen_ns: u64,
}

/// Counters of one joined cluster (sb_cluster_get_stats). Fields are only ever appended.
#[repr(C)]
#[derive(Default)]
pub struct sb_cluster_stats {
    /// Messages sent to other nodes (shared topics and sb_cluster_publish_to).
    pub sent: u64,
    /// Messages that arrived and were published here (including loaded snapshots).
    pub received: u64,
    /// Messages dropped because the outgoing queue (out_queue_limit) was full, and
    /// messages and snapshots larger than the servers take (their max_payload; warned
    /// once per type).
    pub dropped_out: u64,
    /// Arrivals dropped: no decoder, unknown type, decode failure, bad wire data, or the
    /// server reporting this node as a slow consumer.
    pub dropped_in: u64,
    /// Reconnections to the servers since joining.
    pub reconnects: u64,
    /// 1 while connected to a server.
    pub connected: u32,
    /// Nodes up, this one included.
    pub nodes_up: u32,
}

/// Encodes a message's data for the wire: returns malloc()'d bytes (released with
/// free() by the library) and their length in *len; NULL: the message is not sent.
/// Called on a library thread.
pub type sb_message_encode_fn =
    Option<unsafe extern "C" fn(msg: *const sb_message, len: *mut usize) -> *mut c_char>;
/// Decodes bytes from the wire into message data, setting *dtor to the function that
/// frees it (or leaving it NULL); NULL: the arrival is dropped and counted. `bytes` is
/// borrowed for the call. Called on a library thread.
pub type sb_message_decode_fn = Option<
    unsafe extern "C" fn(bytes: *const c_void, len: usize, dtor: *mut sb_data_dtor) -> *mut c_void,
>;

#[cfg(feature = "cluster")]
mod imp {
    use super::*;
    use crate::cluster::codec::{self, Codec};
    use crate::cluster::config::Config;
    use crate::cluster::{Cluster, NodeView, CLUSTER_MAGIC};
    use crate::eid::Eid;
    use crate::ffi::{ref_arg, Handle};
    use crate::message::{Message, MessageRef, Payload};
    use crate::message_type::DEAD_MAGIC;

    const _: () =
        assert!(std::mem::size_of::<sb_cluster_node>() == std::mem::size_of::<NodeView>());
    const CONFIG_MAGIC: u32 = 0x5342_4346; // "SBCF"

    #[repr(C)]
    pub struct ConfigBox {
        magic: u32,
        cfg: Config,
    }

    impl Handle for sb_cluster {
        type Rust = Cluster;
        type Ptr = std::sync::Arc<Cluster>;
        const WHAT: &'static str = "sb_cluster";
        fn magic_ok(r: &Cluster) -> bool {
            r.magic_ok()
        }
    }
    const _: u32 = CLUSTER_MAGIC;

    fn config<'a>(p: *const sb_cluster_config) -> Result<&'a mut ConfigBox> {
        if p.is_null() {
            return Err(Error::invalid("sb_cluster_config is NULL"));
        }
        if !(p as usize).is_multiple_of(std::mem::align_of::<ConfigBox>()) {
            return Err(Error::invalid("sb_cluster_config pointer is misaligned"));
        }
        // SAFETY: non-null and aligned; the caller promises a config from
        // sb_cluster_config_new not yet freed, used by one thread at a time (documented);
        // the magic check catches most freed or foreign pointers.
        let b = unsafe { &mut *(p as *mut ConfigBox) };
        if b.magic != CONFIG_MAGIC {
            return Err(Error::invalid(
                "sb_cluster_config pointer is not a live config",
            ));
        }
        Ok(b)
    }

    pub fn config_new() -> *mut sb_cluster_config {
        Box::into_raw(Box::new(ConfigBox {
            magic: CONFIG_MAGIC,
            cfg: Config::default(),
        }))
        .cast()
    }

    pub fn config_set(cfg: *mut sb_cluster_config, key: &str, value: &str) -> Result<()> {
        config(cfg)?.cfg.set(key, value)
    }

    pub fn config_free(cfg: *mut sb_cluster_config) -> Result<()> {
        if cfg.is_null() {
            return Ok(());
        }
        let b = config(cfg)?;
        b.magic = DEAD_MAGIC;
        // SAFETY: checked above: a live Box made by config_new; the caller gives it up.
        drop(unsafe { Box::from_raw(b as *mut ConfigBox) });
        Ok(())
    }

    pub fn join(cfg: *const sb_cluster_config) -> Result<*mut sb_cluster> {
        let cfg = &config(cfg)?.cfg;
        Cluster::join(cfg).map(sb_cluster::into_raw)
    }

    pub fn leave(c: *mut sb_cluster) -> *mut sb_cluster {
        super::super::act_and_release(c, |c| c.leave())
    }

    pub fn share_topic(c: *mut sb_cluster, t: *mut sb_topic, share: bool) -> Result<()> {
        let c = sb_cluster::borrow(c)?;
        let t = sb_topic::borrow(t)?;
        if share {
            c.share_topic(&t)
        } else {
            c.unshare_topic(&t)
        }
    }

    pub fn export_json(c: *mut sb_cluster, t: *mut sb_topic) -> Result<()> {
        let c = sb_cluster::borrow(c)?;
        let t = sb_topic::borrow(t)?;
        c.export_json(&t)
    }

    pub fn share_cache(c: *mut sb_cluster, ct: *mut sb_caching_topic) -> Result<()> {
        let c = sb_cluster::borrow(c)?;
        let ct = sb_caching_topic::borrow(ct)?;
        c.share_cache(&ct)
    }

    pub fn publish_to(
        c: *mut sb_cluster,
        node: *const sb_eid,
        t: *mut sb_topic,
        m: *mut sb_message,
    ) -> Result<()> {
        let c = sb_cluster::borrow(c)?;
        let node = ref_arg("node", node)?;
        let eid = Eid { bytes: node.bytes };
        let (t, m) = (sb_topic::borrow(t)?, sb_message::borrow(m)?);
        c.publish_to(&eid, &t, &m)
    }

    pub fn set_codec(
        ty: *mut sb_message_type,
        encode: sb_message_encode_fn,
        decode: sb_message_decode_fn,
    ) -> Result<()> {
        let ty = sb_message_type::borrow(ty)?;
        let enc = encode.map(|f| {
            Box::new(move |msg: &Message| {
                let mut len = 0usize;
                // SAFETY: `f` is the type's encoder, called with a live message and a
                // writable length; it returns malloc()'d bytes or NULL.
                let p = unsafe { f((msg as *const Message).cast(), &mut len) };
                if p.is_null() {
                    return None;
                }
                if len > isize::MAX as usize {
                    // No buffer is that long (a negative length cast, most likely): not
                    // sent, as when the encoder returns NULL.
                    // SAFETY: malloc()'d by the encoder, released once here (API.md).
                    unsafe { libc::free(p.cast()) };
                    return None;
                }
                // SAFETY: the encoder promised `len` readable bytes at `p`, and a slice of
                // up to isize::MAX bytes is valid.
                let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }.to_vec();
                // SAFETY: malloc()'d by the encoder, released once here (API.md).
                unsafe { libc::free(p.cast()) };
                Some(v)
            }) as codec::EncodeFn
        });
        let dec = decode.map(|f| {
            Box::new(move |bytes: &[u8]| {
                let mut dtor: sb_data_dtor = None;
                // SAFETY: `f` is the type's decoder; `bytes` is valid for the call and
                // `dtor` is writable.
                let data = unsafe { f(bytes.as_ptr().cast(), bytes.len(), &mut dtor) };
                if data.is_null() {
                    return None;
                }
                Some(Payload::Raw { data, dtor })
            }) as codec::DecodeFn
        });
        codec::set(
            &ty,
            Some(Codec {
                encode: enc,
                decode: dec,
            }),
        );
        Ok(())
    }

    pub fn node_type() -> *mut sb_message_type {
        sb_message_type::as_ptr(crate::cluster::node_type())
    }

    pub fn topic(c: *mut sb_cluster) -> Result<*mut sb_topic> {
        let c = sb_cluster::borrow(c)?;
        Ok(sb_topic::as_ptr(c.topic()))
    }

    pub fn nodes(c: *mut sb_cluster) -> Result<*mut sb_message_list> {
        let c = sb_cluster::borrow(c)?;
        let nodes: Vec<MessageRef> = c.nodes()?;
        Ok(super::super::cache::list_out(nodes))
    }

    pub fn stats(c: *mut sb_cluster, out: &mut sb_cluster_stats) -> Result<()> {
        let c = sb_cluster::borrow(c)?;
        let s = c.stats()?;
        *out = sb_cluster_stats {
            sent: s.sent,
            received: s.received,
            dropped_out: s.dropped_out,
            dropped_in: s.dropped_in,
            reconnects: s.reconnects,
            connected: u32::from(s.connected),
            nodes_up: s.nodes_up,
        };
        Ok(())
    }
}

#[cfg(not(feature = "cluster"))]
mod imp {
    //! Without cluster support: every call fails with SB_E_STATE.
    use super::*;

    fn off() -> Error {
        Error::state("this libswitchboard was built without cluster support")
    }
    pub fn config_new() -> *mut sb_cluster_config {
        crate::error::set_last_error(&off());
        std::ptr::null_mut()
    }
    pub fn config_set(_: *mut sb_cluster_config, _: &str, _: &str) -> Result<()> {
        Err(off())
    }
    pub fn config_free(_: *mut sb_cluster_config) -> Result<()> {
        Ok(())
    }
    pub fn join(_: *const sb_cluster_config) -> Result<*mut sb_cluster> {
        Err(off())
    }
    pub fn leave(_: *mut sb_cluster) -> *mut sb_cluster {
        crate::error::set_last_error(&off());
        std::ptr::null_mut()
    }
    pub fn share_topic(_: *mut sb_cluster, _: *mut sb_topic, _: bool) -> Result<()> {
        Err(off())
    }
    pub fn export_json(_: *mut sb_cluster, _: *mut sb_topic) -> Result<()> {
        Err(off())
    }
    pub fn share_cache(_: *mut sb_cluster, _: *mut sb_caching_topic) -> Result<()> {
        Err(off())
    }
    pub fn publish_to(
        _: *mut sb_cluster,
        _: *const sb_eid,
        _: *mut sb_topic,
        _: *mut sb_message,
    ) -> Result<()> {
        Err(off())
    }
    pub fn set_codec(
        _: *mut sb_message_type,
        _: sb_message_encode_fn,
        _: sb_message_decode_fn,
    ) -> Result<()> {
        Err(off())
    }
    pub fn node_type() -> *mut sb_message_type {
        crate::error::set_last_error(&off());
        std::ptr::null_mut()
    }
    pub fn topic(_: *mut sb_cluster) -> Result<*mut sb_topic> {
        Err(off())
    }
    pub fn nodes(_: *mut sb_cluster) -> Result<*mut sb_message_list> {
        Err(off())
    }
    pub fn stats(_: *mut sb_cluster, _: &mut sb_cluster_stats) -> Result<()> {
        Err(off())
    }
}

/// A new, empty cluster configuration (owned by the caller: sb_cluster_config_free).
/// Not thread-safe: set it from one thread, then hand it to sb_cluster_join.
/// Ownership: returns a new config the caller owns (sb_cluster_config_free).
#[no_mangle]
pub extern "C" fn sb_cluster_config_new() -> *mut sb_cluster_config {
    boundary(imp::config_new)
}

/// Sets `key` to `value` (both borrowed, copied). A key set before is overwritten; ""
/// unsets an optional key. SB_E_INVAL, naming the key, for an unknown key or a bad value.
///
/// Keys (defaults in brackets): servers (required; comma-separated nats://host:port or
/// tls://host:port), prefix [sb] (1-64 of A-Z a-z 0-9 _ -; clusters with different
/// prefixes never see each other), node_name [host name], heartbeat_ms [1000],
/// down_after_missed [3], connect_timeout_ms [5000], out_queue_limit [100000],
/// store_replicas [1] (replicas of the shared caches' store; 3 on a three-server NATS
/// cluster survives losing one), user, password, token, creds_file, tls_ca_file,
/// tls_cert_file, tls_key_file, tls_required [0].
/// Ownership: `cfg` is borrowed; `key` and `value` are borrowed (copied).
#[no_mangle]
pub extern "C" fn sb_cluster_config_set(
    cfg: *mut sb_cluster_config,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    boundary(|| {
        let r = str_arg("key", key)
            .and_then(|k| str_arg("value", value).map(|v| (k, v)))
            .and_then(|(k, v)| imp::config_set(cfg, k, v));
        to_code(r)
    })
}

/// Frees a configuration (NULL is a no-op). It may be freed once sb_cluster_join returns.
/// Ownership: takes ownership of `cfg` (freed).
#[no_mangle]
pub extern "C" fn sb_cluster_config_free(cfg: *mut sb_cluster_config) {
    boundary(|| {
        if let Err(e) = imp::config_free(cfg) {
            crate::error::set_last_error(&e);
        }
    })
}

/// Joins the cluster `cfg` describes; returns once connected (a new handle, released by
/// sb_cluster_leave), or NULL with SB_E_UNAVAILABLE (servers unreachable, refused us,
/// auth or TLS failed, or the account lacks a permission the node needs: the server's
/// reason is in sb_last_error(); README: Permissions), SB_E_TIMEOUT (no
/// answer within connect_timeout_ms) or SB_E_INVAL (bad configuration). This process's
/// default eid (sb_eid_default) is its node id. `cfg` is borrowed.
/// Ownership: returns a new handle the caller owns (released by sb_cluster_leave); `cfg`
/// is borrowed.
#[no_mangle]
pub extern "C" fn sb_cluster_join(cfg: *const sb_cluster_config) -> *mut sb_cluster {
    boundary(|| imp::join(cfg).unwrap_or_else(fail_null))
}

/// Leaves the cluster and releases the handle; returns NULL (`c = sb_cluster_leave(c);`).
/// Announces the departure (other nodes mark this one left and clear its entries at
/// once), sends what is queued (waiting at most 1 s), stops sharing, clears remote
/// entries from local shared caches (cache updates are published) and stops the
/// cluster's threads. Returns within about 6 s whatever the servers do: when none
/// answers, the cluster's thread is stopped where it waits (warned in the log) and the
/// other nodes take this one for down instead of left. In a forked child the handle is
/// only released (SB_E_STATE). The leave waits for the cluster's delivery thread, which
/// runs the synchronous callbacks of what arrives (and of the clears): do not call it
/// holding a lock such a callback may wait for, as for sb_unsubscribe_and_join.
/// Ownership: takes ownership of `c` (released, even when the call fails): no other
/// thread may still be inside a call on `c`, or make one, once the leave starts.
#[no_mangle]
pub extern "C" fn sb_cluster_leave(c: *mut sb_cluster) -> *mut sb_cluster {
    boundary(|| imp::leave(c))
}

/// Shares `topic` (borrowed; the cluster keeps a reference until unshared or left) with
/// every node: local messages that reach it are sent to the other nodes, and their
/// messages of that topic name are published here with the sender's eid and timestamp.
/// Returns once this node's subscriptions are in place (SB_E_TIMEOUT after
/// connect_timeout_ms; they complete in the background; SB_E_UNAVAILABLE with the
/// server's words when it refused one, e.g. a permission the account lacks: the topic
/// stays shared as far as the server allows). SB_E_INVAL when the topic's name
/// is too long for a subject (over 1024 bytes once escaped, see README: Wire format).
/// SB_E_STATE when another cluster handle of this process (another prefix) shares or
/// exports the topic: one topic goes through one cluster at a time.
/// Ownership: `c` and `topic` are borrowed; the cluster keeps its own reference to
/// `topic` while it is shared.
#[no_mangle]
pub extern "C" fn sb_cluster_share_topic(c: *mut sb_cluster, topic: *mut sb_topic) -> c_int {
    boundary(|| to_code(imp::share_topic(c, topic, true)))
}

/// Stops sharing `topic` (SB_E_STATE when it is not shared through `c`). Of a topic
/// shared with its cache (sb_cluster_share_cache), the cache's changes are no longer
/// stored nor sent, and nothing is undone: this node's stored snapshots and the other
/// nodes' copies of them stay until it leaves or goes down, and the other nodes' entries
/// stay in the local cache, no longer updated, until it leaves.
/// Ownership: `c` and `topic` are borrowed; the cluster drops its reference to `topic`.
#[no_mangle]
pub extern "C" fn sb_cluster_unshare_topic(c: *mut sb_cluster, topic: *mut sb_topic) -> c_int {
    boundary(|| to_code(imp::share_topic(c, topic, false)))
}

/// Sets the wire codec of `type` (both NULL: removes it). Types without a codec are not
/// sent, except bytes messages, which need none. The buffer `encode` returns is released
/// with free(). Both run on library threads.
/// Ownership: `type` is borrowed; the functions must stay callable while the type may
/// be sent or received (until the codec is removed or the cluster left).
#[no_mangle]
pub extern "C" fn sb_message_type_set_codec(
    ty: *mut sb_message_type,
    encode: sb_message_encode_fn,
    decode: sb_message_decode_fn,
) -> c_int {
    boundary(|| to_code(imp::set_codec(ty, encode, decode)))
}

/// Sends `msg` (borrowed) to one node only: published there on its topic named like
/// `topic`, which that node shares; not published here. SB_E_STATE when that node is not
/// up, SB_E_INVAL when the message cannot be encoded or the topic's or the type's name is
/// too long for a subject (over 1024 bytes once escaped). Never waits for the network.
/// Ownership: every argument is borrowed; the library takes its own reference to `msg`
/// while it waits to be sent.
#[no_mangle]
pub extern "C" fn sb_cluster_publish_to(
    c: *mut sb_cluster,
    node: *const sb_eid,
    topic: *mut sb_topic,
    msg: *mut sb_message,
) -> c_int {
    boundary(|| to_code(imp::publish_to(c, node, topic, msg)))
}

/// Also publishes local messages of `topic` whose type has to_json as JSON, for programs
/// outside the bus, on subject "<prefix>.json.<topic>.<type>" (README: Wire format).
/// SB_E_INVAL when the topic's name is too long for a subject (as sb_cluster_share_topic);
/// SB_E_STATE when another cluster handle of this process shares or exports it.
/// Ownership: `c` and `topic` are borrowed; the cluster keeps its own reference to
/// `topic` until it leaves.
#[no_mangle]
pub extern "C" fn sb_cluster_export_json(c: *mut sb_cluster, topic: *mut sb_topic) -> c_int {
    boundary(|| to_code(imp::export_json(c, topic)))
}

/// Shares `ct`'s original topic (as sb_cluster_share_topic) and its cache's state: this
/// node's snapshots are kept in the cluster's store, and every other live node's are
/// loaded here as remote entries. Returns SB_OK once the local cache holds them, or after
/// connect_timeout_ms SB_E_UNAVAILABLE (the store refused, with the servers' reason: e.g.
/// JetStream not enabled) or SB_E_TIMEOUT (no answer); at once SB_E_UNAVAILABLE when the
/// server refused the store's subjects (a permission the account lacks, README:
/// Permissions). Sharing goes on in the background either way (a read or write the store
/// stops answering in the middle of is tried again). SB_E_INVAL when the original topic's
/// name is too long for a subject (as sb_cluster_share_topic); SB_E_STATE when another
/// cluster handle of this process shares the original topic or the caching topic.
/// Ownership: `c` and `ct` are borrowed; the cluster keeps its own reference to `ct`
/// (and so to its cache and original topic) until it leaves.
#[no_mangle]
pub extern "C" fn sb_cluster_share_cache(c: *mut sb_cluster, ct: *mut sb_caching_topic) -> c_int {
    boundary(|| to_code(imp::share_cache(c, ct)))
}

/// Type of node messages (borrowed, lives forever); their data is a
/// `const sb_cluster_node *`, borrowed from the message.
/// Ownership: returns a borrowed type that lives as long as the process.
#[no_mangle]
pub extern "C" fn sb_cluster_node_type() -> *mut sb_message_type {
    boundary(imp::node_type)
}

/// The topic node messages are published on at each change of a node's state (up, down,
/// left, up again). Borrowed: valid while the cluster handle is.
/// Ownership: returns a borrowed topic (sb_topic_ref it to keep it longer); `c` is
/// borrowed.
#[no_mangle]
pub extern "C" fn sb_cluster_topic(c: *mut sb_cluster) -> *mut sb_topic {
    boundary(|| imp::topic(c).unwrap_or_else(fail_null))
}

/// One node message per known node, this one included (a new list: free it with
/// sb_message_list_free). Down and left nodes stay listed until they come back, or for
/// 10 minutes.
/// Ownership: returns a new list the caller owns (sb_message_list_free); `c` is borrowed.
#[no_mangle]
pub extern "C" fn sb_cluster_nodes(c: *mut sb_cluster) -> *mut sb_message_list {
    boundary(|| imp::nodes(c).unwrap_or_else(fail_null))
}

/// Fills `*out` with the cluster's counters.
/// Ownership: `c` is borrowed; `*out` is written, owned by the caller.
#[no_mangle]
pub extern "C" fn sb_cluster_get_stats(c: *mut sb_cluster, out: *mut sb_cluster_stats) -> c_int {
    boundary(|| {
        if out.is_null() {
            return fail_code(Error::invalid("out is NULL"));
        }
        // SAFETY: non-null; the caller promises a writable sb_cluster_stats.
        let out = unsafe { &mut *out };
        to_code(imp::stats(c, out))
    })
}

#[cfg(all(test, not(feature = "cluster")))]
mod tests {
    use super::*;

    #[test]
    fn without_cluster_support_every_call_fails_with_state() {
        assert!(sb_cluster_config_new().is_null());
        assert_eq!(crate::error::last_error_code(), crate::error::SB_E_STATE);
        assert!(sb_cluster_join(std::ptr::null()).is_null());
        assert_eq!(
            sb_cluster_share_topic(std::ptr::null_mut(), std::ptr::null_mut()),
            crate::error::SB_E_STATE
        );
        assert!(sb_cluster_node_type().is_null());
        let mut st = sb_cluster_stats::default();
        assert_eq!(
            sb_cluster_get_stats(std::ptr::null_mut(), &mut st),
            crate::error::SB_E_STATE
        );
    }
}
