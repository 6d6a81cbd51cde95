//! The standalone provider: a folder of ordinary Kubernetes YAML, read into a [`Snapshot`].
//!
//! Every problem is reported with its file and line, and a folder with any problem yields no
//! snapshot at all, so the caller keeps the last good one: a typo never withdraws a service.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use serde::Deserialize;

use crate::{
    convert,
    gateway_api::Kind,
    model::{Meta, ObjectRef, Snapshot},
    resources,
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
                AddError::Unknown(path) => error(
                    line_of(&doc, &path).map_or(start, |l| start + l - 1),
                    format!("unknown field {path}"),
                ),
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
    /// A field this controller does not know, by its path (`spec.rules.0.backendRef`).
    Unknown(String),
    Other(String),
}

impl From<serde_yaml::Error> for AddError {
    fn from(e: serde_yaml::Error) -> Self {
        AddError::Yaml(e)
    }
}

impl From<convert::ConvertError> for AddError {
    fn from(e: convert::ConvertError) -> Self {
        AddError::Other(e.to_string())
    }
}

/// Parses a Gateway API document; a field the type does not have is an error.
fn strict<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T, AddError> {
    let mut unknown = Vec::new();
    let value = serde_ignored::deserialize(serde_yaml::Deserializer::from_str(doc), |path| {
        // The derived root type skips these two itself; they were checked by `Head`.
        let path = path.to_string();
        if path != "apiVersion" && path != "kind" {
            unknown.push(path)
        }
    })?;
    match unknown.into_iter().next() {
        Some(path) => Err(AddError::Unknown(path)),
        None => Ok(value),
    }
}

/// The line (from 1) where the last segment of `path` is written as a key in `doc`, in block
/// (`key:`) or flow (`{key: ...}`) style, if it can be found.
fn line_of(doc: &str, path: &str) -> Option<usize> {
    let key = format!("{}:", path.rsplit('.').next()?);
    doc.lines()
        .position(|line| {
            line.match_indices(&key).any(|(at, _)| {
                line[..at]
                    .chars()
                    .next_back()
                    .is_none_or(|c| matches!(c, ' ' | '{' | ',' | '-' | '"' | '\''))
            })
        })
        .map(|i| i + 1)
}

/// A manifest document, parsed strictly: a field the type does not have is an error.
struct StrictDocument<'a>(&'a str);

impl convert::ReadSpec for StrictDocument<'_> {
    type Error = AddError;
    fn gateway_class(&self) -> Result<resources::GatewayClassSpec, AddError> {
        strict::<resources::GatewayClass>(self.0).map(|c| c.spec)
    }
    fn gateway(&self) -> Result<resources::GatewaySpec, AddError> {
        strict::<resources::Gateway>(self.0).map(|g| g.spec)
    }
    fn route(&self) -> Result<resources::TCPRouteSpec, AddError> {
        // The derived root type does not check `kind`: TCPRoute reads both route kinds.
        strict::<resources::TCPRoute>(self.0).map(|r| r.spec)
    }
    fn reference_grant(&self) -> Result<resources::ReferenceGrantSpec, AddError> {
        strict::<resources::ReferenceGrant>(self.0).map(|g| g.spec)
    }
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
    if let Some(kind) = Kind::from_name(&head.kind).filter(|k| k.read_at(version)) {
        let document = StrictDocument(doc);
        convert::add_gateway_api(
            snapshot,
            kind,
            version.ends_with("/v1"),
            id,
            meta,
            &document,
        )?;
        return Ok(true);
    }
    match head.kind.as_str() {
        "Service" if version == "v1" => {
            let mut service: core::Service = serde_yaml::from_str(doc)?;
            service.metadata.namespace = Some(id.namespace);
            snapshot.services.push(convert::service(&service));
        }
        "EndpointSlice" if version == "discovery.k8s.io/v1" => {
            let mut slice: discovery::EndpointSlice = serde_yaml::from_str(doc)?;
            slice.metadata.namespace = Some(id.namespace);
            let slice = convert::endpoint_slice(&slice)?.ok_or_else(|| {
                AddError::Other(format!(
                    "an EndpointSlice needs the {} label",
                    convert::SERVICE_NAME_LABEL
                ))
            })?;
            snapshot.endpoint_slices.push(slice);
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
