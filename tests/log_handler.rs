//! The log handler through the C entry points (`sb_set_log_handler`): it runs on a
//! library thread, never on the thread that logs; replacing or removing it waits for the
//! call in flight (a module that installed it may then be unloaded); a handler may
//! replace itself without deadlock; a handler that falls behind loses lines, counted.
//!
//! The handler is process-wide, so the tests take turns (`serial`).

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};
use switchboard::ffi::library::{sb_log_dropped, sb_set_log_handler, sb_warning_count};
use switchboard::log::{warn, QUEUE_CAPACITY};

fn serial() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a thread of its own and fails (instead of hanging) after `secs`.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: no result after {secs} s (deadlock?)"))
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

// ---- a handler held inside its call until the test opens a gate ----

static GATE_OPEN: AtomicBool = AtomicBool::new(false);
static GATE_ENTERED: AtomicUsize = AtomicUsize::new(0);
static GATE_RETURNED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn gated(_data: *mut c_void, _level: c_int, _text: *const c_char) {
    GATE_ENTERED.fetch_add(1, Ordering::SeqCst);
    while !GATE_OPEN.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(1));
    }
    GATE_RETURNED.fetch_add(1, Ordering::SeqCst);
}

/// `sb_set_log_handler(NULL)` returns only once the handler's call in flight returned:
/// after it, the module's code may be unmapped.
#[test]
fn removing_the_handler_waits_for_the_call_in_flight() {
    let _turn = serial();
    GATE_OPEN.store(false, Ordering::SeqCst);
    let entered0 = GATE_ENTERED.load(Ordering::SeqCst);
    sb_set_log_handler(Some(gated), std::ptr::null_mut());
    // Logged from another thread: a library that ran the handler on the logging thread
    // would hold that thread, not this one.
    thread::spawn(|| warn("log_handler test: held line"));
    wait_until("the handler to be called", || {
        GATE_ENTERED.load(Ordering::SeqCst) > entered0
    });

    let removed = std::sync::Arc::new(AtomicBool::new(false));
    let r = std::sync::Arc::clone(&removed);
    let remover = thread::spawn(move || {
        sb_set_log_handler(None, std::ptr::null_mut());
        // What the handler had done when the removal returned.
        let returned = GATE_RETURNED.load(Ordering::SeqCst);
        r.store(true, Ordering::SeqCst);
        returned
    });
    thread::sleep(Duration::from_millis(150));
    assert!(
        !removed.load(Ordering::SeqCst),
        "sb_set_log_handler(NULL) returned while the handler was still running"
    );
    let returned_before = GATE_RETURNED.load(Ordering::SeqCst);
    GATE_OPEN.store(true, Ordering::SeqCst);
    let returned_at_removal = remover.join().expect("remover");
    assert!(
        returned_at_removal > returned_before,
        "the removal returned before the handler's call did"
    );
    let calls = GATE_RETURNED.load(Ordering::SeqCst);
    warn("log_handler test: after removal (stderr)");
    thread::sleep(Duration::from_millis(20));
    assert_eq!(
        GATE_RETURNED.load(Ordering::SeqCst),
        calls,
        "removed handler called"
    );
}

// ---- a slow handler ----

static SLOW_CALLS: AtomicUsize = AtomicUsize::new(0);
static SLOW_ON_LOGGING_THREAD: AtomicUsize = AtomicUsize::new(0);
static LOGGING_THREAD: Mutex<Option<thread::ThreadId>> = Mutex::new(None);

extern "C" fn slow(_data: *mut c_void, _level: c_int, _text: *const c_char) {
    if *LOGGING_THREAD.lock().unwrap() == Some(thread::current().id()) {
        SLOW_ON_LOGGING_THREAD.fetch_add(1, Ordering::SeqCst);
    }
    thread::sleep(Duration::from_millis(20));
    SLOW_CALLS.fetch_add(1, Ordering::SeqCst);
}

