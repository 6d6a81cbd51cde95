//! The TC egress hook: tcx where the kernel has it (Linux 6.6 and later), else the clsact qdisc
//! with a cls_bpf filter attached over netlink.
//!
//! A tcx attachment is a bpf_link, pinned under `links/` and replaced in place like the XDP one.
//! A netlink filter is no bpf_link and cannot be pinned, but it needs no pin to outlive the
//! agent: the kernel keeps it until it is deleted. It sits at a fixed priority and handle, so
//! a restarted agent finds it again and replaces its program in place (a netlink change of an
//! existing cls_bpf filter swaps the program atomically). A symlink under `links/` says where
//! it is (network namespace, interface), for `detach` and `inspect`.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, Link as _, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use fulgur_common::program_names;

use crate::{
    dataplane::{DataplaneError, Pins, if_index, pin_link},
    netlink::{self, attributes},
};

/// Lower runs first: ahead of other filters, as tcx runs ahead of every clsact filter.
pub const FILTER_PRIORITY: u16 = 1;
/// Ours at that priority; other handles there belong to other tools.
pub const FILTER_HANDLE: u32 = 0xf17c;
/// clsact's egress parent, ffff:fff3.
const EGRESS_PARENT: u32 = 0xffff_fff3;

/// How `--tc-attach` asks for the TC egress program to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// tcx where the kernel has it, else clsact with a netlink filter. A restart keeps the hook
    /// already in place.
    Auto,
    /// tcx only (Linux 6.6 and later).
    Tcx,
    /// clsact with a netlink-attached filter (any kernel).
    Netlink,
}

/// The hook the TC egress program is attached with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcHook {
    Tcx,
    Netlink,
}

impl TcHook {
    pub fn name(self) -> &'static str {
        match self {
            TcHook::Tcx => "tcx",
            TcHook::Netlink => "netlink",
        }
    }
}

fn tcx_pin(pins: &Pins, iface: &str) -> PathBuf {
    pins.links().join(format!("tc-egress-{iface}"))
}

fn netlink_marker(pins: &Pins, iface: &str) -> PathBuf {
    pins.links().join(format!("tc-netlink-{iface}"))
}

fn hook_error(iface: &str, message: impl Into<String>) -> DataplaneError {
    DataplaneError::TcHook {
        iface: iface.to_owned(),
        message: message.into(),
    }
}

fn program_error(source: aya::programs::ProgramError) -> DataplaneError {
    DataplaneError::Program {
        name: program_names::TC_EGRESS,
        source,
    }
}

