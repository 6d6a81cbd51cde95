//! Gateway API semantics for TCPRoute and UDPRoute: a pure function from a [`Snapshot`] to the
//! dataplane's desired services and every object's status. No I/O, no clock (the caller passes
//! `now`), deterministic order.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use fulgur_proto::v1;

use crate::{
    gateway_api::{ConditionType, GROUP, Reason},
    model::{
        Announcement, Announcements, BackendRef, Condition, Dataplane, EndpointSlice,
        FromNamespaces, Gateway, Listener, ObjectRef, ParentRef, Route, RouteGroupKind, RouteKind,
        Service, Snapshot,
    },
};

/// Features this implementation supports, sorted (GatewayClass `status.supportedFeatures`).
pub const SUPPORTED_FEATURES: [&str; 5] = [
    "Gateway",
    "GatewayStaticAddresses",
    "ReferenceGrant",
    "TCPRoute",
    "UDPRoute",
];
/// The dataplane's weight ceiling (the contract's limit); endpoint weights are scaled to fit
/// under it.
const MAX_WEIGHT: f64 = fulgur_common::limits::MAX_WEIGHT as f64;

pub struct Config<'a> {
    pub controller_name: &'a str,
    /// Pools for Gateways without `spec.addresses`.
    pub address_pools: &'a [ipnet::IpNet],
    /// RFC 3339 time stamped on conditions that change now.
    pub now: &'a str,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassStatus {
    pub conditions: Vec<Condition>,
    pub supported_features: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerStatus {
    pub name: String,
    pub supported_kinds: Vec<RouteGroupKind>,
    pub attached_routes: i32,
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayStatus {
    pub addresses: Vec<IpAddr>,
    pub conditions: Vec<Condition>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteParentStatus {
    pub parent_ref: ParentRef,
    pub controller_name: String,
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteStatus {
    pub parents: Vec<RouteParentStatus>,
}

/// What a backendRef of a route that carries traffic resolves to in the dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BackendRefState {
    /// At least one ready endpoint in every address family the route serves.
    Ready,
    /// A valid Service without ready endpoints (in some family the route serves): legal, but
    /// its weight is rejected, while ResolvedRefs stays True.
    NoEndpoints,
    /// Not resolvable (ResolvedRefs False): its weight is rejected.
    Invalid,
}

impl BackendRefState {
    pub fn label(self) -> &'static str {
        match self {
            BackendRefState::Ready => "ready",
            BackendRefState::NoEndpoints => "no_endpoints",
            BackendRefState::Invalid => "invalid",
        }
    }
}

/// A backendRef of a route: the route, and the Service it names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendRefKey {
    pub route_kind: RouteKind,
    pub route: ObjectRef,
    pub service: ObjectRef,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Output {
    /// What every node's agent must run, before [`node_services`] marks remote backends.
    pub services: Vec<v1::Service>,
    /// The node of each endpoint whose EndpointSlice names one (`endpoints[].nodeName`).
    pub endpoint_nodes: BTreeMap<IpAddr, String>,
    /// The Gateway addresses served: each must be announced by exactly one node.
    pub announce: BTreeSet<IpAddr>,
    /// The backendRefs of the routes that receive traffic, by what they resolve to.
    pub backend_refs: BTreeMap<BackendRefKey, BackendRefState>,
    pub classes: BTreeMap<String, ClassStatus>,
    pub gateways: BTreeMap<ObjectRef, GatewayStatus>,
    pub routes: BTreeMap<(RouteKind, ObjectRef), RouteStatus>,
}

/// Builds conditions, keeping lastTransitionTime when a condition did not change.
struct Conditions<'a> {
    previous: &'a [Condition],
    generation: i64,
    now: &'a str,
    out: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    fn new(snapshot: &'a Snapshot, key: &str, generation: i64, now: &'a str) -> Self {
        let previous = snapshot
            .previous_conditions
            .get(key)
            .map_or(&[][..], Vec::as_slice);
        Conditions {
            previous,
            generation,
            now,
            out: Vec::new(),
        }
    }

    fn set(
        &mut self,
        type_: ConditionType,
        status: bool,
        reason: Reason,
        message: impl Into<String>,
    ) {
        let (type_, reason) = (type_.as_str(), reason.as_str());
        let last_transition_time = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status && c.reason == reason)
            .map_or_else(|| self.now.to_owned(), |c| c.last_transition_time.clone());
        self.out.push(Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            observed_generation: self.generation,
            last_transition_time,
        });
    }

    fn done(self) -> Vec<Condition> {
        self.out
    }
}

/// Condition keys in `Snapshot::previous_conditions`.
pub fn class_key(name: &str) -> String {
    format!("GatewayClass/{name}")
}
pub fn gateway_key(id: &ObjectRef) -> String {
    format!("Gateway/{id}")
}
pub fn listener_key(id: &ObjectRef, listener: &str) -> String {
    format!("Gateway/{id}/{listener}")
}
pub fn route_key(kind: RouteKind, id: &ObjectRef, parent: &ParentRef) -> String {
    let namespace = parent.namespace.as_deref().unwrap_or(&id.namespace);
    let section = parent.section_name.as_deref().unwrap_or("");
    let port = parent.port.map(|p| p.to_string()).unwrap_or_default();
    format!(
        "{}/{id}/{namespace}/{}/{section}/{port}",
        kind.kind(),
        parent.name
    )
}

