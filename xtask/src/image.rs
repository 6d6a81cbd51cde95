//! `cargo xtask image`: the `fulgur:VERSION` image (both binaries in /usr/local/bin) and a
//! docker-archive of it that `kind load image-archive` takes.
//!
//! Two ways to build it, with podman, buildah or docker, whichever is there:
//! - `containerfile`: the repository's multi-stage `Containerfile` (needs its base images from a
//!   registry);
//! - `host`: the host's `cargo build --release` binaries plus the shared libraries `ldd` names,
//!   in an image `FROM scratch`: nothing to pull, for machines without registry access.
//!
//! `auto` (the default) uses the Containerfile when its base images can be pulled.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cargo, output, run, target_dir, workspace_root};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Fully qualified, as containerd stores it after `kind load`, so the pods' `fulgur:VERSION`
/// resolves to it (podman would otherwise call it `localhost/fulgur`).
pub fn reference() -> String {
    format!("docker.io/library/fulgur:{VERSION}")
}
/// The base images of `Containerfile` (kept in step with it by a test).
pub const BUILDER_IMAGE: &str = "docker.io/library/rust:1.95-bookworm";
pub const RUNTIME_IMAGE: &str = "gcr.io/distroless/cc-debian12";
pub const BINARIES: [&str; 2] = ["fulgur-agent", "fulgur-controller"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    Auto,
    Containerfile,
    Host,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Podman,
    Buildah,
    Docker,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Podman => "podman",
            Tool::Buildah => "buildah",
            Tool::Docker => "docker",
        }
    }
}

/// The first usable image tool: podman, buildah, then docker (whose CLI alone is not enough: it
/// needs a running engine).
pub fn find_tool() -> Option<Tool> {
    if crate::have("podman") {
        return Some(Tool::Podman);
    }
    if crate::have("buildah") {
        return Some(Tool::Buildah);
    }
    if crate::have("docker") && output(Command::new("docker").arg("info")).is_some() {
        return Some(Tool::Docker);
    }
    None
}

pub const NO_TOOL: &str = "`cargo xtask image` needs podman, buildah or docker (with a running \
    engine): `apt-get install podman` (or buildah) on Debian and Ubuntu";

pub fn archive_path() -> PathBuf {
    target_dir().join(format!("image/fulgur-{VERSION}.tar"))
}

/// Builds the image and writes its docker-archive; returns the archive's path.
pub fn build(source: Source) -> anyhow::Result<PathBuf> {
    let tool = find_tool().context(NO_TOOL)?;
    let started = std::time::Instant::now();
    let source = match source {
        Source::Auto => {
            if pullable(tool) {
                Source::Containerfile
            } else {
                eprintln!(
                    "[image] {BUILDER_IMAGE} cannot be pulled: packaging the host's release binaries FROM scratch instead"
                );
                Source::Host
            }
        }
        other => other,
    };
    let out = target_dir().join("image");
    std::fs::create_dir_all(&out)?;
    match source {
        Source::Containerfile => build_command(
            tool,
            &workspace_root().join("Containerfile"),
            &workspace_root(),
        )?,
        Source::Host => {
            let context = host_context(&out)?;
            build_command(tool, &context.join("Containerfile"), &context)?
        }
        Source::Auto => unreachable!("resolved above"),
    }
    let archive = archive_path();
    let _ = std::fs::remove_file(&archive);
    eprintln!("[image] writing {}", archive.display());
    let docker_archive = format!("docker-archive:{}:{}", archive.display(), reference());
    match tool {
        Tool::Podman => run(Command::new("podman")
            .args(["save", "--format", "docker-archive", "-o"])
            .arg(&archive)
            .arg(reference()))?,
        Tool::Buildah => {
            run(Command::new("buildah").args(["push", &reference(), &docker_archive]))?
        }
        Tool::Docker => run(Command::new("docker")
            .args(["save", "-o"])
            .arg(&archive)
            .arg(reference()))?,
    }
    let size = std::fs::metadata(&archive)?.len();
    eprintln!(
        "[image] {} ({:.1} MiB) in {:.0?}; load it with `kind load image-archive {}`",
        reference(),
        size as f64 / (1024.0 * 1024.0),
        started.elapsed(),
        archive.display()
    );
    Ok(archive)
}

fn pullable(tool: Tool) -> bool {
    let check = if tool == Tool::Docker {
        "inspect"
    } else {
        "exists"
    };
    let exists = Command::new(tool.name())
        .args(["image", check, BUILDER_IMAGE])
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        return true;
    }
    eprintln!("[image] $ {} pull {BUILDER_IMAGE}", tool.name());
    Command::new(tool.name())
        .args(["pull", BUILDER_IMAGE])
        .status()
        .is_ok_and(|s| s.success())
}