/// Attaches `program` to egress of `iface` as `wanted` says, adopting what a previous agent left
/// (in place, without a gap) or replacing the other hook (with a logged gap: the kernel would
/// run both programs otherwise).
pub(crate) fn attach(
    program: &mut SchedClassifier,
    pins: &Pins,
    iface: &str,
    wanted: TcAttach,
) -> Result<TcHook, DataplaneError> {
    let if_index = if_index(iface)?;
    let tcx_pin = tcx_pin(pins, iface);
    let pinned = match PinnedLink::from_pin(&tcx_pin) {
        Ok(pinned) => Some(pinned),
        Err(e) => {
            if tcx_pin.exists() {
                tracing::warn!(iface, "cannot open the pinned tcx link: {e}");
            }
            None
        }
    };
    let filter = our_filter(iface, if_index)?;
    let target = match wanted {
        TcAttach::Tcx => TcHook::Tcx,
        TcAttach::Netlink => TcHook::Netlink,
        TcAttach::Auto if pinned.is_some() => TcHook::Tcx,
        TcAttach::Auto if filter => {
            tracing::info!(
                iface,
                "keeping the netlink TC hook in place (--tc-attach tcx switches to tcx)"
            );
            TcHook::Netlink
        }
        TcAttach::Auto => {
            return match attach_tcx(program, iface, None, &tcx_pin) {
                Ok(()) => Ok(TcHook::Tcx),
                Err(tcx) => {
                    tracing::warn!(
                        iface,
                        "tcx is not available ({tcx}; it needs Linux 6.6): attaching to clsact \
                         with a netlink filter instead"
                    );
                    attach_netlink(program, pins, iface, if_index, false)
                        .map_err(|e| hook_error(iface, format!("tcx: {tcx}; netlink: {e}")))?;
                    Ok(TcHook::Netlink)
                }
            };
        }
    };
    let switch = |from: TcHook| {
        tracing::warn!(
            iface,
            "TC hook changes from {} to {}: the kernel would run both, so the old attachment is \
             removed first and packets leaving in between are not translated",
            from.name(),
            target.name()
        );
        Instant::now()
    };
    match target {
        TcHook::Tcx => {
            let gap = filter.then(|| switch(TcHook::Netlink));
            if gap.is_some() {
                remove_filter(iface)?;
            }
            if let Err(e) = attach_tcx(program, iface, pinned, &tcx_pin) {
                if gap.is_some() {
                    restore(
                        attach_netlink(program, pins, iface, if_index, false),
                        iface,
                        target,
                    );
                }
                return Err(e);
            }
            remove_if_present(&netlink_marker(pins, iface));
            log_gap(gap, iface, target);
        }
        TcHook::Netlink => {
            // Before the gap, not in it.
            add_clsact(iface)?;
            let gap = match pinned {
                Some(link) => {
                    let started = switch(TcHook::Tcx);
                    // Dropping the last reference to the link detaches it.
                    drop(link.unpin().map_err(|source| DataplaneError::Io {
                        action: "unpinning",
                        path: tcx_pin.clone(),
                        source,
                    })?);
                    Some(started)
                }
                None => None,
            };
            if let Err(e) = attach_netlink(program, pins, iface, if_index, filter) {
                if gap.is_some() {
                    restore(attach_tcx(program, iface, None, &tcx_pin), iface, target);
                }
                return Err(e);
            }
            log_gap(gap, iface, target);
        }
    }
    Ok(target)
}

fn restore(result: Result<(), DataplaneError>, iface: &str, failed: TcHook) {
    match result {
        Ok(()) => tracing::error!(
            iface,
            "attaching with {} failed; put back the previous TC hook",
            failed.name()
        ),
        Err(e) => tracing::error!(
            iface,
            "attaching with {} failed, and putting back the previous TC hook failed too ({e}): \
             replies leave untranslated",
            failed.name()
        ),
    }
}

fn log_gap(gap: Option<Instant>, iface: &str, hook: TcHook) {
    if let Some(started) = gap {
        tracing::warn!(
            iface,
            gap_us = started.elapsed().as_micros() as u64,
            "TC hook switched to {}",
            hook.name()
        );
    }
}

/// tcx: swaps the program into the pinned link when there is one, else creates and pins a link.
fn attach_tcx(
    program: &mut SchedClassifier,
    iface: &str,
    pinned: Option<PinnedLink>,
    pin: &Path,
) -> Result<(), DataplaneError> {
    let replaced = pinned.and_then(|pinned| {
        SchedClassifierLink::try_from(FdLink::from(pinned))
            .map_err(|e| e.to_string())
            .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()))
            .inspect_err(|e| tracing::warn!(iface, "cannot update the tcx link in place: {e}"))
            .ok()
    });
    let link_id = match replaced {
        Some(id) => id,
        None => program
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(program_error)?,
    };
    let link: FdLink = program
        .take_link(link_id)
        .map_err(program_error)?
        .try_into()
        .map_err(|source| DataplaneError::Link {
            name: program_names::TC_EGRESS,
            source,
        })?;
    pin_link(link, pin)
}

