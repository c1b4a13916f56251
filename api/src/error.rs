use zbus::DBusError;

/// Errors vmsnapd returns, as named D-Bus errors (`org.vmsnap.VmSnap1.Error.<Variant>`).
///
/// Each variant carries a one-line, human-readable message that clients show as is.
#[derive(Debug, DBusError)]
#[zbus(prefix = "org.vmsnap.VmSnap1.Error")]
pub enum VmSnapError {
    /// A transport-level error, not one vmsnapd returned.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No such VM (or, later, snapshot or restore).
    NotFound(String),
    /// libvirt cannot be reached right now; vmsnapd keeps trying to reconnect.
    LibvirtUnavailable(String),
    /// libvirt refused or failed a call; the message is libvirt's own.
    LibvirtError(String),
    /// An argument is malformed.
    InvalidArgument(String),
    /// The caller is not authorized.
    AccessDenied(String),
    /// The daemon is shutting down and takes no new work.
    ShuttingDown(String),
    /// A snapshot name breaks the naming rules.
    InvalidName(String),
    /// A snapshot with this name already exists for the VM.
    AlreadyExists(String),
    /// The VM has disks that cannot be snapshotted; pass `allow_excluded` to go ahead without them.
    /// The message lists each disk and why.
    ExcludedDisks(String),
    /// Another operation runs on this VM; try again when it has finished.
    Busy(String),
    /// The operation is not possible in the object's current state.
    InvalidState(String),
    /// The operation failed; the message says why and what was left unchanged.
    Failed(String),
    /// The VM runs; stop it first (or ask the operation to stop it).
    VmRunning(String),
    /// vmsnapd could not write the record that journals the operation (a full or read-only
    /// state folder): nothing was started.
    RecordWriteFailed(String),
    /// A storage step failed: an image, a logical volume, a file of the VM's state.
    StorageFailed(String),
    /// The operation did not finish within its deadline (`failure_deadline`, a grace period).
    DeadlineExceeded(String),
}

impl VmSnapError {
    /// The message meant for a user: the daemon's own text for vmsnap errors, the transport's
    /// description otherwise.
    pub fn user_message(&self) -> String {
        match self {
            VmSnapError::ZBus(e) => e.to_string(),
            VmSnapError::NotFound(m)
            | VmSnapError::LibvirtUnavailable(m)
            | VmSnapError::LibvirtError(m)
            | VmSnapError::InvalidArgument(m)
            | VmSnapError::AccessDenied(m)
            | VmSnapError::ShuttingDown(m)
            | VmSnapError::InvalidName(m)
            | VmSnapError::AlreadyExists(m)
            | VmSnapError::ExcludedDisks(m)
            | VmSnapError::Busy(m)
            | VmSnapError::InvalidState(m)
            | VmSnapError::Failed(m)
            | VmSnapError::VmRunning(m)
            | VmSnapError::RecordWriteFailed(m)
            | VmSnapError::StorageFailed(m)
            | VmSnapError::DeadlineExceeded(m) => m.clone(),
        }
    }
}
