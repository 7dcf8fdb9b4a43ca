//! Helpers shared by the end-to-end tests: locate the real binaries and run them.

#![allow(dead_code)]

pub mod prometheus;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The folder holding the workspace's binaries for the profile these tests were
/// built with (`target/debug` under `cargo test`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A command for one of the workspace binaries (`coordinator` or `worker`).
/// They are built by `scripts/test` (cargo does not build other packages'
/// binaries for a test crate).
pub fn binary(name: &str) -> Command {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, as scripts/test does)",
        path.display()
    );
    let mut cmd = Command::new(path);
    // A developer's own overrides must not leak into tests.
    for (name, _) in std::env::vars() {
        if name.starts_with("DECLIP__") {
            cmd.env_remove(name);
        }
    }
    cmd
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every file and folder below `dir`, relative, sorted.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
                if path.is_dir() {
                    walk(root, &path, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
