//! Life as a system service: readiness and watchdog notifications for systemd (no-ops without
//! NOTIFY_SOCKET), and configuration reload on SIGHUP.

use std::path::PathBuf;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::Config;
use crate::engine::Request;

pub type LogFilterHandle = reload::Handle<EnvFilter, Registry>;

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

/// Called once the objects are served and the name is owned.
pub fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Pings the systemd watchdog at half its interval, but only while the engine answers: a
/// wedged engine should be restarted, not kept alive by a timer.
pub fn spawn_watchdog(engine: mpsc::Sender<Request>) -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let period = interval / 2;
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            let (reply, answer) = oneshot::channel();
            if engine.send(Request::Ping { reply }).await.is_err() {
                return;
            }
            match tokio::time::timeout(period, answer).await {
                Ok(Ok(())) => notify(&[NotifyState::Watchdog]),
                _ => warn!("the engine did not answer in time; not pinging the watchdog"),
            }
        }
    }))
}

/// Re-reads the configuration on SIGHUP and applies what can change while running.
pub struct Reloader {
    path: Option<PathBuf>,
    current: Config,
    log_filter: LogFilterHandle,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, current: Config, log_filter: LogFilterHandle) -> Self {
        Reloader {
            path,
            current,
            log_filter,
        }
    }

    pub async fn reload(&mut self, engine: &mpsc::Sender<Request>) {
        let mut state = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            state.push(now);
        }
        notify(&state);
        match Config::load(self.path.as_deref()) {
            Err(e) => error!("configuration not reloaded, keeping the current one: {e}"),
            Ok((config, _)) => {
                for (key, changed) in [
                    (
                        "libvirt_uri",
                        config.libvirt_uri != self.current.libvirt_uri,
                    ),
                    ("state_dir", config.state_dir != self.current.state_dir),
                    (
                        "vm_lock_dir",
                        config.vm_lock_dir != self.current.vm_lock_dir,
                    ),
                    (
                        "refresh_interval",
                        config.refresh_interval != self.current.refresh_interval,
                    ),
                    (
                        "reconnect_interval",
                        config.reconnect_interval != self.current.reconnect_interval,
                    ),
                ] {
                    if changed {
                        warn!(key, "this setting changes only when vmsnapd restarts");
                    }
                }
                let filter = std::env::var("VMSNAP_LOG")
                    .ok()
                    .and_then(|f| EnvFilter::try_new(f).ok())
                    .or_else(|| EnvFilter::try_new(&config.log_level).ok());
                if let Some(filter) = filter {
                    if let Err(e) = self.log_filter.reload(filter) {
                        warn!(error = %e, "cannot change the log filter");
                    }
                }
                let _ = engine
                    .send(Request::Reconfigure(Box::new(config.clone())))
                    .await;
                info!(
                    freeze_timeout_ms = config.freeze_timeout.as_millis() as u64,
                    require_quiesce = config.require_quiesce,
                    "configuration reloaded"
                );
                self.current = config;
            }
        }
        notify(&[NotifyState::Ready]);
    }
}
