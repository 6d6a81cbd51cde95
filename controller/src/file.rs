//! The standalone provider: a folder of ordinary Kubernetes YAML, read into a [`Snapshot`].
//!
//! Every problem is reported with its file and line, and a folder with any problem yields no
//! snapshot at all, so the caller keeps the last good one: a typo never withdraws a service.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::model::{
    BackendRef, EndpointSlice, FromNamespaces, Gateway, GatewayAddress, GatewayClass, Listener,
    Meta, ObjectRef, ParentRef, ReferenceGrant, Route, RouteGroupKind, RouteKind, Service,
    ServicePort, Snapshot,
};

/// One problem in the folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    creation_timestamp: Option<String>,
    #[serde(default)]
    generation: Option<i64>,
}

/// apiVersion, kind and metadata of any document.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: Metadata,
}

/// A Gateway API object: unknown fields are errors.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Strict<S> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(rename = "metadata")]
    _metadata: serde_yaml::Value,
    spec: S,
    #[serde(default, rename = "status")]
    _status: serde_yaml::Value,
}

/// A core object (Service, EndpointSlice): other fields are normal and ignored.
#[derive(Deserialize)]
struct Lenient<S> {
    spec: S,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GatewayClassSpec {
    controller_name: String,
    // Accepted, not used.
    #[serde(default, rename = "description")]
    _description: Option<String>,
    #[serde(default, rename = "parametersRef")]
    _parameters_ref: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GroupKind {
    #[serde(default)]
    group: Option<String>,
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LabelSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteNamespaces {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    selector: Option<LabelSelector>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AllowedRoutes {
    #[serde(default)]
    namespaces: Option<RouteNamespaces>,
    #[serde(default)]
    kinds: Vec<GroupKind>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListenerSpec {
    name: String,
    port: u16,
    protocol: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    tls: Option<serde_yaml::Value>,
    #[serde(default)]
    allowed_routes: Option<AllowedRoutes>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddressSpec {
    #[serde(default, rename = "type")]
    type_: Option<String>,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GatewaySpec {
    gateway_class_name: String,
    listeners: Vec<ListenerSpec>,
    #[serde(default)]
    addresses: Vec<AddressSpec>,
    #[serde(default, rename = "infrastructure")]
    _infrastructure: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ParentRefSpec {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
    #[serde(default)]
    section_name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackendRefSpec {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    #[serde(default, rename = "name")]
    _name: Option<String>,
    #[serde(default)]
    backend_refs: Vec<BackendRefSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRefSpec>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrantFrom {
    group: String,
    kind: String,
    namespace: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrantTo {
    group: String,
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReferenceGrantSpec {
    from: Vec<GrantFrom>,
    to: Vec<GrantTo>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortSpec {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default)]
    ports: Vec<ServicePortSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointConditions {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<EndpointConditions>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointPort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

/// EndpointSlices keep their fields at the top level.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointSliceDoc {
    #[serde(default)]
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    ports: Vec<EndpointPort>,
}

/// Documents of a file, each with the line it starts on.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// What the folder held, with the time each object is first seen (the caller's).
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    /// Keys of the objects, for first-seen bookkeeping: "Kind/namespace/name".
    pub keys: Vec<String>,
}

/// What the provider remembers between reads: when each object was first seen (its
/// creationTimestamp unless the manifest sets one) and its content, so `metadata.generation`
/// grows when the object changes, as the API server would make it.
#[derive(Clone, Debug, Default)]
pub struct History {
    first_seen: BTreeMap<String, String>,
    content: BTreeMap<String, (String, i64)>,
}

impl History {
    fn creation(&mut self, key: &str, now: &str) -> String {
        self.first_seen
            .entry(key.to_owned())
            .or_insert_with(|| now.to_owned())
            .clone()
    }

    fn generation(&mut self, key: &str, content: String) -> i64 {
        let entry = self
            .content
            .entry(key.to_owned())
            .or_insert_with(|| (content.clone(), 1));
        if entry.0 != content {
            *entry = (content, entry.1 + 1);
        }
        entry.1
    }
}

/// Everything of a document but metadata and status: what a generation counts changes of.
fn content(doc: &str) -> String {
    match serde_yaml::from_str::<serde_yaml::Value>(doc) {
        Ok(serde_yaml::Value::Mapping(mut map)) => {
            map.remove("metadata");
            map.remove("status");
            serde_yaml::to_string(&map).unwrap_or_default()
        }
        _ => doc.to_owned(),
    }
}

/// Reads every `*.yaml` / `*.yml` in `dir`. `history` is updated only when the whole folder is
/// good; `now` stamps objects seen for the first time.
pub fn load(dir: &Path, history: &mut History, now: &str) -> Result<Loaded, Vec<ManifestError>> {
    let mut staged = history.clone();
    let loaded = load_with(dir, &mut staged, now)?;
    *history = staged;
    Ok(loaded)
}

fn load_with(dir: &Path, history: &mut History, now: &str) -> Result<Loaded, Vec<ManifestError>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect(),
        Err(e) => {
            return Err(vec![ManifestError {
                file: dir.into(),
                line: 0,
                message: e.to_string(),
            }]);
        }
    };
    files.sort();
    let mut snapshot = Snapshot::default();
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(ManifestError {
                    file: file.clone(),
                    line: 0,
                    message: e.to_string(),
                });
                continue;
            }
        };
        for (start, doc) in documents(&text) {
            let error = |line: usize, message: String| ManifestError {
                file: file.clone(),
                line,
                message,
            };
            let located = |e: serde_yaml::Error| {
                let line = e.location().map_or(start, |l| start + l.line() - 1);
                error(line, e.to_string())
            };
            let head: Head = match serde_yaml::from_str(&doc) {
                Ok(head) => head,
                Err(e) => {
                    errors.push(located(e));
                    continue;
                }
            };
            let namespace = head
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let id = ObjectRef::new(&namespace, &head.metadata.name);
            let key = format!("{}/{}", head.kind, id);
            let meta = Meta {
                generation: match head.metadata.generation {
                    Some(generation) => generation,
                    None => history.generation(&key, content(&doc)),
                },
                creation_timestamp: match &head.metadata.creation_timestamp {
                    Some(timestamp) => timestamp.clone(),
                    None => history.creation(&key, now),
                },
                labels: head.metadata.labels.clone(),
            };
            let result = add(&mut snapshot, &head, &doc, id, meta).map_err(|e| match e {
                AddError::Yaml(e) => located(e),
                AddError::Other(message) => error(start, message),
            });
            match result {
                Ok(true) => keys.push(key),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
    }
    if errors.is_empty() {
        Ok(Loaded { snapshot, keys })
    } else {
        Err(errors)
    }
}

enum AddError {
    Yaml(serde_yaml::Error),
    Other(String),
}

impl From<serde_yaml::Error> for AddError {
    fn from(e: serde_yaml::Error) -> Self {
        AddError::Yaml(e)
    }
}

fn gateway_api(api_version: &str, versions: &[&str]) -> bool {
    api_version
        .strip_prefix("gateway.networking.k8s.io/")
        .is_some_and(|v| versions.contains(&v))
}

/// Adds one document; `Ok(false)` for kinds this controller does not read.
fn add(
    snapshot: &mut Snapshot,
    head: &Head,
    doc: &str,
    id: ObjectRef,
    meta: Meta,
) -> Result<bool, AddError> {
    let version = head.api_version.as_str();
    match head.kind.as_str() {
        "GatewayClass" if gateway_api(version, &["v1", "v1beta1"]) => {
            let spec = serde_yaml::from_str::<Strict<GatewayClassSpec>>(doc)?.spec;
            snapshot.classes.push(GatewayClass {
                name: id.name,
                meta,
                controller_name: spec.controller_name,
            });
        }
        "Gateway" if gateway_api(version, &["v1", "v1beta1"]) => {
            let spec = serde_yaml::from_str::<Strict<GatewaySpec>>(doc)?.spec;
            let mut listeners = Vec::new();
            for l in spec.listeners {
                let allowed = l.allowed_routes.unwrap_or(AllowedRoutes {
                    namespaces: None,
                    kinds: vec![],
                });
                let from = match allowed.namespaces {
                    None => FromNamespaces::Same,
                    Some(n) => match n.from.as_deref().unwrap_or("Same") {
                        "Same" => FromNamespaces::Same,
                        "All" => FromNamespaces::All,
                        "Selector" => {
                            let selector = n.selector.ok_or_else(|| {
                                AddError::Other(format!(
                                    "listener {}: from: Selector needs a selector",
                                    l.name
                                ))
                            })?;
                            if !selector.match_expressions.is_empty() {
                                return Err(AddError::Other(format!(
                                    "listener {}: matchExpressions are not supported, use matchLabels",
                                    l.name
                                )));
                            }
                            FromNamespaces::Selector(selector.match_labels)
                        }
                        other => {
                            return Err(AddError::Other(format!(
                                "listener {}: unknown allowedRoutes.namespaces.from {other:?}",
                                l.name
                            )));
                        }
                    },
                };
                if (l.protocol == "TCP" || l.protocol == "UDP")
                    && (l.hostname.is_some() || l.tls.is_some())
                {
                    return Err(AddError::Other(format!(
                        "listener {}: hostname and tls are not allowed for {}",
                        l.name, l.protocol
                    )));
                }
                let kinds = allowed
                    .kinds
                    .into_iter()
                    .map(|k| RouteGroupKind {
                        group: k
                            .group
                            .unwrap_or_else(|| "gateway.networking.k8s.io".into()),
                        kind: k.kind,
                    })
                    .collect();
                listeners.push(Listener {
                    name: l.name,
                    port: l.port,
                    protocol: l.protocol,
                    from,
                    kinds,
                });
            }
            let addresses = spec
                .addresses
                .into_iter()
                .map(|a| GatewayAddress {
                    kind: a.type_.unwrap_or_else(|| "IPAddress".into()),
                    value: a.value,
                })
                .collect();
            snapshot.gateways.push(Gateway {
                id,
                meta,
                class_name: spec.gateway_class_name,
                listeners,
                addresses,
            });
        }
        "TCPRoute" | "UDPRoute" if gateway_api(version, &["v1", "v1alpha2"]) => {
            let spec = serde_yaml::from_str::<Strict<RouteSpec>>(doc)?.spec;
            if version.ends_with("/v1") && spec.rules.len() > 1 {
                return Err(AddError::Other(format!(
                    "{} v1 has exactly one rule, found {}",
                    head.kind,
                    spec.rules.len()
                )));
            }
            let parent_refs = spec
                .parent_refs
                .into_iter()
                .map(|p| ParentRef {
                    group: p
                        .group
                        .unwrap_or_else(|| "gateway.networking.k8s.io".into()),
                    kind: p.kind.unwrap_or_else(|| "Gateway".into()),
                    namespace: p.namespace,
                    name: p.name,
                    section_name: p.section_name,
                    port: p.port,
                })
                .collect();
            let backend_refs = spec
                .rules
                .into_iter()
                .flat_map(|r| r.backend_refs)
                .map(|b| BackendRef {
                    group: b.group.unwrap_or_default(),
                    kind: b.kind.unwrap_or_else(|| "Service".into()),
                    namespace: b.namespace,
                    name: b.name,
                    port: b.port,
                    weight: b.weight.unwrap_or(1),
                })
                .collect();
            let kind = if head.kind == "TCPRoute" {
                RouteKind::Tcp
            } else {
                RouteKind::Udp
            };
            snapshot.routes.push(Route {
                kind,
                id,
                meta,
                parent_refs,
                backend_refs,
            });
        }
        "ReferenceGrant" if gateway_api(version, &["v1", "v1beta1", "v1alpha2"]) => {
            let spec = serde_yaml::from_str::<Strict<ReferenceGrantSpec>>(doc)?.spec;
            snapshot.grants.push(ReferenceGrant {
                namespace: id.namespace,
                from: spec
                    .from
                    .into_iter()
                    .map(|f| (f.group, f.kind, f.namespace))
                    .collect(),
                to: spec
                    .to
                    .into_iter()
                    .map(|t| (t.group, t.kind, t.name))
                    .collect(),
            });
        }
        "Service" if version == "v1" => {
            let spec = serde_yaml::from_str::<Lenient<ServiceSpec>>(doc)?.spec;
            let ports = spec
                .ports
                .into_iter()
                .map(|p| ServicePort {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                })
                .collect();
            snapshot.services.push(Service { id, ports });
        }
        "EndpointSlice" if version == "discovery.k8s.io/v1" => {
            let slice: EndpointSliceDoc = serde_yaml::from_str(doc)?;
            let service_name = head
                .metadata
                .labels
                .get("kubernetes.io/service-name")
                .cloned()
                .ok_or_else(|| {
                    AddError::Other(
                        "an EndpointSlice needs the kubernetes.io/service-name label".into(),
                    )
                })?;
            let mut ready_addresses = Vec::new();
            for endpoint in slice.endpoints {
                let conditions = endpoint.conditions.unwrap_or(EndpointConditions {
                    ready: None,
                    terminating: None,
                });
                // Unset ready means ready; terminating endpoints get no new flows.
                if conditions.ready == Some(false) || conditions.terminating == Some(true) {
                    continue;
                }
                for address in endpoint.addresses {
                    let ip: IpAddr = address.parse().map_err(|_| {
                        AddError::Other(format!("{address:?} is not an IP address"))
                    })?;
                    ready_addresses.push(ip);
                }
            }
            let ports = slice
                .ports
                .into_iter()
                .filter_map(|p| p.port.map(|port| (p.name, port)))
                .collect();
            snapshot.endpoint_slices.push(EndpointSlice {
                namespace: id.namespace,
                service_name,
                ports,
                ready_addresses,
            });
        }
        "Namespace" if version == "v1" => {
            snapshot
                .namespaces
                .insert(id.name, head.metadata.labels.clone());
        }
        _ => return Ok(false),
    }
    Ok(true)
}
