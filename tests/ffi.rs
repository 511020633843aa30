//! Compiles and runs each C test program in `ffi-tests/` against the cdylib that
//! `cargo test` builds (target/<profile>/libswitchboard.so).
//!
//! One `#[test]` per C file. With `SB_VALGRIND=1` every program runs under valgrind
//! memcheck (definite leaks and memory errors fail the test). With `SB_TSAN=1` (set by
//! `make tsan`, which also builds the library with ThreadSanitizer) every program is
//! compiled with `-fsanitize=thread` and any report (data race, lock-order inversion)
//! fails it. A program that does not finish in time is killed and the test fails with
//! everything it printed. Every program gets `SB_NATS_SERVER`, the nats-server binary that
//! the cluster tests start (see `nats_server`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds before a program is killed (natively / under valgrind or ThreadSanitizer).
const TIMEOUT_NATIVE: u64 = 120;
const TIMEOUT_VALGRIND: u64 = 600;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>: the test executable is target/<profile>/deps/ffi-xxxx.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// The nats-server binary the C tests start (ffi-tests/nats_harness.h): `SB_NATS_SERVER` if
/// set, else `.tools/nats/bin/nats-server`, which `make nats-server` installs. None if
/// neither exists; the tests that need a server then fail and say how to install it.
fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SB_NATS_SERVER").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return Some(if p.is_absolute() {
            p
        } else {
            crate_dir().join(p)
        });
    }
    let p = crate_dir()
        .join(".tools")
        .join("nats")
        .join("bin")
        .join("nats-server");
    p.exists().then_some(p)
}

fn flag(name: &str) -> bool {
    matches!(std::env::var(name), Ok(v) if !v.is_empty() && v != "0")
}

fn valgrind() -> bool {
    flag("SB_VALGRIND")
}

fn tsan() -> bool {
    flag("SB_TSAN")
}

/// In ThreadSanitizer mode the library itself must be instrumented, or races inside it
/// would go unseen while every test passes: refuse a plain build.
fn assert_library_instrumented(lib: &Path) {
    let bytes = std::fs::read(lib).expect("read libswitchboard.so");
    let needle = b"__tsan_func_entry";
    assert!(
        bytes.windows(needle.len()).any(|w| w == needle),
        "SB_TSAN=1 but {} is not built with ThreadSanitizer: use `make tsan`",
        lib.display()
    );
}

