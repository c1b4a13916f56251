//! Hand-written client proxies. They mirror the daemon's interfaces; the committed introspection
//! XML under `config/dbus/` is the contract both sides are tested against.

use zbus::{proxy, OwnedObjectPath};

use std::collections::HashMap;

use zbus::OwnedVariant;

use crate::{DetachedDisk, DiskInfo, ExcludedVolume, IncludedVolume, VmSnapError, VolumeRestore};

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

    /// Restores a VM (name or UUID) to one of its snapshots and returns the restore object at
    /// once, in phase InProgress (or Waiting, see `readiness_policy`). More options: `name`
    /// (s), `readiness_policy` (s: StopTarget, FailImmediate, WaitGracePeriod, WaitEventually). Options: `target` (s: a new VM name; empty or absent restores
    /// in place), `stop_target` (b: shut the VM down first, gracefully then forced),
    /// `start` (b: start the VM afterwards), `safety_snapshot` (b, default true: snapshot the
    /// current state first so the restore can be undone).
    fn restore(
        &self,
        vm: &str,
        snapshot: &str,
        options: HashMap<&str, OwnedVariant>,
    ) -> Result<OwnedObjectPath, VmSnapError>;

    /// A snapshot's content record (JSON) for another host sharing its storage (RBD only).
    fn export_snapshot(&self, vm: &str, name: &str) -> Result<String, VmSnapError>;

    /// Takes in a snapshot another host exported; returns its object.
    fn import_snapshot(&self, record: &str) -> Result<OwnedObjectPath, VmSnapError>;

    /// All restore objects, oldest first.
    fn list_restores(&self) -> Result<Vec<OwnedObjectPath>, VmSnapError>;

    /// The snapshot objects of one VM (or all when `vm` is empty) with their properties, as
    /// GetManagedObjects gives them.
    fn get_snapshot_objects(&self, vm: &str) -> Result<zbus::fdo::ManagedObjects, VmSnapError>;

    /// Every restore object with its properties, as GetManagedObjects gives them.
    fn get_restore_objects(&self) -> Result<zbus::fdo::ManagedObjects, VmSnapError>;

    /// Every VM object with its properties, as GetManagedObjects gives them.
    fn get_vm_objects(&self) -> Result<zbus::fdo::ManagedObjects, VmSnapError>;

    /// The snapshots of one VM (or all when `vm` is empty), oldest first, each as one
    /// structure of all its properties.
    fn get_snapshot_list(&self, vm: &str) -> Result<Vec<crate::SnapshotRow>, VmSnapError>;

    /// GetSnapshotObjects decoded into typed properties (a reply with a property of an
    /// unexpected type fails to decode: read it with `get_snapshot_objects` to name it).
    #[zbus(name = "GetSnapshotObjects")]
    fn get_snapshot_objects_typed(
        &self,
        vm: &str,
    ) -> Result<crate::TypedObjects<crate::SnapshotProperties>, VmSnapError>;

    /// GetRestoreObjects decoded into typed properties.
    #[zbus(name = "GetRestoreObjects")]
    fn get_restore_objects_typed(
        &self,
    ) -> Result<crate::TypedObjects<crate::RestoreProperties>, VmSnapError>;

    /// GetVmObjects decoded into typed properties.
    #[zbus(name = "GetVmObjects")]
    fn get_vm_objects_typed(&self)
        -> Result<crate::TypedObjects<crate::VmProperties>, VmSnapError>;

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

    /// The VM's inactive domain XML recorded with the snapshot (the content record), read
    /// from the record on disk; empty until recorded. It replaced the `DomainXml` property of
    /// earlier vmsnapd (README, "D-Bus API", "Changes").
    fn get_domain_xml(&self) -> Result<String, VmSnapError>;

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
    /// Online, GuestAgent, NoGuestAgent, QuiesceFailed, QuiesceTimeout, Paused,
    /// PartialSnapshot.
    #[zbus(property)]
    fn indications(&self) -> zbus::Result<Vec<String>>;
    /// Each indication with a message saying why (the agent's error, the excluded disks).
    #[zbus(property)]
    fn source_indications(&self) -> zbus::Result<Vec<crate::SourceIndication>>;
    #[zbus(property)]
    fn included_volumes(&self) -> zbus::Result<Vec<IncludedVolume>>;
    #[zbus(property)]
    fn excluded_volumes(&self) -> zbus::Result<Vec<ExcludedVolume>>;
    /// Why the snapshot failed; empty otherwise.
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;
    /// The D-Bus error name of Error; empty without an error.
    #[zbus(property)]
    fn error_name(&self) -> zbus::Result<String>;
    /// What the operation is doing right now; empty when idle.
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<String>;
    /// How long the guest's filesystems were frozen, in milliseconds (0 without a freeze).
    #[zbus(property)]
    fn freeze_duration_ms(&self) -> zbus::Result<u64>;
    /// How many filesystems the guest agent froze.
    #[zbus(property)]
    fn frozen_filesystems(&self) -> zbus::Result<u32>;
    /// The fullest copy-on-write space of the snapshot's thick LVM volumes, in percent (0 when
    /// it has none); at 100 the snapshot is Failed.
    #[zbus(property)]
    fn cow_fill_percent(&self) -> zbus::Result<f64>;
}

