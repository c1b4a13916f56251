//! Hand-written client proxies. They mirror the daemon's interfaces; the committed introspection
//! XML under `config/dbus/` is the contract both sides are tested against.

use zbus::{proxy, OwnedObjectPath};

use crate::{DiskInfo, VmSnapError};

/// `org.vmsnap.VmSnap1.Manager` at `/org/vmsnap/VmSnap1/Manager`.
#[proxy(
    interface = "org.vmsnap.VmSnap1.Manager",
    default_service = "org.vmsnap.VmSnap1",
    default_path = "/org/vmsnap/VmSnap1/Manager"
)]
pub trait Manager {
    /// Object path of the VM with this name or UUID; `NotFound` if there is none.
    fn find_vm(&self, name_or_uuid: &str) -> Result<OwnedObjectPath, VmSnapError>;

    /// Paths of all VM objects, sorted by VM name.
    fn list_vms(&self) -> Result<Vec<OwnedObjectPath>, VmSnapError>;

    /// vmsnapd's version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;

    /// The libvirt URI vmsnapd uses.
    #[zbus(property)]
    fn libvirt_uri(&self) -> zbus::Result<String>;

    /// Whether vmsnapd is connected to libvirt right now.
    #[zbus(property)]
    fn libvirt_connected(&self) -> zbus::Result<bool>;

    /// Why libvirt is unavailable; empty while connected.
    #[zbus(property)]
    fn libvirt_error(&self) -> zbus::Result<String>;
}

/// `org.vmsnap.VmSnap1.VirtualMachine`, one object per libvirt domain.
#[proxy(
    interface = "org.vmsnap.VmSnap1.VirtualMachine",
    default_service = "org.vmsnap.VmSnap1"
)]
pub trait VirtualMachine {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn uuid(&self) -> zbus::Result<String>;

    /// `running`, `paused`, `shut-off`, ... (see `VmState`).
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    /// `connected`, `disconnected` or `not-configured` (see `AgentState`).
    #[zbus(property)]
    fn agent(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn disks(&self) -> zbus::Result<Vec<DiskInfo>>;
}
