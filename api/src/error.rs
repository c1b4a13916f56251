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
            | VmSnapError::ShuttingDown(m) => m.clone(),
        }
    }
}
