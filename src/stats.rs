//! Statistics of the whole bus (`sb_stats_json`, `sb_stats_prometheus`) and alerts.
//!
//! The figures themselves live where they are counted: a topic's publish counters in its
//! side block, a subscription's in its mailbox (under the lock it takes anyway) and its
//! own callback timing, a type's publish counter on a cache line of its own, the pool's
//! and the clusters' in their own structures. Listing takes each registry's lock only to
//! collect references, then formats without any lock held: a listing never stalls
//! publishers.
//!
//! Alerts: a subsystem (a topic name up to its first `/` or `:`) is in alert while at
//! least one of its subscriptions is above its high-water mark (and not yet back under
//! its low-water mark). Whoever sees a subscription's congestion change calls
//! `sync_alert`, which reads the subscription's current state under the alert lock: so
//! whatever the order in which threads report, the registry ends up with the last state.

use crate::log;
use crate::message_type::{MessageType, TypeRef};
use crate::pool;
use crate::subscription::{Subscription, SubscriptionStats};
use crate::topic::{self, Topic, TopicStats};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Default)]
struct Alerts {
    /// Subscriptions in alert, by number, with their subsystem.
    subs: HashMap<u64, Arc<str>>,
    /// Subsystems in alert, with their subscriptions in alert.
    subsystems: HashMap<Arc<str>, u32>,
}

static ALERTS: Mutex<Option<Alerts>> = Mutex::new(None);
static ALERT_COUNT: AtomicUsize = AtomicUsize::new(0);

/// The subsystem of a topic: its name up to the first `/` or `:`.
pub fn subsystem(topic_name: &str) -> &str {
    topic_name.split(['/', ':']).next().unwrap_or(topic_name)
}

/// Brings the alert registry up to date with `sub`'s congestion state; queues an alert
/// change for the handler when its subsystem enters or leaves alert. Never called with a
/// mailbox lock held (it takes one).
pub(crate) fn sync_alert(sub: &Subscription) {
    let mut guard = ALERTS.lock();
    let alerts = guard.get_or_insert_with(Alerts::default);
    let now = sub.is_congested();
    let key = sub.number();
    if now == alerts.subs.contains_key(&key) {
        return;
    }
    if now {
        let sys: Arc<str> = Arc::from(subsystem(sub.topic().name()));
        alerts.subs.insert(key, Arc::clone(&sys));
        let n = alerts.subsystems.entry(Arc::clone(&sys)).or_insert(0);
        *n += 1;
        if *n == 1 {
            // Queued under the alert lock, so changes reach the handler in order.
            log::alert(true, &sys);
        }
    } else if let Some(sys) = alerts.subs.remove(&key) {
        let n = alerts.subsystems.get_mut(&sys).expect("counted");
        *n -= 1;
        if *n == 0 {
            alerts.subsystems.remove(&sys);
            log::alert(false, &sys);
        }
    }
    ALERT_COUNT.store(alerts.subs.len(), Ordering::Relaxed);
    if alerts.subs.is_empty() {
        // Nothing in alert: no memory kept (a process that stops using the bus holds none).
        *guard = None;
    }
}

