//! The library's one way to report something: every warning goes through here, to a
//! host-installed handler (a PBX routes it into its own logger) or to stderr.

use parking_lot::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warning = 2,
    Notice = 3,
    Debug = 4,
}

pub type Handler = Arc<dyn Fn(Level, &str) + Send + Sync>;

static HANDLER: RwLock<Option<Handler>> = RwLock::new(None);
static WARNINGS: AtomicU64 = AtomicU64::new(0);

/// Installs `handler` (None: back to stderr).
pub fn set_handler(handler: Option<Handler>) {
    *HANDLER.write() = handler;
}

/// Number of warnings reported since the process started.
pub fn warning_count() -> u64 {
    WARNINGS.load(Ordering::Relaxed)
}

pub fn log(level: Level, text: &str) {
    if level <= Level::Warning {
        WARNINGS.fetch_add(1, Ordering::Relaxed);
    }
    // Clone out of the lock: the handler is user code and may log or reinstall itself.
    let handler = HANDLER.read().clone();
    match handler {
        Some(h) => h(level, text),
        None => eprintln!("switchboard: {level:?}: {text}"),
    }
}

pub fn warn(text: &str) {
    log(Level::Warning, text);
}