/// A listener after validation.
struct ValidListener<'a> {
    listener: &'a Listener,
    kind: Option<RouteKind>,
    /// Accepted and not conflicted: routes may attach.
    usable: bool,
    attached: i32,
}

fn supported_kinds(listener: &Listener) -> (Vec<RouteGroupKind>, bool) {
    let derived = RouteKind::for_protocol(&listener.protocol);
    if listener.kinds.is_empty() {
        let kinds = derived
            .map(|k| {
                vec![RouteGroupKind {
                    group: GROUP.into(),
                    kind: k.kind().into(),
                }]
            })
            .unwrap_or_default();
        return (kinds, true);
    }
    let mut all_valid = true;
    let mut kinds = Vec::new();
    for k in &listener.kinds {
        let group_ok = k.group.is_empty() || k.group == GROUP;
        if group_ok && derived.is_some_and(|d| d.kind() == k.kind) {
            kinds.push(RouteGroupKind {
                group: GROUP.into(),
                kind: k.kind.clone(),
            });
        } else {
            all_valid = false;
        }
    }
    (kinds, all_valid)
}

/// Whether `route` (in its namespace) may attach to `listener` of `gateway` by namespace.
fn namespace_allowed(
    snapshot: &Snapshot,
    gateway: &Gateway,
    listener: &Listener,
    route: &Route,
) -> bool {
    match &listener.from {
        FromNamespaces::Same => route.id.namespace == gateway.id.namespace,
        FromNamespaces::All => true,
        FromNamespaces::Selector(selector) => snapshot
            .namespaces
            .get(&route.id.namespace)
            .is_some_and(|labels| selector.matches(labels)),
    }
}

fn granted(snapshot: &Snapshot, route: &Route, backend: &BackendRef, namespace: &str) -> bool {
    namespace == route.id.namespace
        || snapshot.grants.iter().any(|g| {
            g.namespace == namespace
                && g.from.iter().any(|(group, kind, ns)| {
                    group == GROUP && kind == route.kind.kind() && *ns == route.id.namespace
                })
                && g.to.iter().any(|(group, kind, name)| {
                    group.is_empty()
                        && kind == "Service"
                        && name.as_ref().is_none_or(|n| *n == backend.name)
                })
        })
}

/// Why a backendRef does not resolve (its weight is rejected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unresolved {
    NotFound,
    NotPermitted,
    InvalidKind,
    /// The Service port speaks another protocol than the route (a TCPRoute to a UDP port).
    UnsupportedProtocol,
}

/// What translate looks up per backendRef, indexed once per run (a scan per ref made a
/// cluster of 10,000 routes cost seconds).
struct Index<'a> {
    services: BTreeMap<&'a ObjectRef, &'a Service>,
    /// (namespace, service name) → its EndpointSlices
    slices: BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl<'a> Index<'a> {
    fn new(snapshot: &'a Snapshot) -> Self {
        let mut slices: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for slice in &snapshot.endpoint_slices {
            slices
                .entry((slice.namespace.as_str(), slice.service_name.as_str()))
                .or_default()
                .push(slice);
        }
        Index {
            services: snapshot.services.iter().map(|s| (&s.id, s)).collect(),
            slices,
        }
    }
}

/// The endpoints a backendRef reaches, in the VIP's family: `Err` when the ref itself is
/// invalid, `Ok(empty)` for a valid Service without ready endpoints.
fn resolve(
    snapshot: &Snapshot,
    index: &Index,
    route: &Route,
    backend: &BackendRef,
    v6: bool,
) -> Result<Vec<(IpAddr, u16)>, Unresolved> {
    if !(backend.group.is_empty() || backend.group == "core") || backend.kind != "Service" {
        return Err(Unresolved::InvalidKind);
    }
    let namespace = backend.namespace.as_deref().unwrap_or(&route.id.namespace);
    if !granted(snapshot, route, backend, namespace) {
        return Err(Unresolved::NotPermitted);
    }
    let id = ObjectRef::new(namespace, &backend.name);
    let service = *index.services.get(&id).ok_or(Unresolved::NotFound)?;
    let Some(port) = backend.port else {
        return Err(Unresolved::NotFound);
    };
    // A Service may carry one port number for TCP and for UDP (DNS does): take the route's.
    let route_protocol = route.kind.protocol();
    let mut numbered = service.ports.iter().filter(|p| p.port == port).peekable();
    if numbered.peek().is_none() {
        return Err(Unresolved::NotFound);
    }
    let Some(service_port) = numbered.find(|p| p.protocol == route_protocol) else {
        return Err(Unresolved::UnsupportedProtocol);
    };
    let mut endpoints = BTreeSet::new();
    let slices = index.slices.get(&(namespace, backend.name.as_str()));
    for slice in slices.into_iter().flatten() {
        // The slice port with the Service port's name carries the target port.
        let Some((_, target)) = slice
            .ports
            .iter()
            .find(|(name, _)| *name == service_port.name)
        else {
            continue;
        };
        for address in slice.ready_addresses.iter().filter(|a| a.is_ipv6() == v6) {
            endpoints.insert((*address, *target));
        }
    }
    Ok(endpoints.into_iter().collect())
}

/// Which listeners of `gateway` a parentRef selects.
fn selects(parent: &ParentRef, listener: &Listener) -> bool {
    parent
        .section_name
        .as_ref()
        .is_none_or(|s| *s == listener.name)
        && parent.port.is_none_or(|p| p == listener.port)
}