thread_local! {
    static FORK_GUARD: std::cell::RefCell<Option<parking_lot::MutexGuard<'static, Option<Alerts>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Before a fork: no alert change in progress (see `fork`).
pub(crate) fn fork_lock() {
    let guard = ALERTS.lock();
    let _ = FORK_GUARD.try_with(|g| *g.borrow_mut() = Some(guard));
}

/// After a fork, in the parent or the child (the thread that forked).
pub(crate) fn fork_unlock() {
    let _ = FORK_GUARD.try_with(|g| drop(g.borrow_mut().take()));
}

/// Subscriptions above their high-water mark now.
pub fn alert_count() -> usize {
    ALERT_COUNT.load(Ordering::Relaxed)
}

/// Subsystems in alert now, sorted.
pub fn alert_subsystems() -> Vec<String> {
    let guard = ALERTS.lock();
    let mut v: Vec<String> = guard
        .iter()
        .flat_map(|a| a.subsystems.keys().map(|s| s.to_string()))
        .collect();
    v.sort();
    v
}

/// A topic, its figures and its subscriptions' figures.
type TopicRow = (
    Arc<Topic>,
    TopicStats,
    Vec<(Arc<Subscription>, SubscriptionStats)>,
);

/// Everything a listing reports, collected without formatting.
struct Snapshot {
    topics: Vec<TopicRow>,
    types: Vec<TypeRef>,
    /// Every worker group's name and pool figures, the shared one ("default") first.
    pools: Vec<(String, pool::PoolStats)>,
    #[cfg(feature = "cluster")]
    clusters: Vec<(Arc<crate::cluster::Cluster>, crate::cluster::StatsSnapshot)>,
}

fn snapshot() -> Snapshot {
    let mut topics: Vec<_> = topic::live_topics()
        .into_iter()
        .map(|t| {
            let stats = t.stats();
            let subs = t
                .direct_subscribers()
                .into_iter()
                .map(|s| {
                    let st = s.stats();
                    (s, st)
                })
                .collect();
            (t, stats, subs)
        })
        .collect();
    topics.sort_by(|a, b| a.0.name().cmp(b.0.name()));
    let mut types = MessageType::all();
    types.sort_by_key(|t| t.id());
    Snapshot {
        topics,
        types,
        pools: crate::worker_group::all_stats(),
        #[cfg(feature = "cluster")]
        clusters: crate::cluster::live_stats(),
    }
}

fn kind_name(s: &Subscription) -> &'static str {
    match s.kind() {
        crate::Kind::Dedicated => "dedicated",
        crate::Kind::Pool => "pool",
        crate::Kind::Synchronous => "synchronous",
    }
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The whole bus as one JSON object.
pub fn json() -> String {
    let snap = snapshot();
    let mut o = String::with_capacity(256 + snap.topics.len() * 256);
    o.push_str("{\"topics\":[");
    for (i, (t, ts, subs)) in snap.topics.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str("{\"name\":");
        json_str(&mut o, t.name());
        let _ = write!(
            o,
            ",\"published\":{},\"dispatched\":{},\"not_dispatched\":{},\"subscribers\":{},\"created_ns\":{},\"subscriptions\":[",
            ts.published, ts.dispatched, ts.not_dispatched, ts.subscribers, ts.created_ns
        );
        for (j, (s, ss)) in subs.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            o.push_str("{\"uniqueid\":");
            json_str(&mut o, s.uniqueid());
            let _ = write!(
                o,
                ",\"kind\":\"{}\",\"delivered\":{},\"dropped\":{},\"congestion_warnings\":{},\"queued\":{},\"queued_max\":{},\"callback_max_ns\":{},\"callback_max_type\":",
                kind_name(s),
                ss.delivered,
                ss.dropped,
                ss.congestion_warnings,
                ss.queued,
                ss.queued_max,
                ss.callback_max_ns
            );
            match &ss.callback_max_type {
                Some(ty) => json_str(&mut o, ty.name()),
                None => o.push_str("null"),
            }
            let _ = write!(o, ",\"in_alert\":{}}}", ss.congested);
        }
        o.push_str("]}");
    }
    o.push_str("],\"types\":[");
    for (i, ty) in snap.types.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str("{\"name\":");
        json_str(&mut o, ty.name());
        let _ = write!(o, ",\"published\":{}}}", ty.published());
    }
    o.push_str("],\"pools\":[");
    for (i, (name, p)) in snap.pools.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str("{\"name\":");
        json_str(&mut o, name);
        let _ = write!(
            o,
            ",\"min_threads\":{},\"max_threads\":{},\"threads\":{},\"blocked\":{},\"sleeping\":{},\"queued\":{}}}",
            p.min_threads, p.max_threads, p.threads, p.blocked, p.sleeping, p.queued
        );
    }
    o.push(']');
    timers_json(&mut o);
    let _ = write!(
        o,
        ",\"alerts\":{{\"count\":{},\"subsystems\":[",
        alert_count()
    );
    for (i, sys) in alert_subsystems().iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        json_str(&mut o, sys);
    }
    let _ = write!(
        o,
        "]}},\"log\":{{\"warnings\":{},\"dropped\":{}}},\"clusters\":[",
        log::warning_count(),
        log::dropped_count()
    );
    #[cfg(feature = "cluster")]
    for (i, (c, s)) in snap.clusters.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let (prefix, node) = c.labels();
        o.push_str("{\"prefix\":");
        json_str(&mut o, prefix);
        o.push_str(",\"node\":");
        json_str(&mut o, node);
        let _ = write!(
            o,
            ",\"sent\":{},\"received\":{},\"dropped_out\":{},\"dropped_in\":{},\"reconnects\":{},\"connected\":{},\"nodes_up\":{},\"store_errors\":{},\"server_errors\":{}}}",
            s.sent,
            s.received,
            s.dropped_out,
            s.dropped_in,
            s.reconnects,
            s.connected,
            s.nodes_up,
            s.store_errors,
            s.server_errors
        );
    }
    o.push_str("]}");
    o
}

