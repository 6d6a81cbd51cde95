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
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use fulgur_common::{defaults, map_names, program_names};

use crate::{EBPF_OBJECT, writer::Layout};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{path} is not on a bpffs mount (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
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
    #[error("interface {iface} does not exist")]
    UnknownInterface { iface: String },
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
    fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }
    fn xdp_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("xdp-{iface}"))
    }
    fn tc_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("tc-egress-{iface}"))
    }

    /// Creates the folders, refusing anything that is not on bpffs.
    pub fn create(&self) -> Result<(), DataplaneError> {
        for dir in [self.maps(), self.links(), self.progs()] {
            fs::create_dir_all(&dir).map_err(|source| DataplaneError::Io {
                action: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        if !is_bpffs(&self.root) {
            return Err(DataplaneError::NotBpffs {
                path: self.root.clone(),
            });
        }
        Ok(())
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

/// The loaded programs, with their maps pinned under `pins`.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub pins: Pins,
}

impl Dataplane {
    /// Loads the object, reusing maps already pinned under `pins`, and loads every program.
    pub fn load(pins: Pins, sizes: &Sizes) -> Result<Self, DataplaneError> {
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
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps());
        for (name, entries) in wanted {
            loader.map_max_entries(name, entries);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
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
    /// one (no packet sees a gap), and pins the links and programs.
    pub fn attach(&mut self, iface: &str, mode: XdpAttachMode) -> Result<(), DataplaneError> {
        let if_index = if_index(iface)?;
        let xdp_pin = self.pins.xdp_link(iface);
        let program = xdp_program(&mut self.ebpf, program_names::XDP_INGRESS)?;
        let err = |source| DataplaneError::Program {
            name: program_names::XDP_INGRESS,
            source,
        };
        let replaced = match PinnedLink::from_pin(&xdp_pin) {
            Ok(pinned) => XdpLink::try_from(FdLink::from(pinned))
                .ok()
                .and_then(|link| program.attach_to_link(link).ok()),
            Err(_) => None,
        };
        let link_id = match replaced {
            Some(id) => id,
            None => program
                .attach_to_if_index(if_index, mode.flags())
                .map_err(err)?,
        };
        let link: FdLink = program
            .take_link(link_id)
            .map_err(err)?
            .try_into()
            .map_err(|source| DataplaneError::Link {
                name: program_names::XDP_INGRESS,
                source,
            })?;
        pin_link(link, &xdp_pin)?;

        let tc_pin = self.pins.tc_link(iface);
        let program = tc_program(&mut self.ebpf)?;
        let err = |source| DataplaneError::Program {
            name: program_names::TC_EGRESS,
            source,
        };
        let replaced = match PinnedLink::from_pin(&tc_pin) {
            Ok(pinned) => SchedClassifierLink::try_from(FdLink::from(pinned))
                .ok()
                .and_then(|link| program.attach_to_link(link).ok()),
            Err(_) => None,
        };
        let link_id = match replaced {
            Some(id) => id,
            None => program
                .attach_with_options(
                    iface,
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(err)?,
        };
        let link: FdLink = program
            .take_link(link_id)
            .map_err(err)?
            .try_into()
            .map_err(|source| DataplaneError::Link {
                name: program_names::TC_EGRESS,
                source,
            })?;
        pin_link(link, &tc_pin)?;
        self.pin_programs()
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

fn pin_link(link: FdLink, path: &Path) -> Result<(), DataplaneError> {
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
/// the programs), then programs and maps.
pub fn detach(pins: &Pins) -> Result<Vec<PathBuf>, DataplaneError> {
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