impl Gateway {
    /// How many addresses it asks the pools for: one per `{type: IPAddress}` without a value,
    /// or one when it lists no address at all.
    fn pool_requests(&self) -> usize {
        if self.addresses.is_empty() {
            return 1;
        }
        self.addresses
            .iter()
            .filter(|a| a.kind == "IPAddress" && a.value.is_none())
            .count()
    }

    /// The addresses it lists.
    fn static_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses
            .iter()
            .filter(|a| a.kind == "IPAddress")
            .filter_map(|a| a.value.as_deref()?.parse().ok())
    }
}

/// The pool addresses a Gateway was given before and may keep: still in a pool, not listed
/// statically, and no more than it asks for.
fn previous_pooled(config: &Config, snapshot: &Snapshot, gateway: &Gateway) -> Vec<IpAddr> {
    let listed: BTreeSet<IpAddr> = gateway.static_addresses().collect();
    snapshot
        .previous_addresses
        .get(&gateway.id)
        .into_iter()
        .flatten()
        .filter(|a| !listed.contains(a) && config.address_pools.iter().any(|p| p.contains(*a)))
        .take(gateway.pool_requests())
        .copied()
        .collect()
}

/// Allocates a Gateway's pool addresses, keeping earlier assignments.
fn assign_addresses(
    config: &Config,
    snapshot: &Snapshot,
    gateway: &Gateway,
    taken: &mut BTreeSet<IpAddr>,
) -> Vec<IpAddr> {
    // Earlier assignments were reserved up front (see `translate`), so keeping them is safe.
    let mut assigned = previous_pooled(config, snapshot, gateway);
    let mut free = config
        .address_pools
        .iter()
        .flat_map(|pool| pool.hosts())
        .filter(|a| !taken.contains(a));
    while assigned.len() < gateway.pool_requests() {
        let Some(address) = free.next() else { break };
        assigned.push(address);
    }
    taken.extend(assigned.iter().copied());
    assigned
}

pub fn translate(config: &Config, snapshot: &Snapshot) -> Output {
    let ours = our_classes(config, snapshot);
    let gateways = our_gateways(snapshot, &ours);
    let lookup = Index::new(snapshot);
    // Routes, oldest first: the oldest attached to a listener receives its traffic.
    let routes = oldest_first(&snapshot.routes);

    let addresses = gateway_addresses(config, snapshot, &gateways);
    let mut listeners: BTreeMap<ObjectRef, GatewayListeners> = gateways
        .iter()
        .map(|g| (g.id.clone(), validate_listeners(config, snapshot, g)))
        .collect();
    let (routes, winners) = attach_routes(
        config,
        snapshot,
        &lookup,
        &gateways,
        &mut listeners,
        &routes,
    );
    let gateway_statuses = gateways
        .iter()
        .map(|g| {
            let status = gateway_status(config, snapshot, g, &addresses[&g.id], &listeners[&g.id]);
            (g.id.clone(), status)
        })
        .collect();
    let endpoint_nodes = snapshot
        .endpoint_slices
        .iter()
        .flat_map(|slice| slice.nodes.iter().map(|(a, n)| (*a, n.clone())))
        .collect();
    let (services, backend_refs, shortfalls) = dataplane_services(
        snapshot,
        &lookup,
        &listeners,
        &addresses,
        &winners,
        &endpoint_nodes,
    );
    let mut routes = routes;
    report_shortfalls(config, snapshot, &addresses, &shortfalls, &mut routes);
    Output {
        services,
        endpoint_nodes,
        announce: addresses
            .values()
            .flat_map(|a| a.served().iter().copied())
            .collect(),
        backend_refs,
        classes: class_statuses(config, snapshot, &ours),
        gateways: gateway_statuses,
        routes,
    }
}

/// The GatewayClasses this controller handles.
fn our_classes<'a>(config: &Config, snapshot: &'a Snapshot) -> BTreeSet<&'a str> {
    snapshot
        .classes
        .iter()
        .filter(|c| c.controller_name == config.controller_name)
        .map(|c| c.name.as_str())
        .collect()
}

fn class_statuses(
    config: &Config,
    snapshot: &Snapshot,
    ours: &BTreeSet<&str>,
) -> BTreeMap<String, ClassStatus> {
    let mut statuses = BTreeMap::new();
    for class in snapshot
        .classes
        .iter()
        .filter(|c| ours.contains(c.name.as_str()))
    {
        let mut conditions = Conditions::new(
            snapshot,
            &class_key(&class.name),
            class.meta.generation,
            config.now,
        );
        conditions.set(
            ConditionType::Accepted,
            true,
            Reason::Accepted,
            "handled by fulgur",
        );
        statuses.insert(
            class.name.clone(),
            ClassStatus {
                conditions: conditions.done(),
                supported_features: SUPPORTED_FEATURES.iter().map(|s| (*s).to_owned()).collect(),
            },
        );
    }
    statuses
}

/// Gateways of our classes, by namespace/name.
fn our_gateways<'a>(snapshot: &'a Snapshot, ours: &BTreeSet<&str>) -> Vec<&'a Gateway> {
    let mut gateways: Vec<&Gateway> = snapshot
        .gateways
        .iter()
        .filter(|g| ours.contains(g.class_name.as_str()))
        .collect();
    gateways.sort_by(|a, b| a.id.cmp(&b.id));
    gateways
}

