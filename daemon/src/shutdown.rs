//! Explicit shutdown: one trigger, any number of listeners. SIGTERM and SIGINT become a stop
//! request, SIGHUP a reload request.

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
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

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalRequest {
    /// SIGTERM or SIGINT.
    Stop(&'static str),
    /// SIGHUP.
    Reload,
}

/// The daemon's signals as a stream of requests.
pub struct SignalRequests {
    signals: Signals,
}

impl SignalRequests {
    pub fn new() -> std::io::Result<SignalRequests> {
        Ok(SignalRequests {
            signals: Signals::new([SIGTERM, SIGINT, SIGHUP])?,
        })
    }

    /// The next request; a closed signal stream counts as a stop.
    pub async fn next(&mut self) -> SignalRequest {
        match self.signals.next().await {
            Some(SIGHUP) => SignalRequest::Reload,
            Some(SIGINT) => SignalRequest::Stop("SIGINT"),
            _ => SignalRequest::Stop("SIGTERM"),
        }
    }
}
