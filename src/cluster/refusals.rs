//! What the servers refused this node.
//!
//! A server that denies an operation does not close the connection: it answers `-ERR`
//! (a publish or a subscription the account this node connects as may not make:
//! "Permissions Violation for Publish to "sb.hb""), drops that one operation and goes on.
//! The client hands such an answer to its event callback only; nothing fails. Unseen, a
//! node whose account lacks a permission looks healthy while it sends nothing (the others
//! take it for down) or hears nothing; its join waited `connect_timeout_ms` and then
//! blamed the server for not answering.
//!
//! So every server error is counted (`server_errors`) and logged (once per distinct
//! text: a denied publish is refused again at every message), and the operations that
//! wait for the server (the join, a share) look here for a refusal that names a subject
//! they used: they fail with it at once instead of timing out, or succeeding deaf.

use std::collections::{HashSet, VecDeque};

/// Distinct texts logged; past it, refusals are only counted.
const LOGGED_MAX: usize = 64;
/// Recent refusals kept for the operations waiting on the server.
const RECENT_MAX: usize = 32;

pub(crate) struct Refusals {
    /// How many refusals so far: waiting operations watch it.
    count: tokio::sync::watch::Sender<u64>,
    /// The latest refusals, each with its number.
    recent: parking_lot::Mutex<VecDeque<(u64, String)>>,
    /// Texts already logged.
    logged: parking_lot::Mutex<HashSet<String>>,
}

impl Default for Refusals {
    fn default() -> Refusals {
        Refusals {
            count: tokio::sync::watch::Sender::new(0),
            recent: parking_lot::Mutex::new(VecDeque::new()),
            logged: parking_lot::Mutex::new(HashSet::new()),
        }
    }
}

impl Refusals {
    /// Records a server error; returns true the first time this text is seen (the caller
    /// logs it), false after that or once `LOGGED_MAX` texts were logged.
    pub(crate) fn record(&self, text: &str) -> bool {
        let mut n = 0;
        self.count.send_modify(|c| {
            *c += 1;
            n = *c;
        });
        {
            let mut recent = self.recent.lock();
            if recent.len() == RECENT_MAX {
                recent.pop_front();
            }
            recent.push_back((n, text.to_owned()));
        }
        self.first_log(text)
    }

    /// True the first time `text` is offered (the caller logs it), false after that or
    /// once `LOGGED_MAX` texts were.
    pub(crate) fn first_log(&self, text: &str) -> bool {
        let mut logged = self.logged.lock();
        logged.len() < LOGGED_MAX && !logged.contains(text) && logged.insert(text.to_owned())
    }

    /// Refusals so far: an operation notes it before it starts.
    pub(crate) fn count(&self) -> u64 {
        *self.count.borrow()
    }

    /// The first refusal after `since` that `concerns` (see `names_any`, `names_under`).
    pub(crate) fn first_after(
        &self,
        since: u64,
        concerns: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let recent = self.recent.lock();
        recent
            .iter()
            .filter(|(n, _)| *n > since)
            .find(|(_, text)| concerns(text))
            .map(|(_, text)| text.clone())
    }

    /// Waits for a refusal after `since` that `concerns`; returns its text.
    pub(crate) async fn wait_for(&self, since: u64, concerns: impl Fn(&str) -> bool) -> String {
        let mut rx = self.count.subscribe();
        loop {
            if let Some(text) = self.first_after(since, &concerns) {
                return text;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`: never here while it is borrowed.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Whether a server's error text names one of `subjects` ("... to "sb.hb"").
pub(crate) fn names_any(text: &str, subjects: &[String]) -> bool {
    subjects.iter().any(|s| text.contains(&format!("\"{s}\"")))
}

/// Whether a server's error text names a subject that starts with one of `prefixes`.
pub(crate) fn names_under(text: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|p| text.contains(&format!("\"{p}")))
}

/// Whether a server error is a denied permission (the node's account lacks it).
pub(crate) fn is_permission(text: &str) -> bool {
    text.to_ascii_lowercase().contains("permissions violation")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_and_found_by_subject() {
        let r = Refusals::default();
        let start = r.count();
        assert!(r.record("Permissions Violation for Publish to \"sb.hb\""));
        assert!(!r.record("Permissions Violation for Publish to \"sb.hb\""));
        assert_eq!(r.count(), start + 2);
        let hb = vec!["sb.hb".to_owned()];
        let other = vec!["sb.h".to_owned()];
        assert!(r.first_after(start, |t| names_any(t, &hb)).is_some());
        let prefix_only = r.first_after(start, |t| names_any(t, &other));
        assert!(prefix_only.is_none(), "a prefix is not the subject");
        assert!(r.first_after(start, |t| names_under(t, &["sb."])).is_some());
        assert!(r
            .first_after(start, |t| names_under(t, &["$JS.API."]))
            .is_none());
        let later = r.first_after(r.count(), |t| names_any(t, &hb));
        assert!(later.is_none(), "only refusals after the start");
    }

    #[test]
    fn logging_is_bounded() {
        let r = Refusals::default();
        let fresh = (0..200).filter(|i| r.record(&format!("error {i}"))).count();
        assert_eq!(fresh, LOGGED_MAX);
        assert_eq!(r.recent.lock().len(), RECENT_MAX);
    }

    #[test]
    fn a_waiter_sees_a_later_refusal() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = std::sync::Arc::new(Refusals::default());
        let subjects = vec!["sb.d.x.>".to_owned()];
        let start = r.count();
        let r2 = std::sync::Arc::clone(&r);
        let text = rt.block_on(async move {
            let waiter =
                tokio::spawn(async move { r2.wait_for(start, |t| names_any(t, &subjects)).await });
            tokio::task::yield_now().await;
            r.record("Permissions Violation for Subscription to \"sb.other\"");
            tokio::task::yield_now().await;
            r.record("Permissions Violation for Subscription to \"sb.d.x.>\"");
            waiter.await.unwrap()
        });
        assert!(text.contains("sb.d.x.>"));
        assert!(is_permission(&text));
    }
}
