//! The connection to vmsnapd: proxies, object reads, and one-line descriptions of bus errors.

use vmsnap_api::{
    ManagerProxy, RestoreProxy, SnapshotProxy, VirtualMachineProxy, VmSnapError, BUS_NAME,
    MANAGER_PATH,
};
use zbus::{Connection, DBusError, OwnedObjectPath};

use crate::objects::Objects;
use crate::output::Vm;
use crate::restore_output::Restore;
use crate::snapshot_output::Snapshot;

/// The VMs of a GetVmObjects reply, sorted by name then UUID (ListVms' order); `Err` when
/// an object lacks a property.
fn vms_from(objects: vmsnap_api::TypedObjects<vmsnap_api::VmProperties>) -> Result<Vec<Vm>, ()> {
    let mut vms = Vec::with_capacity(objects.len());
    for (_, mut interfaces) in objects {
        let Some(p) = interfaces.remove(vmsnap_api::VM_INTERFACE) else {
            continue;
        };
        let (Some(name), Some(uuid), Some(state), Some(agent), Some(disks)) =
            (p.name, p.uuid, p.state, p.agent, p.disks)
        else {
            return Err(());
        };
        vms.push(Vm {
            name,
            uuid,
            state,
            agent,
            disks,
        });
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.uuid.cmp(&b.uuid)));
    Ok(vms)
}

/// The error of a method call to a vmsnapd older than the method.
const UNKNOWN_METHOD: &str = "org.freedesktop.DBus.Error.UnknownMethod";

/// Why an object could not be read.
pub enum ReadError {
    /// The object is gone: it was removed between being listed (or found) and being read.
    Vanished,
    /// Anything else, described for the user.
    Other(String),
}

/// Errors that mean "this VM object does not exist (any more)".
const VM_VANISHED: &[&str] = &[
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownProperty",
];

/// Errors that mean "this snapshot (or restore) object does not exist (any more)". Some bus
/// implementations answer a call on a removed object with UnknownMethod.
const OBJECT_VANISHED: &[&str] = &[
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.UnknownMethod",
];

#[derive(Clone)]
pub struct Bus {
    connection: Connection,
    description: String,
}

impl Bus {
    pub async fn connect(address: Option<&str>) -> Result<Bus, String> {
        let (builder, description) = match address {
            Some(address) => (
                zbus::connection::Builder::address(address),
                format!("the D-Bus bus at {address}"),
            ),
            None => (
                zbus::connection::Builder::system(),
                "the D-Bus system bus".to_string(),
            ),
        };
        let connection = builder
            .build()
            .await
            .map_err(|e| format!("cannot connect to {description}: {e}"))?;
        Ok(Bus {
            connection,
            description,
        })
    }

