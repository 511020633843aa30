//! The library's one way to report something: every warning goes through here, to a
//! host-installed handler (a PBX routes it into its own logger) or to stderr.
//!
//! A handler is the host's code, possibly slow (a PBX logger takes locks, writes files):
//! a publisher that crosses a congestion mark must not wait for it. So a line only goes
//! into a bounded queue on the logging thread, and a library thread (the log thread)
//! calls the handler; when the queue is full the line is dropped and counted.
//!
//! Replacing or removing the handler waits for the call in flight, and delivers the
//! lines still queued to the old handler first: once `set_handler` returns the old
//! handler is never called again, so a module that installed it may be unloaded. From
//! inside the handler (the log thread, or a thread draining the queue in `set_handler`)
//! the replacement takes effect after the current call returns and nothing waits.
//!
//! The alert handler (`set_alert_handler`) is called the same way, by the same thread,
//! with the same waiting rules: alert changes are queued among the lines (never dropped:
//! there is one per subsystem's change of state) while an alert handler is installed.
//!
//! Locks: `DELIVER` (held while a handler runs) is taken before `QUEUE` (held briefly to
//! push or pop); `log` takes only `QUEUE`, so a handler may log.

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
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
/// Called with (in alert, subsystem).
pub type AlertHandler = Arc<dyn Fn(bool, &str) + Send + Sync>;

/// What the queue holds.
enum Entry {
    Line(Level, String),
    Alert(bool, String),
}

/// Lines waiting for the handler at most; beyond, lines are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 1024;

struct Queue {
    lines: VecDeque<Entry>,
    /// Log lines among `lines` (the capacity bounds those only).
    line_count: usize,
    /// An alert handler is installed: alert changes are queued.
    alerts: bool,
    /// A handler is installed (or will be once the queued lines are delivered): lines
    /// go through the queue. Without one they go straight to stderr.
    installed: bool,
    /// The log thread of this process runs (or is being started).
    thread: bool,
}

/// What the delivering thread calls.
struct Deliver {
    handler: Option<Handler>,
    alert: Option<AlertHandler>,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    lines: VecDeque::new(),
    line_count: 0,
    alerts: false,
    installed: false,
    thread: false,
});
static READY: Condvar = Condvar::new();
static DELIVER: Mutex<Deliver> = Mutex::new(Deliver {
    handler: None,
    alert: None,
});
/// A replacement asked for from inside a handler, applied when that call returns.
static FROM_HANDLER: Mutex<Option<Option<Handler>>> = Mutex::new(None);
static ALERT_FROM_HANDLER: Mutex<Option<Option<AlertHandler>>> = Mutex::new(None);
static WARNINGS: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Dropped lines not yet reported to the handler.
static DROPPED_UNREPORTED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread is inside a handler call (it holds `DELIVER`).
    static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
    static FORK_DELIVER: RefCell<Option<MutexGuard<'static, Deliver>>> = const { RefCell::new(None) };
    static FORK_QUEUE: RefCell<Option<MutexGuard<'static, Queue>>> = const { RefCell::new(None) };
}

fn in_handler() -> bool {
    IN_HANDLER.try_with(Cell::get).unwrap_or(false)
}

/// Installs `handler` (None: back to stderr). Waits until no call of the previous
/// handler runs and the lines logged before were delivered to it; from inside a handler
/// call it does not wait, and takes effect when that call returns.
pub fn set_handler(handler: Option<Handler>) {
    fork_install();
    if in_handler() {
        QUEUE.lock().installed = handler.is_some();
        *FROM_HANDLER.lock() = Some(handler);
        return;
    }
    // The lines logged before this call belong to the handler they were logged under.
    let on = handler.is_some();
    swap_in(on, |q| q.installed = on, |d| d.handler = handler);
}

/// Installs the alert handler (None: none), with `set_handler`'s waiting rules: alert
/// changes queued before are delivered to the previous handler, and its call in flight
/// returns first; from inside a handler call it does not wait.
pub fn set_alert_handler(handler: Option<AlertHandler>) {
    fork_install();
    if in_handler() {
        QUEUE.lock().alerts = handler.is_some();
        *ALERT_FROM_HANDLER.lock() = Some(handler);
        return;
    }
    let on = handler.is_some();
    swap_in(on, |q| q.alerts = on, |d| d.alert = handler);
}

/// The common part of installing a log or alert handler: deliver what was queued to the
/// previous one (waiting for its call in flight), put the new one in place, set its
/// queue flag and start the log thread if it is not running.
fn swap_in(on: bool, flag: impl FnOnce(&mut Queue), put: impl FnOnce(&mut Deliver)) {
    let mut deliver = DELIVER.lock();
    drain(&mut deliver);
    put(&mut deliver);
    let start = {
        let mut q = QUEUE.lock();
        flag(&mut q);
        let start = on && !q.thread;
        if start {
            q.thread = true;
        }
        start
    };
    drop(deliver);
    if start {
        // Started now, not at the first line: a host installs its handler at startup,
        // while threads can still be created.
        start_thread();
    }
}

/// Queues an alert change for the alert handler (nothing without one).
pub(crate) fn alert(in_alert: bool, subsystem: &str) {
    let start = {
        let mut q = QUEUE.lock();
        if !q.alerts {
            return;
        }
        q.lines
            .push_back(Entry::Alert(in_alert, subsystem.to_owned()));
        let start = !q.thread;
        if start {
            q.thread = true;
        }
        start
    };
    if start {
        start_thread();
    } else {
        READY.notify_one();
    }
}

