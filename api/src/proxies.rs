//! Hand-written client proxies. They mirror the daemon's interfaces; the committed introspection
//! XML under `config/dbus/` is the contract both sides are tested against.

use zbus::{proxy, OwnedObjectPath};

use std::collections::HashMap;

use zbus::OwnedVariant;

use crate::{DiskInfo, ExcludedVolume, IncludedVolume, VmSnapError};

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

    /// Starts a snapshot of a VM and returns its object at once, in phase InProgress; completion
    /// shows as PropertiesChanged on it. Options: `description` (s), `allow_excluded` (b).
    fn create_snapshot(
        &self,
        vm: &str,
        name: &str,
        options: HashMap<&str, OwnedVariant>,
    ) -> Result<OwnedObjectPath, VmSnapError>;

    /// Snapshots of one VM (name or UUID), or of all VMs when `vm` is empty, oldest first.
    fn list_snapshots(&self, vm: &str) -> Result<Vec<OwnedObjectPath>, VmSnapError>;

    /// The snapshot `name` of a VM (name or UUID).
    fn find_snapshot(&self, vm: &str, name: &str) -> Result<OwnedObjectPath, VmSnapError>;

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

/// `org.vmsnap.VmSnap1.Snapshot`: one per snapshot, mirroring KubeVirt's VirtualMachineSnapshot
/// status.
#[proxy(
    interface = "org.vmsnap.VmSnap1.Snapshot",
    default_service = "org.vmsnap.VmSnap1"
)]
pub trait Snapshot {
    /// Deletes the snapshot without changing any other snapshot or the live disk. Returns at
    /// once; the object goes to phase Deleting and disappears when done.
    fn delete(&self) -> Result<(), VmSnapError>;

    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn description(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn vm_name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn vm_uuid(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn uuid(&self) -> zbus::Result<String>;
    /// InProgress, Succeeded, Failed or Deleting.
    #[zbus(property)]
    fn phase(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn ready_to_use(&self) -> zbus::Result<bool>;
    /// RFC 3339, UTC.
    #[zbus(property)]
    fn creation_time(&self) -> zbus::Result<String>;
    /// Online, GuestAgent, NoGuestAgent, QuiesceFailed, Paused.
    #[zbus(property)]
    fn indications(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn included_volumes(&self) -> zbus::Result<Vec<IncludedVolume>>;
    #[zbus(property)]
    fn excluded_volumes(&self) -> zbus::Result<Vec<ExcludedVolume>>;
    /// Why the snapshot failed; empty otherwise.
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;
    /// What the operation is doing right now; empty when idle.
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<String>;
    /// How long the guest's filesystems were frozen, in milliseconds (0 without a freeze).
    #[zbus(property)]
    fn freeze_duration_ms(&self) -> zbus::Result<u64>;
    /// How many filesystems the guest agent froze.
    #[zbus(property)]
    fn frozen_filesystems(&self) -> zbus::Result<u32>;
}
