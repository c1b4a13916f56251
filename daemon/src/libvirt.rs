//! The libvirt side of vmsnapd. Invariant: only the threads started here call libvirt.
//!
//! Every libvirt call blocks (a synchronous RPC to libvirtd; guest agent calls can take
//! seconds), so none may run on a tokio worker. A dedicated thread owns the connection: it
//! (re)connects, keeps the VM inventory, and runs jobs that the async side sends it, answering
//! through oneshot channels.
//!
//! The inventory follows libvirt's domain events. A second thread runs libvirt's default event
//! loop; the callbacks registered on each new connection ([`events`]) only pass the UUID of the
//! domain they name to the libvirt thread, which re-reads that one domain. A full re-read (the
//! reconcile) runs after every (re)connect and then every `refresh_interval`, for what libvirt
//! reports no event for: a disk-only snapshot changes a running domain's disk sources silently,
//! and an LVM volume appearing changes a disk's classification. libvirt's close callback reports
//! a lost connection at once, so there is nothing to poll.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot};
use tracing::{debug, info, warn};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;
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
    Inventory(Inventory),
}

/// Every domain as the libvirt thread last read it, sorted by name. Each domain is shared with
/// the thread's own map: publishing after an event costs a pointer per domain, and a domain
/// the event did not change is the very same `Arc` as in the inventory before.
pub type Inventory = Arc<Vec<Arc<VmInfo>>>;

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

/// What the libvirt thread is sent.
enum Msg {
    /// Work from the async side.
    Job(Job),
    /// Re-read the domain with this UUID: libvirt reported an event about it, or an operation
    /// changed it.
    Domain(String),
    /// libvirt closed connection number `generation` (libvirtd stopped, keepalive timed out).
    Closed { generation: u64, reason: i32 },
    /// The last [`LibvirtClient`] is gone.
    Stop,
}

/// The inventory as the libvirt thread last read it, for operations on their own threads (the
/// image forest asks it which images every domain uses, instead of reading every domain).
/// Empty while the thread has no current inventory (not connected yet, or disconnected).
#[derive(Debug, Default)]
pub struct KnownDomains {
    inventory: std::sync::RwLock<Option<Inventory>>,
    /// Domains (lower-case UUIDs) that vmsnapd's own operations changed and that the published
    /// inventory may not show as they are now, each with the number of its latest mark.
    changed: std::sync::Mutex<(u64, BTreeMap<String, u64>)>,
}

/// What the inventory shows, and which domains in it may be behind.
#[derive(Debug, Clone)]
pub struct InventoryView {
    pub vms: Inventory,
    /// Lower-case UUIDs of domains to read again rather than trust `vms` for.
    pub changed: BTreeSet<String>,
}

impl KnownDomains {
    pub fn get(&self) -> Option<InventoryView> {
        let vms = self
            .inventory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let changed = self.lock_changed().1.keys().cloned().collect();
        Some(InventoryView { vms, changed })
    }