    /// Connects to `address`, described as `description` in messages (`-H`: "the system bus
    /// of HOST (over ssh)").
    pub async fn connect_described(
        address: zbus::Address,
        description: String,
    ) -> Result<Bus, String> {
        let connection = zbus::connection::Builder::address(address)
            .build()
            .await
            .map_err(|e| format!("cannot connect to {description}: {e}"))?;
        Ok(Bus {
            connection,
            description,
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    pub async fn manager(&self) -> Result<ManagerProxy<'static>, String> {
        ManagerProxy::builder(&self.connection)
            .path(MANAGER_PATH)
            .build()
            .await
            .map_err(|e| self.describe(&e))
    }

    /// The snapshot objects of one VM (or of all when `vm` is empty) with their properties,
    /// in one call (GetSnapshotObjects): what lists read instead of one GetAll
    /// per object. Its size grows with what is listed only, unlike GetManagedObjects, whose
    /// reply holds every object and can pass the bus's message size limit.
    pub async fn snapshot_objects(&self, vm: &str) -> Result<Objects, String> {
        let manager = self.manager().await?;
        // Typed first (serde straight into structures); a reply it refuses is read again
        // generically, which names the property of an unexpected type.
        match manager.get_snapshot_objects_typed(vm).await {
            Ok(objects) => return Ok(Objects::Snapshots(objects)),
            // Not an error vmsnapd answered: the reply did not decode (or the transport
            // failed, which the generic call reports as well).
            Err(VmSnapError::ZBus(e)) if !matches!(e, zbus::Error::MethodError(..)) => {}
            Err(e) => return Err(self.describe_api(e)),
        }
        let objects = manager
            .get_snapshot_objects(vm)
            .await
            .map_err(|e| self.describe_api(e))?;
        Ok(Objects::new(objects))
    }

    /// The snapshots of one VM (or of all when `vm` is empty), oldest first, in one call:
    /// GetSnapshotList (one structure per snapshot), or GetSnapshotObjects from a vmsnapd older
    /// than it.
    pub async fn snapshot_list(&self, vm: &str) -> Result<Vec<Snapshot>, String> {
        let manager = self.manager().await?;
        match manager.get_snapshot_list(vm).await {
            Ok(rows) => return Ok(rows.into_iter().map(Snapshot::from).collect()),
            Err(VmSnapError::ZBus(e)) if error_name(&e).as_deref() == Some(UNKNOWN_METHOD) => {}
            Err(e) => return Err(self.describe_api(e)),
        }
        self.snapshot_objects(vm).await?.into_snapshots()
    }

    /// Every restore object with its properties, in one call (GetRestoreObjects).
    pub async fn restore_objects(&self) -> Result<Objects, String> {
        let manager = self.manager().await?;
        match manager.get_restore_objects_typed().await {
            Ok(objects) => return Ok(Objects::Restores(objects)),
            // Not an error vmsnapd answered: the reply did not decode (or the transport
            // failed, which the generic call reports as well).
            Err(VmSnapError::ZBus(e)) if !matches!(e, zbus::Error::MethodError(..)) => {}
            Err(e) => return Err(self.describe_api(e)),
        }
        let objects = manager
            .get_restore_objects()
            .await
            .map_err(|e| self.describe_api(e))?;
        Ok(Objects::new(objects))
    }

    /// Every VM, sorted by name (then UUID), as ListVms orders them: in one call
    /// (GetVmObjects), or from a vmsnapd older than it (or a reply that does not decode) with
    /// ListVms and one read per VM.
    pub async fn vms(&self, manager: &ManagerProxy<'static>) -> Result<Vec<Vm>, String> {
        match manager.get_vm_objects_typed().await {
            Ok(objects) => {
                // With a property missing, the generic reads below name it.
                if let Ok(vms) = vms_from(objects) {
                    return Ok(vms);
                }
            }
            // An older vmsnapd, or a reply that does not decode: read VM by VM below.
            Err(VmSnapError::ZBus(e)) => match error_name(&e).as_deref() {
                None | Some(UNKNOWN_METHOD) => {}
                Some(_) => return Err(self.describe(&e)),
            },
            Err(e) => return Err(self.describe_api(e)),
        }
        let paths = manager.list_vms().await.map_err(|e| self.describe_api(e))?;
        let mut vms = Vec::with_capacity(paths.len());
        for path in paths {
            match self.read_vm(path).await {
                Ok(vm) => vms.push(vm),
                // Undefined between the listing and the read: it is simply gone.
                Err(ReadError::Vanished) => {}
                Err(ReadError::Other(message)) => return Err(message),
            }
        }
        Ok(vms)
    }

    pub async fn read_vm(&self, path: OwnedObjectPath) -> Result<Vm, ReadError> {
        let proxy = VirtualMachineProxy::builder(&self.connection)
            .path(path)
            .build()
            .await
            .map_err(|e| ReadError::Other(self.describe(&e)))?;
        let read = async {
            Ok::<_, zbus::Error>(Vm {
                name: proxy.name().await?,
                uuid: proxy.uuid().await?,
                state: proxy.state().await?,
                agent: proxy.agent().await?,
                disks: proxy.disks().await?,
            })
        };
        read.await.map_err(|e| self.read_error(&e, VM_VANISHED))
    }

    /// A proxy for the snapshot at `path`. Every proxy fetches all properties at its first read
    /// (GetAll), so a new proxy always gives a fresh, consistent view.
    pub async fn snapshot_proxy(
        &self,
        path: &OwnedObjectPath,
    ) -> Result<SnapshotProxy<'static>, String> {
        SnapshotProxy::builder(&self.connection)
            .path(path.clone())
            .build()
            .await
            .map_err(|e| self.describe(&e))
    }

    /// The definition recorded with the snapshot at `path` (GetDomainXml, read from its record
    /// by vmsnapd; from a vmsnapd older than that method, its DomainXml property); `None` when
    /// empty or when the snapshot is gone meanwhile.
    pub async fn domain_xml(&self, path: &OwnedObjectPath) -> Result<Option<String>, String> {
        let proxy = self.snapshot_proxy(path).await?;
        let xml = match proxy.get_domain_xml().await {
            Ok(xml) => xml,
            Err(VmSnapError::NotFound(_)) => return Ok(None),
            Err(VmSnapError::ZBus(e)) => match error_name(&e).as_deref() {
                Some("org.freedesktop.DBus.Error.UnknownObject") => return Ok(None),
                Some("org.freedesktop.DBus.Error.UnknownMethod") => {
                    let properties = zbus::fdo::PropertiesProxy::builder(&self.connection)
                        .destination(BUS_NAME)
                        .path(path.clone())
                        .build()
                        .await
                        .map_err(|e| self.describe(&e))?;
                    let interface = zbus::names::InterfaceName::from_static_str_unchecked(
                        vmsnap_api::SNAPSHOT_INTERFACE,
                    );
                    let value = properties
                        .get(interface, "DomainXml")
                        .await
                        .map_err(|e| self.describe(&e.into()))?;
                    String::try_from(value)
                        .map_err(|e| format!("snapshot {path}: DomainXml is not a string: {e}"))?
                }
                _ => return Err(self.describe(&e)),
            },
            Err(e) => return Err(self.describe_api(e)),
        };
        Ok(Some(xml).filter(|x| !x.is_empty()))
    }

    /// Reads every property of the snapshot at `path`, fresh from vmsnapd.
    pub async fn read_snapshot(&self, path: &OwnedObjectPath) -> Result<Snapshot, ReadError> {
        let proxy = self.snapshot_proxy(path).await.map_err(ReadError::Other)?;
        let read = async {
            Ok::<_, zbus::Error>(Snapshot {
                name: proxy.name().await?,
                uuid: proxy.uuid().await?,
                vm: proxy.vm_name().await?,
                vm_uuid: proxy.vm_uuid().await?,
                description: proxy.description().await?,
                phase: proxy.phase().await?,
                ready_to_use: proxy.ready_to_use().await?,
                creation_time: proxy.creation_time().await?,
                indications: proxy.indications().await?,
                included_volumes: proxy.included_volumes().await?,
                excluded_volumes: proxy.excluded_volumes().await?,
                error: proxy.error().await?,
                // Absent from a vmsnapd older than ErrorName.
                error_name: proxy.error_name().await.unwrap_or_default(),
                progress: proxy.progress().await?,
                freeze_duration_ms: proxy.freeze_duration_ms().await?,
                frozen_filesystems: proxy.frozen_filesystems().await?,
                cow_fill_percent: proxy.cow_fill_percent().await?,
            })
        };
        read.await.map_err(|e| self.read_error(&e, OBJECT_VANISHED))
    }

    /// Reads every property of the restore at `path`, fresh from vmsnapd (a new proxy, so one
    /// GetAll: a consistent view).
    pub async fn read_restore(&self, path: &OwnedObjectPath) -> Result<Restore, ReadError> {
        let proxy = RestoreProxy::builder(&self.connection)
            .path(path.clone())
            .build()
            .await
            .map_err(|e| ReadError::Other(self.describe(&e)))?;
        let read = async {
            Ok::<_, zbus::Error>(Restore {
                uuid: proxy.uuid().await?,
                vm: proxy.vm_name().await?,
                snapshot: proxy.snapshot().await?,
                target: proxy.target().await?,
                new_vm: proxy.new_vm().await?,
                phase: proxy.phase().await?,
                complete: proxy.complete().await?,
                creation_time: proxy.creation_time().await?,
                restore_time: proxy.restore_time().await?,
                restores: proxy.restores().await?,
                detached_disks: proxy.detached_disks().await?,
                not_restored: proxy.not_restored().await?,
                safety_snapshot: proxy.safety_snapshot().await?,
                error: proxy.error().await?,
                // Absent from a vmsnapd older than ErrorName.
                error_name: proxy.error_name().await.unwrap_or_default(),
                progress: proxy.progress().await?,
            })
        };
        read.await.map_err(|e| self.read_error(&e, OBJECT_VANISHED))
    }

    /// Whether `error` says a snapshot or restore object is gone.
    pub fn object_vanished(error: &zbus::Error) -> bool {
        error_name(error).is_some_and(|name| OBJECT_VANISHED.contains(&name.as_str()))
    }

    fn read_error(&self, error: &zbus::Error, vanished: &[&str]) -> ReadError {
        match error_name(error) {
            Some(name) if vanished.contains(&name.as_str()) => ReadError::Vanished,
            _ => ReadError::Other(self.describe(error)),
        }
    }

    /// A warning when libvirt is unavailable, since the listed data may then be stale.
    pub async fn libvirt_status(
        &self,
        manager: &ManagerProxy<'_>,
    ) -> Result<Option<String>, String> {
        let connected = manager
            .libvirt_connected()
            .await
            .map_err(|e| self.describe(&e))?;
        if connected {
            return Ok(None);
        }
        let error = manager
            .libvirt_error()
            .await
            .map_err(|e| self.describe(&e))?;
        Ok(Some(format!(
            "vmsnapd cannot reach libvirt ({error}); VMs are shown as last seen"
        )))
    }

    /// One line for an error a vmsnapd method returned.
    pub fn describe_api(&self, error: VmSnapError) -> String {
        match error {
            VmSnapError::ZBus(e) => self.describe(&e),
            VmSnapError::AccessDenied(m) => format!("access denied: {m}"),
            other => other.user_message(),
        }
    }

    /// One line for a transport or bus error, naming the common causes plainly.
    pub fn describe(&self, error: &zbus::Error) -> String {
        let description = error_description(error);
        match error_name(error).as_deref() {
            Some("org.freedesktop.DBus.Error.ServiceUnknown")
            | Some("org.freedesktop.DBus.Error.NameHasNoOwner") => format!(
                "vmsnapd is not running (nothing owns {BUS_NAME} on {})",
                self.description
            ),
            Some("org.freedesktop.DBus.Error.AccessDenied")
            | Some("org.vmsnap.VmSnap1.Error.AccessDenied") => {
                format!("access denied: {description}")
            }
            _ => description,
        }
    }
}

fn error_name(error: &zbus::Error) -> Option<String> {
    match error {
        zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
        zbus::Error::FDO(e) => Some(e.name().to_string()),
        _ => None,
    }
}

fn error_description(error: &zbus::Error) -> String {
    match error {
        zbus::Error::MethodError(name, description, _) => {
            description.clone().unwrap_or_else(|| name.to_string())
        }
        zbus::Error::FDO(e) => e
            .description()
            .map(str::to_string)
            .unwrap_or_else(|| e.name().to_string()),
        other => other.to_string(),
    }
}