/// clsact and our filter: changes the filter's program in place when `replace`, else creates
/// the filter. The marker symlink records where it is.
fn attach_netlink(
    program: &mut SchedClassifier,
    pins: &Pins,
    iface: &str,
    if_index: u32,
    replace: bool,
) -> Result<(), DataplaneError> {
    add_clsact(iface)?;
    let handle = TcHandle::from(FILTER_HANDLE);
    let link_id = if replace {
        let link = SchedClassifierLink::attached(
            iface,
            TcAttachType::Egress,
            FILTER_PRIORITY,
            handle,
            None,
        )
        .map_err(|e| hook_error(iface, e.to_string()))?;
        program.attach_to_link(link)
    } else {
        program.attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(NlOptions {
                priority: FILTER_PRIORITY,
                handle,
                classid: None,
            }),
        )
    }
    .map_err(program_error)?;
    let link = program.take_link(link_id).map_err(program_error)?;
    // The filter is no fd: dropping its link would delete it, and it is to outlive the agent.
    std::mem::forget(link);
    let marker = netlink_marker(pins, iface);
    remove_if_present(&marker);
    let target = format!(
        "netns {} ifindex {if_index} egress prio {FILTER_PRIORITY} handle {:x}:{:x}",
        netns_id().unwrap_or(0),
        FILTER_HANDLE >> 16,
        FILTER_HANDLE & 0xffff
    );
    std::os::unix::fs::symlink(&target, &marker).map_err(|source| DataplaneError::Io {
        action: "recording the netlink filter at",
        path: marker,
        source,
    })
}

/// The qdisc that holds netlink TC filters; one that is there already is fine.
fn add_clsact(iface: &str) -> Result<(), DataplaneError> {
    match tc::qdisc_add_clsact(iface) {
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(hook_error(iface, format!("adding the clsact qdisc: {e}"))),
        Ok(()) => Ok(()),
    }
}

fn remove_if_present(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", path.display());
    }
}

/// This process's network namespace (the inode of /proc/self/ns/net).
fn netns_id() -> io::Result<u64> {
    fs::metadata("/proc/self/ns/net").map(|m| m.ino())
}

/// Whether our filter is on egress of `iface`; an error when the slot holds another program.
fn our_filter(iface: &str, if_index: u32) -> Result<bool, DataplaneError> {
    match query_filter(if_index) {
        Ok(None) => Ok(false),
        Ok(Some(name)) if name == program_names::TC_EGRESS => Ok(true),
        Ok(Some(name)) => Err(hook_error(
            iface,
            format!(
                "egress filter priority {FILTER_PRIORITY} handle {FILTER_HANDLE:#x} holds \
                 another program ({name:?}); remove it: tc filter del dev {iface} egress prio \
                 {FILTER_PRIORITY} handle {FILTER_HANDLE:#x} bpf"
            ),
        )),
        Err(e) => Err(hook_error(
            iface,
            format!("reading the egress filters: {e}"),
        )),
    }
}

fn remove_filter(iface: &str) -> Result<(), DataplaneError> {
    SchedClassifierLink::attached(
        iface,
        TcAttachType::Egress,
        FILTER_PRIORITY,
        TcHandle::from(FILTER_HANDLE),
        None,
    )
    .map_err(|e| hook_error(iface, e.to_string()))?
    .detach()
    .map_err(program_error)
}

/// The hook in use on `iface`, as the kernel shows it: a live pinned tcx link, or our filter.
pub fn in_use(pins: &Pins, iface: &str) -> Option<TcHook> {
    if PinnedLink::from_pin(tcx_pin(pins, iface)).is_ok() {
        return Some(TcHook::Tcx);
    }
    let if_index = if_index(iface).ok()?;
    matches!(our_filter(iface, if_index), Ok(true)).then_some(TcHook::Netlink)
}

