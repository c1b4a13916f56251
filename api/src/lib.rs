//! The vmsnap D-Bus API: bus name, object paths, interface and error names, the types carried in
//! properties, and client proxies.
//!
//! This crate is what clients (vmsnapctl, tests, other Rust programs) link against; it depends on
//! zbus and serde only, never on the daemon.

mod error;
mod listing;
mod proxies;
mod text;
mod types;

pub use error::VmSnapError;
pub use listing::{RestoreProperties, SnapshotProperties, SnapshotRow, TypedObjects, VmProperties};
pub use proxies::{ManagerProxy, RestoreProxy, SnapshotProxy, VirtualMachineProxy};
pub use text::{
    clip, excerpt, is_unsafe_char, record_error, terminal_safe, terminal_safe_multiline,
    validate_description, validate_snapshot_name, validate_vm_name, EXCERPT_CHARS, MAX_DESCRIPTION,
    MAX_ERROR_CHARS, MAX_SNAPSHOT_NAME, MAX_VM_NAME,
};
pub use types::{
    AgentState, DetachedDisk, DiskBackend, DiskInfo, ExcludedVolume, IncludedVolume, Indication,
    RestorePhase, SnapshotPhase, SourceIndication, VmState, VolumeRestore,
};

/// Well-known bus name of vmsnapd. The trailing `1` is the API version: an incompatible API gets
/// a new name, so old and new clients can coexist.
pub const BUS_NAME: &str = "org.vmsnap.VmSnap1";

/// Path of the `org.freedesktop.DBus.ObjectManager` that lists every vmsnap object.
pub const ROOT_PATH: &str = "/org/vmsnap/VmSnap1";

/// Path of the manager object.
pub const MANAGER_PATH: &str = "/org/vmsnap/VmSnap1/Manager";

/// Interface of the manager object.
pub const MANAGER_INTERFACE: &str = "org.vmsnap.VmSnap1.Manager";

/// Interface of each virtual machine object.
pub const VM_INTERFACE: &str = "org.vmsnap.VmSnap1.VirtualMachine";

/// Interface of each snapshot object.
pub const SNAPSHOT_INTERFACE: &str = "org.vmsnap.VmSnap1.Snapshot";

/// Interface of each restore object.
pub const RESTORE_INTERFACE: &str = "org.vmsnap.VmSnap1.Restore";

/// Prefix of every error name vmsnapd returns.
pub const ERROR_PREFIX: &str = "org.vmsnap.VmSnap1.Error";

/// Environment variable that points daemon and client at another bus than the system bus.
pub const BUS_ADDRESS_ENV: &str = "VMSNAP_BUS_ADDRESS";

/// Object path of the VM with the given libvirt UUID. Keyed by UUID, not name, so a path stays
/// valid when a domain is renamed.
pub fn vm_path(uuid: &str) -> String {
    let element: String = uuid
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{ROOT_PATH}/vm/{element}")
}

/// Object path of the snapshot with the given UUID.
pub fn snapshot_path(uuid: &str) -> String {
    let element: String = uuid
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{ROOT_PATH}/snapshot/{element}")
}

/// Object path of the restore with the given UUID.
pub fn restore_path(uuid: &str) -> String {
    let element: String = uuid
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{ROOT_PATH}/restore/{element}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_path_is_a_valid_object_path() {
        let path = vm_path("0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11");
        assert_eq!(
            path,
            "/org/vmsnap/VmSnap1/vm/0f6b3a52_4a8e_4a4b_9a3c_2f0d7c5a9e11"
        );
        assert!(zbus::ObjectPath::try_from(path.as_str()).is_ok());
    }
}