/// `org.vmsnap.VmSnap1.Restore`: one per restore, mirroring KubeVirt's VirtualMachineRestore
/// status.
#[proxy(
    interface = "org.vmsnap.VmSnap1.Restore",
    default_service = "org.vmsnap.VmSnap1"
)]
pub trait Restore {
    /// Deletes a finished restore's record (the restored VM stays as it is), or cancels a
    /// restore waiting for its VM and removes it.
    fn delete(&self) -> Result<(), VmSnapError>;
    /// The name it was asked under; empty if none.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// The targetReadinessPolicy it was asked with; empty if none.
    #[zbus(property)]
    fn readiness_policy(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn uuid(&self) -> zbus::Result<String>;
    /// The VM the snapshot belongs to.
    #[zbus(property)]
    fn vm_name(&self) -> zbus::Result<String>;
    /// The snapshot's name.
    #[zbus(property)]
    fn snapshot(&self) -> zbus::Result<String>;
    /// The VM restored: the same VM (in place) or the new one.
    #[zbus(property)]
    fn target(&self) -> zbus::Result<String>;
    /// Whether the restore created a new VM.
    #[zbus(property)]
    fn new_vm(&self) -> zbus::Result<bool>;
    /// InProgress, Waiting, Succeeded or Failed.
    #[zbus(property)]
    fn phase(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn complete(&self) -> zbus::Result<bool>;
    /// RFC 3339, UTC; when the restore was requested.
    #[zbus(property)]
    fn creation_time(&self) -> zbus::Result<String>;
    /// RFC 3339, UTC; when it completed, empty before.
    #[zbus(property)]
    fn restore_time(&self) -> zbus::Result<String>;
    /// Per disk: (target, from image, to image).
    #[zbus(property)]
    fn restores(&self) -> zbus::Result<Vec<VolumeRestore>>;
    /// Disks attached after the snapshot, detached by the restore: (target, source).
    #[zbus(property)]
    fn detached_disks(&self) -> zbus::Result<Vec<DetachedDisk>>;
    /// Disks the snapshot left out: back in the definition, but their content was never
    /// captured and is not restored: (target, reason).
    #[zbus(property)]
    fn not_restored(&self) -> zbus::Result<Vec<ExcludedVolume>>;
    /// The snapshot taken of the state before an in-place restore; empty if none.
    #[zbus(property)]
    fn safety_snapshot(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;
    /// The D-Bus error name of Error; empty without an error.
    #[zbus(property)]
    fn error_name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<String>;
}
