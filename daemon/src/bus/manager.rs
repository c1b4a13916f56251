use tokio::sync::mpsc;
use vmsnap_api::{vm_path, VmSnapError};
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedObjectPath};

use super::ask;
use crate::engine::Request;

/// `org.vmsnap.VmSnap1.Manager`: entry point for requests that are not about one object.
pub struct ManagerObject {
    engine: mpsc::Sender<Request>,
    libvirt_uri: String,
    libvirt_connected: bool,
    libvirt_error: String,
}

impl ManagerObject {
    pub fn new(engine: mpsc::Sender<Request>, libvirt_uri: String) -> Self {
        ManagerObject {
            engine,
            libvirt_uri,
            libvirt_connected: false,
            libvirt_error: "not connected yet".to_string(),
        }
    }

    pub(super) async fn set_libvirt_status(
        &mut self,
        connected: bool,
        error: String,
        emitter: &SignalEmitter<'_>,
    ) -> zbus::Result<()> {
        if self.libvirt_connected != connected {
            self.libvirt_connected = connected;
            self.libvirt_connected_changed(emitter).await?;
        }
        if self.libvirt_error != error {
            self.libvirt_error = error;
            self.libvirt_error_changed(emitter).await?;
        }
        Ok(())
    }
}

fn object_path(uuid: &str) -> Result<OwnedObjectPath, VmSnapError> {
    OwnedObjectPath::try_from(vm_path(uuid)).map_err(VmSnapError::ZBus)
}

#[interface(name = "org.vmsnap.VmSnap1.Manager")]
impl ManagerObject {
    /// Object path of the VM with this name or UUID.
    async fn find_vm(&self, name_or_uuid: String) -> Result<OwnedObjectPath, VmSnapError> {
        let uuid = ask(&self.engine, |reply| Request::FindVm {
            key: name_or_uuid,
            reply,
        })
        .await??;
        object_path(&uuid)
    }

    /// Paths of all VM objects, sorted by VM name.
    async fn list_vms(&self) -> Result<Vec<OwnedObjectPath>, VmSnapError> {
        let vms = ask(&self.engine, |reply| Request::ListVms { reply }).await?;
        vms.iter().map(|vm| object_path(&vm.uuid)).collect()
    }

    /// vmsnapd's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// The libvirt URI vmsnapd uses.
    #[zbus(property(emits_changed_signal = "const"))]
    fn libvirt_uri(&self) -> String {
        self.libvirt_uri.clone()
    }

    /// Whether vmsnapd is connected to libvirt. While it is not, VM objects show their last known
    /// state.
    #[zbus(property)]
    fn libvirt_connected(&self) -> bool {
        self.libvirt_connected
    }

    /// Why libvirt is unavailable; empty while connected.
    #[zbus(property)]
    fn libvirt_error(&self) -> String {
        self.libvirt_error.clone()
    }
}
