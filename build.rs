//! Generates include/switchboard.h from src/ffi with cbindgen, and tells the C tests
//! which target to compile for.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=build.rs");
    // ffi tests compile C with the cc crate, which needs the target triple.
    println!(
        "cargo:rustc-env=SB_TARGET={}",
        std::env::var("TARGET").expect("cargo sets it")
    );
    // Bus threads run library code after a module's callbacks are done: the library
    // must stay mapped even when the module that loaded it is dlclose()d.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    // The ABI's major version is in the soname: a program linked today asks for
    // libswitchboard.so.0 and keeps getting it after an install of a compatible 0.x.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libswitchboard.so.0");
    soname_links();

    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is valid");
    config.after_includes = Some(version_macros());
    let out = crate_dir.join("include").join("switchboard.h");
    match cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
    {
        Ok(bindings) => {
            let mut text = Vec::new();
            bindings.write(&mut text);
            let text = c89_comments(&String::from_utf8(text).expect("cbindgen writes UTF-8"));
            // Leave the file alone when the text is unchanged (no rebuilds of C code).
            if std::fs::read_to_string(&out).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&out, text).expect("write include/switchboard.h");
            }
        }
        Err(e) => {
            // Keep the old header; rustc reports the real error in the sources.
            println!("cargo:warning=header not regenerated: {e}");
        }
    }
}

/// SB_VERSION_MAJOR / _MINOR / _PATCH, from Cargo.toml's version (what sb_version()
/// returns at run time).
fn version_macros() -> String {
    let part = |name: &str| std::env::var(name).expect("cargo sets the version parts");
    format!(
        "\n/* The version of this header: sb_version() returns the loaded library's, as\n \
         * \"MAJOR.MINOR.PATCH\". The major version is the one in the soname\n \
         * (libswitchboard.so.{major}). */\n\
         #define SB_VERSION_MAJOR {major}\n\
         #define SB_VERSION_MINOR {minor}\n\
         #define SB_VERSION_PATCH {patch}\n",
        major = part("CARGO_PKG_VERSION_MAJOR"),
        minor = part("CARGO_PKG_VERSION_MINOR"),
        patch = part("CARGO_PKG_VERSION_PATCH"),
    )
}

/// cbindgen writes `#endif // __cplusplus` (and `}  // extern "C"`): a C89 compiler with
/// -pedantic rejects `//` comments, and the header is meant to compile as C89.
fn c89_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        match body.split_once("//") {
            Some((code, comment)) if code.trim_start().starts_with(['#', '}']) => {
                out.push_str(code.trim_end());
                out.push_str(" /* ");
                out.push_str(comment.trim());
                out.push_str(" */");
                if line.ends_with('\n') {
                    out.push('\n');
                }
            }
            _ => out.push_str(line),
        }
    }
    out
}

/// A program linked with `-lswitchboard` against the build tree records the soname,
/// libswitchboard.so.0, and the loader looks for that name: put it next to the library
/// cargo writes (target/<profile> and its deps/, where the C tests link), as a relative
/// link that follows each rebuild. Installed copies get theirs from `make install`.
fn soname_links() {
    #[cfg(unix)]
    {
        let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
            return;
        };
        // OUT_DIR is <target dir>/<profile>/build/<package>-<hash>/out.
        let Some(profile) = out.ancestors().nth(3) else {
            return;
        };
        for dir in [profile.to_path_buf(), profile.join("deps")] {
            let link = dir.join("libswitchboard.so.0");
            if std::fs::symlink_metadata(&link).is_ok() {
                continue;
            }
            let _ = std::fs::create_dir_all(&dir);
            if let Err(e) = std::os::unix::fs::symlink("libswitchboard.so", &link) {
                println!("cargo:warning=cannot create {}: {e}", link.display());
            }
        }
    }
}
