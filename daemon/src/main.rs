//! vmsnapd: consistent snapshots and restores of libvirt/QEMU VMs, served on D-Bus.
//!
//! See ARCHITECTURE.md for the parts and their invariants.

mod backends;
mod bus;
mod config;
mod disks;
mod domain;
mod engine;
mod files;
#[cfg(test)]
mod fuzz_tests;
mod hypervisor;
mod libvirt;
mod memory;
mod ops;
mod service;
mod shutdown;
mod store;
mod thaw_guard;
mod virt_ext;

/// Tests count the blocks a structure costs (`memory::counting`).
#[cfg(test)]
#[global_allocator]
static COUNTING: memory::counting::Counting = memory::counting::Counting;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use vmsnap_api::{BUS_ADDRESS_ENV, BUS_NAME};
use zbus::fdo::{RequestNameFlags, RequestNameReply};

use crate::bus::{Authorizer, BusTarget, ManagerObject};
use crate::config::Config;
use crate::engine::{Change, Engine, Flushed, Request, Settled};
use crate::libvirt::{LibvirtClient, LibvirtEvent, LibvirtSettings};
use crate::ops::{OpContext, OpEvent};
use crate::shutdown::{Shutdown, SignalRequest, SignalRequests};
use crate::store::{StateLock, Store};

/// How long to wait for the first word from libvirt before taking the bus name anyway, so that a
/// slow libvirtd does not keep the API away.
const FIRST_INVENTORY_WAIT: Duration = Duration::from_secs(10);

/// How long the libvirt thread gets to finish its current call at shutdown.
const LIBVIRT_STOP_WAIT: Duration = Duration::from_secs(10);

/// vmsnapd serves consistent snapshots and restores of libvirt/QEMU virtual machines on D-Bus
/// (bus name org.vmsnap.VmSnap1). Use vmsnapctl, busctl or any D-Bus client to talk to it.
#[derive(Debug, Parser)]
#[command(name = "vmsnapd", version, about, long_about = None)]
struct Args {
    /// Configuration file [default: /etc/vmsnap/vmsnapd.toml if it exists, else built-in
    /// defaults].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Serve on this D-Bus address instead of the system bus (e.g. unix:path=/run/x/bus.sock).
    #[arg(long, value_name = "ADDRESS", env = BUS_ADDRESS_ENV)]
    bus_address: Option<String>,

    /// Internal: run as the thaw guard of the domain with this UUID (see thaw_guard.rs).
    #[arg(long, hide = true, value_name = "UUID", requires_all = ["guard_uri", "guard_deadline_ms"])]
    thaw_guard: Option<String>,

