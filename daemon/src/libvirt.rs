//! The libvirt side of vmsnapd. Invariant: only the threads started here call libvirt.
//!
//! Every libvirt call blocks (a synchronous RPC to libvirtd; guest agent calls can take
//! seconds), so none may run on a tokio worker. A dedicated thread owns the connection: it
//! (re)connects, refreshes the VM inventory on a timer, and runs jobs that the async side sends
//! it, answering through oneshot channels.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot};
use tracing::{debug, info, warn};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use vmsnap_api::VmState;

use crate::disks::{LvmProbe, SysfsLvmProbe};
use crate::domain::{parse_domain, VmInfo};

/// What the libvirt thread reports to the engine.
#[derive(Debug)]
pub enum LibvirtEvent {
    /// Connected (again); an inventory follows at once.
    Connected,
    /// The connection could not be made or was lost; the message is libvirt's.
    Unavailable(String),
    /// The complete current list of domains.
    Inventory(Vec<VmInfo>),
}

/// Why a job could not run or what it failed with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LibvirtFailure {
    #[error("libvirt is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Call(String),
}

impl From<virt::error::Error> for LibvirtFailure {
    fn from(e: virt::error::Error) -> Self {
        LibvirtFailure::Call(e.message().to_string())
    }
}

type Job = Box<dyn FnOnce(Option<&Connect>) + Send>;

/// Settings of the libvirt thread.
#[derive(Debug, Clone)]
pub struct LibvirtSettings {
    pub uri: String,
    pub refresh_interval: Duration,
    pub reconnect_interval: Duration,
}

/// Handle the async side uses to run work on the libvirt thread. Cheap to clone.
#[derive(Clone)]
pub struct LibvirtClient {
    jobs: mpsc::Sender<Job>,
}

impl LibvirtClient {
    /// Runs `f` with the connection on the libvirt thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, LibvirtFailure>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, LibvirtFailure> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => f(conn),
                None => Err(LibvirtFailure::Unavailable(
                    "not connected to libvirt".to_string(),
                )),
            };
            // The caller may have gone away (its D-Bus call cancelled); nothing to do then.
            let _ = reply.send(result);
        });
        self.jobs
            .send(job)
            .map_err(|_| LibvirtFailure::Unavailable("the libvirt thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| LibvirtFailure::Unavailable("the libvirt thread has stopped".into()))?
    }
}

/// Starts the libvirt thread. It stops once every [`LibvirtClient`] is dropped.
pub fn start(
    settings: LibvirtSettings,
    events: tokio_mpsc::UnboundedSender<LibvirtEvent>,
) -> std::io::Result<(LibvirtClient, JoinHandle<()>)> {
    // libvirt prints every error to stderr by default; we report them ourselves.
    virt::error::clear_error_callback();
    let (jobs, queue) = mpsc::channel::<Job>();
    let thread = std::thread::Builder::new()
        .name("libvirt".to_string())
        .spawn(move || Worker::new(settings, events).run(queue))?;
    Ok((LibvirtClient { jobs }, thread))
}

struct Worker {
    settings: LibvirtSettings,
    events: tokio_mpsc::UnboundedSender<LibvirtEvent>,
    conn: Option<Connect>,
    last_error: Option<String>,
    lvm: SysfsLvmProbe,
}

impl Worker {
    fn new(settings: LibvirtSettings, events: tokio_mpsc::UnboundedSender<LibvirtEvent>) -> Self {
        Worker {
            settings,
            events,
            conn: None,
            last_error: None,
            lvm: SysfsLvmProbe,
        }
    }