/// Objects by age: creationTimestamp, then namespace/name.
fn oldest_first<'a, T: Aged>(items: impl IntoIterator<Item = &'a T>) -> Vec<&'a T> {
    let mut items: Vec<&T> = items.into_iter().collect();
    items.sort_by(|a, b| a.age().cmp(&b.age()));
    items
}

trait Aged {
    fn age(&self) -> (&str, &ObjectRef);
}

impl Aged for Route {
    fn age(&self) -> (&str, &ObjectRef) {
        (&self.meta.creation_timestamp, &self.id)
    }
}

impl Aged for Gateway {
    fn age(&self) -> (&str, &ObjectRef) {
        (&self.meta.creation_timestamp, &self.id)
    }
}

/// A Gateway's addresses, and what kept others from it.
struct Addresses {
    /// Listed statically and owned, then from the pools.
    assigned: Vec<IpAddr>,
    /// Types other than IPAddress, and values that are not addresses.
    unsupported: Vec<String>,
    /// Static addresses an older Gateway owns.
    not_usable: Vec<String>,
    /// The pools could not give every address asked for.
    pool_short: bool,
}

impl Addresses {
    /// What the dataplane serves: nothing while any address is unsupported.
    fn served(&self) -> &[IpAddr] {
        if self.unsupported.is_empty() {
            &self.assigned
        } else {
            &[]
        }
    }
}

fn gateway_addresses(
    config: &Config,
    snapshot: &Snapshot,
    gateways: &[&Gateway],
) -> BTreeMap<ObjectRef, Addresses> {
    // Static addresses first, so pools never hand out one of them.
    let mut taken: BTreeSet<IpAddr> = snapshot
        .gateways
        .iter()
        .flat_map(Gateway::static_addresses)
        .collect();
    // A static address belongs to the oldest of our Gateways that lists it; for the others it
    // is not usable (two Gateways on one address would program the same VIP twice).
    let mut static_owner: BTreeMap<IpAddr, &ObjectRef> = BTreeMap::new();
    for gateway in oldest_first(gateways.iter().copied()) {
        for address in gateway.static_addresses() {
            static_owner.entry(address).or_insert(&gateway.id);
        }
    }
    // Pool addresses handed out before stay with their Gateways.
    for gateway in gateways {
        taken.extend(previous_pooled(config, snapshot, gateway));
    }
    let mut all = BTreeMap::new();
    for gateway in gateways {
        // A value-less IPAddress asks the pools; any other type, or a value that is not an
        // address, is not supported.
        let unsupported: Vec<String> = gateway
            .addresses
            .iter()
            .filter(|a| {
                a.kind != "IPAddress"
                    || a.value
                        .as_deref()
                        .is_some_and(|v| v.parse::<IpAddr>().is_err())
            })
            .map(|a| match &a.value {
                Some(value) => value.clone(),
                None => format!("any {}", a.kind),
            })
            .collect();
        let mut not_usable = Vec::new();
        let mut assigned = Vec::new();
        for address in gateway.static_addresses() {
            match static_owner.get(&address) {
                Some(owner) if **owner != gateway.id => {
                    not_usable.push(format!("{address} is used by Gateway {owner}"))
                }
                _ => assigned.push(address),
            }
        }
        let pooled = assign_addresses(config, snapshot, gateway, &mut taken);
        let pool_short = pooled.len() < gateway.pool_requests();
        assigned.extend(pooled);
        all.insert(
            gateway.id.clone(),
            Addresses {
                assigned,
                unsupported,
                not_usable,
                pool_short,
            },
        );
    }
    all
}

/// A Gateway's listeners after validation, and their statuses (attachedRoutes filled in
/// after attachment).
struct GatewayListeners<'a> {
    valid: Vec<ValidListener<'a>>,
    statuses: Vec<ListenerStatus>,
}

/// Listener conditions. Port use by protocol family: TCP/UDP listeners conflict with others of
/// the same layer-4 protocol on the port, and TCP with HTTP, HTTPS and TLS.
fn validate_listeners<'a>(
    config: &Config,
    snapshot: &Snapshot,
    gateway: &'a Gateway,
) -> GatewayListeners<'a> {
    let mut listeners = Vec::new();
    let mut statuses = Vec::new();
    for listener in &gateway.listeners {
        let mut c = Conditions::new(
            snapshot,
            &listener_key(&gateway.id, &listener.name),
            gateway.meta.generation,
            config.now,
        );
        let (kinds, kinds_valid) = supported_kinds(listener);
        let kind = RouteKind::for_protocol(&listener.protocol);
        let same_port = |pred: &dyn Fn(&Listener) -> bool| {
            gateway
                .listeners
                .iter()
                .any(|o| !std::ptr::eq(o, listener) && o.port == listener.port && pred(o))
        };
        let conflicted = match listener.protocol.as_str() {
            "TCP" => {
                same_port(&|o| matches!(o.protocol.as_str(), "TCP" | "HTTP" | "HTTPS" | "TLS"))
            }
            "UDP" => same_port(&|o| o.protocol == "UDP"),
            "HTTP" | "HTTPS" | "TLS" => same_port(&|o| o.protocol == "TCP"),
            _ => false,
        };
        let accepted = kind.is_some();
        if accepted {
            c.set(ConditionType::Accepted, true, Reason::Accepted, "");
        } else {
            c.set(
                ConditionType::Accepted,
                false,
                Reason::UnsupportedProtocol,
                format!("protocol {} is not supported", listener.protocol),
            );
        }
        if conflicted {
            c.set(
                ConditionType::Conflicted,
                true,
                Reason::ProtocolConflict,
                format!("port {} is used by another listener", listener.port),
            );
        } else {
            c.set(ConditionType::Conflicted, false, Reason::NoConflicts, "");
        }
        if kinds_valid {
            c.set(ConditionType::ResolvedRefs, true, Reason::ResolvedRefs, "");
        } else {
            c.set(
                ConditionType::ResolvedRefs,
                false,
                Reason::InvalidRouteKinds,
                "only TCPRoute for TCP and UDPRoute for UDP listeners",
            );
        }
        let usable = accepted && !conflicted;
        c.set(
            ConditionType::Programmed,
            usable,
            if usable {
                Reason::Programmed
            } else {
                Reason::Invalid
            },
            "",
        );
        listeners.push(ValidListener {
            listener,
            kind,
            usable,
            attached: 0,
        });
        statuses.push(ListenerStatus {
            name: listener.name.clone(),
            supported_kinds: kinds,
            attached_routes: 0,
            conditions: c.done(),
        });
    }

    GatewayListeners {
        valid: listeners,
        statuses,
    }
}

