//! Builds the eBPF object with the nightly toolchain so a plain `cargo build` builds everything.
//!
//! This runs the command aya-build 0.2 runs, but keeps the inner cargo's output to itself:
//! aya-build turns every line of it into a `cargo:warning`, so each build printed ~40 warnings.
//! Here the output goes to this script's stderr, which cargo shows when the build fails and with
//! `cargo build -vv`; `FULGUR_EBPF_VERBOSE=1` also repeats it as warnings.
use std::{
    env,
    ffi::OsString,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The eBPF crate and its one binary (the object the agent embeds).
const PACKAGE: &str = "fulgur-ebpf";
const BINARY: &str = "fulgur";
const TOOLCHAIN: &str = "nightly";

fn main() {
    // Printed plainly: an anyhow error returned from main would add a backtrace to the output.
    if let Err(e) = build() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../dataplane-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    // A folder makes cargo rerun this script when any file below it changes (the programs and
    // fulgur-common, which lives in dataplane-ebpf/common).
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-env-changed=FULGUR_EBPF_VERBOSE");

    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        Ok("little") => "bpfel-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64".to_owned()
    } else {
        arch
    };
    let target_dir = out_dir.join("ebpf-target");
    let mut rustflags = OsString::new();
    // Same flags as aya-build, separated by 0x1f as CARGO_ENCODED_RUSTFLAGS wants.
    for flag in [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ] {
        if !rustflags.is_empty() {
            rustflags.push("\x1f");
        }
        rustflags.push(flag);
    }
    let mut command = Command::new("rustup");
    command
        .args(["run", TOOLCHAIN, "cargo", "build", "--package", PACKAGE])
        .args([
            "--bins",
            "--release",
            "-Z",
            "build-std=core",
            "--target",
            target,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // The outer cargo's compiler (or clippy's wrapper) is not the nightly one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER");
    let output = command
        .output()
        .with_context(|| format!("running {command:?} (is rustup installed?)"))?;
    let text = [&output.stdout[..], &output.stderr[..]].concat();
    // Seen by cargo on failure and with -vv only.
    std::io::stderr().write_all(&text)?;
    if env::var_os("FULGUR_EBPF_VERBOSE").is_some_and(|v| v != "0") {
        for line in String::from_utf8_lossy(&text).lines() {
            println!("cargo:warning={line}");
        }
    }
    if !output.status.success() {
        bail!(
            "building the eBPF programs failed ({}); the compiler's output is above. Command: {command:?}",
            output.status
        );
    }
    let object = target_dir.join(target).join("release").join(BINARY);
    copy(&object, &out_dir.join(BINARY))
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}