fn compile(name: &str) -> PathBuf {
    let crate_dir = crate_dir();
    // `cargo test` rebuilds the cdylib in target/<profile>/deps but copies it up to
    // target/<profile> only on `cargo build`: link the fresh one, never a stale copy.
    let lib_dir = profile_dir().join("deps");
    let lib = lib_dir.join("libswitchboard.so");
    assert!(
        lib.exists(),
        "{} not found: `cargo test` should build the cdylib",
        lib.display()
    );
    if tsan() {
        assert_library_instrumented(&lib);
    }
    let out_dir = profile_dir().join("ffi-tests");
    std::fs::create_dir_all(&out_dir).expect("create target/<profile>/ffi-tests");
    let src = crate_dir.join("ffi-tests").join(format!("{name}.c"));
    assert!(src.exists(), "{} is missing", src.display());
    let exe = out_dir.join(name);

    let target = env!("SB_TARGET");
    let mut cmd = cc::Build::new()
        .target(target)
        .host(target)
        .opt_level(0)
        .cargo_metadata(false)
        .warnings(true)
        .get_compiler()
        .to_command();
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-pthread"])
        .arg(format!("-I{}", crate_dir.join("include").display()))
        .arg(format!("-I{}", crate_dir.join("ffi-tests").display()))
        .arg(&src);
    if tsan() {
        cmd.args(["-fsanitize=thread", "-rdynamic"])
            .arg(crate_dir.join("ffi-tests").join("tsan_shim.c"));
    }
    cmd.arg(format!("-L{}", lib_dir.display()))
        .arg("-lswitchboard")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&exe);
    // The command line without the (long) environment, for error messages.
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler ({line}): {e}"));
    if !output.status.success() {
        panic!(
            "compiling {name}.c failed ({}):\n{line}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    exe
}

/// valgrind memcheck running `exe`. Every leak kind is an error; ffi-tests/valgrind.supp
/// lists the few per-process blocks (interned types, static tables, threads alive at
/// exit) allowed to remain. No gdbserver: its FIFOs in /tmp outlive a forked child that
/// a test ends with SIGKILL.
fn memcheck(exe: &Path) -> Command {
    let mut c = Command::new("valgrind");
    c.args([
        "--vgdb=no",
        "--error-exitcode=99",
        "--leak-check=full",
        "--errors-for-leak-kinds=all",
        "--show-leak-kinds=all",
        "--num-callers=40",
        "-q",
    ])
    .arg(format!(
        "--suppressions={}",
        crate_dir()
            .join("ffi-tests")
            .join("valgrind.supp")
            .display()
    ))
    .arg(exe)
    .env_remove("LD_LIBRARY_PATH");
    c
}

/// The memcheck settings catch real leaks: leak_canary.c leaks a message (definitely
/// lost) and keeps a topic in a global (possibly lost); both must be reported.
///
/// Ignored by default, so that a plain `cargo test` does not report it as passed when
/// it did not run; CI's valgrind step runs it with
/// `SB_VALGRIND=1 cargo test --test ffi -- --ignored --exact valgrind_catches_leaks`.
#[test]
#[ignore = "runs only under valgrind: SB_VALGRIND=1 ... -- --ignored"]
fn valgrind_catches_leaks() {
    assert!(
        valgrind(),
        "valgrind_catches_leaks checks valgrind's settings: run it with SB_VALGRIND=1"
    );
    let exe = compile("leak_canary");
    let out = memcheck(&exe).output().expect("run valgrind");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(99),
        "memcheck missed the leaks:\n{stderr}"
    );
    for kind in ["definitely lost", "possibly lost"] {
        assert!(stderr.contains(kind), "no '{kind}' report:\n{stderr}");
    }
}

/// API.md: every exported symbol starts with `sb_`. The library is loaded into PBX
/// processes that export thousands of names of their own (`ast_*`, `ao2_*`, ...), where
/// a clash would be fatal.
#[test]
fn exports_only_sb_symbols() {
    let lib = profile_dir().join("deps").join("libswitchboard.so");
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .expect("run nm (binutils)");
    assert!(out.status.success(), "nm failed on {}", lib.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert!(
        names.contains(&"sb_publish") && names.contains(&"sb_last_error"),
        "nm listed no API function:\n{text}"
    );
    let foreign: Vec<&&str> = names.iter().filter(|n| !n.starts_with("sb_")).collect();
    assert!(
        foreign.is_empty(),
        "exported without the sb_ prefix: {foreign:?}"
    );
}

/// ThreadSanitizer's settings, unless the caller set its own: stop at the first report
/// (the exit status then fails the test); let test_fork's children start threads after
/// a fork of a threaded process, which the sanitizer refuses by default (those children
/// are checked like any other process); let an impossible allocation fail as malloc does
/// (test_bad_input asks for one) instead of stopping the program.
fn tsan_command(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    if std::env::var_os("TSAN_OPTIONS").is_none() {
        c.env(
            "TSAN_OPTIONS",
            "halt_on_error=1 die_after_fork=0 second_deadlock_stack=1 allocator_may_return_null=1",
        );
    }
    c
}

/// The ThreadSanitizer build sees races between the library's threads and the caller's:
/// race_canary.c reads, unsynchronized, a counter its subscription's callback writes; the
/// sanitizer must report it.
///
/// Ignored by default (it only means something in a ThreadSanitizer build); `make tsan`
/// runs it with `-- --ignored --exact tsan_catches_races`.
#[test]
#[ignore = "runs only in a ThreadSanitizer build: make tsan"]
fn tsan_catches_races() {
    assert!(
        tsan(),
        "tsan_catches_races checks a ThreadSanitizer build: run it with `make tsan`"
    );
    let exe = compile("race_canary");
    let out = tsan_command(&exe)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run race_canary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(66),
        "ThreadSanitizer missed the race:\n{stderr}"
    );
    assert!(
        stderr.contains("WARNING: ThreadSanitizer: data race"),
        "no data race report:\n{stderr}"
    );
}

