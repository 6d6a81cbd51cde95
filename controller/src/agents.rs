//! One connection per agent, each kept in sync with the desired state: the full state is pushed
//! on every (re)connect and on every change, with a generation that only grows, also across
//! controller restarts (it is derived from the clock and from what the agent reports).
//!
//! Each agent runs on a node and gets its own view of the state: backends on other nodes marked
//! `remote` (or left out for an agent without the "remote-backends" feature), and the Gateway
//! addresses it announces, planned by [`crate::announce`]. Every agent is called (Get) at least
//! every lease / 3, which renews its announce lease.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    announce::{self, AgentFacts},
    model::{Announcement, Announcements, Dataplane, Snapshot},
    translate,
};
use fulgur_proto::{
    features,
    v1::{ApplyRequest, DesiredState, GetRequest, Service, dataplane_client::DataplaneClient},
};
use tokio::sync::{Notify, watch};
use tonic::{
    Code,
    transport::{ClientTlsConfig, Endpoint},
};
use tracing::{info, warn};

/// How one agent is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Not connected yet, or reconnecting.
    Connecting,
    /// The agent runs the state of this generation.
    Synced { generation: u64 },
    /// The last attempt failed (unreachable, transport error); the client retries with backoff.
    Failed { error: String },
    /// The agent refused the desired state: invalid, or more than its maps hold
    /// (`no_resources`). Retrying the same state cannot help, so the client waits for a new one;
    /// the agent keeps running what it had.
    Refused { error: String, no_resources: bool },
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Desired {
    generation: u64,
    services: Vec<Service>,
    /// Endpoint address → node (EndpointSlice `nodeName`).
    endpoint_nodes: BTreeMap<IpAddr, String>,
    /// Each agent's announce list, by URL (the planner's).
    announce: BTreeMap<String, BTreeSet<IpAddr>>,
}

/// What the agents must run, for every node (translate's output).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: Vec<Service>,
    pub endpoint_nodes: BTreeMap<IpAddr, String>,
    /// The Gateway addresses, each announced by one agent.
    pub announce: BTreeSet<IpAddr>,
}

/// An agent: the node it runs on and its gRPC URL.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AgentTarget {
    pub node: String,
    pub url: String,
    /// The node was given (`NODE=URL`, a pod's `spec.nodeName`), not named after the URL's
    /// host: only then are backends on other nodes marked remote. A bare URL's agent counts
    /// every backend as local, as before nodes were known, so existing setups keep working.
    pub node_given: bool,
}

impl AgentTarget {
    /// `NODE=URL`, or a bare URL, whose node is named after its host.
    pub fn parse(spec: &str) -> Result<Self, AgentsError> {
        if let Some((node, url)) = spec.split_once('=')
            && !node.contains('/')
        {
            if node.is_empty() {
                return Err(AgentsError::Node {
                    spec: spec.to_owned(),
                });
            }
            return Ok(AgentTarget {
                node: node.to_owned(),
                url: url.to_owned(),
                node_given: true,
            });
        }
        let host = spec
            .parse::<tonic::codegen::http::Uri>()
            .ok()
            .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_owned()))
            .unwrap_or_else(|| spec.to_owned());
        Ok(AgentTarget {
            node: host,
            url: spec.to_owned(),
            node_given: false,
        })
    }
}

/// Announcement timing: the lease the agents get, and how long an announcer may be lost before
/// its addresses move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnounceSettings {
    pub lease: Duration,
    pub failover: Duration,
}

impl Default for AnnounceSettings {
    fn default() -> Self {
        AnnounceSettings {
            lease: Duration::from_millis(1000),
            failover: Duration::from_secs(2),
        }
    }
}

/// One agent as the tasks and the planner see it.
#[derive(Clone, Debug)]
struct Record {
    state: SyncState,
    features: BTreeSet<String>,
    /// `features` comes from a Get (before the first one, nothing is known).
    features_read: bool,
    /// As [`AgentTarget::node_given`]: backends on other nodes are remote to it.
    node_given: bool,
    facts: AgentFacts,
}

