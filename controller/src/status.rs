//! Status documents, shaped as in Kubernetes: written to the standalone status file (and, with
//! the Kubernetes provider, patched onto the objects), and read back so lastTransitionTime and
//! pool addresses stay stable across controller restarts.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    gateway_api::{GROUP, Kind, STATUS_API_VERSION},
    model::{Condition, ObjectRef, ParentRef, RouteGroupKind},
    resources::ParentReference,
    translate::{self, Output},
};

// Every field the Gateway API status schema leaves optional is optional here, and what the
// CRDs default (conditions without observedGeneration) or other controllers write (parentRefs
// without namespace) reads back: one such entry must not make the whole status unreadable.

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionDoc {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub last_transition_time: String,
}

impl From<&Condition> for ConditionDoc {
    fn from(c: &Condition) -> Self {
        ConditionDoc {
            type_: c.type_.clone(),
            status: if c.status { "True" } else { "False" }.into(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            observed_generation: Some(c.observed_generation),
            last_transition_time: c.last_transition_time.clone(),
        }
    }
}

impl ConditionDoc {
    /// The condition, unless its status is neither True nor False (the CRDs default
    /// conditions to `Unknown`, which no condition of ours continues).
    fn to_condition(&self) -> Option<Condition> {
        let status = match self.status.as_str() {
            "True" => true,
            "False" => false,
            _ => return None,
        };
        Some(Condition {
            type_: self.type_.clone(),
            status,
            reason: self.reason.clone(),
            message: self.message.clone(),
            observed_generation: self.observed_generation.unwrap_or_default(),
            last_transition_time: self.last_transition_time.clone(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressDoc {
    #[serde(rename = "type", default = "ip_address_type")]
    pub type_: String,
    pub value: String,
}

fn ip_address_type() -> String {
    "IPAddress".into()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupKindDoc {
    #[serde(default = "gateway_group")]
    pub group: String,
    pub kind: String,
}

fn gateway_group() -> String {
    GROUP.into()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerDoc {
    pub name: String,
    #[serde(default)]
    pub supported_kinds: Vec<GroupKindDoc>,
    #[serde(default)]
    pub attached_routes: i32,
    #[serde(default)]
    pub conditions: Vec<ConditionDoc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentDoc {
    pub parent_ref: ParentReference,
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<ConditionDoc>,
}

/// One `status.parents` entry. It is read on its own, and kept exactly as found: another
/// controller's entry, or one this controller cannot read, is written back unchanged (the list
/// is atomic, so a forced apply that dropped it would wipe it).
#[derive(Clone, Debug, PartialEq)]
pub struct ParentEntry {
    /// None: not readable as a route parent status.
    pub doc: Option<RouteParentDoc>,
    raw: serde_json::Value,
}

impl ParentEntry {
    pub fn new(doc: RouteParentDoc) -> Self {
        let raw = serde_json::to_value(&doc).expect("status documents serialize");
        ParentEntry {
            doc: Some(doc),
            raw,
        }
    }

    /// The entry's controllerName, read or not.
    pub fn controller_name(&self) -> Option<&str> {
        match &self.doc {
            Some(doc) => Some(&doc.controller_name),
            None => self.raw.get("controllerName")?.as_str(),
        }
    }
}

impl Serialize for ParentEntry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ParentEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = serde_json::Value::deserialize(deserializer)?;
        let doc = RouteParentDoc::deserialize(&raw).ok();
        Ok(ParentEntry { doc, raw })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDoc {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<AddressDoc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ConditionDoc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supported_features: Vec<Named>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerDoc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<ParentEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataDoc {
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    pub api_version: String,
    pub kind: String,
    pub metadata: MetadataDoc,
    pub status: StatusDoc,
}

/// The current time as conditions carry it (RFC 3339, seconds).
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn conditions(list: &[Condition]) -> Vec<ConditionDoc> {
    list.iter().map(ConditionDoc::from).collect()
}

fn parent_doc(route: &ObjectRef, p: &ParentRef) -> ParentReference {
    ParentReference {
        group: Some(p.group.clone()),
        kind: Some(p.kind.clone()),
        namespace: Some(
            p.namespace
                .clone()
                .unwrap_or_else(|| route.namespace.clone()),
        ),
        name: p.name.clone(),
        section_name: p.section_name.clone(),
        port: p.port,
    }
}

fn doc(kind: &str, id: &ObjectRef, status: StatusDoc) -> ObjectStatus {
    ObjectStatus {
        api_version: STATUS_API_VERSION.into(),
        kind: kind.into(),
        metadata: MetadataDoc {
            name: id.name.clone(),
            namespace: id.namespace.clone(),
        },
        status,
    }
}

/// Every status, in a stable order: GatewayClasses, Gateways, then routes.
pub fn documents(out: &Output) -> Vec<ObjectStatus> {
    let mut docs = Vec::new();
    for (name, class) in &out.classes {
        let status = StatusDoc {
            conditions: conditions(&class.conditions),
            supported_features: class
                .supported_features
                .iter()
                .map(|f| Named { name: f.clone() })
                .collect(),
            ..Default::default()
        };
        docs.push(doc("GatewayClass", &ObjectRef::new("", name), status));
    }
    for (id, gateway) in &out.gateways {
        let status = StatusDoc {
            addresses: gateway
                .addresses
                .iter()
                .map(|a| AddressDoc {
                    type_: "IPAddress".into(),
                    value: a.to_string(),
                })
                .collect(),
            conditions: conditions(&gateway.conditions),
            listeners: gateway
                .listeners
                .iter()
                .map(|l| ListenerDoc {
                    name: l.name.clone(),
                    supported_kinds: l
                        .supported_kinds
                        .iter()
                        .map(|k: &RouteGroupKind| GroupKindDoc {
                            group: k.group.clone(),
                            kind: k.kind.clone(),
                        })
                        .collect(),
                    attached_routes: l.attached_routes,
                    conditions: conditions(&l.conditions),
                })
                .collect(),
            ..Default::default()
        };
        docs.push(doc("Gateway", id, status));
    }
    for ((kind, id), route) in &out.routes {
        let status = StatusDoc {
            parents: route
                .parents
                .iter()
                .map(|p| {
                    ParentEntry::new(RouteParentDoc {
                        parent_ref: parent_doc(id, &p.parent_ref),
                        controller_name: p.controller_name.clone(),
                        conditions: conditions(&p.conditions),
                    })
                })
                .collect(),
            ..Default::default()
        };
        docs.push(doc(kind.kind(), id, status));
    }
    docs
}

/// The multi-document YAML of the status file.
pub fn render(docs: &[ObjectStatus]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("status documents serialize"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Writes `text` to `path` atomically (temporary file, then rename).
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// What an earlier status file says: conditions by translate key, and Gateway addresses.
#[derive(Debug, Default)]
pub struct Previous {
    pub conditions: BTreeMap<String, Vec<Condition>>,
    pub addresses: BTreeMap<ObjectRef, Vec<IpAddr>>,
}

/// Reads a status file written before (a missing or unreadable one is an empty history).
pub fn read_previous(path: &Path) -> Previous {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Previous::default();
    };
    let docs: Vec<ObjectStatus> = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|document| ObjectStatus::deserialize(document).ok())
        .collect();
    Previous::from_documents(&docs)
}

impl Previous {
    /// Conditions and addresses as translate wants them next time.
    pub fn from_documents(docs: &[ObjectStatus]) -> Previous {
        let mut previous = Previous::default();
        for object in docs {
            let id = ObjectRef::new(&object.metadata.namespace, &object.metadata.name);
            let conds = |list: &[ConditionDoc]| {
                list.iter()
                    .filter_map(ConditionDoc::to_condition)
                    .collect::<Vec<_>>()
            };
            match object.kind.as_str() {
                "GatewayClass" => {
                    previous.conditions.insert(
                        translate::class_key(&id.name),
                        conds(&object.status.conditions),
                    );
                }
                "Gateway" => {
                    previous.conditions.insert(
                        translate::gateway_key(&id),
                        conds(&object.status.conditions),
                    );
                    for l in &object.status.listeners {
                        previous
                            .conditions
                            .insert(translate::listener_key(&id, &l.name), conds(&l.conditions));
                    }
                    let addresses = object
                        .status
                        .addresses
                        .iter()
                        .filter_map(|a| a.value.parse().ok())
                        .collect();
                    previous.addresses.insert(id, addresses);
                }
                _ if let Some(kind) = Kind::from_name(&object.kind).and_then(Kind::route) => {
                    for p in object.status.parents.iter().filter_map(|p| p.doc.as_ref()) {
                        let r = &p.parent_ref;
                        let parent = ParentRef {
                            group: r.group.clone().unwrap_or_else(gateway_group),
                            kind: r.kind.clone().unwrap_or_else(|| "Gateway".into()),
                            namespace: Some(
                                r.namespace.clone().unwrap_or_else(|| id.namespace.clone()),
                            ),
                            name: p.parent_ref.name.clone(),
                            section_name: p.parent_ref.section_name.clone(),
                            port: p.parent_ref.port,
                        };
                        previous.conditions.insert(
                            translate::route_key(kind, &id, &parent),
                            conds(&p.conditions),
                        );
                    }
                }
                _ => {}
            }
        }
        previous
    }
}
