//! The D-Bus transport: a thin layer over the engine.
//!
//! Method calls become [`Request`]s for the engine; the engine's [`Change`]s become objects,
//! property changes and ObjectManager signals. No decision is made here.

mod auth;
#[cfg(test)]
mod fallback_tests;
mod listing;
mod manager;
mod restore;
mod snapshot;
mod vm;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use vmsnap_api::{
    restore_path, snapshot_path, vm_path, VmSnapError, MANAGER_PATH, ROOT_PATH, SNAPSHOT_INTERFACE,
};
use zbus::connection::Builder;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::Connection;

use crate::engine::{Change, EngineError, Request};
use crate::store::RestoreRecord;
pub use auth::Authorizer;
pub use listing::SharedRegistry;
use listing::{RestoreEntry, RootObjectManager, SnapshotEntry};
pub use manager::ManagerObject;
pub use restore::RestoreObject;
pub use snapshot::{SnapshotFallback, SnapshotObject};
pub use vm::VmObject;

/// Where to serve.
#[derive(Debug, Clone)]
pub enum BusTarget {
    System,
    Address(String),
}

/// Connects to the bus and registers the ObjectManager and the manager object. The well-known
/// name is *not* requested here: the caller does that once the objects are in place.
pub async fn connect(
    target: &BusTarget,
    manager: ManagerObject,
    registry: SharedRegistry,
) -> Result<Connection, zbus::Error> {
    let builder = match target {
        BusTarget::System => Builder::system(),
        BusTarget::Address(address) => Builder::address(address.as_str()),
    };
    builder
        .serve_at(ROOT_PATH, RootObjectManager::new(registry))
        .serve_at(MANAGER_PATH, manager)
        .build()
        .await
}

/// Applies the engine's changes to the exported objects, in order, until the engine stops.
///
/// Snapshots are not objects of zbus's tree: their paths are served from the registry by a
/// [`SnapshotFallback`], set here before the first change, and their signals are sent here.
pub async fn publish(
    connection: Connection,
    engine: mpsc::Sender<Request>,
    auth: Authorizer,
    registry: SharedRegistry,
    mut changes: mpsc::UnboundedReceiver<Change>,
) {
    let fallback = SnapshotFallback::new(registry.clone(), engine.clone(), auth.clone());
    if let Err(e) = connection
        .object_server()
        .set_fallback(snapshot::SNAPSHOT_FOLDER, Some(Arc::new(fallback)))
        .await
    {
        warn!(error = %e, "could not serve the snapshots' objects");
    }
    while let Some(change) = changes.recv().await {
        if let Err(e) = apply(&connection, &engine, &auth, &registry, change).await {
            warn!(error = %e, "could not update a D-Bus object");
        }
    }
}

async fn apply(
    connection: &Connection,
    engine: &mpsc::Sender<Request>,
    auth: &Authorizer,
    registry: &SharedRegistry,
    change: Change,
) -> zbus::Result<()> {
    let server = connection.object_server();
    // The registry is updated before the object, so that a listing answered after a signal
    // shows what the signal announced.
    match change {
        Change::VmAdded(info) => {
            let path = vm_path(&info.uuid);
            debug!(%path, "exporting VM");
            let info = Arc::new(info);
            listing::write(registry)
                .vms
                .insert(info.uuid.clone(), info.clone());
            server.at(path.as_str(), VmObject::new(info)).await?;
        }
        Change::VmUpdated(info) => {
            let path = vm_path(&info.uuid);
            let info = Arc::new(info);
            listing::write(registry)
                .vms
                .insert(info.uuid.clone(), info.clone());
            let iface = server.interface::<_, VmObject>(path.as_str()).await?;
            let emitter = iface.signal_emitter().clone();
            let mut object = iface.get_mut().await;
            object.update(info, &emitter).await?;
        }
        Change::VmRemoved { uuid } => {
            listing::write(registry).vms.remove(&uuid);
            server
                .remove::<VmObject, _>(vm_path(&uuid).as_str())
                .await?;
        }
        Change::Libvirt { connected, error } => {
            {
                let mut registry = listing::write(registry);
                registry.manager.libvirt_connected = connected;
                registry.manager.libvirt_error = error.clone();
            }
            let iface = server.interface::<_, ManagerObject>(MANAGER_PATH).await?;
            let emitter = iface.signal_emitter().clone();
            let mut manager = iface.get_mut().await;
            manager
                .set_libvirt_status(connected, error, &emitter)
                .await?;
        }
        // Snapshots: the registry is their objects (see `publish`); the signals are those zbus
        // sent for the `#[interface]` objects registered one by one before issue 13.
        Change::SnapshotAdded(record) => {
            let entry = SnapshotEntry::idle(record);
            let known = listing::write(registry).snapshots.insert(entry.clone());
            // zbus announced an object only when its path was free.
            if !known {
                snapshot_added(connection, &entry).await?;
            }
        }
        Change::SnapshotUpdated(record) => {
            let old = {
                let mut registry = listing::write(registry);
                let old = registry.snapshots.get(&record.uuid).cloned();
                registry.snapshots.update_record(record.clone());
                old
            };
            let old = old.ok_or(zbus::Error::InterfaceNotFound)?;
            let emitter = snapshot_emitter(connection, &record.uuid)?;
            SnapshotObject::new(&old, engine.clone(), auth.clone())
                .update(record, &emitter)
                .await?;
        }
        Change::SnapshotProgress { uuid, text } => {
            let text: Arc<str> = Arc::from(text.as_str());
            let old = {
                let mut registry = listing::write(registry);
                let old = registry.snapshots.get(&uuid).cloned();
                registry.snapshots.set_progress(&uuid, text.clone());
                old
            };
            let old = old.ok_or(zbus::Error::InterfaceNotFound)?;
            let emitter = snapshot_emitter(connection, &uuid)?;
            SnapshotObject::new(&old, engine.clone(), auth.clone())
                .set_progress(text, &emitter)
                .await?;
        }
        Change::RestoreAdded(record) => {
            let path = restore_path(&record.uuid);
            let record: Arc<RestoreRecord> = Arc::from(record);
            listing::write(registry).restores.insert(
                record.uuid.clone(),
                RestoreEntry {
                    record: record.clone(),
                    progress: Arc::from(""),
                },
            );
            server
                .at(
                    path.as_str(),
                    RestoreObject::new(record, engine.clone(), auth.clone()),
                )
                .await?;
        }
        Change::RestoreUpdated(record) => {
            let path = restore_path(&record.uuid);
            let record: Arc<RestoreRecord> = Arc::from(record);
            if let Some(entry) = listing::write(registry).restores.get_mut(&record.uuid) {
                entry.record = record.clone();
            }
            let iface = server.interface::<_, RestoreObject>(path.as_str()).await?;
            let emitter = iface.signal_emitter().clone();
            iface.get_mut().await.update(record, &emitter).await?;
        }
        Change::RestoreProgress { uuid, text } => {
            let path = restore_path(&uuid);
            if let Some(entry) = listing::write(registry).restores.get_mut(&uuid) {
                entry.progress = Arc::from(text.as_str());
            }
            let iface = server.interface::<_, RestoreObject>(path.as_str()).await?;
            let emitter = iface.signal_emitter().clone();
            iface.get_mut().await.set_progress(text, &emitter).await?;
        }
        Change::Flush(flushed) => flushed.0.notify_one(),
        Change::RestoreRemoved { uuid } => {
            listing::write(registry).restores.remove(&uuid);
            server
                .remove::<RestoreObject, _>(restore_path(&uuid).as_str())
                .await?;
        }
        Change::SnapshotRemoved { uuid } => {
            if !listing::write(registry).snapshots.remove(&uuid) {
                return Err(zbus::Error::InterfaceNotFound);
            }
            let path = snapshot_path(&uuid);
            let path = zbus::ObjectPath::try_from(path.as_str())?;
            let emitter = SignalEmitter::new(connection, ROOT_PATH)?;
            let interface = InterfaceName::from_static_str(SNAPSHOT_INTERFACE)?;
            RootObjectManager::interfaces_removed(&emitter, path, vec![interface]).await?;
        }
    }
    Ok(())
}