/// Reads a pipe to the end on a thread of its own (so a full pipe never blocks the child).
fn drain<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn run(name: &str) {
    let exe = compile(name);
    let vg = valgrind();
    let ts = tsan();
    let mut cmd = if vg {
        memcheck(&exe)
    } else if ts {
        tsan_command(&exe)
    } else {
        Command::new(&exe)
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("SB_VALGRIND", if vg { "1" } else { "0" })
        // cargo points LD_LIBRARY_PATH at target/<profile> first, where a stale copy of
        // the library may lie (see `compile`): the program's rpath alone says which one.
        .env_remove("LD_LIBRARY_PATH");
    match nats_server() {
        Some(p) => cmd.env("SB_NATS_SERVER", p),
        None => cmd.env_remove("SB_NATS_SERVER"),
    };
    // test_torture runs SB_TORTURE_SECONDS (default 20); under valgrind 3 s are plenty,
    // under ThreadSanitizer (several times slower) 10.
    if name == "test_torture" && std::env::var_os("SB_TORTURE_SECONDS").is_none() {
        if vg {
            cmd.env("SB_TORTURE_SECONDS", "3");
        } else if ts {
            cmd.env("SB_TORTURE_SECONDS", "10");
        }
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = drain(child.stdout.take().expect("stdout piped"));
    let err = drain(child.stderr.take().expect("stderr piped"));

    let timeout = Duration::from_secs(if vg || ts {
        TIMEOUT_VALGRIND
    } else {
        TIMEOUT_NATIVE
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break status,
            None if start.elapsed() > timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().expect("wait after kill");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();

    if timed_out || !status.success() {
        panic!(
            "{name}{} {} after {:.1} s\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            if vg {
                " (valgrind)"
            } else if ts {
                " (ThreadSanitizer)"
            } else {
                ""
            },
            if timed_out {
                format!("timed out ({} s) and was killed", timeout.as_secs())
            } else {
                format!("failed: {status}")
            },
            start.elapsed().as_secs_f64()
        );
    }
    // A passing program ends with its "N passed, 0 failed" line (guards against an early
    // exit(0) that skipped the checks); show it with --nocapture.
    let summary = stdout.lines().rev().find(|l| l.ends_with(" failed"));
    assert!(
        matches!(summary, Some(l) if l.ends_with(" passed, 0 failed")),
        "{name} exited 0 without a clean summary line\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    println!("{name}: {}", stdout.lines().last().unwrap_or("(no output)"));
}

macro_rules! c_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )*
    };
}

c_tests!(
    test_library,
    test_message,
    test_topic,
    test_subscription,
    test_formatters,
    test_forward,
    test_deep_chain,
    test_topic_pool,
    test_stress,
    test_bad_input,
    test_cache,
    test_router,
    test_cache_concurrency,
    test_cache_aggregate_order,
    test_cache_dump,
    test_regressions,
    test_reentrancy,
    test_torture,
    test_overflow,
    test_slow_subscriber,
    test_exit,
    test_fork,
    test_bad_input_more,
    test_deadlock,
    test_pool_limits,
    test_pool_spawn_failure,
    test_pool_groups,
    test_nats_harness,
    test_cluster_topics,
    test_cluster_cache,
    test_cluster_faults,
    test_cluster_config,
    test_edges,
    test_log,
    test_stats,
    test_sbstat,
    test_timers,
    test_queue_memory,
);
