//! What the Lease holder does: program the agents, patch statuses that changed, record
//! Events.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
    runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter},
};
use tracing::{debug, error, info, warn};

use super::{
    FIELD_MANAGER, Settings,
    stores::{Invalid, Patched, Stores, observed_status, reference, status_id},
};
use crate::{
    agents::{AgentTarget, Agents, AgentsError, Report, SyncState},
    backends::no_endpoints_message,
    gateway_api::Kind,
    metrics::Metrics,
    model::ObjectRef,
    reconcile::Reconciler,
    status::{self, ObjectStatus, StatusDoc},
};

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
pub(super) struct Leader {
    settings: Settings,
    agents: Agents,
    recorder: Recorder,
    client: Client,
    reconciler: Reconciler,
    patched: Patched,
    /// Invalid objects already reported, by uid and resourceVersion.
    reported: BTreeSet<(String, String)>,
    agent_pods: BTreeMap<String, (AgentTarget, ObjectReference)>,
    agent_states: BTreeMap<String, SyncState>,
    /// What the agents said at the last reconcile: the dataplane, who announces what, and
    /// which nodes forward only to local endpoints.
    dataplane: Option<Report>,
    metrics: Arc<Metrics>,
}

fn false_conditions(doc: &StatusDoc) -> BTreeSet<(String, String, String)> {
    let all = doc
        .conditions
        .iter()
        .chain(doc.listeners.iter().flat_map(|l| &l.conditions))
        .chain(
            doc.parents
                .iter()
                .filter_map(|p| p.doc.as_ref())
                .flat_map(|p| &p.conditions),
        );
    all.filter(|c| c.status == "False")
        .map(|c| (c.type_.clone(), c.reason.clone(), c.message.clone()))
        .collect()
}

