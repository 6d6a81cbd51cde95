//! Loading, attaching, pinning and detaching the eBPF programs.
//!
//! Everything lives under one bpffs folder: `maps/` (reused by name on the next load),
//! `links/` (keep the programs attached after the agent exits) and `progs/`. A restarted agent
//! swaps its fresh programs into the pinned links atomically, so forwarding never stops.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{
        SchedClassifier, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use fulgur_common::{defaults, map_names, program_names};

use crate::{
    EBPF_OBJECT,
    bpf_log::BpfLog,
    netlink,
    tc_hook::{self, TcAttach, TcHook},
    writer::Layout,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted by convention; the agent mounts it here when it is missing.
pub const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "{path} is on {fs}, not on a bpffs mount: use a folder under {BPFFS_MOUNT_POINT} (the agent \
         mounts bpffs there when it is missing), or mount one first: mount -t bpf bpf DIR"
    )]
    NotBpffs { path: PathBuf, fs: String },
    #[error(
        "{BPFFS_MOUNT_POINT} is not a bpffs mount (is this 'ip netns exec'?) and mounting one \
         failed ({source}): mount -t bpf bpf {BPFFS_MOUNT_POINT}, or use nsenter --net instead of \
         ip netns exec"
    )]
    MountBpffs { source: io::Error },
    #[error(
        "{BPFFS_MOUNT_POINT} is not a bpffs mount (is this 'ip netns exec'?), so no pins are \
         visible here: use nsenter --net instead of ip netns exec"
    )]
    NoBpffs,
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("program {name}: the attachment is not a bpf_link, so it cannot be pinned: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error(
        "pinned map {name} holds {pinned} entries, the size flags ask for {wanted}: keep the flags \
         the dataplane was created with, or run `fulgur-agent detach` to start afresh"
    )]
    SizeMismatch {
        name: &'static str,
        pinned: u32,
        wanted: u32,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("interface {iface} does not exist")]
    UnknownInterface { iface: String },
    #[error("TC egress hook on {iface}: {message}")]
    TcHook { iface: String, message: String },
}

/// How the XDP program is attached.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// In the driver (needs driver support; veth has it).
    Native,
    /// In the kernel's generic path, on any interface.
    Generic,
}

impl XdpAttachMode {
    pub fn name(self) -> &'static str {
        match self {
            XdpAttachMode::Native => "native",
            XdpAttachMode::Generic => "generic",
        }
    }

    fn flags(self) -> XdpMode {
        match self {
            XdpAttachMode::Native => XdpMode::Driver,
            XdpAttachMode::Generic => XdpMode::Skb,
        }
    }
}

/// Map sizes chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub layout: Layout,
    pub conntrack_entries: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            layout: Layout {
                max_services: defaults::MAX_SERVICES,
                max_backends: defaults::MAX_BACKENDS,
                table_size: 4099,
            },
            conntrack_entries: defaults::CONNTRACK_ENTRIES,
        }
    }
}

/// The folder layout under `--bpffs-dir`.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Pins { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub(crate) fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }
    fn xdp_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("xdp-{iface}"))
    }

    /// Creates the folders, refusing anything that is not on bpffs. A folder under
    /// [`BPFFS_MOUNT_POINT`] with no bpffs there gets one mounted, as other eBPF agents do:
    /// `ip netns exec` gives its command a fresh /sys without one.
    pub fn create(&self) -> Result<(), DataplaneError> {
        // Checked before anything is created, so a wrong folder leaves nothing behind.
        self.ensure_bpffs(true)?;
        for dir in [self.maps(), self.links(), self.progs()] {
            fs::create_dir_all(&dir).map_err(|source| DataplaneError::Io {
                action: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Fails with advice when the folder is not on bpffs (for readers: `inspect`, `detach`).
    pub fn check(&self) -> Result<(), DataplaneError> {
        self.ensure_bpffs(false)
    }

    fn ensure_bpffs(&self, may_mount: bool) -> Result<(), DataplaneError> {
        // The folder itself, or the closest parent that exists yet.
        let existing = self
            .root
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let fs_type = fs_type(existing);
        if fs_type == Some(BPF_FS_MAGIC) {
            return Ok(());
        }
        let mount_point = Path::new(BPFFS_MOUNT_POINT);
        if !self.root.starts_with(mount_point) {
            return Err(DataplaneError::NotBpffs {
                path: self.root.clone(),
                fs: fs_name(fs_type),
            });
        }
        if !may_mount {
            return Err(DataplaneError::NoBpffs);
        }
        mount_bpffs(mount_point).map_err(|source| DataplaneError::MountBpffs { source })?;
        if own_mount_namespace() {
            tracing::warn!(
                "mounted bpffs at {BPFFS_MOUNT_POINT} in this process's own mount namespace \
                 (ip netns exec, or a container without the host's): the pins die with it, so the dataplane is detached when the \
                 agent exits and a restart starts afresh; use nsenter --net to keep the host's \
                 {BPFFS_MOUNT_POINT}"
            );
        } else {
            tracing::info!("mounted bpffs at {BPFFS_MOUNT_POINT}");
        }
        Ok(())
    }
}

/// The file system magic of `path`, if statfs works.
fn fs_type(path: &Path) -> Option<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        (libc::statfs(c_path.as_ptr(), &mut stat) == 0).then_some(stat.f_type as i64)
    }
}

fn fs_name(magic: Option<i64>) -> String {
    match magic {
        Some(0x0102_1994) => "tmpfs".into(),
        Some(0x6265_6572) => "sysfs".into(),
        Some(0xef53) => "ext2/3/4".into(),
        Some(0x794c_7630) => "overlayfs".into(),
        Some(0x9123_683e) => "btrfs".into(),
        Some(0x5846_5342) => "xfs".into(),
        Some(0x9fa0) => "proc".into(),
        Some(magic) => format!("a file system of type {magic:#x}"),
        None => "an unreadable file system".into(),
    }
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid NUL-terminated strings; mount does not keep them.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this process has a mount namespace other than init's (as `ip netns exec` makes).
fn own_mount_namespace() -> bool {
    match (
        fs::read_link("/proc/self/ns/mnt"),
        fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(own), Ok(init)) => own != init,
        _ => false,
    }
}

/// The loaded programs, with their maps pinned under `pins`.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub pins: Pins,
}