/// Number of warnings reported since the process started.
pub fn warning_count() -> u64 {
    WARNINGS.load(Ordering::Relaxed)
}

/// Number of lines dropped because the handler's queue was full.
pub fn dropped_count() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

pub fn log(level: Level, text: &str) {
    if level <= Level::Warning {
        WARNINGS.fetch_add(1, Ordering::Relaxed);
    }
    let start = {
        let mut q = QUEUE.lock();
        if !q.installed && q.lines.is_empty() {
            drop(q);
            to_stderr(level, text);
            return;
        }
        if q.line_count >= QUEUE_CAPACITY {
            drop(q);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            DROPPED_UNREPORTED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.lines.push_back(Entry::Line(level, text.to_owned()));
        q.line_count += 1;
        let start = !q.thread;
        if start {
            q.thread = true;
        }
        start
    };
    if start {
        // No log thread (it could not be started earlier, or this is a forked child).
        start_thread();
    } else {
        READY.notify_one();
    }
}

/// A line on stderr, where a host gave no handler. Not `eprintln!`, which panics when
/// the write fails: a host that ignores SIGPIPE and whose stderr pipe closed would have
/// every later log line panic, in the middle of whatever the library was doing.
fn to_stderr(level: Level, text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "switchboard: {level:?}: {text}");
}

pub fn warn(text: &str) {
    log(Level::Warning, text);
}

fn start_thread() {
    let spawned = std::thread::Builder::new()
        .name("sb-log".into())
        .spawn(log_thread);
    if spawned.is_err() {
        // Lines stay queued (bounded): the next line, or the next set_handler, retries
        // or delivers them.
        QUEUE.lock().thread = false;
    }
}

fn log_thread() {
    loop {
        {
            let mut q = QUEUE.lock();
            while q.lines.is_empty() && DROPPED_UNREPORTED.load(Ordering::Relaxed) == 0 {
                READY.wait(&mut q);
            }
        }
        drain(&mut DELIVER.lock());
    }
}

/// Delivers every queued line to the current handler (stderr without one). The caller
/// holds `DELIVER`.
fn drain(deliver: &mut Deliver) {
    loop {
        let next = {
            let mut q = QUEUE.lock();
            let next = q.lines.pop_front();
            if matches!(next, Some(Entry::Line(..))) {
                q.line_count -= 1;
            }
            if next.is_none() {
                // Nothing kept between bursts (a queue's worth of room stays otherwise).
                q.lines = VecDeque::new();
            }
            next
        };
        let entry = match next {
            Some(entry) => entry,
            None => match DROPPED_UNREPORTED.swap(0, Ordering::Relaxed) {
                0 => return,
                n => Entry::Line(
                    Level::Warning,
                    format!(
                        "{n} log line(s) dropped: the log handler was slower than the library \
                         logged (queue of {QUEUE_CAPACITY})"
                    ),
                ),
            },
        };
        let call = |f: &dyn Fn()| {
            let _ = IN_HANDLER.try_with(|c| c.set(true));
            // A panicking handler loses its line, not the log thread.
            let _ = catch_unwind(AssertUnwindSafe(f));
            let _ = IN_HANDLER.try_with(|c| c.set(false));
        };
        match (&entry, &deliver.handler, &deliver.alert) {
            (Entry::Line(level, text), Some(h), _) => call(&|| h(*level, text)),
            (Entry::Line(level, text), None, _) => to_stderr(*level, text),
            (Entry::Alert(on, subsystem), _, Some(h)) => call(&|| h(*on, subsystem)),
            (Entry::Alert(..), _, None) => {}
        }
        if let Some(replacement) = FROM_HANDLER.lock().take() {
            deliver.handler = replacement;
        }
        if let Some(replacement) = ALERT_FROM_HANDLER.lock().take() {
            deliver.alert = replacement;
        }
    }
}

/// Registers the fork handlers that keep the log's locks consistent in a child.
fn fork_install() {
    crate::fork::install();
}

/// Before a fork, first of the bus's locks: no handler call may be in progress. A handler
/// in flight may take any other lock of the bus (the alert registry's, through
/// `sb_stats_json` or a publish past a high-water mark), and finishes before this returns.
pub(crate) fn fork_lock_handlers() {
    let deliver = DELIVER.lock();
    let _ = FORK_DELIVER.try_with(|g| *g.borrow_mut() = Some(deliver));
}

/// Before a fork, after the alert registry's lock (an alert change is queued under it):
/// no queue operation may be in progress.
pub(crate) fn fork_lock_queue() {
    let queue = QUEUE.lock();
    let _ = FORK_QUEUE.try_with(|g| *g.borrow_mut() = Some(queue));
}

/// After a fork, in the parent.
pub(crate) fn fork_unlock() {
    let _ = FORK_QUEUE.try_with(|g| drop(g.borrow_mut().take()));
    let _ = FORK_DELIVER.try_with(|g| drop(g.borrow_mut().take()));
}

/// After a fork, in the child: the log thread did not survive; the next line starts one.
pub(crate) fn fork_reset_and_unlock() {
    let _ = FORK_QUEUE.try_with(|g| {
        if let Some(queue) = g.borrow_mut().as_mut() {
            queue.thread = false;
        }
    });
    fork_unlock();
}
