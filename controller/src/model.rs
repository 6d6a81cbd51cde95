//! The Snapshot: every object translate needs, already parsed, whatever provider produced it
//! (the Kubernetes API or a folder of manifests). Field names follow the Gateway API.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

/// namespace/name
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What every object carries for status bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub generation: i64,
    /// RFC 3339; decides which route wins a listener (oldest first).
    pub creation_timestamp: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayClass {
    pub name: String,
    pub meta: Meta,
    pub controller_name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    Tcp,
    Udp,
}

impl RouteKind {
    /// The Gateway API kind's name.
    pub fn kind(self) -> &'static str {
        self.api_kind().name()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FromNamespaces {
    Same,
    All,
    Selector(LabelSelector),
}

/// A Kubernetes label selector: every matchLabels pair and every expression must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelRequirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| match r {
                LabelRequirement::In(k, values) => {
                    labels.get(k).is_some_and(|v| values.contains(v))
                }
                LabelRequirement::NotIn(k, values) => {
                    !labels.get(k).is_some_and(|v| values.contains(v))
                }
                LabelRequirement::Exists(k) => labels.contains_key(k),
                LabelRequirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteGroupKind {
    pub group: String,
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub port: u16,
    /// As written: TCP, UDP, HTTP, HTTPS, TLS, ...
    pub protocol: String,
    pub from: FromNamespaces,
    /// Empty: derived from the protocol.
    pub kinds: Vec<RouteGroupKind>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayAddress {
    /// IPAddress (the default), Hostname, NamedAddress, or anything else.
    pub kind: String,
    /// None: any address (from the pools).
    pub value: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub id: ObjectRef,
    pub meta: Meta,
    pub class_name: String,
    pub listeners: Vec<Listener>,
    pub addresses: Vec<GatewayAddress>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    /// Defaults to the route's namespace.
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub group: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<u16>,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub kind: RouteKind,
    pub id: ObjectRef,
    pub meta: Meta,
    pub parent_refs: Vec<ParentRef>,
    /// Every rule's backendRefs, in order (v1 has one rule; v1alpha2 up to 16).
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceGrant {
    /// Lives in the namespace of the referenced objects.
    pub namespace: String,
    /// (group, kind, namespace)
    pub from: Vec<(String, String, String)>,
    /// (group, kind, name: None = any)
    pub to: Vec<(String, String, Option<String>)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: ObjectRef,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: String,
    /// The `kubernetes.io/service-name` label.
    pub service_name: String,
    /// (port name, port)
    pub ports: Vec<(Option<String>, u16)>,
    /// Ready endpoints' addresses (terminating and not-ready ones are left out by the provider).
    pub ready_addresses: Vec<IpAddr>,
    /// The node each ready address runs on (`endpoints[].nodeName`), where the slice names one.
    pub nodes: BTreeMap<IpAddr, String>,
}

/// What the agents report about the desired state (Gateway `Programmed`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Dataplane {
    /// Running on the agents, or no feedback to be had (no agents configured).
    #[default]
    Programmed,
    /// No agent runs any state yet.
    Pending(String),
    /// An agent refused the state: it does not fit its maps.
    NoResources(String),
    /// An agent refused the state as invalid.
    Invalid(String),
}

/// Who announces the Gateway addresses (ARP / NDP), as the agents report it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Announcements {
    /// Nothing to wait for: no agents are configured (as [`Dataplane::Programmed`]).
    #[default]
    NotChecked,
    /// What the agents do about each address; an address not listed is not assigned yet.
    Checked(BTreeMap<IpAddr, Announcement>),
}

/// What the agents do about one Gateway address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announcement {
    /// An in-sync agent, on this node, announces it.
    Announced { node: String },
    /// Given to the agent on this node, which has not applied it yet.
    Assigned { node: String },
    /// Its announcer's agent was lost; another takes over once the failover bound has passed.
    FailingOver { node: String },
    /// No in-sync agent can announce it; says why.
    NoAnnouncer(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub routes: Vec<Route>,
    pub grants: Vec<ReferenceGrant>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Namespace name → labels (for `allowedRoutes.namespaces.from: Selector`).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Addresses assigned before (read back from status): keeps assignments stable.
    pub previous_addresses: BTreeMap<ObjectRef, Vec<IpAddr>>,
    /// Previous conditions, to keep lastTransitionTime when nothing changed.
    pub previous_conditions: BTreeMap<String, Vec<Condition>>,
    pub dataplane: Dataplane,
    pub announcements: Announcements,
    /// Nodes whose agents leave backends on other nodes out (they do not list the
    /// "remote-backends" feature: an older agent, or one run with `--snat never`), so they
    /// forward only to their local endpoints. Empty when no agent's node is known.
    pub local_only_nodes: BTreeSet<String>,
}

/// A status condition, shaped as in Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Condition {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub observed_generation: i64,
    pub last_transition_time: String,
}

/// Names of the objects present, for quick membership tests.
pub fn names<'a>(ids: impl IntoIterator<Item = &'a ObjectRef>) -> BTreeSet<&'a ObjectRef> {
    ids.into_iter().collect()
}