fn gateway_status(
    config: &Config,
    snapshot: &Snapshot,
    gateway: &Gateway,
    addresses: &Addresses,
    listeners: &GatewayListeners,
) -> GatewayStatus {
    let mut g = Conditions::new(
        snapshot,
        &gateway_key(&gateway.id),
        gateway.meta.generation,
        config.now,
    );
    let listeners_valid = listeners.valid.iter().all(|l| l.usable);
    if !addresses.unsupported.is_empty() {
        g.set(
            ConditionType::Accepted,
            false,
            Reason::UnsupportedAddress,
            format!(
                "unsupported addresses: {}",
                addresses.unsupported.join(", ")
            ),
        );
    } else if listeners_valid {
        g.set(ConditionType::Accepted, true, Reason::Accepted, "");
    } else {
        g.set(
            ConditionType::Accepted,
            true,
            Reason::ListenersNotValid,
            "some listeners are not valid",
        );
    }
    if !addresses.not_usable.is_empty() {
        g.set(
            ConditionType::Programmed,
            false,
            Reason::AddressNotUsable,
            addresses.not_usable.join(", "),
        );
    } else if addresses.assigned.is_empty() || addresses.pool_short {
        g.set(
            ConditionType::Programmed,
            false,
            Reason::AddressNotAssigned,
            if config.address_pools.is_empty() {
                "an address is asked for, and no --address-pool is configured"
            } else {
                "an address is asked for, and none is free in the pools"
            },
        );
    } else if !addresses.unsupported.is_empty() {
        g.set(ConditionType::Programmed, false, Reason::Invalid, "");
    } else {
        match &snapshot.dataplane {
            Dataplane::Programmed => set_announced(&mut g, snapshot, addresses.served()),
            Dataplane::Pending(why) => g.set(
                ConditionType::Programmed,
                false,
                Reason::Pending,
                why.clone(),
            ),
            Dataplane::NoResources(why) => g.set(
                ConditionType::Programmed,
                false,
                Reason::NoResources,
                why.clone(),
            ),
            Dataplane::Invalid(why) => g.set(
                ConditionType::Programmed,
                false,
                Reason::Invalid,
                why.clone(),
            ),
        }
    }
    let mut statuses = listeners.statuses.clone();
    for (status, listener) in statuses.iter_mut().zip(&listeners.valid) {
        status.attached_routes = listener.attached;
    }
    GatewayStatus {
        addresses: addresses.assigned.clone(),
        conditions: g.done(),
        listeners: statuses,
    }
}

/// Programmed once the agents run the state: True only while an in-sync agent announces each
/// of the Gateway's addresses (the first that is not says why).
fn set_announced(g: &mut Conditions, snapshot: &Snapshot, served: &[IpAddr]) {
    let checked = match &snapshot.announcements {
        Announcements::NotChecked => {
            return g.set(ConditionType::Programmed, true, Reason::Programmed, "");
        }
        Announcements::Checked(checked) => checked,
    };
    let mut announced = Vec::new();
    for address in served {
        let (reason, message) = match checked.get(address) {
            Some(Announcement::Announced { node }) => {
                announced.push(format!("{address} by node {node}"));
                continue;
            }
            Some(Announcement::Assigned { node }) => (
                Reason::Pending,
                format!("{address} is given to the agent on node {node}, not applied yet"),
            ),
            Some(Announcement::FailingOver { node }) => (
                Reason::FailingOver,
                format!(
                    "{address}: the agent on node {node} that announced it is lost; \
                     another in-sync agent takes it over after the failover bound"
                ),
            ),
            Some(Announcement::NoAnnouncer(why)) => {
                (Reason::NoAnnouncer, format!("{address}: {why}"))
            }
            None => (
                Reason::Pending,
                format!("{address} is not assigned to an agent yet"),
            ),
        };
        return g.set(ConditionType::Programmed, false, reason, message);
    }
    g.set(
        ConditionType::Programmed,
        true,
        Reason::Programmed,
        format!("announced: {}", announced.join(", ")),
    );
}

/// Route statuses per parent, and the winning (oldest attached) route of each listener.
type Winners<'a> = BTreeMap<(ObjectRef, usize), &'a Route>;

