//! include/switchboard.h compiles as C89 (`-std=c89 -pedantic -Werror`), C99, C11, and
//! C++98 / C++17 (`-Wall -Wextra -Werror`), with a program that uses its types, macros
//! and callbacks as a host would. The compilers are the system's `cc` and `c++` (CC /
//! CXX override them).

use std::path::PathBuf;
use std::process::Command;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A program in the common subset of C89 and C++98: declarations first, no `//`.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <switchboard.h>

#if !defined(SB_VERSION_MAJOR) || !defined(SB_VERSION_MINOR) || !defined(SB_VERSION_PATCH)
#error "SB_VERSION_* missing"
#endif

#ifdef __cplusplus
extern "C" {
#endif
static void on_message(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
}
static const char *snapshot_id(void *data, sb_message *msg)
{
    (void)data;
    (void)msg;
    return NULL;
}
static void on_log(void *data, int level, const char *text)
{
    (void)data;
    (void)level;
    (void)text;
}
#ifdef __cplusplus
}
#endif

int main(void)
{
    sb_subscription_cb cb = on_message;
    sb_snapshot_get_id_with_data id = snapshot_id;
    sb_log_fn log = on_log;
    sb_eid eid;
    sb_subscription_change change;
    sb_cache_update update;
    int codes[3];
    codes[0] = SB_OK;
    codes[1] = SB_E_INVAL;
    codes[2] = SB_E_INTERNAL;
    eid.bytes[0] = 0;
    change.uniqueid = NULL;
    update.old_snapshot = NULL;
    printf("%d.%d.%d %d %d %d %p %p %p %d %p %p\n", SB_VERSION_MAJOR, SB_VERSION_MINOR,
           SB_VERSION_PATCH, codes[0], codes[1], codes[2], (void *)&cb, (void *)&id,
           (void *)&log, eid.bytes[0], (void *)change.uniqueid, (void *)update.old_snapshot);
    return SB_FILTER_NONE;
}
"#;

fn compile(compiler: &str, lang: &str, flags: &[&str]) {
    let std = flags[0].trim_start_matches("-std=");
    let dir = std::env::temp_dir().join(format!("sb-header-{}-{std}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let obj = dir.join("program.o");
    let out = Command::new(compiler)
        .args(flags)
        .args(["-x", lang, "-c", "-o"])
        .arg(&obj)
        .arg(format!("-I{}", crate_dir().join("include").display()))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin piped")
                .write_all(PROGRAM.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "switchboard.h does not compile with {compiler} {}:\n{}",
        flags.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

const C_WARNINGS: &[&str] = &["-pedantic", "-Wall", "-Wextra", "-Werror"];

#[test]
fn header_compiles_as_c89() {
    compile(&cc(), "c", &[&["-std=c89"], C_WARNINGS].concat());
}

#[test]
fn header_compiles_as_c99() {
    compile(&cc(), "c", &[&["-std=c99"], C_WARNINGS].concat());
}

#[test]
fn header_compiles_as_c11() {
    compile(&cc(), "c", &[&["-std=c11"], C_WARNINGS].concat());
}

#[test]
fn header_compiles_as_cxx98() {
    compile(&cxx(), "c++", &[&["-std=c++98"], C_WARNINGS].concat());
}

#[test]
fn header_compiles_as_cxx17() {
    compile(&cxx(), "c++", &[&["-std=c++17"], C_WARNINGS].concat());
}

/// Every function the header declares says who owns what: its comment has an
/// "Ownership:" line (the header's opening comment defines the words).
#[test]
fn every_function_states_ownership() {
    let header = std::fs::read_to_string(crate_dir().join("include").join("switchboard.h"))
        .expect("read include/switchboard.h");
    let mut doc = String::new();
    let mut in_doc = false;
    let mut missing = Vec::new();
    let mut functions = 0;
    for line in header.lines() {
        let t = line.trim();
        if t.starts_with("/**") {
            in_doc = true;
            doc.clear();
        }
        if in_doc {
            doc.push_str(t);
            doc.push('\n');
            if t.ends_with("*/") {
                in_doc = false;
            }
            continue;
        }
        // A declaration: `<type> sb_name(...);` at the start of a line.
        let decl = !line.starts_with(' ')
            && !t.starts_with('#')
            && !t.starts_with("/*")
            && !t.starts_with('*')
            && !t.starts_with("typedef")
            && t.contains("sb_")
            && t.contains('(');
        if decl {
            functions += 1;
            let before_paren = t.split('(').next().unwrap_or("");
            let name = before_paren
                .rsplit([' ', '*'])
                .next()
                .unwrap_or("")
                .to_string();
            if !doc.contains("Ownership:") {
                missing.push(name);
            }
            doc.clear();
        } else if !t.is_empty() {
            doc.clear();
        }
    }
    assert!(
        functions > 100,
        "found only {functions} functions in the header"
    );
    assert!(missing.is_empty(), "no Ownership: line for {missing:?}");
}
