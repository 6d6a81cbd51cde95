//! Leader election on a `coordination.k8s.io/v1` Lease, so several controller replicas are safe:
//! only the holder programs agents and writes statuses.
//!
//! A lease is free when it has no holder, or when its record has not changed for its duration as
//! measured on this replica's own clock (never by comparing timestamps written by another
//! machine, whose clock may be skewed). Every write carries the resourceVersion it read, so two
//! replicas can never both take the lease.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{PostParams, Resource as _},
};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity` (its pod name in a cluster).
    pub identity: String,
    /// How long a lease stays taken without renewal.
    pub duration: Duration,
    /// How often the holder renews, and others retry.
    pub renew_every: Duration,
}

/// The last version of the lease record seen, and when this replica first saw it.
struct Observed {
    resource_version: Option<String>,
    since: Instant,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Takes or renews the lease: `Ok(true)` when this replica holds it after the call.
async fn try_acquire(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Option<Observed>,
) -> kube::Result<bool> {
    let now = MicroTime(Timestamp::now());
    let duration_seconds = i32::try_from(settings.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(settings.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let version = lease.meta().resource_version.clone();
    if observed
        .as_ref()
        .is_none_or(|o| o.resource_version != version)
    {
        *observed = Some(Observed {
            resource_version: version,
            since: Instant::now(),
        });
    }
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    let ours = holder == settings.identity;
    let their_duration = spec
        .lease_duration_seconds
        .map_or(settings.duration, |s| Duration::from_secs(s.max(0) as u64));
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.since.elapsed() > their_duration);
    if !ours && !holder.is_empty() && !expired {
        return Ok(false);
    }
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(duration_seconds),
        acquire_time: if ours {
            spec.acquire_time
        } else {
            Some(now.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!ours)),
        ..spec
    });
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs the election until the receiver side is dropped; the channel says whether this replica
/// leads. Leadership is given up when the lease could not be renewed within its duration.
pub fn spawn(api: Api<Lease>, settings: LeaseSettings) -> watch::Receiver<bool> {
    let (leader, receiver) = watch::channel(false);
    tokio::spawn(async move {
        let mut observed = None;
        let mut renewed = Instant::now();
        loop {
            let leads = match try_acquire(&api, &settings, &mut observed).await {
                Ok(true) => {
                    renewed = Instant::now();
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    warn!(lease = %settings.name, "lease: {e}");
                    // Stop leading one period before others may take over.
                    *leader.borrow() && renewed.elapsed() + settings.renew_every < settings.duration
                }
            };
            let changed = leader.send_if_modified(|l| std::mem::replace(l, leads) != leads);
            if changed {
                info!(identity = %settings.identity, leads, "leadership changed");
            }
            if leader.is_closed() {
                return;
            }
            tokio::time::sleep(settings.renew_every).await;
        }
    });
    receiver
}

/// Gives the lease up (best effort), so another replica takes over without waiting for expiry.
pub async fn release(api: &Api<Lease>, settings: &LeaseSettings) {
    let Ok(Some(mut lease)) = api.get_opt(&settings.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    if let Err(e) = api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        warn!(lease = %settings.name, "releasing the lease: {e}");
    }
}