    fn run(mut self, queue: mpsc::Receiver<Job>) {
        let mut next_tick = Instant::now();
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match queue.recv_timeout(timeout) {
                Ok(job) => job(self.conn.as_ref()),
                Err(RecvTimeoutError::Timeout) => {
                    self.tick();
                    next_tick = Instant::now()
                        + if self.conn.is_some() {
                            self.settings.refresh_interval
                        } else {
                            self.settings.reconnect_interval
                        };
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        debug!("libvirt thread stopping");
    }

    /// Connects if needed, then publishes the inventory.
    fn tick(&mut self) {
        if self.conn.is_none() {
            match open(&self.settings.uri) {
                Ok(conn) => {
                    info!(uri = %self.settings.uri, "connected to libvirt");
                    self.conn = Some(conn);
                    self.last_error = None;
                    self.send(LibvirtEvent::Connected);
                }
                Err(e) => {
                    self.mark_unavailable(e.message().to_string());
                    return;
                }
            }
        }
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        match read_inventory(conn, &self.lvm) {
            Ok(vms) => self.send(LibvirtEvent::Inventory(vms)),
            Err(e) => {
                let alive = conn.is_alive().unwrap_or(false);
                if alive {
                    warn!(error = %e, "could not list domains");
                } else {
                    self.conn = None;
                    self.mark_unavailable(format!("connection to libvirt lost: {e}"));
                }
            }
        }
    }

    fn mark_unavailable(&mut self, message: String) {
        if self.last_error.as_deref() != Some(message.as_str()) {
            warn!(uri = %self.settings.uri, error = %message, "libvirt is unavailable");
            self.last_error = Some(message.clone());
            self.send(LibvirtEvent::Unavailable(message));
        }
    }

    fn send(&self, event: LibvirtEvent) {
        // The engine only goes away at shutdown, when losing an event does not matter.
        let _ = self.events.send(event);
    }
}

/// Reads every domain. A domain that vanishes between listing and reading is skipped; it will be
/// gone from the next listing too.
/// Opens a connection to `uri`. libvirt's test driver keeps its state per connection (a
/// `test:///file.xml` connection starts from the file), so for `test:` URIs every thread of this
/// process shares one connection and sees the same domains, as with a real hypervisor.
pub fn open(uri: &str) -> Result<Connect, virt::error::Error> {
    use std::sync::{Mutex, OnceLock};
    static SHARED_TEST: OnceLock<Mutex<Option<Connect>>> = OnceLock::new();
    if !uri.starts_with("test:") {
        return Connect::open(Some(uri));
    }
    let shared = SHARED_TEST.get_or_init(|| Mutex::new(None));
    let mut guard = shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(conn) = guard.as_ref() {
        return Ok(conn.clone());
    }
    let conn = Connect::open(Some(uri))?;
    *guard = Some(conn.clone());
    Ok(conn)
}

fn read_inventory(conn: &Connect, lvm: &dyn LvmProbe) -> Result<Vec<VmInfo>, virt::error::Error> {
    let domains = conn.list_all_domains(0)?;
    let mut vms = Vec::with_capacity(domains.len());
    for domain in domains {
        match read_domain(&domain, lvm) {
            Ok(vm) => vms.push(vm),
            Err(e) => debug!(error = %e, "skipping a domain that could not be read"),
        }
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vms)
}

fn read_domain(domain: &Domain, lvm: &dyn LvmProbe) -> Result<VmInfo, String> {
    let info = domain.info().map_err(|e| e.message().to_string())?;
    let xml = domain.xml_desc(0).map_err(|e| e.message().to_string())?;
    let state = match info.state {
        virt::enumutil::Enum::Known(s) => vm_state(s),
        virt::enumutil::Enum::Unknown(_) => VmState::Unknown,
    };
    parse_domain(&xml, state, lvm)
}

fn vm_state(state: DomainState) -> VmState {
    match state {
        DomainState::NoState => VmState::NoState,
        DomainState::Running => VmState::Running,
        DomainState::Blocked => VmState::Blocked,
        DomainState::Paused => VmState::Paused,
        DomainState::Shutdown => VmState::ShuttingDown,
        DomainState::Shutoff => VmState::ShutOff,
        DomainState::Crashed => VmState::Crashed,
        DomainState::PMSuspended => VmState::Suspended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(uri: &str) -> LibvirtSettings {
        LibvirtSettings {
            uri: uri.to_string(),
            refresh_interval: Duration::from_millis(200),
            reconnect_interval: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn thread_publishes_inventory_and_runs_jobs() {
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        let (client, thread) = start(settings("test:///default"), tx).expect("thread starts");
        assert!(matches!(rx.recv().await, Some(LibvirtEvent::Connected)));
        match rx.recv().await {
            Some(LibvirtEvent::Inventory(vms)) => {
                let names: Vec<_> = vms.iter().map(|vm| vm.name.as_str()).collect();
                assert_eq!(names, ["test"]);
                assert_eq!(vms[0].state, VmState::Running);
            }
            other => panic!("expected an inventory, got {other:?}"),
        }
        let name = client
            .call(|conn| Ok(conn.lookup_domain_by_name("test")?.name()?))
            .await
            .expect("job runs");
        assert_eq!(name, "test");
        let missing = client
            .call(|conn| Ok(conn.lookup_domain_by_name("nope")?.name()?))
            .await;
        assert!(
            matches!(&missing, Err(LibvirtFailure::Call(m)) if m.contains("not found")),
            "{missing:?}"
        );
        drop(client);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join task")
            .expect("thread ends cleanly");
    }

    #[tokio::test]
    async fn unreachable_libvirt_is_reported_once_and_jobs_fail_cleanly() {
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        let (client, _thread) = start(
            settings("qemu+unix:///system?socket=/nonexistent/libvirt-sock"),
            tx,
        )
        .expect("thread starts");
        match rx.recv().await {
            Some(LibvirtEvent::Unavailable(message)) => {
                assert!(message.contains("nonexistent"), "{message}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        let result = client.call(|conn| Ok(conn.is_alive()?)).await;
        assert!(matches!(result, Err(LibvirtFailure::Unavailable(_))));
        // Retries with the same error are not reported again.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(rx.try_recv().is_err());
    }
}
