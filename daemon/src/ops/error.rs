//! The errors of the operation layer. Each kind is one a client or the flows must tell apart;
//! the message says what happened in words for the user, and becomes the record's `error`.

/// Why an operation (or one of its steps) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// libvirt cannot be reached.
    #[error("cannot connect to libvirt: {0}")]
    LibvirtUnavailable(String),
    /// The VM is not defined (any more).
    #[error("VM {0}: domain not found")]
    VmNotFound(String),
    /// libvirt refused or failed a call; the message names the call's purpose and libvirt's
    /// own words.
    #[error("{0}")]
    Libvirt(String),
    /// A storage step failed: an image, an LV, a file of the VM's state.
    #[error("{0}")]
    Storage(String),
    /// The journal could not be written: the operation stops, since going on without it
    /// would break the crash-safety promise.
    #[error("{0}")]
    RecordWrite(String),
    /// The operation did not finish within its deadline.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The operation is not possible as things are (a VM running, a snapshot not ready, an
    /// image in use, a definition that cannot be read).
    #[error("{0}")]
    Refused(String),
}

impl OpError {
    /// The D-Bus error this failure is reported as (`org.vmsnap.VmSnap1.Error.<name>`), on a
    /// method's reply or in a Snapshot's or Restore's `ErrorName`.
    pub fn error_name(&self) -> String {
        let short = match self {
            OpError::LibvirtUnavailable(_) => "LibvirtUnavailable",
            OpError::VmNotFound(_) => "NotFound",
            OpError::Libvirt(_) => "LibvirtError",
            OpError::Storage(_) => "StorageFailed",
            OpError::RecordWrite(_) => "RecordWriteFailed",
            OpError::DeadlineExceeded(_) => "DeadlineExceeded",
            OpError::Refused(_) => "Failed",
        };
        format!("{}.{short}", vmsnap_api::ERROR_PREFIX)
    }
}

/// Results of the operation layer.
pub type OpResult<T> = Result<T, OpError>;

/// For the storage helpers (qemu-img, LVM, files) whose errors are their own one-line texts.
pub trait StorageContext<T> {
    fn storage(self) -> OpResult<T>;
}

impl<T, E: std::fmt::Display> StorageContext<T> for Result<T, E> {
    fn storage(self) -> OpResult<T> {
        self.map_err(|e| OpError::Storage(e.to_string()))
    }
}

/// The storage helpers' own texts (qemu-img, image chains, definitions edited for a chain)
/// are storage failures.
impl From<String> for OpError {
    fn from(message: String) -> OpError {
        OpError::Storage(message)
    }
}
