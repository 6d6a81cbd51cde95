//! The Kubernetes provider: reflectors on every input build the Snapshot; the leader (see
//! `lease`) pushes the desired state to the agents found through the agent DaemonSet's pods,
//! patches statuses that changed with server-side apply, and records Events for errors.
//!
//! Gateway API objects are read as `DynamicObject`s at the version the cluster serves (`v1`, or
//! `v1alpha2` routes / `v1beta1` ReferenceGrants on older installs) and parsed into the
//! `resources` types, so one code path covers every version.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, ObjectReference, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tonic::transport::ClientTlsConfig;
use tracing::{debug, error, info, warn};

use crate::{
    agents::{Agents, SyncState},
    convert,
    lease::{self, LeaseSettings},
    model::{Dataplane, ObjectRef, RouteKind, Snapshot},
    resources,
    status::{self, ObjectStatus, StatusDoc},
    translate::{self, Config, GATEWAY_GROUP as GROUP},
};

/// The field manager of every status patch.
pub const FIELD_MANAGER: &str = "fulgur-controller";

/// How agents are found: the agent DaemonSet's pods.
#[derive(Clone, Debug)]
pub struct AgentDiscovery {
    pub namespace: String,
    /// A label selector, as `kubectl -l` takes it.
    pub selector: String,
    /// Used when a pod has no container port named `grpc`.
    pub port: u16,
    /// `None`: plaintext (`--insecure`).
    pub tls: Option<ClientTlsConfig>,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub controller_name: String,
    pub address_pools: Vec<ipnet::IpNet>,
    pub agents: AgentDiscovery,
    pub lease: LeaseSettings,
    /// How often kinds the cluster did not serve are looked for again.
    pub rediscover_every: Duration,
}

/// The Gateway API kinds, with the versions read, most preferred first.
const GATEWAY_API: [(&str, &[&str]); 5] = [
    ("GatewayClass", &["v1"]),
    ("Gateway", &["v1"]),
    ("TCPRoute", &["v1", "v1alpha2"]),
    ("UDPRoute", &["v1", "v1alpha2"]),
    ("ReferenceGrant", &["v1", "v1beta1"]),
];

fn api_resource(kind: &str) -> ApiResource {
    match kind {
        "GatewayClass" => ApiResource::erase::<resources::GatewayClass>(&()),
        "Gateway" => ApiResource::erase::<resources::Gateway>(&()),
        "TCPRoute" => ApiResource::erase::<resources::TCPRoute>(&()),
        "UDPRoute" => ApiResource::erase::<resources::UDPRoute>(&()),
        _ => ApiResource::erase::<resources::ReferenceGrant>(&()),
    }
}