impl Record {
    /// It forwards only to endpoints on its own node: backends on other nodes are left out of
    /// its state, as it does not list "remote-backends".
    fn local_only(&self) -> bool {
        self.node_given && self.features_read && !self.features.contains(features::REMOTE_BACKENDS)
    }
}

/// What the agents say, for the statuses. The providers copy it into the Snapshot, and
/// reconcile again when it changes. The default is what holds without agents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub dataplane: Dataplane,
    pub announcements: Announcements,
    pub local_only_nodes: BTreeSet<String>,
}

impl Report {
    pub fn apply_to(&self, snapshot: &mut Snapshot) {
        snapshot.dataplane = self.dataplane.clone();
        snapshot.announcements = self.announcements.clone();
        snapshot.local_only_nodes = self.local_only_nodes.clone();
    }
}

impl Record {
    /// Recomputes eligibility after a change.
    fn refresh(&mut self) {
        let why_not = if !self.facts.in_contact {
            Some("not in contact".to_owned())
        } else if matches!(self.state, SyncState::Refused { .. }) {
            Some("refuses the state".to_owned())
        } else if !self.features.contains(features::ANNOUNCE) {
            Some("its agent does not list the \"announce\" feature (an older agent)".to_owned())
        } else {
            None
        };
        self.facts.eligible = why_not.is_none();
        self.facts.why_not = why_not;
    }
}

#[derive(Debug, Default)]
struct Shared {
    records: BTreeMap<String, Record>,
    addresses: BTreeSet<IpAddr>,
    facts: BTreeMap<IpAddr, Announcement>,
}

impl Shared {
    /// Plans the announcements; hands changed lists to the agents. Returns when to plan again.
    fn replan(&mut self, desired: &watch::Sender<Desired>, failover: Duration) -> Option<Instant> {
        let facts: BTreeMap<String, AgentFacts> = self
            .records
            .iter()
            .map(|(url, r)| (url.clone(), r.facts.clone()))
            .collect();
        let plan = announce::plan(&self.addresses, &facts, Instant::now(), failover);
        desired.send_if_modified(|d| {
            let changed = d.announce != plan.lists;
            d.announce = plan.lists;
            changed
        });
        self.facts = plan.facts;
        plan.next_deadline
    }
}

/// The agents this controller programs. The set can change (agents found through pods come
/// and go).
pub struct Agents {
    desired: Arc<watch::Sender<Desired>>,
    shared: Arc<Mutex<Shared>>,
    replan: Arc<Notify>,
    tasks: Mutex<BTreeMap<String, tokio::task::JoinHandle<()>>>,
    planner: tokio::task::JoinHandle<()>,
    tls: Option<ClientTlsConfig>,
    announce: AnnounceSettings,
}

/// Reconnect delays: from `MIN_BACKOFF`, doubling up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A synced agent is checked this often (a cheap Get), so a restarted agent, or one that lost
/// its state, is noticed and re-synced even when nothing changes.
const RESYNC: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    #[error("agent address {url:?}: {source}")]
    Url {
        url: String,
        source: tonic::transport::Error,
    },
    #[error(
        "agent address {url:?}: {expected} (mutual TLS: https://HOST:PORT; --insecure: http://HOST:PORT)"
    )]
    Scheme { url: String, expected: &'static str },
    #[error("agent {spec:?}: NODE=URL needs a node name")]
    Node { spec: String },
}

impl AgentsError {
    /// The metric label of this error.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentsError::Url { .. } => "agent_url",
            AgentsError::Scheme { .. } => "agent_scheme",
            AgentsError::Node { .. } => "agent_node",
        }
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

impl Agents {
    /// Starts one task per agent (`NODE=URL` or a bare URL: `http://` with `tls = None`, else
    /// `https://`), with the default announcement timing.
    pub fn spawn(specs: &[String], tls: Option<ClientTlsConfig>) -> Result<Self, AgentsError> {
        Self::spawn_with(specs, tls, AnnounceSettings::default())
    }

