//! Kubernetes objects (the `resources` types and k8s-openapi's Service and EndpointSlice) into
//! the Snapshot's model. Both providers go through here, so a manifest file and a cluster object
//! mean the same thing. Defaults of the Gateway API fields are filled in here.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    gateway_api::{GROUP, Kind},
    model::{
        self, BackendRef, FromNamespaces, GatewayAddress, LabelRequirement, Listener, Meta,
        ObjectRef, ParentRef, RouteGroupKind, RouteKind, ServicePort, Snapshot,
    },
    resources,
};

/// Why an object cannot enter the Snapshot. The message goes to the operator as is (a file
/// error, a Kubernetes Event on the object).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The spec does not have the type's shape (a reflected object; the file provider reads
    /// its documents strictly itself).
    #[error("spec: {0}")]
    Spec(#[from] serde_json::Error),
    #[error("unknown label selector operator {operator:?}")]
    UnknownSelectorOperator { operator: String },
    #[error("listener {listener}: {problem}")]
    Listener {
        listener: String,
        problem: Box<ConvertError>,
    },
    #[error("from: Selector needs a selector")]
    SelectorMissing,
    #[error("unknown allowedRoutes.namespaces.from {from:?}")]
    UnknownFrom { from: String },
    #[error("hostname and tls are not allowed for {protocol}")]
    HostnameOrTls { protocol: String },
    #[error("{kind} v1 has exactly one rule, found {rules}")]
    OneRuleAtV1 { kind: &'static str, rules: usize },
    #[error("{address:?} is not an IP address")]
    NotAnIp { address: String },
}

impl ConvertError {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ConvertError::Spec(_) => "spec",
            ConvertError::Listener { problem, .. } => problem.kind(),
            ConvertError::UnknownSelectorOperator { .. }
            | ConvertError::SelectorMissing
            | ConvertError::UnknownFrom { .. } => "selector",
            ConvertError::HostnameOrTls { .. } => "listener",
            ConvertError::OneRuleAtV1 { .. } => "rules",
            ConvertError::NotAnIp { .. } => "address",
        }
    }
}

/// One Gateway API object's spec, read the way its provider reads: strictly from a manifest
/// document, or from a reflected cluster object.
pub trait ReadSpec {
    type Error: From<ConvertError>;
    fn gateway_class(&self) -> Result<resources::GatewayClassSpec, Self::Error>;
    fn gateway(&self) -> Result<resources::GatewaySpec, Self::Error>;
    /// TCPRoute and UDPRoute share one spec.
    fn route(&self) -> Result<resources::TCPRouteSpec, Self::Error>;
    fn reference_grant(&self) -> Result<resources::ReferenceGrantSpec, Self::Error>;
}

/// Adds one Gateway API object of `kind` to the Snapshot: the one place both providers turn a
/// spec into the model. `served_at_v1`: the object was read at the `v1` API version (routes
/// report it in their status).
pub fn add_gateway_api<R: ReadSpec>(
    snapshot: &mut Snapshot,
    kind: Kind,
    served_at_v1: bool,
    id: ObjectRef,
    meta: Meta,
    read: &R,
) -> Result<(), R::Error> {
    if let Some(route_kind) = kind.route() {
        let spec = read.route()?;
        snapshot.routes.push(route(
            route_kind,
            id,
            meta,
            &spec.parent_refs,
            &spec.rules,
            served_at_v1,
        )?);
        return Ok(());
    }
    match kind {
        Kind::GatewayClass => {
            let spec = read.gateway_class()?;
            snapshot.classes.push(gateway_class(&id.name, meta, &spec));
        }
        Kind::Gateway => {
            let spec = read.gateway()?;
            snapshot.gateways.push(gateway(id, meta, &spec)?);
        }
        Kind::ReferenceGrant => {
            let spec = read.reference_grant()?;
            snapshot.grants.push(reference_grant(&id.namespace, &spec));
        }
        Kind::TcpRoute | Kind::UdpRoute => unreachable!("routes are added above"),
    }
    Ok(())
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// namespace/name; objects without a namespace are in `default`.
pub fn object_ref(metadata: &ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        metadata.namespace.as_deref().unwrap_or("default"),
        metadata.name.as_deref().unwrap_or_default(),
    )
}

/// generation, creationTimestamp and labels as the API server reports them.
pub fn meta(metadata: &ObjectMeta) -> Meta {
    Meta {
        generation: metadata.generation.unwrap_or(1),
        creation_timestamp: metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        labels: metadata.labels.clone().unwrap_or_default(),
    }
}

pub fn gateway_class(
    name: &str,
    meta: Meta,
    spec: &resources::GatewayClassSpec,
) -> model::GatewayClass {
    model::GatewayClass {
        name: name.to_owned(),
        meta,
        controller_name: spec.controller_name.clone(),
    }
}

fn label_selector(
    selector: &resources::LabelSelector,
) -> Result<model::LabelSelector, ConvertError> {
    let mut match_expressions = Vec::new();
    for r in &selector.match_expressions {
        let values = r.values.iter().cloned().collect();
        let key = r.key.clone();
        match_expressions.push(match r.operator.as_str() {
            "In" => LabelRequirement::In(key, values),
            "NotIn" => LabelRequirement::NotIn(key, values),
            "Exists" => LabelRequirement::Exists(key),
            "DoesNotExist" => LabelRequirement::DoesNotExist(key),
            other => {
                return Err(ConvertError::UnknownSelectorOperator {
                    operator: other.to_owned(),
                });
            }
        });
    }
    Ok(model::LabelSelector {
        match_labels: selector.match_labels.clone(),
        match_expressions,
    })
}

