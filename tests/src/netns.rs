//! Network namespaces owned by a test: unique names, removed on drop even when the test fails.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A unique, short (interface-name-sized) token for this process and call.
pub fn unique_token(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command and fails with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let name = unique_token(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "dev", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace (network namespace only; mounts are shared, so
    /// bpffs stays visible).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let net = format!("--net={}", self.path());
        let mut full = vec![net.as_str(), program];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> anyhow::Result<Entered> {
        let original = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        let target = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        setns(&target)?;
        Ok(Entered { original })
    }

    /// A `Command` whose child starts inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", self.path())).arg(program);
        command
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn setns(file: &File) -> anyhow::Result<()> {
    // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread is inside a namespace; dropping it goes back.
pub struct Entered {
    original: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        setns(&self.original).expect("returning to the original network namespace");
    }
}

/// Runs `f` on a fresh thread inside `ns` (so the caller's thread never changes namespace).
pub fn in_netns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = ns.path();
    std::thread::spawn(move || {
        let target = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&target)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}