    /// As [`Agents::spawn`], with this announcement timing.
    pub fn spawn_with(
        specs: &[String],
        tls: Option<ClientTlsConfig>,
        announce: AnnounceSettings,
    ) -> Result<Self, AgentsError> {
        let targets = specs
            .iter()
            .map(|s| AgentTarget::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let desired = Arc::new(watch::channel(Desired::default()).0);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let replan = Arc::new(Notify::new());
        let planner = tokio::spawn(plan_announcements(
            shared.clone(),
            desired.clone(),
            replan.clone(),
            announce.failover,
        ));
        let agents = Agents {
            desired,
            shared,
            replan,
            tasks: Mutex::default(),
            planner,
            tls,
            announce,
        };
        agents.set_agents(&targets)?;
        Ok(agents)
    }

    /// Makes `targets` the set of agents: new ones are connected (and get the current state),
    /// ones no longer listed are disconnected. Nothing changes when any URL is invalid. Two
    /// agents may share a node (a rollout, or tests on one host): both count its endpoints as
    /// local, and rendezvous ties go by URL.
    pub fn set_agents(&self, targets: &[AgentTarget]) -> Result<(), AgentsError> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = Vec::new();
        for target in targets.iter().filter(|t| !tasks.contains_key(&t.url)) {
            new.push((target.clone(), self.endpoint(&target.url)?));
        }
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|url, task| {
            let keep = targets.iter().any(|t| t.url == *url);
            if !keep {
                info!(agent = %url, "agent removed");
                task.abort();
                shared.records.remove(url);
            }
            keep
        });
        for (target, endpoint) in new {
            shared.records.insert(
                target.url.clone(),
                Record {
                    state: SyncState::Connecting,
                    features: BTreeSet::new(),
                    features_read: false,
                    node_given: target.node_given,
                    facts: AgentFacts {
                        node: target.node.clone(),
                        first_contact_since: Some(Instant::now()),
                        ..AgentFacts::default()
                    },
                },
            );
            let sync = AgentSync {
                url: target.url.clone(),
                node: target.node.clone(),
                node_given: target.node_given,
                endpoint,
                desired: self.desired.subscribe(),
                shared: self.shared.clone(),
                replan: self.replan.clone(),
                announce: self.announce,
                synced_once: false,
            };
            tasks.insert(target.url, tokio::spawn(sync.run()));
        }
        drop(shared);
        self.replan.notify_one();
        Ok(())
    }

    fn endpoint(&self, url: &str) -> Result<Endpoint, AgentsError> {
        // A TLS setting that does not match the scheme would fail at every connect, or worse,
        // send plaintext to an agent that expects TLS: refuse it up front.
        let (prefix, expected) = if self.tls.is_some() {
            ("https://", "mutual TLS needs an https:// address")
        } else {
            ("http://", "plaintext needs an http:// address")
        };
        if !url.starts_with(prefix) {
            return Err(AgentsError::Scheme {
                url: url.to_owned(),
                expected,
            });
        }
        let error = |source| AgentsError::Url {
            url: url.to_owned(),
            source,
        };
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(error)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30));
        match &self.tls {
            Some(tls) => endpoint.tls_config(tls.clone()).map_err(error),
            None => Ok(endpoint),
        }
    }

    /// Sets the desired services, the same on every node (no endpoint nodes, nothing to
    /// announce). Returns the new generation.
    pub fn set_desired(&self, services: Vec<Service>) -> u64 {
        self.set_cluster_state(ClusterState {
            services,
            ..ClusterState::default()
        })
    }

    /// Sets what the agents must run; each gets its node's view. Returns the new generation.
    pub fn set_cluster_state(&self, state: ClusterState) -> u64 {
        let mut generation = 0;
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.addresses = state.announce;
        self.desired.send_modify(|d| {
            d.generation = now_nanos().max(d.generation + 1);
            d.services = state.services;
            d.endpoint_nodes = state.endpoint_nodes;
            generation = d.generation;
        });
        shared.replan(&self.desired, self.announce.failover);
        generation
    }

    /// Every agent's sync state, by URL.
    pub fn states(&self) -> BTreeMap<String, SyncState> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .iter()
            .map(|(url, r)| (url.clone(), r.state.clone()))
            .collect()
    }

    /// Who announces each Gateway address, for the Gateways' `Programmed` condition.
    pub fn announcements(&self) -> BTreeMap<IpAddr, Announcement> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .facts
            .clone()
    }

    /// Each agent's node and the addresses it announces by its last answer, by URL.
    pub fn announced(&self) -> BTreeMap<String, (String, BTreeSet<IpAddr>)> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .iter()
            .map(|(url, r)| (url.clone(), (r.facts.node.clone(), r.facts.acked.clone())))
            .collect()
    }

    /// What the agents say about the desired state, for the Gateways' `Programmed` condition.
    /// An update still on its way does not count as pending: the agents keep running the
    /// previous state meanwhile, so a Gateway does not flap on every change.
    pub fn dataplane(&self) -> Dataplane {
        let states = self.states();
        let refused = states.iter().find_map(|(url, s)| match s {
            SyncState::Refused {
                error,
                no_resources,
            } => Some((format!("agent {url}: {error}"), *no_resources)),
            _ => None,
        });
        match refused {
            Some((error, true)) => Dataplane::NoResources(error),
            Some((error, false)) => Dataplane::Invalid(error),
            None if states.is_empty() => Dataplane::Pending("no agents found".into()),
            None if !states
                .values()
                .any(|s| matches!(s, SyncState::Synced { .. })) =>
            {
                Dataplane::Pending(format!("waiting for {} agents", states.len()))
            }
            None => Dataplane::Programmed,
        }
    }

    /// The nodes whose agents forward only to local endpoints (see [`Report`]).
    pub fn local_only_nodes(&self) -> BTreeSet<String> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .values()
            .filter(|r| r.local_only())
            .map(|r| r.facts.node.clone())
            .collect()
    }

    /// Everything the agents say for the statuses.
    pub fn report(&self) -> Report {
        Report {
            dataplane: self.dataplane(),
            announcements: Announcements::Checked(self.announcements()),
            local_only_nodes: self.local_only_nodes(),
        }
    }

    /// Waits until every agent runs a generation at least `generation`.
    pub async fn wait_synced(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let all = self
                .states()
                .values()
                .all(|s| matches!(s, SyncState::Synced { generation: g } if *g >= generation));
            if all {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.planner.abort();
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            task.abort();
        }
    }
}

