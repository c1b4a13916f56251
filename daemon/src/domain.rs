//! What vmsnap knows about one libvirt domain, read from its live XML definition.

use vmsnap_api::{AgentState, DiskInfo, VmState};

use crate::disks::{classify_disk, LvmProbe};

/// Name of the virtio-serial port qemu-ga listens on.
const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// One VM as published on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub uuid: String,
    pub state: VmState,
    pub agent: AgentState,
    pub disks: Vec<DiskInfo>,
}

/// Parses a domain's XML (live XML for a running domain: only it shows the agent channel's
/// connection state) into a [`VmInfo`].
pub fn parse_domain(xml: &str, state: VmState, lvm: &dyn LvmProbe) -> Result<VmInfo, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable domain XML: {e}"))?;
    let domain = doc.root_element();
    let text_of = |tag: &str| {
        domain
            .children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|n| n.text())
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let name = text_of("name");
    let uuid = text_of("uuid");
    if name.is_empty() || uuid.is_empty() {
        return Err("domain XML has no name or uuid".to_string());
    }
    let devices = domain.children().find(|c| c.has_tag_name("devices"));
    let disks = devices
        .iter()
        .flat_map(|d| d.children())
        .filter(|c| c.has_tag_name("disk"))
        .map(|disk| classify_disk(disk, lvm))
        .collect();
    let agent = devices
        .iter()
        .flat_map(|d| d.children())
        .filter(|c| c.has_tag_name("channel"))
        .filter_map(|c| c.children().find(|t| t.has_tag_name("target")))
        .find(|t| t.attribute("name") == Some(AGENT_CHANNEL))
        .map(|target| {
            if target.attribute("state") == Some("connected") {
                AgentState::Connected
            } else {
                AgentState::Disconnected
            }
        })
        .unwrap_or(AgentState::NotConfigured);
    Ok(VmInfo {
        name,
        uuid,
        state,
        agent,
        disks,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    struct NoLvm;
    impl LvmProbe for NoLvm {
        fn is_logical_volume(&self, _: &Path) -> bool {
            false
        }
    }

    fn domain(devices: &str) -> String {
        format!(
            "<domain type='qemu' id='3'><name>web</name>\
             <uuid>6f1c2f0e-54a7-4c5e-9d0b-1c9b2e0f7a11</uuid><memory unit='KiB'>131072</memory>\
             <devices>{devices}</devices></domain>"
        )
    }

    #[test]
    fn connected_agent_channel() {
        let xml = domain(
            "<channel type='unix'><source mode='bind' path='/run/libvirt/qemu/channel/3-web/org.qemu.guest_agent.0'/>\
             <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>\
             <alias name='channel0'/></channel>",
        );
        let vm = parse_domain(&xml, VmState::Running, &NoLvm).expect("parses");
        assert_eq!(vm.name, "web");
        assert_eq!(vm.uuid, "6f1c2f0e-54a7-4c5e-9d0b-1c9b2e0f7a11");
        assert_eq!(vm.agent, AgentState::Connected);
    }

    #[test]
    fn disconnected_agent_channel() {
        let xml = domain(
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/></channel>",
        );
        let vm = parse_domain(&xml, VmState::Running, &NoLvm).expect("parses");
        assert_eq!(vm.agent, AgentState::Disconnected);
    }

    #[test]
    fn agent_channel_of_a_shut_off_domain_is_disconnected() {
        let xml = domain(
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        );
        let vm = parse_domain(&xml, VmState::ShutOff, &NoLvm).expect("parses");
        assert_eq!(vm.agent, AgentState::Disconnected);
    }

    #[test]
    fn other_channels_do_not_count_as_an_agent() {
        let xml = domain(
            "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>",
        );
        let vm = parse_domain(&xml, VmState::Running, &NoLvm).expect("parses");
        assert_eq!(vm.agent, AgentState::NotConfigured);
    }

    #[test]
    fn disks_are_listed_in_definition_order() {
        let xml = domain(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/><target dev='vda'/></disk>\
             <disk type='file' device='cdrom'><source file='/seed.iso'/><target dev='sda'/><readonly/></disk>",
        );
        let vm = parse_domain(&xml, VmState::ShutOff, &NoLvm).expect("parses");
        let targets: Vec<_> = vm
            .disks
            .iter()
            .map(|d| (d.target.as_str(), d.backend.as_str()))
            .collect();
        assert_eq!(targets, [("vda", "qcow2"), ("sda", "excluded")]);
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(parse_domain("<domain><name>x", VmState::Running, &NoLvm).is_err());
        assert!(parse_domain("<domain/>", VmState::Running, &NoLvm).is_err());
    }
}
