//! Build steps of `cellfleet-worker`:
//!
//! * Lets `cellfleet` find libtorch at run time without `LD_LIBRARY_PATH`: torch-sys reports the
//!   directory of the libtorch it linked (the installed PyTorch's `torch/lib`), and every binary and test
//!   of this crate gets it as an rpath.
//! * Builds the Gloo shim (`cpp/gloo_shim.cc`) into `$OUT_DIR/libcellfleet_gloo.so`, which
//!   `src/collective/gloo.rs` embeds and loads at run time. It is a separate shared object, not a static
//!   library linked into the binary, because libtorch_cpu.so exports its own, ABI-incompatible copy of
//!   Gloo's symbols: linked together, calls would bind to whichever library the loader finds first. Loaded
//!   with `RTLD_DEEPBIND`, the shim and Debian's libgloo bind to each other only.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    build_gloo_shim();
}

fn build_gloo_shim() {
    let source = PathBuf::from("cpp/gloo_shim.cc");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-env-changed=CELLFLEET_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=CELLFLEET_GLOO_LIB");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let shim = out.join("libcellfleet_gloo.so");

    // `cc` picks the C++ compiler and the target's flags; the link into a shared object is ours.
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .pic(true)
        .opt_level(2)
        .warnings(true)
        .flag("-fvisibility=hidden");
    if let Ok(include) = std::env::var("CELLFLEET_GLOO_INCLUDE") {
        build.include(include);
    }
    let compiler = build.get_compiler();
    let mut cmd: Command = compiler.to_command();
    cmd.arg("-shared").arg(&source).arg("-o").arg(&shim);
    if let Ok(lib) = std::env::var("CELLFLEET_GLOO_LIB") {
        cmd.arg(format!("-L{lib}")).arg(format!("-Wl,-rpath,{lib}"));
    }
    // --no-undefined: every symbol must resolve against libgloo and the C++ runtime now, not at load time.
    cmd.args(["-Wl,--no-undefined", "-lgloo", "-pthread"]);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cmd:?}: {e}"));
    if !status.success() {
        panic!(
            "building the Gloo shim failed ({cmd:?}); it needs Gloo's headers and libgloo.so \
             (Debian: `apt-get install libgloo-dev`, or set CELLFLEET_GLOO_INCLUDE / CELLFLEET_GLOO_LIB)"
        );
    }
}