impl Dataplane {
    /// Loads the object, reusing maps already pinned under `pins`, and loads every program, with
    /// kernel-side logging off.
    pub fn load(pins: Pins, sizes: &Sizes) -> Result<Self, DataplaneError> {
        Self::load_with_log(pins, sizes, BpfLog::Off)
    }

    /// [`Dataplane::load`] with the programs' log level set (a load-time constant: the verifier
    /// removes the calls a level disables). Read the records with [`crate::bpf_log::reader`].
    pub fn load_with_log(
        pins: Pins,
        sizes: &Sizes,
        bpf_log: BpfLog,
    ) -> Result<Self, DataplaneError> {
        pins.create()?;
        let lookup_entries = u32::try_from(sizes.layout.lookup_entries()).unwrap_or(u32::MAX);
        let wanted = [
            (map_names::SERVICES, sizes.layout.max_services),
            (map_names::BACKENDS, sizes.layout.max_backends),
            (map_names::LOOKUP_TABLE, lookup_entries),
            (map_names::CONNTRACK, sizes.conntrack_entries),
            (map_names::REVERSE_NAT, sizes.conntrack_entries),
            (map_names::SERVICE_STATS, sizes.layout.max_services),
            (map_names::BACKEND_STATS, sizes.layout.max_backends),
            (map_names::NEXT_HOPS, sizes.layout.max_backends),
        ];
        // Pinned maps are reused as they are: a size flag that differs would be ignored silently.
        for (name, entries) in wanted {
            if let Ok(info) = aya::maps::MapInfo::from_pin(pins.map(name))
                && info.max_entries() != entries
            {
                return Err(DataplaneError::SizeMismatch {
                    name,
                    pinned: info.max_entries(),
                    wanted: entries,
                });
            }
        }
        replace_outgrown_counters(&pins)?;
        replace_next_hops_without_epoch(&pins)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps());
        let level = bpf_log.level();
        loader.override_global(fulgur_common::LOG_LEVEL_GLOBAL, &level, true);
        for (name, entries) in wanted {
            loader.map_max_entries(name, entries);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // A new epoch map holds 0, the mark of an empty next hop: moved on before any run.
        move_next_hop_epoch_on(&mut ebpf)?;
        for name in [program_names::XDP_INGRESS, program_names::XDP_PASS] {
            xdp_program(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        tc_program(&mut ebpf)?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: program_names::TC_EGRESS,
                source,
            })?;
        Ok(Dataplane { ebpf, pins })
    }

    /// Hands a map over to its owner (the map writer, the stats reader).
    pub fn take_map(&mut self, name: &str) -> Option<Map> {
        self.ebpf.take_map(name)
    }

