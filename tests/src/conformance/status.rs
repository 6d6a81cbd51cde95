//! Reading the controller's status file as the upstream suite reads the API server's objects.

use std::path::Path;

use fulgur_controller::status::{ListenerDoc, ObjectStatus, RouteParentDoc};
use serde::Deserialize as _;

/// Every document of the status file (none while it does not exist or is being replaced).
pub fn read(path: &Path) -> Vec<ObjectStatus> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return vec![];
    };
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| ObjectStatus::deserialize(doc).ok())
        .collect()
}

pub fn find<'a>(
    docs: &'a [ObjectStatus],
    kind: &str,
    namespace: &str,
    name: &str,
) -> Option<&'a ObjectStatus> {
    docs.iter()
        .find(|d| d.kind == kind && d.metadata.name == name && d.metadata.namespace == namespace)
}

/// Whether `conditions` holds `type_` with `status` (and `reason`, when given).
pub fn has_condition(
    conditions: &[fulgur_controller::status::ConditionDoc],
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == status && reason.is_none_or(|r| c.reason == r))
}

/// The route's `status.parents` entries written by `controller` for the Gateway `gateway`
/// (in `namespace`).
pub fn parents<'a>(
    route: &'a ObjectStatus,
    controller: &'a str,
    namespace: &'a str,
    gateway: &'a str,
) -> impl Iterator<Item = &'a RouteParentDoc> + 'a {
    route
        .status
        .parents
        .iter()
        .filter_map(|p| p.doc.as_ref())
        .filter(move |p| {
            p.controller_name == controller
                && p.parent_ref.name == gateway
                && p.parent_ref
                    .namespace
                    .as_deref()
                    .unwrap_or(&route.metadata.namespace)
                    == namespace
                && p.parent_ref.kind.as_deref().unwrap_or("Gateway") == "Gateway"
        })
}

pub fn listener<'a>(gateway: &'a ObjectStatus, name: &str) -> Option<&'a ListenerDoc> {
    gateway.status.listeners.iter().find(|l| l.name == name)
}

/// One line per condition of `doc`, for error messages.
pub fn describe(doc: Option<&ObjectStatus>) -> String {
    let Some(doc) = doc else {
        return "(not in the status file)".into();
    };
    let fmt = |list: &[fulgur_controller::status::ConditionDoc]| {
        list.iter()
            .map(|c| format!("{}={}/{}", c.type_, c.status, c.reason))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = format!(
        "{} {}/{}:",
        doc.kind, doc.metadata.namespace, doc.metadata.name
    );
    if !doc.status.conditions.is_empty() {
        out += &format!(" [{}]", fmt(&doc.status.conditions));
    }
    for l in &doc.status.listeners {
        out += &format!(
            " listener {} ({} routes) [{}]",
            l.name,
            l.attached_routes,
            fmt(&l.conditions)
        );
    }
    for p in doc.status.parents.iter().filter_map(|p| p.doc.as_ref()) {
        out += &format!(
            " parent {} section {:?} port {:?} [{}]",
            p.parent_ref.name,
            p.parent_ref.section_name,
            p.parent_ref.port,
            fmt(&p.conditions)
        );
    }
    out
}