fn build_command(tool: Tool, containerfile: &Path, context: &Path) -> anyhow::Result<()> {
    let mut command = Command::new(tool.name());
    match tool {
        Tool::Buildah => command.arg("bud"),
        _ => command.arg("build"),
    };
    command
        .arg("-f")
        .arg(containerfile)
        .args(["-t", &reference()])
        .arg(context);
    eprintln!("[image] $ {command:?}");
    run(&mut command)
}

/// A build context holding `rootfs/` (the binaries and their libraries) and a `FROM scratch`
/// Containerfile that copies it.
fn host_context(out: &Path) -> anyhow::Result<PathBuf> {
    eprintln!("[image] building the release binaries");
    let mut build = cargo();
    build.args(["build", "--release", "--bins"]);
    for binary in ["fulgur-agent", "fulgur-controller"] {
        build.args(["-p", binary]);
    }
    run(&mut build)?;
    let context = out.join("context");
    let _ = std::fs::remove_dir_all(&context);
    let rootfs = context.join("rootfs");
    let release = target_dir().join("release");
    let mut libraries = std::collections::BTreeSet::new();
    for binary in BINARIES {
        let path = release.join(binary);
        copy_into(
            &path,
            &rootfs,
            Path::new("/usr/local/bin").join(binary).as_path(),
        )?;
        let ldd = Command::new("ldd")
            .arg(&path)
            .output()
            .context("running ldd (Debian: libc-bin)")?;
        libraries.extend(parse_ldd(&String::from_utf8_lossy(&ldd.stdout))?);
    }
    for library in &libraries {
        copy_into(library, &rootfs, library)?;
    }
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    std::fs::write(context.join("Containerfile"), scratch_containerfile())?;
    eprintln!(
        "[image] rootfs: {} and {}",
        BINARIES.join(", "),
        libraries
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(context)
}

pub fn scratch_containerfile() -> String {
    format!(
        "# Generated by `cargo xtask image` (host binaries; see the repository's Containerfile).\n\
         FROM scratch\n\
         COPY rootfs/ /\n\
         LABEL org.opencontainers.image.title=fulgur org.opencontainers.image.version={VERSION}\n\
         # No USER: the agent needs uid 0 for its capabilities; the controller's Deployment\n\
         # runs it as 65532 (runAsNonRoot).\n"
    )
}

/// Copies `from` (following symlinks) to `rootfs` + `at`.
fn copy_into(from: &Path, rootfs: &Path, at: &Path) -> anyhow::Result<()> {
    let to = rootfs.join(at.strip_prefix("/").unwrap_or(at));
    std::fs::create_dir_all(to.parent().expect("a file path"))?;
    std::fs::copy(from, &to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The absolute library paths in `ldd` output (`name => /path (0x..)` and the loader's
/// `/path (0x..)`); a library `ldd` could not find is an error.
pub fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        // linux-vdso.so.1 has no file; "statically linked" has no path.
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            out.push(PathBuf::from(path));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_every_library_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    /// What the host mode packages for a real binary: its loader and libc at least.
    #[test]
    fn ldd_of_a_host_binary_names_its_loader() {
        let ldd = Command::new("ldd").arg("/bin/true").output().unwrap();
        let libraries = parse_ldd(&String::from_utf8_lossy(&ldd.stdout)).unwrap();
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("libc.so")),
            "{libraries:?}"
        );
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libraries:?}"
        );
        assert!(libraries.iter().all(|l| l.exists()));
    }

    #[test]
    fn the_containerfile_uses_the_base_images_and_tag_xtask_names() {
        let text = std::fs::read_to_string(workspace_root().join("Containerfile")).unwrap();
        assert!(
            text.contains(&format!("FROM {BUILDER_IMAGE} AS builder")),
            "{BUILDER_IMAGE}"
        );
        assert!(
            text.contains(&format!("FROM {RUNTIME_IMAGE}")),
            "{RUNTIME_IMAGE}"
        );
        for binary in BINARIES {
            assert!(
                text.contains(&format!("/usr/local/bin/{binary}")),
                "{binary}"
            );
        }
        assert!(!text.contains(":latest"));
        assert!(text.contains(&format!("org.opencontainers.image.version={VERSION}")));
        assert!(scratch_containerfile().contains("FROM scratch"));
    }
}