impl Leader {
    pub(super) fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, AgentsError> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(settings.lease.identity.clone()),
        };
        let reconciler = Reconciler::new(
            settings.controller_name.clone(),
            settings.address_pools.clone(),
            metrics.clone(),
        );
        Ok(Leader {
            agents: Agents::spawn_with(&[], settings.agents.tls.clone(), settings.announce)?,
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            reconciler,
            patched: BTreeMap::new(),
            reported: BTreeSet::new(),
            agent_pods: BTreeMap::new(),
            agent_states: BTreeMap::new(),
            dataplane: None,
            metrics,
        })
    }

    async fn event(&self, object: &ObjectReference, reason: &str, note: String) {
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1024).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        match self.recorder.publish(&event, object).await {
            Ok(()) => {
                self.metrics.events.inc();
            }
            Err(e) => warn!("recording an event: {e}"),
        }
    }

    /// Returns whether everything was done (else the caller retries on its next tick).
    pub(super) async fn reconcile(&mut self, stores: &Stores) -> bool {
        let (mut snapshot, invalid) = stores.snapshot(&self.patched);
        let mut still_invalid = BTreeSet::new();
        for Invalid { object, message } in invalid {
            let key = (
                object.uid.clone().unwrap_or_default(),
                object.resource_version.clone().unwrap_or_default(),
            );
            still_invalid.insert(key.clone());
            if self.reported.insert(key) {
                warn!(kind = ?object.kind, name = ?object.name, "ignored: {message}");
                self.event(&object, "InvalidObject", message).await;
            }
        }
        // Fixed or deleted objects are forgotten, so the set does not grow with churn.
        self.reported.retain(|key| still_invalid.contains(key));
        self.agent_pods = stores.agents(&self.settings.agents);
        let targets: Vec<AgentTarget> = self.agent_pods.values().map(|(t, _)| t.clone()).collect();
        let mut done = true;
        if let Err(e) = self.agents.set_agents(&targets) {
            error!("agents: {e}");
            done = false;
        }
        let report = self.agents.report();
        report.apply_to(&mut snapshot);
        self.dataplane = Some(report);
        let reconciled = self.reconciler.reconcile(&snapshot, &self.agents);
        for key in reconciled.no_endpoints {
            let kind = key.route_kind.kind();
            let route = stores
                .gateway_api
                .served
                .get(kind)
                .and_then(|(resource, _)| {
                    stores
                        .gateway_api
                        .objects(kind)
                        .into_iter()
                        .find(|o| status_id(kind, o) == key.route)
                        .map(|o| reference(&o, resource))
                });
            if let Some(route) = route {
                self.event(&route, "NoEndpoints", no_endpoints_message(&key))
                    .await;
            }
        }
        let (patches, present) = self.status_patches(stores, &reconciled.documents);
        // Patches of deleted objects are forgotten, so the map does not grow with churn.
        self.patched.retain(|key, _| present.contains(key));
        for patch in patches {
            done &= self.patch(stores, patch).await;
        }
        done
    }

    /// Statuses that differ from what the objects show, and the keys of every object with a
    /// status. Route statuses keep the entries of other controllers; entries of ours for
    /// parents no longer referenced are removed.
    fn status_patches(
        &self,
        stores: &Stores,
        docs: &[ObjectStatus],
    ) -> (Vec<StatusPatch>, BTreeSet<(String, ObjectRef)>) {
        let mut wanted: BTreeMap<(&str, ObjectRef), &StatusDoc> = BTreeMap::new();
        for doc in docs {
            let id = ObjectRef::new(&doc.metadata.namespace, &doc.metadata.name);
            wanted.insert((doc.kind.as_str(), id), &doc.status);
        }
        let mut patches = Vec::new();
        let mut present = BTreeSet::new();
        for (kind, (resource, _)) in &stores.gateway_api.served {
            if *kind == "ReferenceGrant" {
                continue;
            }
            for object in stores.gateway_api.objects(kind) {
                let id = status_id(kind, &object);
                let key = (kind.to_string(), id.clone());
                present.insert(key.clone());
                let observed = observed_status(&object);
                let route = kind.ends_with("Route");
                let mut desired = match wanted.get(&(*kind, id.clone())) {
                    Some(status) => (*status).clone(),
                    // Only routes carry entries of several controllers to clean up.
                    None if route => StatusDoc::default(),
                    None => continue,
                };
                if route {
                    let ours = |p: &&status::ParentEntry| {
                        p.controller_name() == Some(self.settings.controller_name.as_str())
                    };
                    if observed
                        .parents
                        .iter()
                        .filter(ours)
                        .map(|p| &p.doc)
                        .eq(desired.parents.iter().map(|p| &p.doc))
                    {
                        continue;
                    }
                    let others = observed.parents.iter().filter(|p| !ours(p)).cloned();
                    desired.parents = others.chain(desired.parents).collect();
                } else if observed == desired {
                    continue;
                }
                let mut patch_status = serde_json::to_value(&desired).unwrap_or_default();
                if route && desired.parents.is_empty() {
                    // Empty lists are left out when serialized; this one must clear the field.
                    patch_status = serde_json::json!({ "parents": [] });
                }
                let mut metadata = serde_json::json!({ "name": id.name });
                if Kind::from_name(kind).is_some_and(Kind::namespaced) {
                    metadata["namespace"] = id.namespace.clone().into();
                }
                let body = serde_json::json!({
                    "apiVersion": resource.api_version,
                    "kind": kind,
                    "metadata": metadata,
                    "status": patch_status,
                });
                let version = object.metadata.resource_version.clone();
                if self.patched.get(&key) == Some(&(body.clone(), version.clone())) {
                    continue; // Already sent against this version: the watch has not caught up.
                }
                debug!(%kind, %id, "status changed");
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
        (patches, present)
    }

    /// Returns whether the patch went through.
    async fn patch(&mut self, stores: &Stores, patch: StatusPatch) -> bool {
        let Some((resource, _)) = stores.gateway_api.served.get(patch.kind) else {
            return true;
        };
        let api: Api<DynamicObject> = if Kind::from_name(patch.kind).is_some_and(Kind::namespaced) {
            Api::namespaced_with(self.client.clone(), &patch.id.namespace, resource)
        } else {
            Api::all_with(self.client.clone(), resource)
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&patch.id.name, &params, &Patch::Apply(&patch.body))
            .await
        {
            Ok(_) => {
                self.metrics.status_write(true);
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
                self.metrics.status_write(false);
                self.metrics.error("status_patch");
                warn!(kind = patch.kind, id = %patch.id, "patching status: {e}");
                false
            }
        }
    }

    /// Reports agents that fell out of sync or refused the state, once per failure. Returns
    /// whether what the agents say about the dataplane changed (statuses follow it).
    pub(super) async fn check_agents(&mut self) -> bool {
        let states = self.agents.states();
        for (url, state) in &states {
            let was = self.agent_states.get(url);
            let (reason, error) = match state {
                SyncState::Failed { error } => ("AgentSyncFailed", error),
                SyncState::Refused { error, .. } => ("AgentRefusedState", error),
                _ => continue,
            };
            if was.is_none_or(|w| std::mem::discriminant(w) != std::mem::discriminant(state))
                && let Some((_, pod)) = self.agent_pods.get(url)
            {
                self.event(pod, reason, format!("{url}: {error}")).await;
            }
        }
        self.metrics.set_agents(states.values());
        self.agent_states = states;
        self.dataplane.as_ref() != Some(&self.agents.report())
    }
}