/// The interfaces named under `links/` (`xdp-IFACE`, `tc-egress-IFACE`, `tc-netlink-IFACE`).
pub fn attached_ifaces(pins: &Pins) -> Vec<String> {
    let mut ifaces: Vec<String> = fs::read_dir(pins.links())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            ["xdp-", "tc-egress-", "tc-netlink-"]
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix).map(str::to_owned))
        })
        .collect();
    ifaces.sort();
    ifaces.dedup();
    ifaces
}

/// Deletes the netlink filters the markers under `links/` name, in this network namespace;
/// a filter in another one is left (it goes with its namespace) with a warning.
pub(crate) fn detach_netlink(pins: &Pins) {
    let own_netns = netns_id().unwrap_or(0);
    for iface in attached_ifaces(pins) {
        let marker = netlink_marker(pins, &iface);
        let Ok(target) = fs::read_link(&marker) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let words: Vec<&str> = target.split_whitespace().collect();
        let field = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("netns") != Some(own_netns) {
            tracing::warn!(
                iface,
                "the netlink TC filter ({target}) is in another network namespace: not removed \
                 (it goes with that namespace; or run detach there, with nsenter --net)"
            );
            continue;
        }
        let here = if_index(&iface).ok();
        if here.map(u64::from) != field("ifindex") {
            tracing::warn!(
                iface,
                "the interface of the netlink TC filter ({target}) is gone"
            );
            continue;
        }
        match here.map(|i| our_filter(&iface, i)) {
            Some(Ok(true)) => match remove_filter(&iface) {
                Ok(()) => tracing::info!(iface, "removed the netlink TC filter"),
                Err(e) => tracing::warn!(iface, "removing the netlink TC filter: {e}"),
            },
            Some(Err(e)) => tracing::warn!(iface, "{e}"),
            _ => {}
        }
    }
}

/// The name of the bpf program in our egress filter on `if_index`, if that filter exists
/// (RTM_GETTFILTER for exactly our priority and handle).
fn query_filter(if_index: u32) -> io::Result<Option<String>> {
    const TCMSG: usize = 20; // struct tcmsg
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_NAME: u16 = 7;

    let mut tcmsg = [0u8; TCMSG];
    tcmsg[4..8].copy_from_slice(&(if_index as i32).to_ne_bytes());
    tcmsg[8..12].copy_from_slice(&FILTER_HANDLE.to_ne_bytes());
    tcmsg[12..16].copy_from_slice(&EGRESS_PARENT.to_ne_bytes());
    let protocol = u32::from((libc::ETH_P_ALL as u16).to_be());
    let info = (u32::from(FILTER_PRIORITY) << 16) | protocol;
    tcmsg[16..20].copy_from_slice(&info.to_ne_bytes());
    let messages = match netlink::request(libc::NETLINK_ROUTE, libc::RTM_GETTFILTER, 0, &tcmsg) {
        // No such filter (ENOENT), or no clsact qdisc to hold one (EINVAL).
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
            return Ok(None);
        }
        answer => answer?,
    };
    let message = messages
        .iter()
        .find(|m| netlink::u16_at(m, 4) == libc::RTM_NEWTFILTER)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no filter in the answer"))?;
    let attrs = message.get(netlink::HEADER + TCMSG..).unwrap_or(&[]);
    let kind = attributes(attrs)
        .find(|(k, _)| *k == TCA_KIND)
        .map(|(_, v)| v);
    if kind != Some(b"bpf\0".as_slice()) {
        let kind = kind.map(|k| String::from_utf8_lossy(k).trim_end_matches('\0').to_owned());
        return Ok(Some(format!("a {} filter", kind.unwrap_or_default())));
    }
    let name = attributes(attrs)
        .find(|(k, _)| *k == TCA_OPTIONS)
        .and_then(|(_, options)| attributes(options).find(|(k, _)| *k == TCA_BPF_NAME))
        .map(|(_, v)| String::from_utf8_lossy(v).trim_end_matches('\0').to_owned());
    Ok(Some(name.unwrap_or_else(|| "an unnamed bpf filter".into())))
}