/// Lines reach the handler on a library thread: a handler taking 20 ms per line does not
/// slow the thread that logs 50 lines (it would take a second); removing the handler
/// delivers every line logged before.
#[test]
fn a_slow_handler_does_not_slow_the_logging_thread() {
    let _turn = serial();
    *LOGGING_THREAD.lock().unwrap() = Some(thread::current().id());
    SLOW_CALLS.store(0, Ordering::SeqCst);
    SLOW_ON_LOGGING_THREAD.store(0, Ordering::SeqCst);
    sb_set_log_handler(Some(slow), std::ptr::null_mut());
    let w0 = sb_warning_count();
    let start = Instant::now();
    for i in 0..50 {
        warn(&format!("log_handler test: line {i}"));
    }
    let took = start.elapsed();
    assert_eq!(
        sb_warning_count() - w0,
        50,
        "warnings are counted when logged"
    );
    assert!(
        took < Duration::from_millis(500),
        "logging 50 lines took {took:?} with a 20 ms handler"
    );
    within(30, "removing the slow handler", || {
        sb_set_log_handler(None, std::ptr::null_mut())
    });
    assert_eq!(
        SLOW_CALLS.load(Ordering::SeqCst),
        50,
        "every line delivered"
    );
    assert_eq!(
        SLOW_ON_LOGGING_THREAD.load(Ordering::SeqCst),
        0,
        "the handler ran on the thread that logged"
    );
    *LOGGING_THREAD.lock().unwrap() = None;
}

// ---- a handler that replaces itself ----

static FIRST_CALLS: AtomicUsize = AtomicUsize::new(0);
static SECOND_CALLS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn second(_data: *mut c_void, _level: c_int, _text: *const c_char) {
    SECOND_CALLS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn first(_data: *mut c_void, _level: c_int, _text: *const c_char) {
    FIRST_CALLS.fetch_add(1, Ordering::SeqCst);
    sb_set_log_handler(Some(second), std::ptr::null_mut());
}

/// From inside the handler, replacing it does not wait for itself; the next line goes to
/// the new handler.
#[test]
fn a_handler_replacing_itself_does_not_deadlock() {
    let _turn = serial();
    FIRST_CALLS.store(0, Ordering::SeqCst);
    SECOND_CALLS.store(0, Ordering::SeqCst);
    within(10, "a handler replacing itself", || {
        sb_set_log_handler(Some(first), std::ptr::null_mut());
        warn("log_handler test: to the first handler");
        warn("log_handler test: to the second handler");
        sb_set_log_handler(None, std::ptr::null_mut());
    });
    assert_eq!(FIRST_CALLS.load(Ordering::SeqCst), 1);
    assert_eq!(SECOND_CALLS.load(Ordering::SeqCst), 1);
}

// ---- overflow ----

static COUNTED: AtomicU64 = AtomicU64::new(0);

extern "C" fn counting_gated(data: *mut c_void, level: c_int, text: *const c_char) {
    COUNTED.fetch_add(1, Ordering::SeqCst);
    gated(data, level, text);
}

/// A handler that falls more than the queue behind loses lines, and they are counted
/// (sb_log_dropped); once it catches up one more line says how many.
#[test]
fn lines_beyond_the_queue_are_dropped_and_counted() {
    let _turn = serial();
    GATE_OPEN.store(false, Ordering::SeqCst);
    COUNTED.store(0, Ordering::SeqCst);
    let entered0 = GATE_ENTERED.load(Ordering::SeqCst);
    let dropped0 = sb_log_dropped();
    sb_set_log_handler(Some(counting_gated), std::ptr::null_mut());
    warn("log_handler test: held");
    wait_until("the first line to be taken", || {
        GATE_ENTERED.load(Ordering::SeqCst) > entered0
    });
    let extra = 10;
    let start = Instant::now();
    for i in 0..QUEUE_CAPACITY + extra {
        warn(&format!("log_handler test: flood {i}"));
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "a full queue slowed the logging thread"
    );
    assert_eq!(sb_log_dropped() - dropped0, extra as u64);
    GATE_OPEN.store(true, Ordering::SeqCst);
    within(30, "removing the handler", || {
        sb_set_log_handler(None, std::ptr::null_mut())
    });
    // the held line, the queue's worth, and the line reporting the drops
    assert_eq!(
        COUNTED.load(Ordering::SeqCst),
        1 + QUEUE_CAPACITY as u64 + 1
    );
}