/// The timer service's figures (`"timers":{...}`, after the pools).
fn timers_json(o: &mut String) {
    let t = crate::timer::stats();
    let _ = write!(
        o,
        ",\"timers\":{{\"pending\":{},\"scheduled\":{},\"fired\":{},\"cancelled\":{},\"lateness_max_ns\":{},\"lateness_mean_ns\":{}}}",
        t.pending,
        t.scheduled,
        t.fired,
        t.cancelled,
        t.lateness_max_ns,
        t.lateness_total_ns.checked_div(t.fired).unwrap_or(0)
    );
}

/// The timer service's metric families.
fn timer_families(o: &mut String) {
    let t = crate::timer::stats();
    let families: [(&str, &str, &str, u64); 6] = [
        (
            "timers_pending",
            "gauge",
            "Timers neither fired nor cancelled.",
            t.pending,
        ),
        (
            "timers_scheduled_total",
            "counter",
            "Timers scheduled (sb_publish_after).",
            t.scheduled,
        ),
        (
            "timers_fired_total",
            "counter",
            "Timers fired (published).",
            t.fired,
        ),
        (
            "timers_cancelled_total",
            "counter",
            "Timers cancelled before they fired.",
            t.cancelled,
        ),
        (
            "timers_lateness_nanoseconds_total",
            "counter",
            "Sum of fired timers' lateness past their due time (divide by fired for the mean).",
            t.lateness_total_ns,
        ),
        (
            "timers_lateness_max_nanoseconds",
            "gauge",
            "Latest a timer fired past its due time.",
            t.lateness_max_ns,
        ),
    ];
    for (name, kind, help, v) in families {
        family(o, name, kind, help, &[(String::new(), v)]);
    }
}