fn attach_routes<'a>(
    config: &Config,
    snapshot: &Snapshot,
    lookup: &Index,
    gateways: &[&Gateway],
    listener_state: &mut BTreeMap<ObjectRef, GatewayListeners<'a>>,
    routes: &[&'a Route],
) -> (BTreeMap<(RouteKind, ObjectRef), RouteStatus>, Winners<'a>) {
    let gateway_by_id: BTreeMap<&ObjectRef, &Gateway> =
        gateways.iter().map(|g| (&g.id, *g)).collect();
    let mut statuses = BTreeMap::new();
    let mut winners: Winners = BTreeMap::new();
    for route in routes {
        let mut parents = Vec::new();
        for parent in &route.parent_refs {
            if !(parent.group == GROUP && parent.kind == "Gateway") {
                continue; // Not a parent we handle.
            }
            let gateway_id = ObjectRef::new(
                parent.namespace.as_deref().unwrap_or(&route.id.namespace),
                &parent.name,
            );
            let Some(&gateway) = gateway_by_id.get(&gateway_id) else {
                continue;
            };
            let mut c = Conditions::new(
                snapshot,
                &route_key(route.kind, &route.id, parent),
                route.meta.generation,
                config.now,
            );
            let listeners = &mut listener_state
                .get_mut(&gateway_id)
                .expect("every gateway has listeners")
                .valid;
            let selected: Vec<usize> = (0..listeners.len())
                .filter(|i| selects(parent, listeners[*i].listener))
                .collect();
            let mut attached_to = Vec::new();
            for i in &selected {
                let l = &listeners[*i];
                if l.usable
                    && l.kind == Some(route.kind)
                    && namespace_allowed(snapshot, gateway, l.listener, route)
                {
                    attached_to.push(*i);
                }
            }
            if selected.is_empty() {
                c.set(
                    ConditionType::Accepted,
                    false,
                    Reason::NoMatchingParent,
                    "no listener matches the sectionName or port",
                );
            } else if attached_to.is_empty() {
                c.set(
                    ConditionType::Accepted,
                    false,
                    Reason::NotAllowedByListeners,
                    "no matching listener allows this route",
                );
            } else {
                c.set(ConditionType::Accepted, true, Reason::Accepted, "");
            }
            for i in &attached_to {
                listeners[*i].attached += 1;
                winners.entry((gateway_id.clone(), *i)).or_insert(route);
            }
            set_resolved_refs(&mut c, snapshot, lookup, route);
            parents.push(RouteParentStatus {
                parent_ref: parent.clone(),
                controller_name: config.controller_name.into(),
                conditions: c.done(),
            });
        }
        if !parents.is_empty() {
            statuses.insert((route.kind, route.id.clone()), RouteStatus { parents });
        }
    }

    (statuses, winners)
}

/// ResolvedRefs: the first problem among the backendRefs, in order.
fn set_resolved_refs(c: &mut Conditions, snapshot: &Snapshot, lookup: &Index, route: &Route) {
    let problem = route
        .backend_refs
        .iter()
        .find_map(|b| resolve(snapshot, lookup, route, b, false).err());
    match problem {
        None => c.set(ConditionType::ResolvedRefs, true, Reason::ResolvedRefs, ""),
        Some(Unresolved::NotFound) => c.set(
            ConditionType::ResolvedRefs,
            false,
            Reason::BackendNotFound,
            "a backendRef names no Service port",
        ),
        Some(Unresolved::NotPermitted) => c.set(
            ConditionType::ResolvedRefs,
            false,
            Reason::RefNotPermitted,
            "a cross-namespace backendRef has no ReferenceGrant",
        ),
        Some(Unresolved::InvalidKind) => c.set(
            ConditionType::ResolvedRefs,
            false,
            Reason::InvalidKind,
            "backendRefs must be core Services",
        ),
        Some(Unresolved::UnsupportedProtocol) => c.set(
            ConditionType::ResolvedRefs,
            false,
            Reason::UnsupportedProtocol,
            format!(
                "a backendRef's Service port does not speak {}",
                route.kind.protocol()
            ),
        ),
    }
}

/// The nodes that serve a route (through one Gateway) otherwise than its backendRefs say, by
/// route kind, route and Gateway.
type Shortfalls<'a> = BTreeMap<(RouteKind, &'a ObjectRef, ObjectRef), BTreeMap<&'a str, Shortfall>>;

/// Every address × listener with a winning route, what each backendRef resolved to, and where
/// nodes that leave remote backends out serve the route otherwise than it says.
fn dataplane_services<'a>(
    snapshot: &'a Snapshot,
    lookup: &Index,
    listeners: &BTreeMap<ObjectRef, GatewayListeners>,
    addresses: &BTreeMap<ObjectRef, Addresses>,
    winners: &Winners<'a>,
    endpoint_nodes: &BTreeMap<IpAddr, String>,
) -> (
    Vec<v1::Service>,
    BTreeMap<BackendRefKey, BackendRefState>,
    Shortfalls<'a>,
) {
    let mut services = BTreeMap::new();
    let mut backend_refs = BTreeMap::new();
    let mut shortfalls: Shortfalls = BTreeMap::new();
    for ((gateway_id, index), route) in winners {
        let listener = listeners[gateway_id].valid[*index].listener;
        for vip in addresses[gateway_id].served() {
            let protocol = match route.kind {
                RouteKind::Tcp => v1::Protocol::Tcp,
                RouteKind::Udp => v1::Protocol::Udp,
            };
            let key = (vip.to_string(), listener.port, protocol as i32);
            if services.contains_key(&key) {
                continue;
            }
            let (service, states, shares) =
                dataplane_service(snapshot, lookup, route, *vip, listener.port, protocol);
            services.insert(key, service);
            for node in &snapshot.local_only_nodes {
                if let Some(shortfall) = shares.shortfall(endpoint_nodes, node) {
                    let nodes = shortfalls
                        .entry((route.kind, &route.id, gateway_id.clone()))
                        .or_default();
                    let entry = nodes.entry(node.as_str()).or_insert(shortfall);
                    *entry = (*entry).max(shortfall);
                }
            }
            for (key, state) in states {
                // The worst state over the route's address families counts.
                let entry = backend_refs.entry(key).or_insert(state);
                *entry = (*entry).max(state);
            }
        }
    }
    (services.into_values().collect(), backend_refs, shortfalls)
}

