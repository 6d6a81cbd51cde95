//! Backend selection: conntrack first, so a flow keeps its backend; otherwise the service's
//! lookup table indexed by the flow hash. A table slot may say "reject".

use fulgur_common::{
    Addr, BACKEND_LIVE, Backend, ConntrackValue, Counter, FlowKey, REJECT, ReverseNatValue,
    ServiceValue, addr_eq, hash::flow_hash, lookup_position,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, LOOKUP, REVNAT},
    snat,
    stats::{self, count},
};

/// The backend a packet goes to.
pub struct Target {
    pub id: u32,
    pub addr: Addr,
    pub port: u16,
}

pub enum Choice {
    Forward(Target),
    /// Not in conntrack, and SNAT may apply to the service: the SNAT path looks further
    /// ([`crate::snat::flow`]).
    Snat,
    /// No usable backend, or the flow fell on the reject weight.
    Reject,
    /// Not in conntrack, and the frame is for another host's MAC (flooded by a switch): not
    /// a flow for this node to start.
    OtherHost,
}

#[inline(always)]
fn still_valid(ct: &ConntrackValue, service: &ServiceValue) -> Option<Target> {
    let backend = BACKENDS.get(ct.backend_id)?;
    let same = backend.flags & BACKEND_LIVE != 0
        && backend.service_id == service.id
        && backend.port == ct.backend_port
        && addr_eq(&backend.addr, &ct.backend_addr);
    same.then_some(Target {
        id: ct.backend_id,
        addr: backend.addr,
        port: backend.port,
    })
}

/// A tracked flow goes on to its backend; any other starts here only when its frame was
/// addressed to this node (`addressed_here`, asked on a conntrack miss only; the SNAT path
/// asks it of its own new flows, after its flow map).
#[inline(always)]
pub fn choose(
    flow: &FlowKey,
    service: &ServiceValue,
    addressed_here: impl FnOnce() -> bool,
) -> Choice {
    // SAFETY: LRU values are only read here; a concurrent rewrite yields a stale but whole flow.
    if let Some(ct) = unsafe { CONNTRACK.get(flow) }
        && let Some(target) = still_valid(ct, service)
    {
        return Choice::Forward(target);
    }
    // SNATed flows are never in conntrack: their own map is looked up on the SNAT path, by
    // services that may have them.
    if snat::config().is_some_and(|config| config.may_apply_to(service.flags)) {
        return Choice::Snat;
    }
    if !addressed_here() {
        return Choice::OtherHost;
    }
    match pick(flow, service) {
        Some((target, backend)) => {
            remember(flow, service, target.id, backend);
            Choice::Forward(target)
        }
        None => Choice::Reject,
    }
}

/// A new flow's backend by the service's lookup table; `None`: reject.
#[inline(always)]
pub fn pick(flow: &FlowKey, service: &ServiceValue) -> Option<(Target, &'static Backend)> {
    if service.table_size == 0 {
        return None;
    }
    let (entry, half) = lookup_position(service.slot(flow_hash(flow)));
    let backend_id = LOOKUP.get(entry)?[half];
    if backend_id == REJECT {
        return None;
    }
    let backend = BACKENDS.get(backend_id)?;
    if backend.flags & BACKEND_LIVE == 0 || backend.service_id != service.id {
        return None;
    }
    Some((
        Target {
            id: backend_id,
            addr: backend.addr,
            port: backend.port,
        },
        backend,
    ))
}

/// Records the choice both ways: the client flow, and the backend's reply flow.
#[inline(always)]
pub fn remember(flow: &FlowKey, service: &ServiceValue, backend_id: u32, backend: &Backend) {
    let tracked = ConntrackValue {
        backend_id,
        service_id: service.id,
        backend_addr: backend.addr,
        backend_port: backend.port,
        pad: [0; 6],
    };
    let reply = FlowKey {
        src: backend.addr,
        dst: flow.src,
        src_port: backend.port,
        dst_port: flow.src_port,
        proto: flow.proto,
        family: flow.family,
        pad: [0; 2],
    };
    let restore = ReverseNatValue {
        vip: flow.dst,
        vip_port: flow.dst_port,
        pad: [0; 2],
        service_id: service.id,
    };
    if CONNTRACK.insert(flow, tracked, 0).is_err() || REVNAT.insert(reply, restore, 0).is_err() {
        count(Counter::ConntrackFull);
        crate::log::conntrack_full(flow);
    }
    count(Counter::NewFlow);
    stats::new_flow(service.id, backend_id);
}