    /// Attaches ingress and egress to `iface`, replacing a pinned attachment in place if there is
    /// one (no packet sees a gap), and pins the links and programs. A pinned XDP attachment in
    /// the other mode is detached first: the kernel holds one mode per interface at a time. The
    /// same goes for the TC hook (see [`tc_hook`]). Returns the TC hook in use.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: XdpAttachMode,
        tc: TcAttach,
    ) -> Result<TcHook, DataplaneError> {
        let if_index = if_index(iface)?;
        let xdp_pin = self.pins.xdp_link(iface);
        let program = xdp_program(&mut self.ebpf, program_names::XDP_INGRESS)?;
        let err = |source| DataplaneError::Program {
            name: program_names::XDP_INGRESS,
            source,
        };
        let mut pinned = match PinnedLink::from_pin(&xdp_pin) {
            Ok(pinned) => Some(pinned),
            Err(e) => {
                if xdp_pin.exists() {
                    tracing::warn!(iface, "cannot open the pinned XDP link: {e}");
                }
                None
            }
        };
        let mut switched_from = None;
        if pinned.is_some() {
            match attached_xdp_mode(if_index) {
                Ok(Some(current)) if current != mode => switched_from = Some(current),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    iface,
                    "cannot read the attached XDP mode ({e}); assuming it is {}",
                    mode.name()
                ),
            }
        }
        let mut gap = None;
        if let Some(old) = switched_from
            && let Some(link) = pinned.take()
        {
            tracing::warn!(
                iface,
                "XDP mode changes from {} to {}: the kernel cannot hold both on one interface, \
                 so the old attachment is removed first and packets arriving in between are \
                 not translated",
                old.name(),
                mode.name()
            );
            gap = Some(std::time::Instant::now());
            // Dropping the last reference to the link detaches it.
            drop(link.unpin().map_err(|source| DataplaneError::Io {
                action: "unpinning",
                path: xdp_pin.clone(),
                source,
            })?);
        }
        let replaced = pinned.and_then(|pinned| {
            let replaced = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| e.to_string())
                .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
            replaced
                .inspect_err(|e| {
                    tracing::warn!(iface, "cannot update the pinned XDP link in place: {e}");
                })
                .ok()
        });
        let link_id = match replaced {
            Some(id) => id,
            None => match program.attach_to_if_index(if_index, mode.flags()) {
                Ok(id) => id,
                Err(e) => {
                    if let Some(old) = switched_from {
                        // Better the old mode than no dataplane at all.
                        let restored = program
                            .attach_to_if_index(if_index, old.flags())
                            .ok()
                            .and_then(|id| program.take_link(id).ok())
                            .and_then(|link| FdLink::try_from(link).ok())
                            .map(|link| pin_link(link, &xdp_pin));
                        if matches!(restored, Some(Ok(()))) {
                            tracing::error!(
                                iface,
                                "attaching in {} mode failed ({e}); put back the {} attachment",
                                mode.name(),
                                old.name()
                            );
                        } else {
                            tracing::error!(
                                iface,
                                "attaching in {} mode failed ({e}), and putting back the {} \
                                 attachment failed too: the interface has no XDP program",
                                mode.name(),
                                old.name()
                            );
                        }
                    }
                    return Err(err(e));
                }
            },
        };
        if let Some(started) = gap {
            tracing::warn!(
                iface,
                gap_us = started.elapsed().as_micros() as u64,
                "XDP mode switched to {}",
                mode.name()
            );
        }
        let link: FdLink = program
            .take_link(link_id)
            .map_err(err)?
            .try_into()
            .map_err(|source| DataplaneError::Link {
                name: program_names::XDP_INGRESS,
                source,
            })?;
        pin_link(link, &xdp_pin)?;

        let hook = tc_hook::attach(tc_program(&mut self.ebpf)?, &self.pins, iface, tc)?;
        self.pin_programs()?;
        Ok(hook)
    }

    fn pin_programs(&mut self) -> Result<(), DataplaneError> {
        for (name, program) in self.ebpf.programs_mut() {
            let path = self.pins.progs().join(name);
            remove_if_present(&path)?;
            match program {
                aya::programs::Program::Xdp(p) => p.pin(&path),
                aya::programs::Program::SchedClassifier(p) => p.pin(&path),
                _ => continue,
            }
            .map_err(|source| DataplaneError::Pin {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

pub(crate) fn pin_link(link: FdLink, path: &Path) -> Result<(), DataplaneError> {
    // The old pin (if any) still names the same kernel link, which `link` keeps alive.
    remove_if_present(path)?;
    link.pin(path).map_err(|source| DataplaneError::Pin {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), DataplaneError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataplaneError::Io {
            action: "removing",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    let name = program_names::TC_EGRESS;
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// A counters map pinned by an older agent has fewer entries than today's `Counter` list, and the
/// programs would fail to count the new reasons. Counters are statistics, not forwarding state:
/// the pin is replaced (the totals restart from zero) rather than counting nothing.
fn replace_outgrown_counters(pins: &Pins) -> Result<(), DataplaneError> {
    let path = pins.map(map_names::COUNTERS);
    let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
        return Ok(());
    };
    if info.max_entries() >= fulgur_common::Counter::COUNT {
        return Ok(());
    }
    tracing::warn!(
        pinned = info.max_entries(),
        wanted = fulgur_common::Counter::COUNT,
        "the pinned counters map predates this agent's counter list: replacing it, totals restart \
         from zero"
    );
    fs::remove_file(&path).map_err(|source| DataplaneError::Io {
        action: "removing the outgrown pin",
        path,
        source,
    })
}

fn move_next_hop_epoch_on(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let name = map_names::NEXT_HOP_EPOCH;
    let err = |source| DataplaneError::Map { name, source };
    let map = ebpf
        .map_mut(name)
        .ok_or(DataplaneError::MissingMap { name })?;
    let mut epoch: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map).map_err(err)?;
    let current = epoch.get(&0, 0).map_err(err)?;
    epoch
        .set(0, fulgur_common::next_epoch(current), 0)
        .map_err(err)
}

/// Next hops pinned by an agent that predates the next-hop epoch have another layout (an expiry
/// time where the epoch and path now sit). They are a cache: the pin is replaced, and the first
/// packet to each backend resolves its next hop again.
fn replace_next_hops_without_epoch(pins: &Pins) -> Result<(), DataplaneError> {
    let path = pins.map(map_names::NEXT_HOPS);
    if !path.exists() || pins.map(map_names::NEXT_HOP_EPOCH).exists() {
        return Ok(());
    }
    tracing::info!("the pinned next-hop cache predates the next-hop epoch: replacing it");
    fs::remove_file(&path).map_err(|source| DataplaneError::Io {
        action: "removing the next-hop cache pin of another layout",
        path,
        source,
    })
}

/// The XDP mode the kernel has attached on `if_index`, if any (RTM_GETLINK, IFLA_XDP): the
/// pinned link does not say which mode it was made with.
pub fn attached_xdp_mode(if_index: u32) -> io::Result<Option<XdpAttachMode>> {
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    const IFLA_XDP_DRV_PROG_ID: u16 = 5;
    const IFLA_XDP_SKB_PROG_ID: u16 = 6;
    const XDP_ATTACHED_DRV: u8 = 1;
    const XDP_ATTACHED_SKB: u8 = 2;
    const XDP_ATTACHED_MULTI: u8 = 4;
    const IFINFO: usize = 16; // struct ifinfomsg

    let mut ifinfo = [0u8; IFINFO];
    ifinfo[4..8].copy_from_slice(&(if_index as i32).to_ne_bytes());
    let messages = netlink::request(libc::NETLINK_ROUTE, libc::RTM_GETLINK, 0, &ifinfo)?;
    let message = messages
        .iter()
        .find(|m| netlink::u16_at(m, 4) == libc::RTM_NEWLINK)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no link in the answer"))?;
    let Some((_, xdp)) =
        netlink::attributes(message.get(netlink::HEADER + IFINFO..).unwrap_or(&[]))
            .find(|(kind, _)| *kind == IFLA_XDP)
    else {
        return Ok(None);
    };
    let mut attached = 0;
    let (mut driver, mut skb) = (false, false);
    for (kind, value) in netlink::attributes(xdp) {
        match kind {
            IFLA_XDP_ATTACHED => attached = value.first().copied().unwrap_or(0),
            IFLA_XDP_DRV_PROG_ID => driver = true,
            IFLA_XDP_SKB_PROG_ID => skb = true,
            _ => {}
        }
    }
    Ok(match attached {
        XDP_ATTACHED_DRV => Some(XdpAttachMode::Native),
        XDP_ATTACHED_SKB => Some(XdpAttachMode::Generic),
        XDP_ATTACHED_MULTI if driver => Some(XdpAttachMode::Native),
        XDP_ATTACHED_MULTI if skb => Some(XdpAttachMode::Generic),
        _ => None,
    })
}

pub fn if_index(iface: &str) -> Result<u32, DataplaneError> {
    let unknown = || DataplaneError::UnknownInterface {
        iface: iface.to_owned(),
    };
    let c_name = std::ffi::CString::new(iface).map_err(|_| unknown())?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(unknown()),
        index => Ok(index),
    }
}

/// Detaches everything pinned under `pins` and removes the folder: links first (which detaches
/// the programs), then programs and maps. A netlink TC filter is deleted when it is in this
/// network namespace.
pub fn detach(pins: &Pins) -> Result<Vec<PathBuf>, DataplaneError> {
    // Netlink filters are no links: they are deleted, not unpinned.
    tc_hook::detach_netlink(pins);
    let mut removed = Vec::new();
    for dir in [pins.links(), pins.progs(), pins.maps()] {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DataplaneError::Io {
                    action: "reading",
                    path: dir,
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            remove_if_present(&entry.path())?;
            removed.push(entry.path());
        }
        let _ = fs::remove_dir(&dir);
    }
    let _ = fs::remove_dir(pins.root());
    Ok(removed)
}