/// What a service of a route is made of, before scaling: the endpoints of each ready
/// backendRef with a weight, and whether some weight is rejected.
struct Shares {
    refs: Vec<(u32, Vec<IpAddr>)>,
    reject: bool,
}

/// How a node whose agent leaves backends on other nodes out serves a route otherwise than its
/// backendRefs say (worst last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Shortfall {
    /// Some refs lose a larger part of their endpoints than others (or than the reject
    /// weight, which stays): the weights between them do not hold on that node.
    WeightsNotKept,
    /// No endpoint with a weight runs on that node: it rejects every new flow.
    NoLocalEndpoint,
}

impl Shares {
    /// What `node` makes of the service when it leaves out the endpoints that run elsewhere,
    /// as [`node_services`] does; `None` when the backendRefs' weights still hold there.
    fn shortfall(
        &self,
        endpoint_nodes: &BTreeMap<IpAddr, String>,
        node: &str,
    ) -> Option<Shortfall> {
        // (local endpoints, endpoints) of each ref.
        let kept: Vec<(usize, usize)> = self
            .refs
            .iter()
            .filter(|(weight, _)| *weight > 0)
            .map(|(_, endpoints)| {
                let local = endpoints
                    .iter()
                    .filter(|a| !runs_elsewhere(a, endpoint_nodes, node))
                    .count();
                (local, endpoints.len())
            })
            .collect();
        let &(local0, all0) = kept.first()?;
        if kept.iter().all(|(local, _)| *local == 0) {
            return Some(Shortfall::NoLocalEndpoint);
        }
        // A ref's weight is spread over its endpoints, so the weights between refs hold while
        // every ref keeps the same fraction of them, and all of them next to a reject weight.
        let same_fraction = kept.iter().all(|(local, all)| local * all0 == local0 * all);
        let all_kept = kept.iter().all(|(local, all)| local == all);
        if same_fraction && (all_kept || !self.reject) {
            None
        } else {
            Some(Shortfall::WeightsNotKept)
        }
    }
}

/// Weights: each backendRef's weight is split evenly over its endpoints; invalid refs and
/// Services without ready endpoints become the reject weight; all scaled under MAX_WEIGHT.
/// Also says what each backendRef resolved to, and what the service is made of.
fn dataplane_service(
    snapshot: &Snapshot,
    index: &Index,
    route: &Route,
    vip: IpAddr,
    port: u16,
    protocol: v1::Protocol,
) -> (v1::Service, Vec<(BackendRefKey, BackendRefState)>, Shares) {
    let mut shares: BTreeMap<(IpAddr, u16), f64> = BTreeMap::new();
    let mut reject = 0.0;
    let mut states = Vec::new();
    let mut made_of = Shares {
        refs: Vec::new(),
        reject: false,
    };
    for backend in &route.backend_refs {
        let weight = backend.weight as f64;
        let state = match resolve(snapshot, index, route, backend, vip.is_ipv6()) {
            Ok(endpoints) if !endpoints.is_empty() => {
                for endpoint in &endpoints {
                    *shares.entry(*endpoint).or_default() += weight / endpoints.len() as f64;
                }
                made_of
                    .refs
                    .push((backend.weight, endpoints.iter().map(|(a, _)| *a).collect()));
                BackendRefState::Ready
            }
            Ok(_) => {
                reject += weight;
                BackendRefState::NoEndpoints
            }
            Err(_) => {
                reject += weight;
                BackendRefState::Invalid
            }
        };
        let key = BackendRefKey {
            route_kind: route.kind,
            route: route.id.clone(),
            service: ObjectRef::new(
                backend.namespace.as_deref().unwrap_or(&route.id.namespace),
                &backend.name,
            ),
            port: backend.port,
        };
        states.push((key, state));
    }
    let largest = shares.values().copied().fold(reject, f64::max);
    let scale = if largest > 0.0 {
        MAX_WEIGHT / largest
    } else {
        0.0
    };
    let scaled = |w: f64| {
        if w > 0.0 {
            ((w * scale).round() as u32).max(1)
        } else {
            0
        }
    };
    let service = v1::Service {
        vip: vip.to_string(),
        port: port.into(),
        protocol: protocol as i32,
        backends: shares
            .into_iter()
            .map(|((address, port), w)| v1::Backend {
                address: address.to_string(),
                port: port.into(),
                weight: scaled(w),
                remote: false,
            })
            .collect(),
        reject_weight: scaled(reject),
    };
    made_of.reject = reject > 0.0;
    (service, states, made_of)
}

