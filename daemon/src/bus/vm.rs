use vmsnap_api::DiskInfo;
use zbus::interface;
use zbus::object_server::SignalEmitter;

use crate::domain::VmInfo;

/// `org.vmsnap.VmSnap1.VirtualMachine`: one per libvirt domain, at a path derived from its UUID.
pub struct VmObject {
    info: VmInfo,
}

impl VmObject {
    pub fn new(info: VmInfo) -> Self {
        VmObject { info }
    }

    /// Takes the new state and announces each property that changed.
    pub(super) async fn update(
        &mut self,
        info: VmInfo,
        emitter: &SignalEmitter<'_>,
    ) -> zbus::Result<()> {
        let old = std::mem::replace(&mut self.info, info);
        if old.name != self.info.name {
            self.name_changed(emitter).await?;
        }
        if old.state != self.info.state {
            self.state_changed(emitter).await?;
        }
        if old.agent != self.info.agent {
            self.agent_changed(emitter).await?;
        }
        if old.disks != self.info.disks {
            self.disks_changed(emitter).await?;
        }
        Ok(())
    }
}

#[interface(name = "org.vmsnap.VmSnap1.VirtualMachine")]
impl VmObject {
    /// The libvirt domain name.
    #[zbus(property)]
    fn name(&self) -> String {
        self.info.name.clone()
    }

    /// The libvirt domain UUID.
    #[zbus(property(emits_changed_signal = "const"))]
    fn uuid(&self) -> String {
        self.info.uuid.clone()
    }

    /// running, paused, shut-off, shutting-down, crashed, blocked, pm-suspended, no-state or
    /// unknown.
    #[zbus(property)]
    fn state(&self) -> String {
        self.info.state.as_str().to_string()
    }

    /// The QEMU guest agent: connected, disconnected or not-configured.
    #[zbus(property)]
    fn agent(&self) -> String {
        self.info.agent.as_str().to_string()
    }

    /// Each disk: (target, device, source, format, backend, reason). backend is qcow2, lvm or
    /// excluded; reason says why a disk is excluded.
    #[zbus(property)]
    fn disks(&self) -> Vec<DiskInfo> {
        self.info.disks.clone()
    }
}