/// Where a snapshot's PropertiesChanged come from: its path.
fn snapshot_emitter<'a>(connection: &'a Connection, uuid: &str) -> zbus::Result<SignalEmitter<'a>> {
    SignalEmitter::new(connection, snapshot_path(uuid))
}

/// InterfacesAdded for a new snapshot, from the root's ObjectManager: the object's path and its
/// interface with every property, as zbus announced an object exported under an ObjectManager
/// (the properties serialized from the registry, as GetManagedObjects lists them).
async fn snapshot_added(connection: &Connection, entry: &SnapshotEntry) -> zbus::Result<()> {
    let path = snapshot_path(&entry.record.uuid);
    let path = zbus::ObjectPath::try_from(path.as_str())?;
    connection
        .emit_signal(
            None::<zbus::names::BusName<'_>>,
            ROOT_PATH,
            OBJECT_MANAGER_INTERFACE,
            "InterfacesAdded",
            &(path, listing::snapshot_interfaces(entry)),
        )
        .await
}

const OBJECT_MANAGER_INTERFACE: &str = "org.freedesktop.DBus.ObjectManager";

/// Sends a request to the engine and waits for its answer.
pub(crate) async fn ask<T>(
    engine: &mpsc::Sender<Request>,
    make: impl FnOnce(oneshot::Sender<T>) -> Request,
) -> Result<T, VmSnapError> {
    let (reply, answer) = oneshot::channel();
    engine
        .send(make(reply))
        .await
        .map_err(|_| VmSnapError::ShuttingDown("vmsnapd is shutting down".to_string()))?;
    answer
        .await
        .map_err(|_| VmSnapError::ShuttingDown("vmsnapd is shutting down".to_string()))
}

impl From<EngineError> for VmSnapError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::VmNotFound(_) | EngineError::SnapshotNotFound { .. } => {
                VmSnapError::NotFound(message)
            }
            EngineError::InvalidArgument(_) => VmSnapError::InvalidArgument(message),
            EngineError::InvalidName(_) => VmSnapError::InvalidName(message),
            EngineError::AlreadyExists { .. } | EngineError::VmExists(_) => {
                VmSnapError::AlreadyExists(message)
            }
            EngineError::VmRunning(_) => VmSnapError::VmRunning(message),
            EngineError::ExcludedDisks(_) => VmSnapError::ExcludedDisks(message),
            EngineError::Busy { .. } => VmSnapError::Busy(message),
            EngineError::InvalidState(_) => VmSnapError::InvalidState(message),
            EngineError::LibvirtUnavailable => VmSnapError::LibvirtUnavailable(message),
            EngineError::Libvirt(_) => VmSnapError::LibvirtError(message),
            EngineError::RecordWrite(_) => VmSnapError::RecordWriteFailed(message),
            EngineError::RecordRead(_) => VmSnapError::StorageFailed(message),
            EngineError::ShuttingDown => VmSnapError::ShuttingDown(message),
        }
    }
}