/// Plans the announcements whenever an agent's facts change, and when a lost announcer's
/// failover bound passes.
async fn plan_announcements(
    shared: Arc<Mutex<Shared>>,
    desired: Arc<watch::Sender<Desired>>,
    replan: Arc<Notify>,
    failover: Duration,
) {
    loop {
        let deadline = shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replan(&desired, failover);
        let wake = deadline.map_or_else(
            || Instant::now() + Duration::from_secs(1),
            |d| d + Duration::from_millis(1),
        );
        tokio::select! {
            _ = replan.notified() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// What one agent is given: its node's services and its announce list.
#[derive(Clone, Debug, Default, PartialEq)]
struct View {
    services: Vec<Service>,
    announce: BTreeSet<IpAddr>,
    lease_ms: u32,
}

struct AgentSync {
    url: String,
    node: String,
    node_given: bool,
    endpoint: Endpoint,
    desired: watch::Receiver<Desired>,
    shared: Arc<Mutex<Shared>>,
    replan: Arc<Notify>,
    announce: AnnounceSettings,
    /// The current session applied a state at least once.
    synced_once: bool,
}

/// Why a session with an agent ended.
enum Ended {
    /// Reconnect after a backoff.
    Retry(String),
}

/// What an agent reported in Get.
struct Reported {
    generation: u64,
    announce: BTreeSet<IpAddr>,
}

fn addresses(list: &[String]) -> BTreeSet<IpAddr> {
    list.iter().filter_map(|a| a.parse().ok()).collect()
}

impl AgentSync {
    /// Changes this agent's record (unless it was just removed) and has the planner look.
    fn update(&self, change: impl FnOnce(&mut Record)) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        // An agent that was just removed (its task aborted) must not come back.
        if let Some(record) = shared.records.get_mut(&self.url) {
            change(record);
            record.refresh();
        }
        drop(shared);
        self.replan.notify_one();
    }

    fn set(&self, state: SyncState) {
        self.update(|r| r.state = state);
    }

    /// Notes that an RPC is about to be sent (it renews the agent's lease).
    fn sending(&self, announcing: &BTreeSet<IpAddr>) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(record) = shared.records.get_mut(&self.url) {
            record.facts.last_request = Some(Instant::now());
            record.facts.maybe.extend(announcing.iter().copied());
        }
    }

    /// This agent's view of the desired state, read under the planner's lock so that what is
    /// sent is what the planner last decided; when it differs from `pushed` (it is about to be
    /// sent) its addresses are noted as maybe announced under the same lock.
    fn next_view(&mut self, pushed: &Option<View>) -> (u64, View) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let desired = self.desired.borrow_and_update().clone();
        let features = shared
            .records
            .get(&self.url)
            .map(|r| r.features.clone())
            .unwrap_or_default();
        let announces = features.contains(features::ANNOUNCE);
        let view = View {
            services: translate::node_services(
                &desired.services,
                &desired.endpoint_nodes,
                self.node_given.then_some(self.node.as_str()),
                features.contains(features::REMOTE_BACKENDS),
            ),
            announce: if announces {
                desired.announce.get(&self.url).cloned().unwrap_or_default()
            } else {
                BTreeSet::new()
            },
            lease_ms: if announces {
                u32::try_from(self.announce.lease.as_millis()).unwrap_or(u32::MAX)
            } else {
                0
            },
        };
        if pushed.as_ref() != Some(&view)
            && let Some(record) = shared.records.get_mut(&self.url)
        {
            record.facts.last_request = Some(Instant::now());
            record.facts.maybe.extend(view.announce.iter().copied());
        }
        (desired.generation, view)
    }

    /// Get: the agent's generation, what it announces now, and (into the record) its features.
    async fn get(
        &self,
        client: &mut DataplaneClient<tonic::transport::Channel>,
    ) -> Result<Reported, Ended> {
        self.sending(&BTreeSet::new());
        let mut request = tonic::Request::new(GetRequest {});
        request.set_timeout(self.announce.lease.max(Duration::from_millis(300)));
        let response = client
            .get(request)
            .await
            .map_err(|e| Ended::Retry(format!("get: {}", e.message())))?
            .into_inner();
        let state = response.state.unwrap_or_default();
        let reported = Reported {
            generation: state.generation,
            announce: addresses(&state.announce),
        };
        let features: BTreeSet<String> = response.features.into_iter().collect();
        let announce = reported.announce.clone();
        self.update(|r| {
            r.features = features;
            r.features_read = true;
            r.facts.in_contact = true;
            r.facts.first_contact_since = None;
            r.facts.acked = announce.clone();
            r.facts.maybe = announce;
        });
        Ok(reported)
    }

    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let synced_before = self.synced_once;
            let Ended::Retry(error) = self.session().await;
            // A session that got as far as a successful apply starts the backoff over.
            if self.synced_once && !synced_before {
                backoff = MIN_BACKOFF;
            }
            self.synced_once = false;
            warn!(agent = %self.url, %error, retry_in = ?backoff, "agent not in sync");
            self.update(|r| {
                r.state = SyncState::Failed { error };
                r.facts.in_contact = false;
                r.facts.first_contact_since = None;
            });
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects, then pushes the full state now and on every change, until something fails.
    async fn session(&mut self) -> Ended {
        self.set(SyncState::Connecting);
        let channel = match self.endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => return Ended::Retry(format!("connect: {e}")),
        };
        let mut client = DataplaneClient::new(channel);
        // What the agent already runs: its generation must be exceeded.
        let mut agent_generation = match self.get(&mut client).await {
            Ok(r) => r.generation,
            Err(ended) => return ended,
        };
        // Nothing is pushed before the controller has computed a state: an empty default would
        // withdraw every service from an agent that a restarted controller reconnects to.
        // Meanwhile the agent is called as often as when in sync (its lease).
        let keepalive = self.keepalive();
        loop {
            if self.desired.borrow().generation > 0 {
                break;
            }
            tokio::select! {
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        return Ended::Retry("controller shutting down".into());
                    }
                }
                _ = tokio::time::sleep(keepalive) => {
                    if let Err(ended) = self.get(&mut client).await {
                        return ended;
                    }
                }
            }
        }
        let mut pushed: Option<View> = None;
        // What the agent announces by the last answer to an Apply.
        let mut expected = BTreeSet::new();
        loop {
            let (desired_generation, view) = self.next_view(&pushed);
            if pushed.as_ref() != Some(&view) {
                let generation = desired_generation.max(agent_generation + 1);
                let request = ApplyRequest {
                    state: Some(DesiredState {
                        generation,
                        services: view.services.clone(),
                        announce: view.announce.iter().map(IpAddr::to_string).collect(),
                        announce_lease_ms: view.lease_ms,
                    }),
                };
                let answer = {
                    let apply = client.apply(request);
                    tokio::pin!(apply);
                    tokio::select! {
                        answer = &mut apply => answer,
                        _ = tokio::time::sleep(self.announce.lease) => {
                            // Unanswered for a lease (a node gone off the network): it renewed
                            // no lease since, so it counts as lost and its addresses move after
                            // the failover bound. The answer may still come.
                            self.update(|r| r.facts.in_contact = false);
                            apply.await
                        }
                    }
                };
                match answer {
                    Ok(response) => {
                        agent_generation = response.into_inner().applied_generation;
                        self.synced_once = true;
                        info!(agent = %self.url, node = %self.node, generation = agent_generation,
                            announce = ?view.announce, "agent in sync");
                        let announce = view.announce.clone();
                        expected = announce.clone();
                        self.update(|r| {
                            r.state = SyncState::Synced {
                                generation: agent_generation,
                            };
                            r.facts.in_contact = true;
                            r.facts.acked = announce.clone();
                            r.facts.maybe = announce;
                        });
                        pushed = Some(view);
                    }
                    Err(status)
                        if matches!(
                            status.code(),
                            Code::InvalidArgument | Code::ResourceExhausted
                        ) =>
                    {
                        // Retrying the same state cannot help: wait for a new one. Nothing was
                        // applied: the agent announces what it did before.
                        warn!(agent = %self.url, "agent refused the state: {}", status.message());
                        self.update(|r| {
                            r.state = SyncState::Refused {
                                error: status.message().to_owned(),
                                no_resources: status.code() == Code::ResourceExhausted,
                            };
                            r.facts.in_contact = true;
                            r.facts.maybe = r.facts.acked.clone();
                        });
                        pushed = Some(view);
                    }
                    Err(status) if status.code() == Code::FailedPrecondition => {
                        // Someone applied a newer generation: read it and go above it.
                        match self.get(&mut client).await {
                            Ok(r) => agent_generation = r.generation,
                            Err(ended) => return ended,
                        }
                        continue;
                    }
                    Err(status) => return Ended::Retry(format!("apply: {}", status.message())),
                }
            }
            match self
                .wait_for_change_or_drift(&mut client, agent_generation, &expected)
                .await
            {
                Ok(true) => pushed = None,
                Ok(false) => {}
                Err(ended) => return ended,
            }
        }
    }

    /// How often a synced agent is called: often enough to renew its lease (every lease / 3),
    /// and so that a restarted agent, or one that lost its state, is noticed and re-synced.
    fn keepalive(&self) -> Duration {
        RESYNC.min(self.announce.lease / 3)
    }

    /// `Ok(false)` when the desired state changed (the caller compares this agent's view),
    /// `Ok(true)` when the agent no longer runs what it was given (it restarted, someone else
    /// programmed it, or its announce lease lapsed): push again.
    async fn wait_for_change_or_drift(
        &mut self,
        client: &mut DataplaneClient<tonic::transport::Channel>,
        applied: u64,
        expected: &BTreeSet<IpAddr>,
    ) -> Result<bool, Ended> {
        let keepalive = self.keepalive();
        tokio::select! {
            changed = self.desired.changed() => {
                changed.map_err(|_| Ended::Retry("controller shutting down".into()))?;
                Ok(false)
            }
            _ = tokio::time::sleep(keepalive) => {
                let reported = self.get(client).await?;
                Ok(reported.generation != applied || reported.announce != *expected)
            }
        }
    }
}
