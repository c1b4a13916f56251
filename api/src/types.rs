use serde::{Deserialize, Serialize};
use zbus::Type;

/// One disk of a VM as vmsnap sees it: where it lives and how (or whether) it is snapshotted.
///
/// On the bus this is the struct `(ssssss)`, in field order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct DiskInfo {
    /// Guest-side target, e.g. `vda`.
    pub target: String,
    /// libvirt device kind: `disk`, `cdrom`, `floppy` or `lun`.
    pub device: String,
    /// Host-side source: a file or device path, `protocol:name` for network disks, or empty.
    pub source: String,
    /// Image format from the driver element (`qcow2`, `raw`, ...), empty when unknown.
    pub format: String,
    /// `qcow2`, `lvm`, `rbd` or `excluded`; see [`DiskBackend`].
    pub backend: String,
    /// Why the disk is excluded; empty when it is not.
    pub reason: String,
}

/// How a disk is snapshotted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBackend {
    /// File disk (qcow2 or raw): external qcow2 overlays.
    Qcow2,
    /// Block disk on an LVM logical volume: LVM snapshots.
    Lvm,
    /// Network disk on a Ceph RBD image: RBD snapshots.
    Rbd,
    /// Not snapshotted; the disk's `reason` says why.
    Excluded,
}

impl DiskBackend {
    pub const fn as_str(self) -> &'static str {
        match self {
            DiskBackend::Qcow2 => "qcow2",
            DiskBackend::Lvm => "lvm",
            DiskBackend::Rbd => "rbd",
            DiskBackend::Excluded => "excluded",
        }
    }
}

/// A VM's run state, as the `State` property spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    NoState,
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    Suspended,
    Unknown,
}

impl VmState {
    pub const fn as_str(self) -> &'static str {
        match self {
            VmState::NoState => "no-state",
            VmState::Running => "running",
            VmState::Blocked => "blocked",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::ShutOff => "shut-off",
            VmState::Crashed => "crashed",
            VmState::Suspended => "pm-suspended",
            VmState::Unknown => "unknown",
        }
    }
}

/// Whether a VM's QEMU guest agent can be used, as the `Agent` property spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// The agent channel is configured and the agent inside the guest answers.
    Connected,
    /// The channel is configured, but no agent is listening (not installed, not started, or the
    /// VM is not running).
    Disconnected,
    /// The VM has no `org.qemu.guest_agent.0` channel.
    NotConfigured,
}

impl AgentState {
    pub const fn as_str(self) -> &'static str {
        match self {
            AgentState::Connected => "connected",
            AgentState::Disconnected => "disconnected",
            AgentState::NotConfigured => "not-configured",
        }
    }
}

/// A disk captured by a snapshot. On the bus: `(ssst)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct IncludedVolume {
    /// Guest-side target, e.g. `vda`.
    pub target: String,
    /// `qcow2` or `lvm`.
    pub backend: String,
    /// The image (or LV) that holds the snapshot's data. It is never written again.
    pub image: String,
    /// The disk's virtual size in bytes.
    pub virtual_size: u64,
}

/// A disk a snapshot left out, and why. On the bus: `(ss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct ExcludedVolume {
    pub target: String,
    pub reason: String,
}

/// Where a snapshot is in its life, as KubeVirt's VirtualMachineSnapshot status spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotPhase {
    InProgress,
    Succeeded,
    Failed,
    Deleting,
}

impl SnapshotPhase {
    pub const fn as_str(self) -> &'static str {
        match self {
            SnapshotPhase::InProgress => "InProgress",
            SnapshotPhase::Succeeded => "Succeeded",
            SnapshotPhase::Failed => "Failed",
            SnapshotPhase::Deleting => "Deleting",
        }
    }
}

/// What a snapshot's consistency rests on, as KubeVirt's indications spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Indication {
    /// The VM was running (or paused) when the snapshot was taken.
    Online,
    /// The guest agent froze the guest's filesystems: application-consistent as far as the
    /// filesystems go.
    GuestAgent,
    /// No usable agent: crash-consistent.
    NoGuestAgent,
    /// The freeze failed; the snapshot is crash-consistent.
    QuiesceFailed,
    /// The VM was paused: consistent as a whole, no freeze needed.
    Paused,
    /// The guest agent did not answer the freeze in time, or the guest was thawed at
    /// `freeze_timeout` before the disks were snapshotted; the snapshot is crash-consistent.
    QuiesceTimeout,
    /// Disks were excluded (acknowledged with allow_excluded): the snapshot holds only some.
    PartialSnapshot,
}

impl Indication {
    pub const fn as_str(self) -> &'static str {
        match self {
            Indication::Online => "Online",
            Indication::GuestAgent => "GuestAgent",
            Indication::NoGuestAgent => "NoGuestAgent",
            Indication::QuiesceFailed => "QuiesceFailed",
            Indication::Paused => "Paused",
            Indication::QuiesceTimeout => "QuiesceTimeout",
            Indication::PartialSnapshot => "PartialSnapshot",
        }
    }
}

/// An indication with its message, as KubeVirt's sourceIndications. On the bus: `(ss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct SourceIndication {
    pub indication: String,
    pub message: String,
}

/// One disk a restore brought back. On the bus: `(sss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct VolumeRestore {
    /// Guest-side target, e.g. `vda`.
    pub target: String,
    /// The snapshot's image the disk was restored from (left unchanged).
    pub from_image: String,
    /// The VM's new disk image (an overlay on `from_image`).
    pub to_image: String,
}

/// A disk the VM had but the snapshot did not: detached from the definition by an in-place
/// restore, its image left untouched. On the bus: `(ss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct DetachedDisk {
    pub target: String,
    pub source: String,
}

/// Where a restore is, as the Restore object's Phase spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestorePhase {
    InProgress,
    /// An in-place restore waiting for its VM to be shut off (targetReadinessPolicy
    /// WaitGracePeriod or WaitEventually); nothing has changed yet.
    Waiting,
    Succeeded,
    Failed,
}

impl RestorePhase {
    pub const fn as_str(self) -> &'static str {
        match self {
            RestorePhase::InProgress => "InProgress",
            RestorePhase::Waiting => "Waiting",
            RestorePhase::Succeeded => "Succeeded",
            RestorePhase::Failed => "Failed",
        }
    }
}
