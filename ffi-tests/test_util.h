/*
 * test_util.h - a tiny test harness for the switchboard C API tests.
 *
 * Include this header FIRST in every test program (it selects POSIX 2008).
 *
 *   CHECK(cond)           record a pass, or a failure printed as "FAIL file:line: cond"
 *   CHECK_EQ_INT(a, b)    same, for two integers (prints both values on failure)
 *   CHECK_STR(a, b)       same, for two C strings (NULL-safe)
 *   WAIT_UNTIL(cond)      poll cond (nanosleep 1 ms) for up to tu_wait_seconds() (10 s,
 *                         120 s under valgrind or ThreadSanitizer), then records a failure
 *                         "FAIL file:line: timeout waiting for cond". tu_last_wait_ok()
 *                         tells the outcome.
 *   CHECK_STAYS(cond, ms) sample cond for ~ms milliseconds; fails if it ever turns false
 *   TEST_INIT()           arm the watchdog (the program fails instead of hanging)
 *   TEST_DONE()           print "N passed, M failed"; evaluates to the exit code
 *
 * Counters are atomic: CHECK may be used from any thread, including library callbacks.
 * Waiting never asserts on speed: the bounds are generous and only catch hangs.
 */
#ifndef SB_TEST_UTIL_H
#define SB_TEST_UTIL_H

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "switchboard.h"

/* valgrind's client requests when its header is installed (RUNNING_ON_VALGRIND,
 * VALGRIND_COUNT_ERRORS); constant stand-ins otherwise. */
#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define HAVE_VALGRIND_H 1
#endif
#endif
#ifndef HAVE_VALGRIND_H
#define RUNNING_ON_VALGRIND 0
#define VALGRIND_COUNT_ERRORS 0
#endif

static atomic_int tu_passed;
static atomic_int tu_failed;

/* Running under valgrind (the Rust harness exports SB_VALGRIND=1): everything is ~50x slower. */
static inline int tu_slow(void)
{
    const char *v = getenv("SB_VALGRIND");
    return v != NULL && v[0] != '\0' && strcmp(v, "0") != 0;
}

/* Threads of this process whose name starts with `prefix` (Linux: /proc/self/task/N/comm;
 * the library names its threads sb-pool, sb-grp-<group>, sb-timer...); -1 if unreadable. */
static inline int tu_threads_named(const char *prefix)
{
    DIR *d = opendir("/proc/self/task");
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (f == NULL)
            continue; /* the thread just exited */
        if (fgets(comm, sizeof comm, f) != NULL && strncmp(comm, prefix, strlen(prefix)) == 0)
            n++;
        fclose(f);
    }
    closedir(d);
    return n;
}

/* Running under ThreadSanitizer (`make tsan` exports SB_TSAN=1): slower too, and its
 * runtime has its own allocator (mallinfo2 describes nothing). */
static inline int tu_tsan(void)
{
    const char *v = getenv("SB_TSAN");
    return v != NULL && v[0] != '\0' && strcmp(v, "0") != 0;
}

/* Under either checker (valgrind, ThreadSanitizer): for time bounds that must stretch with
 * the checker's slowdown, not for what only valgrind changes (child processes re-run under
 * it, memory figures). */
static inline int tu_checked(void)
{
    return tu_slow() || tu_tsan();
}

/* In a forked child: runs this test program again (`self`, its path; the caller sets
 * what tells it what to do in its environment first), under valgrind when the test runs
 * under it, so the new program is checked too. Does not return (exit status 127 when
 * nothing could be run). */
static inline void tu_exec_self(const char *self)
{
    if (tu_slow()) {
        char *args[] = {"valgrind", "-q", "--vgdb=no", "--leak-check=no",
                        "--error-exitcode=99", (char *)self, NULL};
        execvp("valgrind", args);
    } else {
        char *args[] = {(char *)self, NULL};
        execv(self, args);
    }
    _exit(127);
}

/* Ends a forked child that has reported its result (through a pipe) and reaps it; true
 * when it exited with status 0. Under valgrind the child waits to be killed (SIGKILL
 * skips the leak check of memory its parent's threads left in it), so there only the
 * reaping counts. */
