use std::sync::Arc;

use vmsnap_api::DiskInfo;
use zbus::interface;
use zbus::object_server::SignalEmitter;

use crate::domain::VmInfo;

/// `org.vmsnap.VmSnap1.VirtualMachine`: one per libvirt domain, at a path derived from its UUID.
pub struct VmObject {
    info: Arc<VmInfo>,
}

impl VmObject {
    pub fn new(info: Arc<VmInfo>) -> Self {
        VmObject { info }
    }

    /// Takes the new state and announces each property that changed.
    pub(super) async fn update(
        &mut self,
        info: Arc<VmInfo>,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use vmsnap_api::{AgentState, VmState, VM_INTERFACE};
    use zbus::as_variant::to_owned_variant;
    use zbus::OwnedVariant;

    use super::super::listing::{Listed, Objects};
    use super::super::snapshot::tests::decoded;
    use super::*;

    #[test]
    fn a_listing_serves_what_the_object_serves() {
        let info = Arc::new(VmInfo {
            name: "web".into(),
            uuid: "0f6b3a52-4a8e-4a4b-9a3c-2f0d7c5a9e11".into(),
            state: VmState::Running,
            agent: AgentState::Connected,
            disks: vec![DiskInfo {
                target: "vda".into(),
                device: "disk".into(),
                source: "/i/web.qcow2".into(),
                format: "qcow2".into(),
                backend: "qcow2".into(),
                reason: String::new(),
            }],
        });
        let object = VmObject::new(info.clone());
        let v = |r: zbus::Result<OwnedVariant>| r.expect("a variant");
        let served: HashMap<String, OwnedVariant> = HashMap::from([
            ("Name".to_string(), v(to_owned_variant(&object.name()))),
            ("Uuid".into(), v(to_owned_variant(&object.uuid()))),
            ("State".into(), v(to_owned_variant(&object.state()))),
            ("Agent".into(), v(to_owned_variant(&object.agent()))),
            ("Disks".into(), v(to_owned_variant(&object.disks()))),
        ]);
        let mut listing = decoded(&Objects(vec![Listed::Vm(info.clone())]));
        let path = zbus::OwnedObjectPath::try_from(vmsnap_api::vm_path(&info.uuid)).expect("path");
        let mut interfaces = listing.remove(&path).expect("listed");
        let interface = zbus::names::InterfaceName::from_static_str(VM_INTERFACE).expect("a name");
        assert_eq!(
            interfaces.remove(&interface).expect("its interface"),
            served
        );
    }
}
