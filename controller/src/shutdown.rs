//! Shutdown signals, the same for both providers.

use tracing::warn;

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