static inline int tu_reap_reported_child(pid_t pid)
{
    if (RUNNING_ON_VALGRIND)
        kill(pid, SIGKILL);
    int status = 0;
    if (waitpid(pid, &status, 0) != pid)
        return 0;
    return RUNNING_ON_VALGRIND || (WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* Pick a workload size: `normal` natively, `slow` under valgrind. */
static inline int tu_scale(int normal, int slow) { return tu_slow() ? slow : normal; }

static inline void tu_pass(void) { atomic_fetch_add(&tu_passed, 1); }

static inline void tu_fail(const char *file, int line, const char *what)
{
    atomic_fetch_add(&tu_failed, 1);
    printf("FAIL %s:%d: %s\n", file, line, what);
    fflush(stdout);
}

static inline void tu_check(int ok, const char *file, int line, const char *what)
{
    if (ok)
        tu_pass();
    else
        tu_fail(file, line, what);
}

#define CHECK(cond) tu_check((cond) ? 1 : 0, __FILE__, __LINE__, #cond)

static inline void tu_check_eq_int(long long a, long long b, const char *file, int line,
                                   const char *sa, const char *sb)
{
    if (a == b) {
        tu_pass();
    } else {
        char buf[512];
        snprintf(buf, sizeof buf, "%s == %s (%lld != %lld)", sa, sb, a, b);
        tu_fail(file, line, buf);
    }
}

#define CHECK_EQ_INT(a, b) \
    tu_check_eq_int((long long)(a), (long long)(b), __FILE__, __LINE__, #a, #b)

static inline void tu_check_str(const char *a, const char *b, const char *file, int line,
                                const char *sa, const char *sb)
{
    if (a != NULL && b != NULL && strcmp(a, b) == 0) {
        tu_pass();
    } else {
        char buf[768];
        snprintf(buf, sizeof buf, "%s == %s (\"%.200s\" != \"%.200s\")", sa, sb,
                 a ? a : "(null)", b ? b : "(null)");
        tu_fail(file, line, buf);
    }
}

#define CHECK_STR(a, b) tu_check_str((a), (b), __FILE__, __LINE__, #a, #b)

/* 1 if sb_last_error() currently returns a non-empty string. */
static inline int tu_has_error(void)
{
    const char *e = sb_last_error();
    return e != NULL && e[0] != '\0';
}

#define CHECK_ERR() CHECK(tu_has_error())

static inline void tu_sleep_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline void tu_sleep_us(long us)
{
    struct timespec ts;
    ts.tv_sec = us / 1000000L;
    ts.tv_nsec = (us % 1000000L) * 1000L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline double tu_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Bound on any single wait: generous, only meant to turn a hang into a failure. Under
 * valgrind or ThreadSanitizer everything runs several times slower (a cluster store's
 * repair after a lost server took over 10 s under ThreadSanitizer). */
static inline double tu_wait_seconds(void) { return tu_slow() || tu_tsan() ? 120.0 : 10.0; }

typedef struct tu_waiter {
    double deadline;
    int ok;
} tu_waiter;

static inline tu_waiter tu_waiter_start(void)
{
    tu_waiter w;
    w.deadline = tu_now_s() + tu_wait_seconds();
    w.ok = 0;
    return w;
}

/* Returns 1 to keep polling, 0 when finished (w->ok tells the outcome). */
static inline int tu_waiter_step(tu_waiter *w, int cond_now, const char *file, int line,
                                 const char *what)
{
    if (cond_now) {
        w->ok = 1;
        tu_pass();
        return 0;
    }
    if (tu_now_s() > w->deadline) {
        char buf[512];
        snprintf(buf, sizeof buf, "timeout waiting for %s", what);
        tu_fail(file, line, buf);
        w->ok = 0;
        return 0;
    }
    tu_sleep_ms(1);
    return 1;
}

/*
 * WAIT_UNTIL(cond) is a statement:   WAIT_UNTIL(x == 3);
 * Its outcome is available through tu_last_wait_ok() right after it.
 */
static _Thread_local int tu_last_wait;
static inline int tu_last_wait_ok(void) { return tu_last_wait; }

#define WAIT_UNTIL(cond)                                                                \
    do {                                                                                \
        tu_waiter tu_w_ = tu_waiter_start();                                            \
        while (tu_waiter_step(&tu_w_, (cond) ? 1 : 0, __FILE__, __LINE__, #cond)) {     \
        }                                                                               \
        tu_last_wait = tu_w_.ok;                                                        \
    } while (0)

/* Poll cond for a short while and check it never becomes true (used for "nothing more
 * arrives" checks; a negative check cannot be bounded, so this only samples). */
#define CHECK_STAYS(cond, ms)                                                           \
    do {                                                                                \
        int tu_bad_ = 0;                                                                \
        for (long tu_i_ = 0; tu_i_ < (ms); tu_i_++) {                                   \
            if (!(cond)) {                                                              \
                tu_bad_ = 1;                                                            \
                break;                                                                  \
            }                                                                           \
            tu_sleep_ms(1);                                                             \
        }                                                                               \
        tu_check(!tu_bad_, __FILE__, __LINE__, "stays true: " #cond);                   \
    } while (0)

/* ---- watchdog: a deadlocked test fails with a message instead of hanging ---- */

static void tu_watchdog_handler(int sig)
{
    static const char msg[] = "FAIL watchdog: test did not finish in time (deadlock?)\n";
    (void)sig;
    ssize_t r = write(1, msg, sizeof msg - 1);
    (void)r;
    _exit(3);
}

static inline void tu_init(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = tu_watchdog_handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    alarm(tu_slow() || tu_tsan() ? 540 : 100);
    setvbuf(stdout, NULL, _IOLBF, 0);
}

#define TEST_INIT() tu_init()

static inline int tu_done(void)
{
    int p = atomic_load(&tu_passed);
    int f = atomic_load(&tu_failed);
    alarm(0);
    printf("%d passed, %d failed\n", p, f);
    fflush(stdout);
    return f == 0 ? 0 : 1;
}

#define TEST_DONE() tu_done()

/* ---- small helpers ---- */

/* Case-insensitive substring search. */
static inline int tu_contains_ci(const char *hay, const char *needle)
{
    if (hay == NULL || needle == NULL)
        return 0;
    size_t n = strlen(needle);
    for (const char *p = hay; *p; p++) {
        size_t i = 0;
        while (i < n && p[i]) {
            char a = p[i], b = needle[i];
            if (a >= 'A' && a <= 'Z')
                a = (char)(a - 'A' + 'a');
            if (b >= 'A' && b <= 'Z')
                b = (char)(b - 'A' + 'a');
            if (a != b)
                break;
            i++;
        }
        if (i == n)
            return 1;
    }
    return 0;
}

/* Copy the current last error into buf (empty string if none). */
static inline void tu_copy_error(char *buf, size_t len)
{
    const char *e = sb_last_error();
    snprintf(buf, len, "%s", e ? e : "");
}

#endif /* SB_TEST_UTIL_H */
