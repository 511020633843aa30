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
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libswitchboard.so");

    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is valid");
    let out = crate_dir.join("include").join("switchboard.h");
    match cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
    {
        Ok(bindings) => {
            // write_to_file leaves the file alone when the text is unchanged.
            bindings.write_to_file(&out);
        }
        Err(e) => {
            // Keep the old header; rustc reports the real error in the sources.
            println!("cargo:warning=header not regenerated: {e}");
        }
    }
}