    fn lock_changed(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<String, u64>)> {
        self.changed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a domain as changed by vmsnapd until the inventory has read it again.
    fn mark_changed(&self, uuid: &str) {
        let mut guard = self.lock_changed();
        guard.0 += 1;
        let mark = guard.0;
        guard.1.insert(uuid.to_ascii_lowercase(), mark);
    }

    /// The marks as they are before a read: the ones a published read may clear.
    fn marks(&self) -> BTreeMap<String, u64> {
        self.lock_changed().1.clone()
    }

    fn set_inventory(&self, vms: Option<Inventory>) {
        *self.inventory.write().unwrap_or_else(|p| p.into_inner()) = vms;
    }

    /// After an inventory that read the domains `read` again has been published (`set_inventory`),
    /// clears their marks taken before the read (`marks`), unless marked again since.
    fn clear_marks(&self, marks: &BTreeMap<String, u64>, read: &BTreeSet<String>) {
        let mut guard = self.lock_changed();
        for (uuid, mark) in marks {
            if read.contains(uuid) && guard.1.get(uuid) == Some(mark) {
                guard.1.remove(uuid);
            }
        }
    }
}

/// Settings of the libvirt thread.
#[derive(Debug, Clone)]
pub struct LibvirtSettings {
    pub uri: String,
    /// Where the thread publishes each inventory it reads.
    pub known: Arc<KnownDomains>,
    /// How often the whole inventory is re-read while connected (events carry the rest).
    pub reconcile_interval: Duration,
    pub reconnect_interval: Duration,
}

/// The clients' end of the thread's queue. Dropped with the last client, it tells the thread to
/// stop: the queue itself stays open, since libvirt's callbacks hold senders of it too.
struct ClientQueue(mpsc::Sender<Msg>);

impl Drop for ClientQueue {
    fn drop(&mut self) {
        // The thread may have stopped already; nothing to tell it then.
        let _ = self.0.send(Msg::Stop);
    }
}

/// Handle the async side uses to run work on the libvirt thread. Cheap to clone.
#[derive(Clone)]
pub struct LibvirtClient {
    queue: Arc<ClientQueue>,
    known: Arc<KnownDomains>,
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
        self.queue
            .0
            .send(Msg::Job(job))
            .map_err(|_| LibvirtFailure::Unavailable("the libvirt thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| LibvirtFailure::Unavailable("the libvirt thread has stopped".into()))?
    }

    /// The inventory the thread publishes.
    pub fn known(&self) -> Arc<KnownDomains> {
        self.known.clone()
    }

    /// A handle that asks for one domain to be re-read; it does not keep the thread running.
    pub fn refresher(&self) -> DomainRefresher {
        DomainRefresher {
            queue: self.queue.0.clone(),
            known: self.known.clone(),
        }
    }
}

/// Asks the libvirt thread to re-read one domain, for changes libvirt sends no event about.
/// Never blocks, so it may be used on a tokio worker.
#[derive(Clone)]
pub struct DomainRefresher {
    queue: mpsc::Sender<Msg>,
    known: Arc<KnownDomains>,
}

impl DomainRefresher {
    /// Called before anything else can act on what vmsnapd changed: until the inventory has
    /// read the domain again, the image forest reads it itself.
    pub fn refresh(&self, uuid: &str) {
        self.known.mark_changed(uuid);
        // A stopped thread has no inventory left to refresh.
        let _ = self.queue.send(Msg::Domain(uuid.to_string()));
    }
}

/// Starts the libvirt thread (and, once per process, libvirt's event loop). The thread stops
/// once every [`LibvirtClient`] is dropped.
pub fn start(
    settings: LibvirtSettings,
    events: tokio_mpsc::UnboundedSender<LibvirtEvent>,
) -> std::io::Result<(LibvirtClient, JoinHandle<()>)> {
    // libvirt prints every error to stderr by default; we report them ourselves.
    virt::error::clear_error_callback();
    // Before the thread connects: libvirt watches a connection's socket (events, keepalive)
    // only if an event loop was registered when the connection was opened.
    start_event_loop().map_err(std::io::Error::other)?;
    let (queue, inbox) = mpsc::channel::<Msg>();
    let notices = queue.clone();
    let known = settings.known.clone();
    let thread = std::thread::Builder::new()
        .name("libvirt".to_string())
        .spawn(move || Worker::new(settings, events, notices).run(inbox))?;
    Ok((
        LibvirtClient {
            queue: Arc::new(ClientQueue(queue)),
            known,
        },
        thread,
    ))
}

/// Registers libvirt's default event loop implementation and starts the thread that runs it,
/// once per process (libvirt allows one registration, and unit tests start many workers).
fn start_event_loop() -> Result<(), String> {
    static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    EVENT_LOOP
        .get_or_init(|| {
            virt::event::event_register_default_impl()
                .map_err(|e| format!("cannot register libvirt's event loop: {}", e.message()))?;
            std::thread::Builder::new()
                .name("libvirt-events".to_string())
                .spawn(run_event_loop)
                .map(drop)
                .map_err(|e| format!("cannot start libvirt's event thread: {e}"))
        })
        .clone()
}

/// Runs libvirt's event loop for the rest of the process. It dispatches the callbacks of
/// [`events`] and answers libvirtd's keepalives on every connection this process opens, while
/// the calls themselves stay on the threads that make them.
fn run_event_loop() {
    loop {
        if let Err(e) = virt::event::event_run_default_impl() {
            // Only a failing poll() gets here; the pause keeps a lasting failure from spinning.
            warn!(error = %e.message(), "libvirt's event loop failed");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

struct Worker {
    settings: LibvirtSettings,
    events: tokio_mpsc::UnboundedSender<LibvirtEvent>,
    /// Given to libvirt's callbacks, which pass what they learn back to this thread.
    notices: mpsc::Sender<Msg>,
    conn: Option<Connect>,
    /// The callbacks registered on `conn`; dropped (deregistered) before it.
    callbacks: Option<events::Registration>,
    /// Counts connections, so that a late close notice of an earlier one is ignored.
    generation: u64,
    last_error: Option<String>,
    lvm: SysfsLvmProbe,
    /// The inventory as last read, by lower-case UUID.
    vms: BTreeMap<String, Arc<VmInfo>>,
    /// `vms` changed since the engine was last sent it.
    changed: bool,
    /// Domains (lower-case UUIDs) that events named, to re-read once the queue is empty: a
    /// domain starting sends several events at once.
    pending: BTreeSet<String>,
    /// When the next reconcile (connected) or connection attempt (not connected) is due.
    next_tick: Instant,
}

impl Worker {
    fn new(
        settings: LibvirtSettings,
        events: tokio_mpsc::UnboundedSender<LibvirtEvent>,
        notices: mpsc::Sender<Msg>,
    ) -> Self {
        Worker {
            settings,
            events,
            notices,
            conn: None,
            callbacks: None,
            generation: 0,
            last_error: None,
            lvm: SysfsLvmProbe,
            vms: BTreeMap::new(),
            changed: false,
            pending: BTreeSet::new(),
            next_tick: Instant::now(),
        }
    }

    fn run(mut self, inbox: mpsc::Receiver<Msg>) {
        'run: loop {
            // Checked first, so that a steady stream of messages cannot hold off the reconcile.
            if Instant::now() >= self.next_tick {
                self.tick();
            }
            let timeout = self.next_tick.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(timeout) {
                Ok(msg) => {
                    if !self.handle(msg) {
                        break;
                    }
                    // Whatever else is queued (a burst of events when many VMs start) is taken
                    // in before the domains are read, each once, and the engine is sent one
                    // inventory for all of it.
                    while let Ok(msg) = inbox.try_recv() {
                        if !self.handle(msg) {
                            break 'run;
                        }
                    }
                    let marks = self.settings.known.marks();
                    let mut read = BTreeSet::new();
                    for uuid in std::mem::take(&mut self.pending) {
                        if self.reread(&uuid) {
                            read.insert(uuid);
                        }
                    }
                    self.publish_if_changed();
                    self.settings.known.clear_marks(&marks, &read);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.disconnect();
        debug!("libvirt thread stopping");
    }

    /// Handles one message; false means stop.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Job(job) => job(self.conn.as_ref()),
            Msg::Domain(uuid) => {
                self.pending.insert(uuid.to_ascii_lowercase());
            }
            Msg::Closed { generation, reason } => {
                if generation == self.generation && self.conn.is_some() {
                    self.lose(format!(
                        "connection to libvirt lost: {}",
                        events::close_reason(reason)
                    ));
                }
            }
            Msg::Stop => return false,
        }
        true
    }

    /// Connects if needed, then re-reads the whole inventory.
    fn tick(&mut self) {
        if self.conn.is_none() && !self.connect() {
            self.next_tick = Instant::now() + self.settings.reconnect_interval;
            return;
        }
        self.reconcile();
        self.next_tick = Instant::now()
            + if self.conn.is_some() {
                self.settings.reconcile_interval
            } else {
                self.settings.reconnect_interval
            };
    }

    fn connect(&mut self) -> bool {
        let conn = match open(&self.settings.uri) {
            Ok(conn) => conn,
            Err(e) => {
                self.mark_unavailable(e.message().to_string());
                return false;
            }
        };
        self.generation += 1;
        // Before the first full read, so that no change can fall between the two.
        self.callbacks = Some(events::Registration::new(
            &conn,
            &self.notices,
            self.generation,
            &self.settings.uri,
        ));
        info!(uri = %self.settings.uri, "connected to libvirt");
        self.conn = Some(conn);
        self.last_error = None;
        self.send(LibvirtEvent::Connected);
        true
    }

    /// Drops the connection, its callbacks first.
    fn disconnect(&mut self) {
        self.callbacks = None;
        self.conn = None;
        // No events arrive any more: what was read cannot be kept current.
        self.settings.known.set_inventory(None);
    }

    /// The connection is gone: report it and try again after `reconnect_interval`.
    fn lose(&mut self, message: String) {
        self.disconnect();
        self.mark_unavailable(message);
        self.next_tick = Instant::now() + self.settings.reconnect_interval;
    }

    /// Re-reads every domain and sends the engine the whole list.
    fn reconcile(&mut self) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let marks = self.settings.known.marks();
        let domains = match conn.list_all_domains(0) {
            Ok(domains) => domains,
            Err(e) => return self.call_failed(&e, "could not list domains"),
        };
        let mut vms = BTreeMap::new();
        // Domains read now, or known gone: their marks can go once this is published.
        let mut read: BTreeSet<String> = marks.keys().cloned().collect();
        for domain in domains {
            match read_domain(&domain, &self.lvm) {
                Ok(vm) => {
                    let key = vm.uuid.to_ascii_lowercase();
                    // Unchanged: the same `Arc` as before, shared rather than kept twice.
                    let vm = match self.vms.get(&key) {
                        Some(last) if **last == vm => last.clone(),
                        _ => Arc::new(vm),
                    };
                    vms.insert(key, vm);
                }
                // Vanished since the listing: it is not in the next one either.
                Err(ReadError::Gone) => {}
                Err(e) => {
                    // Listed, so it exists: keep it as last read rather than have it drop off
                    // the bus until the next reconcile.
                    let last = domain
                        .uuid_string()
                        .ok()
                        .and_then(|uuid| self.vms.get(&uuid.to_ascii_lowercase()));
                    debug!(error = %e, kept = last.is_some(), "a domain could not be read");
                    if let Ok(uuid) = domain.uuid_string() {
                        read.remove(&uuid.to_ascii_lowercase());
                    }
                    if let Some(last) = last {
                        vms.insert(last.uuid.to_ascii_lowercase(), last.clone());
                    }
                }
            }
        }
        self.vms = vms;
        // Sent even when nothing changed: the engine settles on the first one after a
        // (re)connect, and an unchanged list costs it one comparison per VM.
        self.changed = true;
        self.publish_if_changed();
        self.settings.known.clear_marks(&marks, &read);
    }

    /// Re-reads one domain, after an event about it; false when it could not be read.
    fn reread(&mut self, uuid: &str) -> bool {
        // Not connected: the reconcile that follows the next connection reads it.
        let Some(conn) = self.conn.as_ref() else {
            return false;
        };
        let key = uuid.to_ascii_lowercase();
        let read = conn
            .lookup_domain_by_uuid_string(uuid)
            .map_err(ReadError::from)
            .and_then(|domain| read_domain(&domain, &self.lvm));
        let now = match read {
            Ok(vm) => Some(vm),
            Err(ReadError::Gone) => None,
            Err(ReadError::Call(e)) => {
                self.call_failed(&e, "could not re-read a domain; kept as last read");
                return false;
            }
            Err(ReadError::Unreadable(e)) => {
                debug!(uuid, error = %e, "a domain could not be read; kept as last read");
                return false;
            }
        };
        if self.vms.get(&key).map(|last| &**last) == now.as_ref() {
            return true;
        }
        match now {
            Some(vm) => self.vms.insert(key, Arc::new(vm)),
            None => self.vms.remove(&key),
        };
        self.changed = true;
        true
    }

    /// A call on the connection failed: the connection is lost, or only the call failed.
    fn call_failed(&mut self, error: &virt::error::Error, what: &str) {
        let alive = self
            .conn
            .as_ref()
            .is_some_and(|conn| conn.is_alive().unwrap_or(false));
        if alive {
            warn!(error = %error, "{what}");
        } else {
            self.lose(format!("connection to libvirt lost: {error}"));
        }
    }

    fn publish_if_changed(&mut self) {
        if !std::mem::take(&mut self.changed) {
            return;
        }
        let mut vms: Vec<Arc<VmInfo>> = self.vms.values().cloned().collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        let vms = Arc::new(vms);
        self.settings.known.set_inventory(Some(vms.clone()));
        self.send(LibvirtEvent::Inventory(vms));
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

/// Why a domain could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// libvirt has no such domain (any more).
    #[error("no such domain")]
    Gone,
    #[error("{0}")]
    Call(virt::error::Error),
    /// Its XML is not what vmsnapd can read.
    #[error("{0}")]
    Unreadable(String),
}

impl From<virt::error::Error> for ReadError {
    fn from(e: virt::error::Error) -> Self {
        match e.code() {
            virt::enumutil::Enum::Known(ErrorNumber::NoDomain) => ReadError::Gone,
            _ => ReadError::Call(e),
        }
    }
}

fn read_domain(domain: &Domain, lvm: &dyn LvmProbe) -> Result<VmInfo, ReadError> {
    let info = domain.info()?;
    let xml = domain.xml_desc(0)?;
    let state = match info.state {
        virt::enumutil::Enum::Known(s) => vm_state(s),
        virt::enumutil::Enum::Unknown(_) => VmState::Unknown,
    };
    parse_domain(&xml, state, lvm).map_err(ReadError::Unreadable)
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

/// libvirt's domain event and close callbacks, through `virt::sys` (the `virt` crate has no safe
/// API for them). Each callback only sends a [`Msg`] to the libvirt thread: it runs on the
/// event loop's thread, which must not wait on libvirt calls of its own.
mod events {
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::sync::mpsc;

    use tracing::{debug, warn};
    use virt::connect::Connect;
    use virt::error::Error;
    use virt::sys;

    use super::Msg;

    /// libvirtd is pinged after this many seconds without traffic...
    const KEEPALIVE_INTERVAL: i32 = 5;
    /// ...and the connection closed after this many unanswered pings.
    const KEEPALIVE_COUNT: u32 = 5;

    /// What a callback needs: where to send, and which connection it belongs to. Owned by
    /// libvirt from registration until it calls [`free_target`].
    struct Target {
        queue: mpsc::Sender<Msg>,
        generation: u64,
    }

    type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    type StateFn =
        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void);
    type LifecycleFn = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int;
    type DeviceFn =
        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);
    type BlockJobFn = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        *const c_char,
        c_int,
        c_int,
        *mut c_void,
    );
    type DiskChangeFn = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        *const c_char,
        *const c_char,
        *const c_char,
        c_int,
        *mut c_void,
    );

    /// The events that change what a `VmInfo` holds, with the callback for each. Lifecycle
    /// covers defined, undefined (renamed too), started, stopped, paused and resumed; devices
    /// and block jobs (a commit's pivot) change the disks; disk change is a removable medium's
    /// new source. Metadata and tunable changes touch nothing vmsnapd shows, so they are not
    /// followed.
    fn domain_events() -> [(u32, &'static str, Generic); 6] {
        // SAFETY (each transmute): libvirt calls the callback registered for an event ID with
        // that event's own signature (this cast is C's VIR_DOMAIN_EVENT_CALLBACK), and each
        // function here has the signature of the event it is listed with.
        unsafe {
            [
                (
                    sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    "lifecycle",
                    std::mem::transmute::<LifecycleFn, Generic>(on_lifecycle),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
                    "agent-lifecycle",
                    std::mem::transmute::<StateFn, Generic>(on_agent),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                    "device-added",
                    std::mem::transmute::<DeviceFn, Generic>(on_device),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                    "device-removed",
                    std::mem::transmute::<DeviceFn, Generic>(on_device),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                    "block-job-2",
                    std::mem::transmute::<BlockJobFn, Generic>(on_block_job),
                ),
                (
                    sys::VIR_DOMAIN_EVENT_ID_DISK_CHANGE,
                    "disk-change",
                    std::mem::transmute::<DiskChangeFn, Generic>(on_disk_change),
                ),
            ]
        }
    }

    /// The callbacks registered on one connection. Dropping it deregisters them, which frees
    /// their targets.
    pub(super) struct Registration {
        conn: Connect,
        ids: Vec<c_int>,
        close: bool,
    }

    impl Registration {
        /// Registers every callback on `conn`. One libvirt refuses is logged and left out: the
        /// reconcile still catches what it would have reported. libvirt tracks a function once
        /// per connection and event, so there is one Registration per connection at a time.
        pub(super) fn new(
            conn: &Connect,
            queue: &mpsc::Sender<Msg>,
            generation: u64,
            uri: &str,
        ) -> Registration {
            let target = || Target {
                queue: queue.clone(),
                generation,
            };
            let mut ids = Vec::new();
            for (id, name, callback) in domain_events() {
                match register_domain_event(conn, id, callback, target()) {
                    Ok(callback_id) => ids.push(callback_id),
                    Err(e) => warn!(
                        event = name,
                        error = %e,
                        "cannot follow this libvirt event; the inventory's periodic full read \
                         catches up"
                    ),
                }
            }
            // The test driver keeps no close callback (it accepts one and never calls or frees
            // it) and its connection never closes; nor does it do keepalive.
            let mut close = false;
            if !uri.starts_with("test:") {
                match register_close(conn, target()) {
                    Ok(()) => close = true,
                    Err(e) => warn!(error = %e, "cannot watch the libvirt connection"),
                }
                // With no calls for minutes now, pings are how a dead libvirtd (or network) is
                // noticed; a lost socket closes the connection at once anyway.
                if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
                    debug!(error = %e, "libvirt keepalive not enabled");
                }
            }
            Registration {
                conn: conn.clone(),
                ids,
                close,
            }
        }
    }

    impl Drop for Registration {
        fn drop(&mut self) {
            for id in self.ids.drain(..) {
                // SAFETY: `self.conn` holds a reference, so the pointer is valid; `id` was
                // returned by RegisterAny on this connection and is deregistered once.
                let rc = unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id) };
                if rc < 0 {
                    // Expected on a closed connection: libvirt drops the callback (and frees its
                    // target) locally before telling libvirtd, which is what failed.
                    debug!(error = %Error::last_error(), "deregistering a libvirt event callback");
                }
            }
            if self.close {
                // SAFETY: valid connection pointer; `on_close` is the callback registered on it.
                let rc = unsafe {
                    sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close))
                };
                if rc < 0 {
                    debug!(error = %Error::last_error(), "deregistering the close callback");
                }
            }
        }
    }

    fn register_domain_event(
        conn: &Connect,
        event_id: u32,
        callback: Generic,
        target: Target,
    ) -> Result<c_int, Error> {
        let opaque = Box::into_raw(Box::new(target));
        // SAFETY: valid connection pointer; a null domain means every domain; `callback` has
        // the signature of `event_id` (see domain_events); `opaque` is a live Target that
        // libvirt hands back to the callback and frees through `free_target` when the callback
        // is deregistered or the connection goes.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                // Event IDs are small numbers (below 64).
                event_id as c_int,
                Some(callback),
                opaque.cast(),
                Some(free_target),
            )
        };
        if id < 0 {
            // The target is left allocated (a few bytes, on a failure only): whether libvirt
            // kept or freed it on the way out is not documented, and freeing it twice is worse.
            return Err(Error::last_error());
        }
        Ok(id)
    }

    fn register_close(conn: &Connect, target: Target) -> Result<(), Error> {
        let opaque = Box::into_raw(Box::new(target));
        // SAFETY: as in register_domain_event; libvirt frees `opaque` through `free_target`
        // when the callback is unregistered or the connection is freed.
        let rc = unsafe {
            sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(on_close),
                opaque.cast(),
                Some(free_target),
            )
        };
        if rc < 0 {
            // Left allocated, as in register_domain_event.
            return Err(Error::last_error());
        }
        Ok(())
    }

    /// Words for a `virConnectCloseReason`.
    pub(super) fn close_reason(reason: i32) -> &'static str {
        match u32::try_from(reason) {
            Ok(sys::VIR_CONNECT_CLOSE_REASON_EOF) => "libvirtd closed it",
            Ok(sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE) => "libvirtd stopped answering keepalives",
            Ok(sys::VIR_CONNECT_CLOSE_REASON_CLIENT) => "closed by vmsnapd",
            _ => "an I/O error on it",
        }
    }

    /// Sends the UUID of `dom` to the libvirt thread.
    ///
    /// # Safety
    /// `dom` is the domain libvirt passed to an event callback (valid for the call's
    /// duration); `opaque` is the `Target` registered with that callback.
    unsafe fn notify(dom: sys::virDomainPtr, opaque: *mut c_void) {
        if dom.is_null() || opaque.is_null() {
            return;
        }
        // SAFETY: libvirt keeps the Target alive until it calls free_target, which it never
        // does while the callback runs; it is only read (mpsc::Sender is Sync).
        let target = unsafe { &*opaque.cast::<Target>() };
        let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
        // SAFETY: `dom` is valid for this call; `buf` has the VIR_UUID_STRING_BUFLEN bytes the
        // call writes (a local read of the domain object, no RPC).
        if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } < 0 {
            return;
        }
        // SAFETY: on success libvirt wrote a NUL-terminated string into `buf`.
        let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) };
        // The thread is gone only at shutdown.
        let _ = target
            .queue
            .send(Msg::Domain(uuid.to_string_lossy().into_owned()));
    }

    unsafe extern "C" fn on_lifecycle(
        _conn: sys::virConnectPtr,
        dom: sys::virDomainPtr,
        _event: c_int,
        _detail: c_int,
        opaque: *mut c_void,
    ) -> c_int {
        // SAFETY: called by libvirt as a domain event callback with our Target.
        unsafe { notify(dom, opaque) };
        0
    }

    unsafe extern "C" fn on_agent(
        _conn: sys::virConnectPtr,
        dom: sys::virDomainPtr,
        _state: c_int,
        _reason: c_int,
        opaque: *mut c_void,
    ) {
        // SAFETY: called by libvirt as a domain event callback with our Target.
        unsafe { notify(dom, opaque) };
    }

    unsafe extern "C" fn on_device(
        _conn: sys::virConnectPtr,
        dom: sys::virDomainPtr,
        _alias: *const c_char,
        opaque: *mut c_void,
    ) {
        // SAFETY: called by libvirt as a domain event callback with our Target.
        unsafe { notify(dom, opaque) };
    }

    unsafe extern "C" fn on_block_job(
        _conn: sys::virConnectPtr,
        dom: sys::virDomainPtr,
        _disk: *const c_char,
        _kind: c_int,
        _status: c_int,
        opaque: *mut c_void,
    ) {
        // SAFETY: called by libvirt as a domain event callback with our Target.
        unsafe { notify(dom, opaque) };
    }

    unsafe extern "C" fn on_disk_change(
        _conn: sys::virConnectPtr,
        dom: sys::virDomainPtr,
        _old_source: *const c_char,
        _new_source: *const c_char,
        _alias: *const c_char,
        _reason: c_int,
        opaque: *mut c_void,
    ) {
        // SAFETY: called by libvirt as a domain event callback with our Target.
        unsafe { notify(dom, opaque) };
    }

    unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
        if opaque.is_null() {
            return;
        }
        // SAFETY: the Target registered with the close callback, alive until free_target.
        let target = unsafe { &*opaque.cast::<Target>() };
        let _ = target.queue.send(Msg::Closed {
            generation: target.generation,
            reason,
        });
    }

    /// libvirt's free callback for every Target.
    unsafe extern "C" fn free_target(opaque: *mut c_void) {
        if !opaque.is_null() {
            // SAFETY: `opaque` came from Box::into_raw of a Target, and libvirt calls this once
            // per registration, after its callback's last call.
            drop(unsafe { Box::from_raw(opaque.cast::<Target>()) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by each test that runs a thread on the shared test connection, until the thread
    /// has stopped: libvirt tracks a callback function once per connection and event, so a
    /// second thread's registrations on the same connection are refused.
    static TEST_CONNECTION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Drops the client and waits for the thread to end (its callbacks deregistered).
    async fn stop(client: LibvirtClient, thread: JoinHandle<()>) {
        drop(client);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join task")
            .expect("thread ends cleanly");
    }

    #[test]
    fn a_domain_vmsnapd_changed_is_trusted_again_only_once_a_read_after_the_change_is_published() {
        let known = KnownDomains::default();
        assert!(known.get().is_none(), "no inventory yet");
        known.set_inventory(Some(Arc::new(Vec::new())));
        known.mark_changed("AB-CD");
        let changed = |k: &KnownDomains| k.get().expect("inventory").changed;
        assert!(changed(&known).contains("ab-cd"));
        // A read that started before a second change does not clear it...
        let marks = known.marks();
        known.mark_changed("ab-cd");
        known.clear_marks(&marks, &BTreeSet::from(["ab-cd".to_string()]));
        assert!(changed(&known).contains("ab-cd"));
        // ...nor does one that read other domains; one after it, of this domain, does.
        let marks = known.marks();
        known.clear_marks(&marks, &BTreeSet::from(["ef".to_string()]));
        assert!(changed(&known).contains("ab-cd"));
        known.clear_marks(&marks, &BTreeSet::from(["ab-cd".to_string()]));
        assert!(changed(&known).is_empty());
        known.set_inventory(None);
        assert!(known.get().is_none(), "disconnected: nothing to trust");
    }

    fn settings(uri: &str) -> LibvirtSettings {
        LibvirtSettings {
            uri: uri.to_string(),
            known: Arc::default(),
            reconcile_interval: Duration::from_millis(200),
            reconnect_interval: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn thread_publishes_inventory_and_runs_jobs() {
        let _connection = TEST_CONNECTION.lock().await;
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        let (client, thread) = start(settings("test:///default"), tx).expect("thread starts");
        assert!(matches!(rx.recv().await, Some(LibvirtEvent::Connected)));
        match rx.recv().await {
            Some(LibvirtEvent::Inventory(vms)) => {
                // Other tests of this process may define domains on the shared test connection.
                let test = vms
                    .iter()
                    .find(|vm| vm.name == "test")
                    .expect("the test domain");
                assert_eq!(test.state, VmState::Running);
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
        // A refresher (like libvirt's callbacks) does not keep the thread running.
        let refresher = client.refresher();
        stop(client, thread).await;
        refresher.refresh("11111111-1111-1111-1111-111111111111");
    }

    /// Waits for an inventory in which `check` holds, skipping the others.
    async fn inventory_where(
        rx: &mut tokio_mpsc::UnboundedReceiver<LibvirtEvent>,
        what: &str,
        check: impl Fn(&[Arc<VmInfo>]) -> bool,
    ) {
        let wait = async {
            loop {
                match rx.recv().await {
                    Some(LibvirtEvent::Inventory(vms)) if check(&vms) => return,
                    Some(_) => continue,
                    None => panic!("the libvirt thread stopped"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("no inventory with {what} within 10 s"));
    }

    #[tokio::test]
    async fn domain_events_update_the_inventory_between_full_reads() {
        const NAME: &str = "vmsnap-events-test";
        const UUID: &str = "5e5e5e5e-0000-4000-8000-000000000001";
        let (tx, mut rx) = tokio_mpsc::unbounded_channel();
        let _connection = TEST_CONNECTION.lock().await;
        let mut settings = settings("test:///default");
        // No full read after the first: only events can show the changes below.
        settings.reconcile_interval = Duration::from_secs(3600);
        let (client, thread) = start(settings, tx).expect("thread starts");
        assert!(matches!(rx.recv().await, Some(LibvirtEvent::Connected)));
        inventory_where(&mut rx, "the first full read", |_| true).await;
        let state_of =
            |vms: &[Arc<VmInfo>]| vms.iter().find(|vm| vm.uuid == UUID).map(|vm| vm.state);

        let xml = format!(
            "<domain type='test'><name>{NAME}</name><uuid>{UUID}</uuid>\
             <memory>1024</memory><os><type>hvm</type></os></domain>"
        );
        client
            .call(move |conn| Ok(conn.define_domain_xml(&xml).map(drop)?))
            .await
            .expect("defined");
        inventory_where(&mut rx, "the defined domain", |vms| {
            state_of(vms) == Some(VmState::ShutOff)
        })
        .await;

        let domain_job = |f: fn(&Domain) -> Result<(), virt::error::Error>| {
            client.call(move |conn| Ok(f(&conn.lookup_domain_by_uuid_string(UUID)?)?))
        };
        domain_job(|d| d.create().map(drop)).await.expect("started");
        inventory_where(&mut rx, "the domain running", |vms| {
            state_of(vms) == Some(VmState::Running)
        })
        .await;
        domain_job(|d| d.destroy()).await.expect("destroyed");
        domain_job(|d| d.undefine()).await.expect("undefined");
        inventory_where(&mut rx, "the domain gone", |vms| state_of(vms).is_none()).await;
        stop(client, thread).await;
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