/// The first of `versions` at which the cluster serves `kind`, if any.
async fn discover(
    client: &Client,
    kind: &str,
    versions: &[&str],
) -> anyhow::Result<Option<ApiResource>> {
    let mut resource = api_resource(kind);
    for version in versions {
        let api_version = format!("{GROUP}/{version}");
        match client.list_api_group_resources(&api_version).await {
            Ok(list) if list.resources.iter().any(|r| r.name == resource.plural) => {
                resource.version = (*version).to_owned();
                resource.api_version = api_version;
                return Ok(Some(resource));
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("discovering {api_version}")),
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
struct GatewayApi {
    served: BTreeMap<&'static str, (ApiResource, Store<DynamicObject>)>,
}

impl GatewayApi {
    /// Starts reflectors for the kinds the cluster now serves and were not watched yet
    /// (Gateway API CRDs are often installed next to, or after, the controller). Returns
    /// whether any started.
    async fn discover_missing(
        &mut self,
        client: &Client,
        changed: &Arc<Notify>,
    ) -> anyhow::Result<bool> {
        // Discover everything first: an error then leaves no reflector half started.
        let mut found = Vec::new();
        for (kind, versions) in GATEWAY_API {
            if !self.served.contains_key(kind)
                && let Some(resource) = discover(client, kind, versions).await?
            {
                found.push((kind, resource));
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

    fn complete(&self) -> bool {
        self.served.len() == GATEWAY_API.len()
    }

    fn objects(&self, kind: &str) -> Vec<Arc<DynamicObject>> {
        self.served
            .get(kind)
            .map(|(_, store)| store.state())
            .unwrap_or_default()
    }
}

struct Stores {
    gateway_api: GatewayApi,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
}

fn spec<T: DeserializeOwned>(object: &DynamicObject) -> Result<T, String> {
    let spec = object.data.get("spec").cloned().unwrap_or_default();
    serde_json::from_value(spec).map_err(|e| format!("spec: {e}"))
}

/// An object's status as this controller writes it; anything unreadable counts as empty.
fn observed_status(object: &DynamicObject) -> StatusDoc {
    object
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default()
}

/// A problem with one object, reported as an Event on it.
struct Invalid {
    object: ObjectReference,
    message: String,
}

fn reference(object: &DynamicObject, resource: &ApiResource) -> ObjectReference {
    let mut reference = object.object_ref(resource);
    reference.field_path = None;
    reference
}

impl Stores {
    async fn start(
        client: &Client,
        settings: &Settings,
        changed: &Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let mut gateway_api = GatewayApi {
            served: BTreeMap::new(),
        };
        gateway_api.discover_missing(client, changed).await?;
        for (kind, _) in GATEWAY_API {
            if !gateway_api.served.contains_key(kind) {
                warn!(
                    kind,
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

    async fn ready(&self) -> anyhow::Result<()> {
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
    fn snapshot(&self, patched: &Patched) -> (Snapshot, Vec<Invalid>) {
        let mut snapshot = Snapshot::default();
        let mut invalid = Vec::new();
        let mut previous_docs = Vec::new();
        for (kind, (resource, store)) in &self.gateway_api.served {
            for object in store.state() {
                let id = convert::object_ref(&object.metadata);
                let meta = convert::meta(&object.metadata);
                let result = match *kind {
                    "GatewayClass" => spec(&object).map(|s| {
                        snapshot
                            .classes
                            .push(convert::gateway_class(&id.name, meta, &s))
                    }),
                    "Gateway" => spec(&object)
                        .and_then(|s| convert::gateway(id.clone(), meta, &s))
                        .map(|g| snapshot.gateways.push(g)),
                    "TCPRoute" | "UDPRoute" => {
                        let route_kind = if *kind == "TCPRoute" {
                            RouteKind::Tcp
                        } else {
                            RouteKind::Udp
                        };
                        spec::<resources::TCPRouteSpec>(&object)
                            .and_then(|s| {
                                convert::route(
                                    route_kind,
                                    id.clone(),
                                    meta,
                                    &s.parent_refs,
                                    &s.rules,
                                    resource.version == "v1",
                                )
                            })
                            .map(|r| snapshot.routes.push(r))
                    }
                    _ => spec(&object).map(|s| {
                        snapshot
                            .grants
                            .push(convert::reference_grant(&id.namespace, &s))
                    }),
                };
                if let Err(message) = result {
                    invalid.push(Invalid {
                        object: reference(&object, resource),
                        message,
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
                Err(message) => invalid.push(Invalid {
                    object: slice.object_ref(&()),
                    message,
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
    fn agents(&self, discovery: &AgentDiscovery) -> BTreeMap<String, ObjectReference> {
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
                Some((url, pod.object_ref(&())))
            })
            .collect()
    }
}

/// Per object: the status patch last sent and the resourceVersion it was sent against.
type Patched = BTreeMap<(String, ObjectRef), (serde_json::Value, Option<String>)>;

/// How statuses name an object: GatewayClasses have no namespace.
fn status_id(kind: &str, object: &DynamicObject) -> ObjectRef {
    let mut id = convert::object_ref(&object.metadata);
    if kind == "GatewayClass" {
        id.namespace = String::new();
    }
    id
}

fn status_doc(kind: &str, id: &ObjectRef, status: StatusDoc) -> ObjectStatus {
    ObjectStatus {
        api_version: format!("{GROUP}/v1"),
        kind: kind.to_owned(),
        metadata: status::MetadataDoc {
            name: id.name.clone(),
            namespace: if kind == "GatewayClass" {
                String::new()
            } else {
                id.namespace.clone()
            },
        },
        status,
    }
}

/// What is left to do for one object's status.
struct StatusPatch {
    kind: &'static str,
    id: ObjectRef,
    body: serde_json::Value,
    /// Conditions that just turned False: reported as Warning events.
    failures: Vec<(String, String)>,
    object: ObjectReference,
    /// The resourceVersion the patch was computed against.
    version: Option<String>,
}

/// The leader's side: agents, statuses, events.
struct Leader {
    settings: Settings,
    agents: Agents,
    recorder: Recorder,
    client: Client,
    last_services: Option<Vec<fulgur_proto::v1::Service>>,
    patched: Patched,
    /// Invalid objects already reported, by uid and resourceVersion.
    reported: BTreeSet<(String, String)>,
    agent_pods: BTreeMap<String, ObjectReference>,
    agent_states: BTreeMap<String, SyncState>,
    /// What the last reconcile was told about the dataplane.
    dataplane: Option<Dataplane>,
}

fn false_conditions(doc: &StatusDoc) -> BTreeSet<(String, String, String)> {
    let all = doc
        .conditions
        .iter()
        .chain(doc.listeners.iter().flat_map(|l| &l.conditions))
        .chain(doc.parents.iter().flat_map(|p| &p.conditions));
    all.filter(|c| c.status == "False")
        .map(|c| (c.type_.clone(), c.reason.clone(), c.message.clone()))
        .collect()
}

impl Leader {
    async fn event(&self, object: &ObjectReference, reason: &str, note: String) {
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1024).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, object).await {
            warn!("recording an event: {e}");
        }
    }

    /// Returns whether everything was done (else the caller retries on its next tick).
    async fn reconcile(&mut self, stores: &Stores) -> bool {
        let (mut snapshot, invalid) = stores.snapshot(&self.patched);
        for Invalid { object, message } in invalid {
            let key = (
                object.uid.clone().unwrap_or_default(),
                object.resource_version.clone().unwrap_or_default(),
            );
            if self.reported.insert(key) {
                warn!(kind = ?object.kind, name = ?object.name, "ignored: {message}");
                self.event(&object, "InvalidObject", message).await;
            }
        }
        self.agent_pods = stores.agents(&self.settings.agents);
        let urls: Vec<String> = self.agent_pods.keys().cloned().collect();
        let mut done = true;
        if let Err(e) = self.agents.set_agents(&urls) {
            error!("agents: {e}");
            done = false;
        }
        snapshot.dataplane = self.agents.dataplane();
        self.dataplane = Some(snapshot.dataplane.clone());
        let now = status::now();
        let config = Config {
            controller_name: &self.settings.controller_name,
            address_pools: &self.settings.address_pools,
            now: &now,
        };
        let out = translate::translate(&config, &snapshot);
        if self.last_services.as_ref() != Some(&out.services) {
            let generation = self.agents.set_desired(out.services.clone());
            info!(
                services = out.services.len(),
                generation, "desired state changed"
            );
            self.last_services = Some(out.services.clone());
        }
        for patch in self.status_patches(stores, &status::documents(&out)) {
            done &= self.patch(stores, patch).await;
        }
        done
    }

    /// Statuses that differ from what the objects show. Route statuses keep the entries of
    /// other controllers; entries of ours for parents no longer referenced are removed.
    fn status_patches(&self, stores: &Stores, docs: &[ObjectStatus]) -> Vec<StatusPatch> {
        let mut wanted: BTreeMap<(&str, ObjectRef), &StatusDoc> = BTreeMap::new();
        for doc in docs {
            let id = ObjectRef::new(&doc.metadata.namespace, &doc.metadata.name);
            wanted.insert((doc.kind.as_str(), id), &doc.status);
        }
        let mut patches = Vec::new();
        for (kind, (resource, _)) in &stores.gateway_api.served {
            if *kind == "ReferenceGrant" {
                continue;
            }
            for object in stores.gateway_api.objects(kind) {
                let id = status_id(kind, &object);
                let observed = observed_status(&object);
                let route = kind.ends_with("Route");
                let mut desired = match wanted.get(&(*kind, id.clone())) {
                    Some(status) => (*status).clone(),
                    // Only routes carry entries of several controllers to clean up.
                    None if route => StatusDoc::default(),
                    None => continue,
                };
                let mut compared = observed.clone();
                if route {
                    let ours = |p: &status::RouteParentDoc| {
                        p.controller_name == self.settings.controller_name
                    };
                    compared.parents.retain(ours);
                    if compared.parents == desired.parents {
                        continue;
                    }
                    let others = observed.parents.iter().filter(|p| !ours(p)).cloned();
                    desired.parents = others.chain(desired.parents).collect();
                } else if compared == desired {
                    continue;
                }
                let raw_status = object.data.get("status").cloned().unwrap_or_default();
                let mut patch_status = serde_json::to_value(&desired).unwrap_or_default();
                if route && desired.parents.is_empty() {
                    patch_status = serde_json::json!({ "parents": [] });
                }
                let mut metadata = serde_json::json!({ "name": id.name });
                if *kind != "GatewayClass" {
                    metadata["namespace"] = id.namespace.clone().into();
                }
                let body = serde_json::json!({
                    "apiVersion": resource.api_version,
                    "kind": kind,
                    "metadata": metadata,
                    "status": patch_status,
                });
                let key = (kind.to_string(), id.clone());
                let version = object.metadata.resource_version.clone();
                if self.patched.get(&key) == Some(&(body.clone(), version.clone())) {
                    continue; // Already sent against this version: the watch has not caught up.
                }
                debug!(%kind, %id, before = %raw_status, "status changed");
                let before = false_conditions(&observed);
                let failures = false_conditions(&desired)
                    .into_iter()
                    .filter(|c| !before.contains(c))
                    .map(|(_, reason, message)| (reason, message))
                    .collect();
                patches.push(StatusPatch {
                    kind,
                    id,
                    body,
                    failures,
                    object: reference(&object, resource),
                    version,
                });
            }
        }
        patches
    }

    /// Returns whether the patch went through.
    async fn patch(&mut self, stores: &Stores, patch: StatusPatch) -> bool {
        let Some((resource, _)) = stores.gateway_api.served.get(patch.kind) else {
            return true;
        };
        let api: Api<DynamicObject> = if patch.kind == "GatewayClass" {
            Api::all_with(self.client.clone(), resource)
        } else {
            Api::namespaced_with(self.client.clone(), &patch.id.namespace, resource)
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&patch.id.name, &params, &Patch::Apply(&patch.body))
            .await
        {
            Ok(_) => {
                info!(kind = patch.kind, id = %patch.id, "status patched");
                self.patched.insert(
                    (patch.kind.to_owned(), patch.id.clone()),
                    (patch.body, patch.version),
                );
                for (reason, message) in patch.failures {
                    self.event(&patch.object, &reason, message).await;
                }
                true
            }
            // Gone meanwhile: its deletion comes through the watch.
            Err(kube::Error::Api(s)) if s.code == 404 => true,
            Err(e) => {
                warn!(kind = patch.kind, id = %patch.id, "patching status: {e}");
                false
            }
        }
    }

    /// Reports agents that fell out of sync or refused the state, once per failure. Returns
    /// whether what the agents say about the dataplane changed (statuses follow it).
    async fn check_agents(&mut self) -> bool {
        let states = self.agents.states();
        for (url, state) in &states {
            let was = self.agent_states.get(url);
            let (reason, error) = match state {
                SyncState::Failed { error } => ("AgentSyncFailed", error),
                SyncState::Refused { error, .. } => ("AgentRefusedState", error),
                _ => continue,
            };
            if was.is_none_or(|w| std::mem::discriminant(w) != std::mem::discriminant(state))
                && let Some(pod) = self.agent_pods.get(url)
            {
                self.event(pod, reason, format!("{url}: {error}")).await;
            }
        }
        self.agent_states = states;
        self.dataplane.as_ref() != Some(&self.agents.dataplane())
    }
}

/// Resolves on SIGINT or SIGTERM (what Kubernetes sends a pod that should stop). The handlers
/// are registered when this is called, not when the future is first polled, so no signal that
/// comes later is lost (nor kills the process unhandled).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!("no signal handlers ({e}): stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Runs the provider until SIGINT/SIGTERM, or until leadership is lost (an error: the process should
/// restart, as a fresh follower, so no two replicas ever act at once).
pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let changed = Arc::new(Notify::new());
    // The API may not answer yet (a control plane starting with the cluster): keep trying.
    let mut stores = loop {
        match Stores::start(&client, &settings, &changed).await {
            Ok(stores) => break stores,
            Err(e) => warn!("{e:#}; trying again in 2 s"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = &mut shutdown => return Ok(()),
        }
    };
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &settings.lease.namespace);
    let mut leader = lease::spawn(lease_api.clone(), settings.lease.clone());
    tokio::select! {
        ready = stores.ready() => ready?,
        _ = &mut shutdown => return Ok(()),
    }
    info!("caches synced");
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(settings.lease.identity.clone()),
    };
    let mut state = Leader {
        agents: Agents::spawn(&[], settings.agents.tls.clone())?,
        recorder: Recorder::new(client.clone(), reporter),
        client,
        settings,
        last_services: None,
        patched: BTreeMap::new(),
        reported: BTreeSet::new(),
        agent_pods: BTreeMap::new(),
        agent_states: BTreeMap::new(),
        dataplane: None,
    };
    let mut leading = false;
    // Set by watch events and by work that must be retried (a failed status patch).
    let mut dirty = true;
    let mut rediscover = tokio::time::interval(state.settings.rediscover_every);
    rediscover.tick().await; // The first tick is immediate: discovery just ran.
    // Agents' answers are checked this often (statuses and events follow them).
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                if leading {
                    lease::release(&lease_api, &state.settings.lease).await;
                }
                return Ok(());
            }
            _ = changed.notified() => dirty = true,
            _ = rediscover.tick(), if !stores.gateway_api.complete() => {
                match stores.gateway_api.discover_missing(&state.client, &changed).await {
                    Ok(started) => dirty |= started,
                    Err(e) => warn!("discovery: {e:#}"),
                }
            }
            result = leader.changed() => result.context("leader election stopped")?,
            _ = tick.tick() => {}
        }
        let leads = *leader.borrow_and_update();
        if leading && !leads {
            bail!("lost the lease {}", state.settings.lease.name);
        }
        if !leads {
            continue;
        }
        if !leading {
            info!(identity = %state.settings.lease.identity, "leading");
            leading = true;
            dirty = true;
        }
        if dirty {
            // Let a burst of watch events settle into one reconcile.
            tokio::time::sleep(Duration::from_millis(50)).await;
            dirty = !state.reconcile(&stores).await;
        }
        dirty |= state.check_agents().await;
    }
}