fn listener(l: &resources::ListenerSpec) -> Result<Listener, ConvertError> {
    let context = |problem| ConvertError::Listener {
        listener: l.name.clone(),
        problem: Box::new(problem),
    };
    let allowed = l.allowed_routes.clone().unwrap_or_default();
    let namespaces = allowed.namespaces.unwrap_or_default();
    let from = match namespaces.from.as_deref().unwrap_or("Same") {
        "Same" => FromNamespaces::Same,
        "All" => FromNamespaces::All,
        "Selector" => {
            let selector = namespaces
                .selector
                .as_ref()
                .ok_or_else(|| context(ConvertError::SelectorMissing))?;
            FromNamespaces::Selector(label_selector(selector).map_err(context)?)
        }
        other => {
            return Err(context(ConvertError::UnknownFrom {
                from: other.to_owned(),
            }));
        }
    };
    if (l.protocol == "TCP" || l.protocol == "UDP") && (l.hostname.is_some() || l.tls.is_some()) {
        return Err(context(ConvertError::HostnameOrTls {
            protocol: l.protocol.clone(),
        }));
    }
    Ok(Listener {
        name: l.name.clone(),
        port: l.port,
        protocol: l.protocol.clone(),
        from,
        kinds: allowed
            .kinds
            .iter()
            .map(|k| RouteGroupKind {
                group: k.group.clone().unwrap_or_else(|| GROUP.into()),
                kind: k.kind.clone(),
            })
            .collect(),
    })
}

pub fn gateway(
    id: ObjectRef,
    meta: Meta,
    spec: &resources::GatewaySpec,
) -> Result<model::Gateway, ConvertError> {
    Ok(model::Gateway {
        id,
        meta,
        class_name: spec.gateway_class_name.clone(),
        listeners: spec
            .listeners
            .iter()
            .map(listener)
            .collect::<Result<_, _>>()?,
        addresses: spec
            .addresses
            .iter()
            .map(|a| GatewayAddress {
                kind: a.type_.clone().unwrap_or_else(|| "IPAddress".into()),
                value: a.value.clone().filter(|v| !v.is_empty()),
            })
            .collect(),
    })
}

/// A TCPRoute or UDPRoute. `single_rule`: the `v1` API, which allows exactly one rule.
pub fn route(
    kind: RouteKind,
    id: ObjectRef,
    meta: Meta,
    parent_refs: &[resources::ParentReference],
    rules: &[resources::RouteRule],
    single_rule: bool,
) -> Result<model::Route, ConvertError> {
    if single_rule && rules.len() > 1 {
        return Err(ConvertError::OneRuleAtV1 {
            kind: kind.kind(),
            rules: rules.len(),
        });
    }
    Ok(model::Route {
        kind,
        id,
        meta,
        parent_refs: parent_refs
            .iter()
            .map(|p| ParentRef {
                group: p.group.clone().unwrap_or_else(|| GROUP.into()),
                kind: p.kind.clone().unwrap_or_else(|| "Gateway".into()),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                section_name: p.section_name.clone(),
                port: p.port,
            })
            .collect(),
        backend_refs: rules
            .iter()
            .flat_map(|r| &r.backend_refs)
            .map(|b| BackendRef {
                group: b.group.clone().unwrap_or_default(),
                kind: b.kind.clone().unwrap_or_else(|| "Service".into()),
                namespace: b.namespace.clone(),
                name: b.name.clone(),
                port: b.port,
                weight: b.weight.unwrap_or(1),
            })
            .collect(),
    })
}

pub fn reference_grant(
    namespace: &str,
    spec: &resources::ReferenceGrantSpec,
) -> model::ReferenceGrant {
    model::ReferenceGrant {
        namespace: namespace.to_owned(),
        from: spec
            .from
            .iter()
            .map(|f| (f.group.clone(), f.kind.clone(), f.namespace.clone()))
            .collect(),
        to: spec
            .to
            .iter()
            .map(|t| (t.group.clone(), t.kind.clone(), t.name.clone()))
            .collect(),
    }
}

/// A port's name, with absent and empty the same: the EndpointSlice controller writes
/// `name: ""` for an unnamed Service port, which leaves the field out.
fn port_name(name: Option<&str>) -> Option<String> {
    name.filter(|n| !n.is_empty()).map(str::to_owned)
}

pub fn service(service: &core::Service) -> model::Service {
    let ports = service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| {
            Some(ServicePort {
                name: port_name(p.name.as_deref()),
                port: u16::try_from(p.port).ok()?,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            })
        })
        .collect();
    model::Service {
        id: object_ref(&service.metadata),
        ports,
    }
}

/// `Ok(None)` for a slice that belongs to no Service (no `kubernetes.io/service-name` label).
pub fn endpoint_slice(
    slice: &discovery::EndpointSlice,
) -> Result<Option<model::EndpointSlice>, ConvertError> {
    let Some(service_name) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
    else {
        return Ok(None);
    };
    let mut ready_addresses = Vec::new();
    let mut nodes = BTreeMap::new();
    for endpoint in &slice.endpoints {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        // Unset ready means ready; terminating endpoints get no new flows.
        if conditions.ready == Some(false) || conditions.terminating == Some(true) {
            continue;
        }
        for address in &endpoint.addresses {
            let ip: IpAddr = address.parse().map_err(|_| ConvertError::NotAnIp {
                address: address.clone(),
            })?;
            ready_addresses.push(ip);
            if let Some(node) = endpoint.node_name.as_ref().filter(|n| !n.is_empty()) {
                nodes.insert(ip, node.clone());
            }
        }
    }
    Ok(Some(model::EndpointSlice {
        namespace: object_ref(&slice.metadata).namespace,
        service_name: service_name.clone(),
        ports: slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((port_name(p.name.as_deref()), u16::try_from(p.port?).ok()?)))
            .collect(),
        ready_addresses,
        nodes,
    }))
}
