//! The standalone provider: a folder of manifests, watched, and a status file. Reads happen
//! at start, on file events that change content, and when a 5 s poll sees names, sizes or
//! modification times change.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use notify::Watcher as _;
use tonic::transport::ClientTlsConfig;
use tracing::{error, info, warn};

use crate::{
    agents::{Agents, AgentsError, AnnounceSettings, Report},
    file,
    metrics::Metrics,
    reconcile::Reconciler,
    shutdown, status,
};

/// Whether a file event can change what the folder holds: a create, a write, a rename or a
/// delete; not an open, a read or an attribute change.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(modify) => !matches!(modify, ModifyKind::Metadata(_)),
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Any | EventKind::Other => true,
    }
}

/// What changes when the folder changes: names, sizes and modification times.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.metadata()
                .ok()
                .map(|m| (e.path(), m.len(), m.modified().ok()))
        })
        .collect();
    entries.sort();
    entries
}

/// What the standalone provider needs from the command line.
pub struct Settings {
    pub manifests: PathBuf,
    pub status_file: PathBuf,
    /// Agents: `NODE=URL`, or a bare gRPC URL (its node is named after its host).
    pub agents: Vec<String>,
    /// Announcement lease and failover bound.
    pub announce: AnnounceSettings,
    /// `None`: plaintext (`--insecure`).
    pub tls: Option<ClientTlsConfig>,
    pub controller_name: String,
    pub address_pools: Vec<ipnet::IpNet>,
}

/// What stops the standalone provider from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Agents(#[from] AgentsError),
    #[error("watching {what}: {source}")]
    Watch { what: String, source: notify::Error },
}

impl Error {
    /// The metric label of this error.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Agents(e) => e.kind(),
            Error::Watch { .. } => "watch",
        }
    }
}

/// Runs the provider until SIGINT/SIGTERM.
pub async fn run(settings: Settings, metrics: Arc<Metrics>) -> Result<(), Error> {
    let Settings {
        manifests,
        status_file,
        agents: agent_urls,
        tls,
        controller_name,
        address_pools,
        announce,
    } = settings;
    let agents = Agents::spawn_with(&agent_urls, tls, announce)?;
    let mut reconciler = Reconciler::new(controller_name, address_pools, metrics.clone());
    let previous = status::read_previous(&status_file);
    let mut previous_conditions = previous.conditions;
    let mut previous_addresses = previous.addresses;
    let mut history = file::History::default();
    let mut last_fingerprint = None;
    let mut last_status = None;
    // inotify tells about changes at once; the slow poll catches what it cannot see (some
    // network file systems).
    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the folder makes open and access events: reacting to them would reload for
        // ever. Errors are passed on, so a lost watch is answered with a read.
        let relevant = match &event {
            Ok(event) => changes_content(&event.kind),
            Err(_) => true,
        };
        if relevant {
            let _ = changed.send(());
        }
    })
    .map_err(|source| Error::Watch {
        what: "the manifests folder".into(),
        source,
    })?;
    watcher
        .watch(&manifests, notify::RecursiveMode::NonRecursive)
        .map_err(|source| Error::Watch {
            what: manifests.display().to_string(),
            source,
        })?;
    let mut poll = tokio::time::interval(Duration::from_secs(5));
    // Agents' answers change the Gateways' Programmed condition.
    let mut agents_tick = tokio::time::interval(Duration::from_millis(200));
    let dataplane = || {
        if agent_urls.is_empty() {
            Report::default()
        } else {
            agents.report()
        }
    };
    let mut last_dataplane = None;
    let mut write_failed = false;
    let mut good: Option<file::Loaded> = None;
    info!(manifests = %manifests.display(), status_file = %status_file.display(), "watching");
    // One listener for the whole run: a signal while reading the folder is not lost.
    let mut shutdown = std::pin::pin!(shutdown::shutdown_signal());
    loop {
        let (notified, polled) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = changes.recv() => (true, false),
            _ = poll.tick() => (false, true),
            _ = agents_tick.tick() => (false, false),
        };
        if notified {
            // An editor's save is several events: read once they settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while changes.try_recv().is_ok() {}
        }
        let print = fingerprint(&manifests);
        let reload = notified || (polled && last_fingerprint.as_ref() != Some(&print));
        metrics.set_agents(agents.states().values());
        let dataplane_now = dataplane();
        if !reload && !write_failed && last_dataplane.as_ref() == Some(&dataplane_now) {
            continue;
        }
        last_dataplane = Some(dataplane_now.clone());
        if reload || good.is_none() {
            last_fingerprint = Some(print);
            // On any error the last good state stays: agents and statuses are left as they are.
            metrics.manifest_reads.inc();
            match file::load(&manifests, &mut history, &status::now()) {
                Ok(loaded) => {
                    info!(objects = loaded.keys.len(), "manifests read");
                    good = Some(loaded);
                    metrics.set_ready();
                }
                Err(errors) => {
                    for e in &errors {
                        metrics.error("manifest");
                        error!("{e}");
                    }
                    warn!(errors = errors.len(), "keeping the last good manifests");
                    if good.is_none() {
                        continue;
                    }
                }
            }
        }
        let Some(loaded) = good.as_mut() else {
            continue;
        };
        let snapshot = &mut loaded.snapshot;
        dataplane_now.apply_to(snapshot);
        snapshot.previous_conditions = previous_conditions.clone();
        snapshot.previous_addresses = previous_addresses.clone();
        let docs = reconciler.reconcile(snapshot, &agents).documents;
        let text = status::render(&docs);
        if last_status.as_ref() != Some(&text) {
            let written = status::write_atomically(&status_file, &text);
            metrics.status_write(written.is_ok());
            write_failed = match written {
                Err(e) => {
                    metrics.error("status_file");
                    error!("writing {}: {e}", status_file.display());
                    true // Tried again on the next tick.
                }
                Ok(()) => {
                    info!(objects = docs.len(), "status file written");
                    last_status = Some(text);
                    false
                }
            };
        }
        let now_previous = status::Previous::from_documents(&docs);
        previous_conditions = now_previous.conditions;
        previous_addresses = now_previous.addresses;
    }
}
