//! Discovery, reflectors, and the Snapshot read from their stores.

use std::{collections::BTreeMap, fmt::Debug, hash::Hash, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, ObjectReference, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    runtime::{
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{AgentDiscovery, Error, Settings};
use crate::{
    agents::AgentTarget,
    convert::{self, ConvertError},
    gateway_api::{GROUP, Kind, STATUS_API_VERSION},
    model::{ObjectRef, Snapshot},
    resources,
    status::{self, ObjectStatus, StatusDoc},
};

fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::GatewayClass => ApiResource::erase::<resources::GatewayClass>(&()),
        Kind::Gateway => ApiResource::erase::<resources::Gateway>(&()),
        Kind::TcpRoute => ApiResource::erase::<resources::TCPRoute>(&()),
        Kind::UdpRoute => ApiResource::erase::<resources::UDPRoute>(&()),
        Kind::ReferenceGrant => ApiResource::erase::<resources::ReferenceGrant>(&()),
    }
}

/// The first of the kind's versions that the cluster serves, if any.
async fn discover(client: &Client, kind: Kind) -> Result<Option<ApiResource>, Error> {
    let mut resource = api_resource(kind);
    for version in kind.versions() {
        let api_version = format!("{GROUP}/{version}");
        match client.list_api_group_resources(&api_version).await {
            Ok(list) if list.resources.iter().any(|r| r.name == resource.plural) => {
                resource.version = (*version).to_owned();
                resource.api_version = api_version;
                return Ok(Some(resource));
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Discovery {
                    api_version,
                    source,
                });
            }
        }
    }
    Ok(None)
}

/// Starts a reflector; every change wakes `changed`.
fn reflect<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    config: watcher::Config,
    changed: Arc<Notify>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::new(dyntype);
    let store = writer.as_reader();
    let stream = reflector::reflector(writer, watcher::watcher(api, config));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                // The initial listing wakes the loop once, when it is complete.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    warn!("watch: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    store
}

/// The reflected Gateway API kinds: their served resource and store (absent when not served).
pub(super) struct GatewayApi {
    pub(super) served: BTreeMap<&'static str, (ApiResource, Store<DynamicObject>)>,
}

impl GatewayApi {
    /// Starts reflectors for the kinds the cluster now serves and were not watched yet
    /// (Gateway API CRDs are often installed next to, or after, the controller). Returns
    /// whether any started.
    pub(super) async fn discover_missing(
        &mut self,
        client: &Client,
        changed: &Arc<Notify>,
    ) -> Result<bool, Error> {
        // Discover everything first: an error then leaves no reflector half started.
        let mut found = Vec::new();
        for kind in Kind::ALL {
            if !self.served.contains_key(kind.name())
                && let Some(resource) = discover(client, kind).await?
            {
                found.push((kind.name(), resource));
            }
        }
        let started = !found.is_empty();
        for (kind, resource) in found {
            info!(kind, api_version = %resource.api_version, "watching");
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            let store = reflect(
                api,
                resource.clone(),
                watcher::Config::default(),
                changed.clone(),
            );
            self.served.insert(kind, (resource, store));
        }
        Ok(started)
    }

    pub(super) fn complete(&self) -> bool {
        self.served.len() == Kind::ALL.len()
    }

    pub(super) fn objects(&self, kind: &str) -> Vec<Arc<DynamicObject>> {
        self.served
            .get(kind)
            .map(|(_, store)| store.state())
            .unwrap_or_default()
    }
}

pub(super) struct Stores {
    pub(super) gateway_api: GatewayApi,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
}

fn spec<T: DeserializeOwned>(object: &DynamicObject) -> Result<T, ConvertError> {
    let spec = object.data.get("spec").cloned().unwrap_or_default();
    Ok(serde_json::from_value(spec)?)
}

/// A reflected Gateway API object; unknown fields are the API server's business.
struct ReflectedObject<'a>(&'a DynamicObject);

impl convert::ReadSpec for ReflectedObject<'_> {
    type Error = ConvertError;
    fn gateway_class(&self) -> Result<resources::GatewayClassSpec, ConvertError> {
        spec(self.0)
    }
    fn gateway(&self) -> Result<resources::GatewaySpec, ConvertError> {
        spec(self.0)
    }
    fn route(&self) -> Result<resources::TCPRouteSpec, ConvertError> {
        spec(self.0)
    }
    fn reference_grant(&self) -> Result<resources::ReferenceGrantSpec, ConvertError> {
        spec(self.0)
    }
}

/// An object's status as this controller writes it; anything unreadable counts as empty.
pub(super) fn observed_status(object: &DynamicObject) -> StatusDoc {
    object
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default()
}

/// A problem with one object, reported as an Event on it.
pub(super) struct Invalid {
    pub(super) object: ObjectReference,
    pub(super) message: String,
}

pub(super) fn reference(object: &DynamicObject, resource: &ApiResource) -> ObjectReference {
    let mut reference = object.object_ref(resource);
    reference.field_path = None;
    reference
}

impl Stores {
    pub(super) async fn start(
        client: &Client,
        settings: &Settings,
        changed: &Arc<Notify>,
    ) -> Result<Self, Error> {
        let mut gateway_api = GatewayApi {
            served: BTreeMap::new(),
        };
        gateway_api.discover_missing(client, changed).await?;
        for kind in Kind::ALL {
            if !gateway_api.served.contains_key(kind.name()) {
                warn!(
                    kind = kind.name(),
                    every = ?settings.rediscover_every,
                    "not served by this cluster (yet?): read as empty, discovery repeated"
                );
            }
        }
        let stores = Stores {
            gateway_api,
            services: reflect(
                Api::all(client.clone()),
                (),
                watcher::Config::default(),
                changed.clone(),
            ),
            slices: reflect(
                Api::all(client.clone()),
                (),
                watcher::Config::default(),
                changed.clone(),
            ),
            namespaces: reflect(
                Api::all(client.clone()),
                (),
                watcher::Config::default(),
                changed.clone(),
            ),
            pods: reflect(
                Api::namespaced(client.clone(), &settings.agents.namespace),
                (),
                watcher::Config::default().labels(&settings.agents.selector),
                changed.clone(),
            ),
        };
        Ok(stores)
    }

