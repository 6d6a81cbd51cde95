//! One connection per agent, each kept in sync with the desired state: the full state is pushed
//! on every (re)connect and on every change, with a generation that only grows, also across
//! controller restarts (it is derived from the clock and from what the agent reports).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::model::Dataplane;
use fulgur_proto::v1::{
    ApplyRequest, DesiredState, GetRequest, Service, dataplane_client::DataplaneClient,
};
use tokio::sync::watch;
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
}

/// The agents this controller programs. The set can change (agents found through pods come
/// and go); every agent gets the same desired state.
pub struct Agents {
    desired: watch::Sender<Desired>,
    states: Arc<Mutex<BTreeMap<String, SyncState>>>,
    tasks: Mutex<BTreeMap<String, tokio::task::JoinHandle<()>>>,
    tls: Option<ClientTlsConfig>,
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
}

impl AgentsError {
    /// The metric label of this error.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentsError::Url { .. } => "agent_url",
            AgentsError::Scheme { .. } => "agent_scheme",
        }
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

impl Agents {
    /// Starts one task per agent URL (`http://` with `tls = None`, else `https://`).
    pub fn spawn(urls: &[String], tls: Option<ClientTlsConfig>) -> Result<Self, AgentsError> {
        let agents = Agents {
            desired: watch::channel(Desired::default()).0,
            states: Arc::default(),
            tasks: Mutex::default(),
            tls,
        };
        agents.set_agents(urls)?;
        Ok(agents)
    }

    /// Makes `urls` the set of agents: new ones are connected (and get the current state), ones
    /// no longer listed are disconnected. Nothing changes when any URL is invalid.
    pub fn set_agents(&self, urls: &[String]) -> Result<(), AgentsError> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = Vec::new();
        for url in urls.iter().filter(|u| !tasks.contains_key(*u)) {
            new.push((url.clone(), self.endpoint(url)?));
        }
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|url, task| {
            let keep = urls.contains(url);
            if !keep {
                info!(agent = %url, "agent removed");
                task.abort();
                states.remove(url);
            }
            keep
        });
        for (url, endpoint) in new {
            states.insert(url.clone(), SyncState::Connecting);
            let sync = AgentSync {
                url: url.clone(),
                endpoint,
                desired: self.desired.subscribe(),
                states: self.states.clone(),
                synced_once: false,
            };
            tasks.insert(url, tokio::spawn(sync.run()));
        }
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

    /// Sets the desired services; every agent gets them. Returns the new generation.
    pub fn set_desired(&self, services: Vec<Service>) -> u64 {
        let mut generation = 0;
        self.desired.send_modify(|d| {
            d.generation = now_nanos().max(d.generation + 1);
            d.services = services;
            generation = d.generation;
        });
        generation
    }

    /// Every agent's sync state, by URL.
    pub fn states(&self) -> BTreeMap<String, SyncState> {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

struct AgentSync {
    url: String,
    endpoint: Endpoint,
    desired: watch::Receiver<Desired>,
    states: Arc<Mutex<BTreeMap<String, SyncState>>>,
    /// The current session applied a state at least once.
    synced_once: bool,
}

/// Why a session with an agent ended.
enum Ended {
    /// Reconnect after a backoff.
    Retry(String),
}

impl AgentSync {
    fn set(&self, state: SyncState) {
        // An agent that was just removed (its task aborted) must not come back.
        if let Some(entry) = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.url)
        {
            *entry = state;
        }
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
            self.set(SyncState::Failed { error });
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
        let mut agent_generation = match client.get(GetRequest {}).await {
            Ok(r) => r.into_inner().state.map_or(0, |s| s.generation),
            Err(e) => return Ended::Retry(format!("get: {}", e.message())),
        };
        // Nothing is pushed before the controller has computed a state: an empty default would
        // withdraw every service from an agent that a restarted controller reconnects to.
        if self.desired.wait_for(|d| d.generation > 0).await.is_err() {
            return Ended::Retry("controller shutting down".into());
        }
        let mut push = true;
        loop {
            if !push {
                push = true;
                match self
                    .wait_for_change_or_drift(&mut client, agent_generation)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        push = false;
                        continue;
                    }
                    Err(ended) => return ended,
                }
            }
            let desired = self.desired.borrow_and_update().clone();
            let generation = desired.generation.max(agent_generation + 1);
            let request = ApplyRequest {
                state: Some(DesiredState {
                    generation,
                    services: desired.services,
                    ..Default::default()
                }),
            };
            match client.apply(request).await {
                Ok(response) => {
                    agent_generation = response.into_inner().applied_generation;
                    self.synced_once = true;
                    info!(agent = %self.url, generation = agent_generation, "agent in sync");
                    self.set(SyncState::Synced {
                        generation: agent_generation,
                    });
                }
                Err(status)
                    if matches!(
                        status.code(),
                        Code::InvalidArgument | Code::ResourceExhausted
                    ) =>
                {
                    // Retrying the same state cannot help: wait for a new one.
                    warn!(agent = %self.url, "agent refused the state: {}", status.message());
                    self.set(SyncState::Refused {
                        error: status.message().to_owned(),
                        no_resources: status.code() == Code::ResourceExhausted,
                    });
                }
                Err(status) if status.code() == Code::FailedPrecondition => {
                    // Someone applied a newer generation: read it and go above it.
                    match client.get(GetRequest {}).await {
                        Ok(r) => {
                            agent_generation = r.into_inner().state.map_or(0, |s| s.generation)
                        }
                        Err(e) => return Ended::Retry(format!("get: {}", e.message())),
                    }
                    continue;
                }
                Err(status) => return Ended::Retry(format!("apply: {}", status.message())),
            }
            push = false;
        }
    }

    /// `Ok(true)` when a push is due: the desired state changed, or the agent no longer runs
    /// what it was given (it restarted, or someone else programmed it).
    async fn wait_for_change_or_drift(
        &mut self,
        client: &mut DataplaneClient<tonic::transport::Channel>,
        applied: u64,
    ) -> Result<bool, Ended> {
        tokio::select! {
            changed = self.desired.changed() => {
                changed.map_err(|_| Ended::Retry("controller shutting down".into()))?;
                Ok(true)
            }
            _ = tokio::time::sleep(RESYNC) => {
                let state = client
                    .get(GetRequest {})
                    .await
                    .map_err(|e| Ended::Retry(format!("get: {}", e.message())))?
                    .into_inner()
                    .state
                    .unwrap_or_default();
                Ok(state.generation != applied)
            }
        }
    }
}
