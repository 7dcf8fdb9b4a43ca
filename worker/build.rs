//! torch-sys gives binaries no rpath: every crate whose binaries or tests link tch
//! needs this, or they die at start with exit 127 (see docs/development.md).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/setup-libtorch (.cargo/config.toml points at .libtorch)");
        return;
    };
    let libtorch = PathBuf::from(libtorch);
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let version_file = libtorch.join("build-version");
    println!("cargo:rerun-if-changed={}", version_file.display());
    let version = std::fs::read_to_string(&version_file).unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=DECLIP_LIBTORCH_VERSION={}", version.trim());

    // The autocast-dtype and gradient-view shims (csrc/), against the same headers.
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/grad.cpp");
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast.cpp")
        .file("csrc/grad.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("declip_autocast");
}