/// Route parents that some node serves otherwise than the backendRefs say, because its agent
/// leaves backends on other nodes out: `EveryNodeReachesBackends` False, naming the nodes (and
/// the Gateway addresses each announces). Nothing is added where every node serves the route
/// as it says, so the condition is there only when the status would otherwise hide it.
fn report_shortfalls(
    config: &Config,
    snapshot: &Snapshot,
    addresses: &BTreeMap<ObjectRef, Addresses>,
    shortfalls: &Shortfalls,
    statuses: &mut BTreeMap<(RouteKind, ObjectRef), RouteStatus>,
) {
    if shortfalls.is_empty() {
        return;
    }
    for route in &snapshot.routes {
        let Some(status) = statuses.get_mut(&(route.kind, route.id.clone())) else {
            continue;
        };
        for parent in &mut status.parents {
            let gateway = ObjectRef::new(
                parent
                    .parent_ref
                    .namespace
                    .as_deref()
                    .unwrap_or(&route.id.namespace),
                &parent.parent_ref.name,
            );
            let Some(nodes) = shortfalls.get(&(route.kind, &route.id, gateway.clone())) else {
                continue;
            };
            let served = addresses.get(&gateway).map_or(&[][..], Addresses::served);
            let named = |shortfall: Shortfall| {
                let names: Vec<String> = nodes
                    .iter()
                    .filter(|(_, s)| **s == shortfall)
                    .map(|(node, _)| node_with_addresses(snapshot, node, served))
                    .collect();
                (!names.is_empty()).then(|| listed("node", &names))
            };
            let rejecting = named(Shortfall::NoLocalEndpoint);
            let skewed = named(Shortfall::WeightsNotKept);
            let mut parts = Vec::new();
            if let Some(nodes) = &rejecting {
                parts.push(format!(
                    "new flows are rejected on {nodes}: no endpoint of the backendRefs runs there"
                ));
            }
            if let Some(nodes) = &skewed {
                parts.push(format!(
                    "on {nodes} only local endpoints get new flows, so the backendRefs' weights \
                     do not hold there"
                ));
            }
            let reason = if rejecting.is_some() {
                Reason::NoLocalEndpoints
            } else {
                Reason::LocalEndpointsOnly
            };
            let mut c = Conditions::new(
                snapshot,
                &route_key(route.kind, &route.id, &parent.parent_ref),
                route.meta.generation,
                config.now,
            );
            c.set(
                ConditionType::EveryNodeReachesBackends,
                false,
                reason,
                format!(
                    "{}. Their agents leave backends on other nodes out: they do not list the \
                     \"remote-backends\" feature (no SNAT: an older agent, or --snat never)",
                    parts.join("; ")
                ),
            );
            parent.conditions.extend(c.done());
        }
    }
}

/// "n1 (announcing 192.0.2.10)" when the node announces some of the Gateway's addresses.
fn node_with_addresses(snapshot: &Snapshot, node: &str, served: &[IpAddr]) -> String {
    let Announcements::Checked(checked) = &snapshot.announcements else {
        return node.to_owned();
    };
    let announced: Vec<String> = served
        .iter()
        .filter(
            |a| matches!(checked.get(a), Some(Announcement::Announced { node: n }) if n == node),
        )
        .map(IpAddr::to_string)
        .collect();
    if announced.is_empty() {
        node.to_owned()
    } else {
        format!("{node} (announcing {})", announced.join(", "))
    }
}

/// "nodes a, b and 3 more": at most 10 names, so a large cluster keeps the message short.
fn listed(what: &str, names: &[String]) -> String {
    const SHOWN: usize = 10;
    let plural = if names.len() == 1 { "" } else { "s" };
    let mut text = format!(
        "{what}{plural} {}",
        names[..names.len().min(SHOWN)].join(", ")
    );
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// `address` runs on another node than `node`, by its EndpointSlice's `nodeName` (an endpoint
/// without one counts as local everywhere).
fn runs_elsewhere(address: &IpAddr, endpoint_nodes: &BTreeMap<IpAddr, String>, node: &str) -> bool {
    endpoint_nodes.get(address).is_some_and(|n| n != node)
}

/// What the agent on `node` runs: every service, each backend marked `remote` unless its
/// EndpointSlice puts it on `node`. An endpoint without `nodeName` counts as local on every node
/// (no SNAT, the client address kept: as before nodes were known), and so does every endpoint
/// for an agent whose node is not known (`None`: a bare `--agent URL`). Without `remote_backends`
/// (an older agent, which would forward a remote backend's flows without SNAT and have the
/// replies miss it), remote backends are left out; a service left with no backend rejects.
pub fn node_services(
    services: &[v1::Service],
    endpoint_nodes: &BTreeMap<IpAddr, String>,
    node: Option<&str>,
    remote_backends: bool,
) -> Vec<v1::Service> {
    let remote = |backend: &v1::Backend| {
        let Some(node) = node else { return false };
        backend
            .address
            .parse::<IpAddr>()
            .is_ok_and(|a| runs_elsewhere(&a, endpoint_nodes, node))
    };
    services
        .iter()
        .map(|service| {
            let mut service = service.clone();
            if remote_backends {
                for backend in &mut service.backends {
                    backend.remote = remote(backend);
                }
            } else {
                let had_backends = !service.backends.is_empty();
                service.backends.retain(|b| !remote(b));
                if had_backends && service.backends.is_empty() {
                    service.reject_weight = service.reject_weight.max(1);
                }
            }
            service
        })
        .collect()
}