    pub(super) async fn ready(&self) -> Result<(), Error> {
        for (_, store) in self.gateway_api.served.values() {
            store.wait_until_ready().await?;
        }
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        Ok(())
    }

    /// The Snapshot, with previous conditions and addresses read from the objects' statuses
    /// (or from the patch just sent, while the watch has not shown it yet).
    pub(super) fn snapshot(&self, patched: &Patched) -> (Snapshot, Vec<Invalid>) {
        let mut snapshot = Snapshot::default();
        let mut invalid = Vec::new();
        let mut previous_docs = Vec::new();
        for (kind, (resource, store)) in &self.gateway_api.served {
            for object in store.state() {
                let id = convert::object_ref(&object.metadata);
                let meta = convert::meta(&object.metadata);
                let result = match Kind::from_name(kind) {
                    Some(kind) => convert::add_gateway_api(
                        &mut snapshot,
                        kind,
                        resource.version == "v1",
                        id.clone(),
                        meta,
                        &ReflectedObject(&object),
                    ),
                    None => Ok(()),
                };
                if let Err(problem) = result {
                    invalid.push(Invalid {
                        object: reference(&object, resource),
                        message: problem.to_string(),
                    });
                }
                if *kind != "ReferenceGrant" {
                    let key = (kind.to_string(), status_id(kind, &object));
                    let status = match patched.get(&key) {
                        Some((body, version)) if *version == object.metadata.resource_version => {
                            serde_json::from_value(body["status"].clone()).unwrap_or_default()
                        }
                        _ => observed_status(&object),
                    };
                    previous_docs.push(status_doc(kind, &id, status));
                }
            }
        }
        snapshot.services = self
            .services
            .state()
            .iter()
            .map(|s| convert::service(s))
            .collect();
        for slice in self.slices.state() {
            match convert::endpoint_slice(&slice) {
                Ok(Some(slice)) => snapshot.endpoint_slices.push(slice),
                Ok(None) => {}
                Err(problem) => invalid.push(Invalid {
                    object: slice.object_ref(&()),
                    message: problem.to_string(),
                }),
            }
        }
        for namespace in self.namespaces.state() {
            snapshot
                .namespaces
                .insert(namespace.name_any(), namespace.labels().clone());
        }
        // The store's order is a hash map's: make translate's input deterministic.
        snapshot.classes.sort_by(|a, b| a.name.cmp(&b.name));
        snapshot.gateways.sort_by(|a, b| a.id.cmp(&b.id));
        snapshot
            .routes
            .sort_by(|a, b| (a.kind, &a.id).cmp(&(b.kind, &b.id)));
        snapshot.services.sort_by(|a, b| a.id.cmp(&b.id));
        let previous = status::Previous::from_documents(&previous_docs);
        snapshot.previous_conditions = previous.conditions;
        snapshot.previous_addresses = previous.addresses;
        (snapshot, invalid)
    }

    /// Agents' gRPC URLs by pod: pods with an IP that are not being deleted.
    /// The agent pods by URL, each with its node (`spec.nodeName`; else named after the pod's
    /// address, with every backend local to it) and a reference to it for Events.
    pub(super) fn agents(
        &self,
        discovery: &AgentDiscovery,
    ) -> BTreeMap<String, (AgentTarget, ObjectReference)> {
        let scheme = if discovery.tls.is_some() {
            "https"
        } else {
            "http"
        };
        self.pods
            .state()
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .filter_map(|pod| {
                let ip: std::net::IpAddr = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
                let port = pod
                    .spec
                    .iter()
                    .flat_map(|s| &s.containers)
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| p.name.as_deref() == Some("grpc"))
                    .and_then(|p| u16::try_from(p.container_port).ok())
                    .unwrap_or(discovery.port);
                let url = format!("{scheme}://{}", std::net::SocketAddr::new(ip, port));
                let node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .filter(|n| !n.is_empty());
                let target = AgentTarget {
                    node_given: node.is_some(),
                    node: node.unwrap_or_else(|| ip.to_string()),
                    url: url.clone(),
                };
                Some((url, (target, pod.object_ref(&()))))
            })
            .collect()
    }
}

/// Per object: the status patch last sent and the resourceVersion it was sent against.
pub(super) type Patched = BTreeMap<(String, ObjectRef), (serde_json::Value, Option<String>)>;

/// How statuses name an object: GatewayClasses have no namespace.
pub(super) fn status_id(kind: &str, object: &DynamicObject) -> ObjectRef {
    let mut id = convert::object_ref(&object.metadata);
    if !Kind::from_name(kind).is_some_and(Kind::namespaced) {
        id.namespace = String::new();
    }
    id
}

fn status_doc(kind: &str, id: &ObjectRef, status: StatusDoc) -> ObjectStatus {
    ObjectStatus {
        api_version: STATUS_API_VERSION.into(),
        kind: kind.to_owned(),
        // `id` comes from `status_id`: no namespace for cluster-scoped kinds.
        metadata: status::MetadataDoc {
            name: id.name.clone(),
            namespace: id.namespace.clone(),
        },
        status,
    }
}
