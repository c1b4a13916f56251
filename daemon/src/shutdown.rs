//! Explicit shutdown: one trigger, any number of listeners. SIGTERM and SIGINT become a future.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::watch;

/// Fires shutdown for every [`Shutdown`] made from it.
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// Resolves once shutdown is triggered. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which counts as shutdown too.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

/// Resolves with the signal's name on the first SIGTERM or SIGINT.
pub async fn termination_signal() -> std::io::Result<&'static str> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let name = match signals.next().await {
        Some(SIGINT) => "SIGINT",
        _ => "SIGTERM",
    };
    signals.handle().close();
    Ok(name)
}
