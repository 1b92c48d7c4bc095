//! Lets `cellfleet` find libtorch at run time without `LD_LIBRARY_PATH`: torch-sys reports the directory
//! of the libtorch it linked (the installed PyTorch's `torch/lib`), and every binary and test of this
//! crate gets it as an rpath.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