    /// Internal: run as a standby thaw guard, told its domain later (see thaw_guard.rs).
    #[arg(
        long,
        hide = true,
        requires = "guard_uri",
        conflicts_with = "thaw_guard"
    )]
    thaw_guard_standby: bool,

    /// Internal: the thaw guard's libvirt URI.
    #[arg(long, hide = true, value_name = "URI")]
    guard_uri: Option<String>,

    /// Internal: the thaw guard's deadline, in milliseconds from its start.
    #[arg(long, hide = true, value_name = "MS")]
    guard_deadline_ms: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let (Some(uuid), Some(uri), Some(deadline_ms)) =
        (&args.thaw_guard, &args.guard_uri, args.guard_deadline_ms)
    {
        return thaw_guard::run_guard(uri, uuid, Duration::from_millis(deadline_ms));
    }
    if let (true, Some(uri)) = (args.thaw_guard_standby, &args.guard_uri) {
        return thaw_guard::run_standby(uri);
    }
    let (config, config_path) = match Config::load(args.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("vmsnapd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log_filter_handle = init_logging(&config);
    match &config_path {
        Some(path) => info!(config = %path.display(), "configuration loaded"),
        None => info!("no configuration file, using built-in defaults"),
    }
    let target = match args.bus_address {
        Some(address) => BusTarget::Address(address),
        None => BusTarget::System,
    };
    memory::tune_malloc();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vmsnapd-async")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmsnapd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reload = service::Reloader::new(args.config.clone(), config.clone(), log_filter_handle);
    match runtime.block_on(run(config, target, reload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!("{message}");
            eprintln!("vmsnapd: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter from VMSNAP_LOG, else the config's `log_level`.
fn log_filter(config: &Config) -> EnvFilter {
    std::env::var("VMSNAP_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&config.log_level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
}

/// Logs to the journal, with structured fields (VM, SNAPSHOT, ...), when systemd connected
/// stderr to it; to stderr otherwise. Returns the handle that SIGHUP uses to change the filter.
fn init_logging(config: &Config) -> service::LogFilterHandle {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(log_filter(config));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| {
            tracing_journald::layer()
                .ok()
                .map(|l| l.with_field_prefix(None))
        })
        .flatten();
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(journald) => registry.with(journald).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false),
            )
            .init(),
    }
    handle
}

async fn run(
    config: Config,
    target: BusTarget,
    mut reload: service::Reloader,
) -> Result<(), String> {
    // Handlers before anything is announced (bus name, READY=1): a SIGHUP or SIGTERM sent as
    // soon as the service looks up must reload or stop it, not kill it with the default action.
    // Signals that arrive before wait_for_stop waits are kept and handled there.
    let mut signals = SignalRequests::new().map_err(|e| format!("cannot wait for signals: {e}"))?;
    // Before anything is read from the state folder: it is this daemon's alone.
    let _state_lock = StateLock::take(&config.state_dir)?;
    let (trigger, shutdown) = shutdown::channel();

    let (libvirt, libvirt_thread, libvirt_events) = start_libvirt(&config)?;
    let EngineHandles {
        task: engine_task,
        mut settled,
        requests,
        changes,
        flush,
    } = start_engine(&config, &libvirt, libvirt_events, shutdown.clone());
    let (connection, publisher) = connect_bus(&config, &target, &requests, changes).await?;
    take_bus_name(&connection, &mut settled, flush).await?;
    // The start-up load (every record file read and parsed, every object announced) leaves
    // freed memory behind: hand it back.
    memory::trim();
    info!(name = BUS_NAME, "serving on D-Bus");
    service::notify_ready();
    let watchdog = service::spawn_watchdog(requests.clone());

    let stop = wait_for_stop(&mut signals, &mut reload, &requests, &connection).await;
    service::notify_stopping();
    trigger.trigger();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    stop_serving(
        connection,
        engine_task,
        requests,
        libvirt,
        publisher,
        libvirt_thread,
    )
    .await;
    info!("stopped");
    match stop {
        Stop::Asked => Ok(()),
        // A failure exit: the service manager restarts vmsnapd (Restart=on-failure), and the
        // restarted daemon takes the name again.
        Stop::BusLost => Err("the connection to the D-Bus bus closed".to_string()),
    }
}

/// Why vmsnapd stops.
enum Stop {
    /// SIGTERM or SIGINT.
    Asked,
    /// The bus connection closed under it: dbus-daemon stopped, or it dropped vmsnapd (a
    /// reply over its message size limit does that). Serving on without a bus would leave every
    /// client without an answer.
    BusLost,
}

/// Starts the libvirt thread; returns its client, the thread, and the events it sends.
fn start_libvirt(
    config: &Config,
) -> Result<
    (
        LibvirtClient,
        std::thread::JoinHandle<()>,
        mpsc::UnboundedReceiver<LibvirtEvent>,
    ),
    String,
> {
    let (libvirt_events, libvirt_events_rx) = mpsc::unbounded_channel();
    let (libvirt, libvirt_thread) = libvirt::start(
        LibvirtSettings {
            uri: config.libvirt_uri.clone(),
            known: std::sync::Arc::default(),
            reconcile_interval: config.refresh_interval,
            reconnect_interval: config.reconnect_interval,
        },
        libvirt_events,
    )
    .map_err(|e| format!("cannot start the libvirt thread: {e}"))?;
    Ok((libvirt, libvirt_thread, libvirt_events_rx))
}

/// The engine's task and the ends of its channels that the rest of the daemon holds.
struct EngineHandles {
    task: tokio::task::JoinHandle<()>,
    /// True once the engine has taken in libvirt's first word.
    settled: Settled,
    requests: mpsc::Sender<Request>,
    /// What the engine announces, for the bus.
    changes: mpsc::UnboundedReceiver<Change>,
    /// A sender of changes of our own, to flush the bus before the name is taken.
    flush: mpsc::UnboundedSender<Change>,
}

/// Loads the records from the state folder into the engine and starts it.
fn start_engine(
    config: &Config,
    libvirt: &LibvirtClient,
    libvirt_events: mpsc::UnboundedReceiver<LibvirtEvent>,
    shutdown: Shutdown,
) -> EngineHandles {
    let (changes, changes_rx) = mpsc::unbounded_channel();
    let flush = changes.clone();
    let (requests, requests_rx) = mpsc::channel(64);
    let (op_events, op_events_rx) = refresh_after_operations(libvirt.refresher());
    let ops = OpContext::new(
        std::sync::Arc::new(crate::hypervisor::libvirt::Libvirt {
            uri: config.libvirt_uri.clone(),
            known: Some(libvirt.known()),
        }),
        std::sync::Arc::new(crate::backends::Backends::standard()),
        Store::new(&config.state_dir),
        crate::ops::vm_lock::VmLocks {
            dir: config.vm_lock_dir.clone(),
        },
        config,
        op_events,
        crate::ops::Faults::from_env(),
    );
    // The first create's guard is ready before the create is asked for.
    crate::thaw_guard::keep_standby(&config.libvirt_uri);
    let (engine, settled) = Engine::new(changes);
    let engine = engine.with_operations(ops, libvirt.clone(), requests.clone());
    let task = tokio::spawn(engine.run(requests_rx, libvirt_events, op_events_rx, shutdown));
    EngineHandles {
        task,
        settled,
        requests,
        changes: changes_rx,
        flush,
    }
}

/// The channel of the operations' events to the engine, through a task that has the libvirt
/// thread re-read each VM whose operation ended: libvirt sends no event for a disk-only
/// snapshot, which changes a running VM's disk sources, and the inventory would show the old
/// ones until its next full read.
fn refresh_after_operations(
    refresher: libvirt::DomainRefresher,
) -> (
    mpsc::UnboundedSender<OpEvent>,
    mpsc::UnboundedReceiver<OpEvent>,
) {
    let (op_events, mut from_ops) = mpsc::unbounded_channel();
    let (to_engine, op_events_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = from_ops.recv().await {
            if let OpEvent::Finished { vm_uuid } = &event {
                refresher.refresh(vm_uuid);
            }
            if to_engine.send(event).is_err() {
                break;
            }
        }
    });
    (op_events, op_events_rx)
}

/// Connects to the bus with the manager object registered, and starts publishing what the
/// engine announces. The bus name is not taken yet.
async fn connect_bus(
    config: &Config,
    target: &BusTarget,
    requests: &mpsc::Sender<Request>,
    changes: mpsc::UnboundedReceiver<Change>,
) -> Result<(zbus::Connection, tokio::task::JoinHandle<()>), String> {
    let auth = Authorizer::new(config.polkit, matches!(target, BusTarget::System)).await;
    let registry = bus::SharedRegistry::default();
    let manager = ManagerObject::new(
        requests.clone(),
        auth.clone(),
        config.libvirt_uri.clone(),
        registry.clone(),
    );
    let connection = bus::connect(target, manager, registry.clone())
        .await
        .map_err(|e| format!("cannot connect to D-Bus: {e}"))?;
    let publisher = tokio::spawn(bus::publish(
        connection.clone(),
        requests.clone(),
        auth,
        registry,
        changes,
    ));
    Ok((connection, publisher))
}

/// Takes the bus name once the objects are exported.
async fn take_bus_name(
    connection: &zbus::Connection,
    settled: &mut Settled,
    flush: mpsc::UnboundedSender<Change>,
) -> Result<(), String> {
    // Objects first, name last: a client that sees the name also sees the VMs.
    if tokio::time::timeout(FIRST_INVENTORY_WAIT, settled.wait_for(|s| *s))
        .await
        .is_err()
    {
        warn!("libvirt has not answered yet; serving without an inventory");
    }
    // Every object the engine has announced so far (the records loaded, the inventory) is
    // exported before the name is taken, however many there are.
    let exported = Flushed::default();
    if flush.send(Change::Flush(exported.clone())).is_ok() {
        exported.0.notified().await;
    }
    drop(flush);
    // No replacement either way: a second vmsnapd must fail, not take over a running one.
    let reply = connection
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map_err(|e| format!("cannot own the bus name {BUS_NAME}: {e}"))?;
    if reply != RequestNameReply::PrimaryOwner {
        return Err(format!(
            "cannot own the bus name {BUS_NAME}: another process owns it (is vmsnapd already running?)"
        ));
    }
    Ok(())
}

/// Serves until SIGTERM or SIGINT; SIGHUP reloads the configuration meanwhile.
async fn wait_for_stop(
    signals: &mut SignalRequests,
    reload: &mut service::Reloader,
    requests: &mpsc::Sender<Request>,
    connection: &zbus::Connection,
) -> Stop {
    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                SignalRequest::Reload => reload.reload(requests).await,
                SignalRequest::Stop(signal) => {
                    info!(signal, "stopping");
                    return Stop::Asked;
                }
            },
            () = connection.closed() => {
                error!("the connection to the D-Bus bus closed (dbus-daemon stopped, or dropped vmsnapd); stopping so that vmsnapd is started again");
                return Stop::BusLost;
            }
        }
    }
}

/// Gives up the bus name, lets the engine finish, then closes the bus and stops the libvirt
/// thread (waiting for it at most LIBVIRT_STOP_WAIT).
async fn stop_serving(
    connection: zbus::Connection,
    engine_task: tokio::task::JoinHandle<()>,
    requests: mpsc::Sender<Request>,
    libvirt: LibvirtClient,
    publisher: tokio::task::JoinHandle<()>,
    libvirt_thread: std::thread::JoinHandle<()>,
) {
    if let Err(e) = connection.release_name(BUS_NAME).await {
        warn!(error = %e, "could not release the bus name");
    }
    let _ = engine_task.await;
    drop(requests);
    drop(libvirt);
    publisher.abort();
    drop(connection);
    // With every LibvirtClient dropped, the libvirt thread ends after its current call.
    let joined = tokio::task::spawn_blocking(move || libvirt_thread.join());
    if tokio::time::timeout(LIBVIRT_STOP_WAIT, joined)
        .await
        .is_err()
    {
        warn!("the libvirt thread did not stop in time");
    }
}
