//! `make install` as a packager runs it: into a temporary prefix, then a program built
//! from c-examples/minimal.c with nothing but `pkg-config --cflags --libs switchboard`
//! (PKG_CONFIG_PATH pointing into the prefix) runs against the installed copy. Checks the
//! installed files: libswitchboard.so.X.Y.Z with the soname libswitchboard.so.X and the
//! .so.X / .so links, every exported symbol an sb_* one of version SWITCHBOARD_0 (the
//! same set as the cargo-built library), no debug info, the static library, the header
//! and switchboard.pc; DESTDIR staging; `make uninstall`.
//!
//! Needs make, a C compiler, pkg-config and binutils (readelf, objdump, nm). The library
//! installed is the one this `cargo test` built (BUILD_DIR), not a release build.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/deps, where `cargo test` leaves libswitchboard.{a,so}.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().expect("deps dir").to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let line = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
    assert!(
        out.status.success(),
        "{line} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

fn make(args: &[&str]) {
    let deps = deps_dir();
    run(Command::new("make")
        .arg("-C")
        .arg(crate_dir())
        .arg("--no-print-directory")
        // No cargo build inside the test: install what this test run built.
        .arg("CARGO=:")
        .arg(format!("BUILD_DIR={}", deps.display()))
        .args(args));
}

fn version() -> (String, String) {
    let v = env!("CARGO_PKG_VERSION").to_string();
    let major = env!("CARGO_PKG_VERSION_MAJOR").to_string();
    (v, major)
}

/// Defined dynamic symbols of `lib`: (name, version).
fn dynamic_symbols(lib: &Path) -> Vec<(String, String)> {
    stdout(Command::new("objdump").arg("-T").arg(lib))
        .lines()
        .filter(|l| l.contains(" DF ") || l.contains(" DO "))
        // *ABS*: the version definition itself.
        .filter(|l| !l.contains("*UND*") && !l.contains("*ABS*"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = f.len();
            (n >= 2).then(|| (f[n - 1].to_string(), f[n - 2].to_string()))
        })
        .collect()
}

fn check_installed_tree(libdir: &Path, includedir: &Path) {
    let (v, major) = version();
    let real = libdir.join(format!("libswitchboard.so.{v}"));
    let so_major = libdir.join(format!("libswitchboard.so.{major}"));
    let so = libdir.join("libswitchboard.so");
    assert!(real.is_file(), "{} missing", real.display());
    assert_eq!(
        std::fs::read_link(&so_major).expect("libswitchboard.so.MAJOR is a link"),
        PathBuf::from(format!("libswitchboard.so.{v}"))
    );
    assert_eq!(
        std::fs::read_link(&so).expect("libswitchboard.so is a link"),
        PathBuf::from(format!("libswitchboard.so.{major}"))
    );
    assert!(libdir.join("libswitchboard.a").is_file());
    assert!(includedir.join("switchboard.h").is_file());
    assert!(libdir.join("pkgconfig").join("switchboard.pc").is_file());

    let dynamic = stdout(Command::new("readelf").arg("-d").arg(&real));
    assert!(
        dynamic.contains(&format!("Library soname: [libswitchboard.so.{major}]")),
        "soname:\n{dynamic}"
    );
    assert!(
        dynamic.contains("NODELETE"),
        "not linked -z nodelete:\n{dynamic}"
    );

    let sections = stdout(Command::new("readelf").arg("-S").arg(&real));
    assert!(
        !sections.contains(".debug_"),
        "the installed library keeps debug info:\n{sections}"
    );

    let syms = dynamic_symbols(&real);
    let bad: Vec<_> = syms
        .iter()
        .filter(|(name, ver)| !name.starts_with("sb_") || ver != "SWITCHBOARD_0")
        .collect();
    assert!(bad.is_empty(), "symbols not sb_*@@SWITCHBOARD_0: {bad:?}");
    let installed: BTreeSet<String> = syms.into_iter().map(|(n, _)| n).collect();
    let built: BTreeSet<String> = dynamic_symbols(&deps_dir().join("libswitchboard.so"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(installed.contains("sb_publish"), "{installed:?}");
    assert_eq!(
        installed, built,
        "installed and built libraries export different sets"
    );
}

#[test]
fn make_install_then_build_with_pkg_config() {
    let tmp = std::env::temp_dir().join(format!("sb-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let prefix = tmp.join("prefix");
    let prefix_s = prefix.display().to_string();

    // 1. Into a prefix, as `./configure --prefix` users do.
    make(&["install", &format!("PREFIX={prefix_s}")]);
    check_installed_tree(&prefix.join("lib"), &prefix.join("include"));

    // 2. A program built with the flags pkg-config gives, and nothing else.
    let pc_path = prefix.join("lib").join("pkgconfig");
    let flags = stdout(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "switchboard"])
            .env("PKG_CONFIG_PATH", &pc_path)
            .env_remove("PKG_CONFIG_LIBDIR"),
    );
    assert!(flags.contains("-lswitchboard"), "pkg-config said: {flags}");
    let pc_version = stdout(
        Command::new("pkg-config")
            .args(["--modversion", "switchboard"])
            .env("PKG_CONFIG_PATH", &pc_path),
    );
    assert_eq!(pc_version.trim(), env!("CARGO_PKG_VERSION"));
    let exe = tmp.join("minimal");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    run(Command::new(&cc)
        .arg(crate_dir().join("c-examples").join("minimal.c"))
        .args(flags.split_whitespace())
        .arg("-o")
        .arg(&exe));
    let needed = stdout(Command::new("readelf").arg("-d").arg(&exe));
    assert!(
        needed.contains("Shared library: [libswitchboard.so.0]"),
        "{needed}"
    );
    let out = stdout(
        Command::new(&exe)
            .env("LD_LIBRARY_PATH", prefix.join("lib"))
            .env_remove("LD_PRELOAD"),
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("received:")).count(),
        3,
        "{out}"
    );

    // 3. Staged, as packages are built: PREFIX is where it will live, DESTDIR where the
    //    files go now.
    let dest = tmp.join("dest");
    let dest_s = dest.display().to_string();
    make(&["install", "PREFIX=/usr", &format!("DESTDIR={dest_s}")]);
    let usr = dest.join("usr");
    check_installed_tree(&usr.join("lib"), &usr.join("include"));
    let pc = std::fs::read_to_string(usr.join("lib/pkgconfig/switchboard.pc")).expect("pc");
    assert!(pc.contains("prefix=/usr\n"), "{pc}");
    assert!(pc.contains("libdir=/usr/lib\n"), "{pc}");
    assert!(
        !pc.contains(&dest_s),
        "DESTDIR leaked into the .pc file:\n{pc}"
    );

    // 4. Uninstall leaves nothing of ours.
    make(&["uninstall", &format!("PREFIX={prefix_s}")]);
    make(&["uninstall", "PREFIX=/usr", &format!("DESTDIR={dest_s}")]);
    for dir in [prefix.join("lib"), usr.join("lib")] {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("libdir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains("switchboard"))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