/// A label value in the exposition format: `\`, `"` and newlines escaped.
fn label(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// One metric family: its HELP and TYPE lines, then a sample per `(labels, value)`.
fn family(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(o, "# HELP switchboard_{name} {help}");
    let _ = writeln!(o, "# TYPE switchboard_{name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(o, "switchboard_{name} {v}");
        } else {
            let _ = writeln!(o, "switchboard_{name}{{{labels}}} {v}");
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        label(&mut s, v);
        s.push('"');
    }
    s
}

/// The whole bus in the Prometheus text exposition format (version 0.0.4).
pub fn prometheus() -> String {
    let snap = snapshot();
    let mut o = String::with_capacity(1024 + snap.topics.len() * 512);
    let topic_l: Vec<String> = snap
        .topics
        .iter()
        .map(|(t, _, _)| labels(&[("topic", t.name())]))
        .collect();
    let tfam =
        |o: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(&TopicStats) -> u64| {
            let samples: Vec<(String, u64)> = snap
                .topics
                .iter()
                .zip(&topic_l)
                .map(|((_, ts, _), l)| (l.clone(), f(ts)))
                .collect();
            family(o, name, kind, help, &samples);
        };
    tfam(
        &mut o,
        "topic_published_total",
        "counter",
        "Publishes that reached the topic (published to it or forwarded into it).",
        &|t| t.published,
    );
    tfam(
        &mut o,
        "topic_dispatched_total",
        "counter",
        "Publishes that reached at least one subscription from the topic.",
        &|t| t.dispatched,
    );
    tfam(
        &mut o,
        "topic_not_dispatched_total",
        "counter",
        "Publishes that reached no subscription.",
        &|t| t.not_dispatched,
    );
    tfam(
        &mut o,
        "topic_subscribers",
        "gauge",
        "Subscriptions a publish to the topic reaches, through forwards included.",
        &|t| u64::from(t.subscribers),
    );
    tfam(
        &mut o,
        "topic_created_seconds",
        "gauge",
        "When the topic was created (Unix time).",
        &|t| t.created_ns / 1_000_000_000,
    );

    let subs: Vec<(String, &SubscriptionStats)> = snap
        .topics
        .iter()
        .flat_map(|(t, _, subs)| {
            subs.iter().map(move |(s, ss)| {
                (
                    labels(&[
                        ("subscription", s.uniqueid()),
                        ("topic", t.name()),
                        ("kind", kind_name(s)),
                    ]),
                    ss,
                )
            })
        })
        .collect();
    let sfam = |o: &mut String,
                name: &str,
                kind: &str,
                help: &str,
                f: &dyn Fn(&SubscriptionStats) -> u64| {
        let samples: Vec<(String, u64)> = subs.iter().map(|(l, ss)| (l.clone(), f(ss))).collect();
        family(o, name, kind, help, &samples);
    };
    sfam(
        &mut o,
        "subscription_delivered_total",
        "counter",
        "Messages the subscription handled.",
        &|s| s.delivered,
    );
    sfam(
        &mut o,
        "subscription_dropped_total",
        "counter",
        "Messages its overflow policy dropped.",
        &|s| s.dropped,
    );
    sfam(
        &mut o,
        "subscription_congestion_warnings_total",
        "counter",
        "Times its queue crossed its high-water mark.",
        &|s| s.congestion_warnings,
    );
    sfam(
        &mut o,
        "subscription_queued",
        "gauge",
        "Messages waiting in its queue.",
        &|s| s.queued,
    );
    sfam(
        &mut o,
        "subscription_queued_max",
        "gauge",
        "The longest its queue has been.",
        &|s| s.queued_max,
    );
    sfam(
        &mut o,
        "subscription_callback_max_nanoseconds",
        "gauge",
        "Its longest single callback.",
        &|s| s.callback_max_ns,
    );
    sfam(
        &mut o,
        "subscription_in_alert",
        "gauge",
        "1 while above its high-water mark.",
        &|s| u64::from(s.congested),
    );

    let types: Vec<(String, u64)> = snap
        .types
        .iter()
        .map(|ty| (labels(&[("type", ty.name())]), ty.published()))
        .collect();
    family(
        &mut o,
        "type_published_total",
        "counter",
        "Publishes of messages of the type.",
        &types,
    );

    let pool_rows = |v: fn(&pool::PoolStats) -> usize| -> Vec<(String, u64)> {
        snap.pools
            .iter()
            .map(|(name, p)| (labels(&[("pool", name)]), v(p) as u64))
            .collect()
    };
    type Figure = fn(&pool::PoolStats) -> usize;
    let pool_families: [(&str, &str, Figure); 6] = [
        ("pool_threads", "Worker threads alive.", |p| p.threads),
        (
            "pool_blocked_threads",
            "Workers blocked in a library wait.",
            |p| p.blocked,
        ),
        ("pool_sleeping_threads", "Workers asleep.", |p| p.sleeping),
        (
            "pool_min_threads",
            "Workers kept alive once started.",
            |p| p.min_threads,
        ),
        (
            "pool_max_threads",
            "Most workers running callbacks at once.",
            |p| p.max_threads,
        ),
        (
            "pool_queued",
            "Subscriptions and tasks waiting for a worker.",
            |p| p.queued,
        ),
    ];
    for (name, help, v) in pool_families {
        family(&mut o, name, "gauge", help, &pool_rows(v));
    }

    family(
        &mut o,
        "alerts",
        "gauge",
        "Subscriptions above their high-water mark now.",
        &[(String::new(), alert_count() as u64)],
    );
    let in_alert: Vec<(String, u64)> = alert_subsystems()
        .iter()
        .map(|s| (labels(&[("subsystem", s)]), 1))
        .collect();
    family(
        &mut o,
        "subsystem_in_alert",
        "gauge",
        "Subsystems in alert (1 each).",
        &in_alert,
    );
    family(
        &mut o,
        "log_warnings_total",
        "counter",
        "Warnings the library logged.",
        &[(String::new(), log::warning_count())],
    );
    family(
        &mut o,
        "log_dropped_total",
        "counter",
        "Log lines dropped (handler too slow).",
        &[(String::new(), log::dropped_count())],
    );

    timer_families(&mut o);

    #[cfg(feature = "cluster")]
    {
        let cl: Vec<(String, &crate::cluster::StatsSnapshot)> = snap
            .clusters
            .iter()
            .map(|(c, s)| {
                let (prefix, node) = c.labels();
                (labels(&[("prefix", prefix), ("node", node)]), s)
            })
            .collect();
        let cfam = |o: &mut String,
                    name: &str,
                    kind: &str,
                    help: &str,
                    f: &dyn Fn(&crate::cluster::StatsSnapshot) -> u64| {
            let samples: Vec<(String, u64)> = cl.iter().map(|(l, s)| (l.clone(), f(s))).collect();
            family(o, name, kind, help, &samples);
        };
        cfam(
            &mut o,
            "cluster_sent_total",
            "counter",
            "Messages sent to other nodes.",
            &|s| s.sent,
        );
        cfam(
            &mut o,
            "cluster_received_total",
            "counter",
            "Messages received from other nodes.",
            &|s| s.received,
        );
        cfam(
            &mut o,
            "cluster_dropped_out_total",
            "counter",
            "Messages dropped because the outgoing queue was full, or larger than the servers take.",
            &|s| s.dropped_out,
        );
        cfam(
            &mut o,
            "cluster_dropped_in_total",
            "counter",
            "Arrivals dropped (undecodable, unknown type, bad data).",
            &|s| s.dropped_in,
        );
        cfam(
            &mut o,
            "cluster_reconnects_total",
            "counter",
            "Reconnections to the servers.",
            &|s| s.reconnects,
        );
        cfam(
            &mut o,
            "cluster_connected",
            "gauge",
            "1 while connected to a server.",
            &|s| u64::from(s.connected),
        );
        cfam(
            &mut o,
            "cluster_nodes_up",
            "gauge",
            "Nodes up, this one included.",
            &|s| u64::from(s.nodes_up),
        );
        cfam(
            &mut o,
            "cluster_store_errors_total",
            "counter",
            "Store requests (writes, reads, removals) that failed or were never confirmed; each is tried again.",
            &|s| s.store_errors,
        );
        cfam(
            &mut o,
            "cluster_server_errors_total",
            "counter",
            "Errors the servers reported, such as a permission the node's account lacks (each logged once).",
            &|s| s.server_errors,
        );
    }
    o
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_subsystem_is_the_name_up_to_the_first_slash_or_colon() {
        assert_eq!(subsystem("endpoint:all"), "endpoint");
        assert_eq!(subsystem("endpoint/SIP/alice"), "endpoint");
        assert_eq!(subsystem("a:b/c"), "a");
        assert_eq!(subsystem("plain"), "plain");
    }
}
