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

/// A UUID in lower case, as libvirt spells them: copied only when it is not already.
pub fn lower_case(uuid: &str) -> std::borrow::Cow<'_, str> {
    if uuid.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(uuid.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(uuid)
    }
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

/// Small state a VM keeps outside its disks, found in its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraState {
    /// `nvram` (a file) or `tpm` (a directory).
    pub kind: &'static str,
    pub path: String,
}

/// The UEFI variables file (`<os><nvram>`) and an emulated TPM's state directory, if any.
pub fn extra_state(xml: &str, uuid: &str) -> Result<Vec<ExtraState>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable domain XML: {e}"))?;
    let mut out = Vec::new();
    if let Some(nvram) = doc
        .descendants()
        .find(|n| n.has_tag_name("nvram") && n.parent().is_some_and(|p| p.has_tag_name("os")))
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        out.push(ExtraState {
            kind: "nvram",
            path: nvram.to_string(),
        });
    }
    let emulated_tpm = doc.descendants().any(|n| {
        n.has_tag_name("backend")
            && n.attribute("type") == Some("emulator")
            && n.parent().is_some_and(|p| p.has_tag_name("tpm"))
    });
    if emulated_tpm {
        // libvirt's fixed location for swtpm state.
        out.push(ExtraState {
            kind: "tpm",
            path: format!("/var/lib/libvirt/swtpm/{uuid}"),
        });
    }
    Ok(out)
}

/// Returns `xml` with disk `target`'s source (file, device or RBD image name) set to `path` and its driver format to
/// `format`, and any recorded backing chain of that disk dropped (libvirt re-reads it).
pub fn set_disk_source(
    xml: &str,
    target: &str,
    path: &str,
    format: &str,
) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable domain XML: {e}"))?;
    let disk = disk_node(&doc, target)?;
    // Edits by byte range, back to front so earlier ranges stay valid.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let source = disk
        .children()
        .find(|c| c.has_tag_name("source"))
        .ok_or_else(|| format!("disk {target} has no source"))?;
    // A file's path, a block device's, or a network disk's image name (RBD: POOL/IMAGE).
    let file = source
        .attributes()
        .find(|a| a.name() == "file" || a.name() == "dev" || a.name() == "name")
        .ok_or_else(|| format!("disk {target} has no file, device or image name"))?;
    edits.push((file.range_value(), escape_attr(path)));
    if let Some(kind) = disk
        .children()
        .find(|c| c.has_tag_name("driver"))
        .and_then(|d| d.attributes().find(|a| a.name() == "type"))
    {
        edits.push((kind.range_value(), escape_attr(format)));
    }
    for backing in disk.children().filter(|c| c.has_tag_name("backingStore")) {
        edits.push((backing.range(), String::new()));
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

/// The definition of a new VM made from `xml` (VM `old_name`): another name, no UUID and no MAC
/// addresses (libvirt generates new ones), its own NVRAM file if it has one, and its own
/// console log files (two VMs cannot log to one file).
pub fn for_new_vm(
    xml: &str,
    old_name: &str,
    name: &str,
    nvram: Option<&str>,
) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable domain XML: {e}"))?;
    let domain = doc.root_element();
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for child in domain.children().filter(|c| c.is_element()) {
        if child.has_tag_name("name") {
            edits.push((child.range(), format!("<name>{}</name>", escape_attr(name))));
        } else if child.has_tag_name("uuid") {
            edits.push((child.range(), String::new()));
        }
    }
    for mac in doc.descendants().filter(|n| {
        n.has_tag_name("mac") && n.parent().is_some_and(|p| p.has_tag_name("interface"))
    }) {
        edits.push((mac.range(), String::new()));
    }
    for log in doc.descendants().filter(|n| {
        n.has_tag_name("source")
            && n.parent().is_some_and(|p| {
                (p.has_tag_name("serial") || p.has_tag_name("console"))
                    && p.attribute("type") == Some("file")
            })
    }) {
        if let Some(attr) = log.attributes().find(|a| a.name() == "path") {
            // Only the file name changes: the directory is the host's choice.
            let old = std::path::Path::new(attr.value());
            let file = old
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let new_file = if file.contains(old_name) {
                file.replace(old_name, name)
            } else {
                format!("{file}.{name}")
            };
            let new = old.with_file_name(new_file).to_string_lossy().into_owned();
            edits.push((attr.range_value(), escape_attr(&new)));
        }
    }
    if let Some(path) = nvram {
        if let Some(node) = doc
            .descendants()
            .find(|n| n.has_tag_name("nvram") && n.parent().is_some_and(|p| p.has_tag_name("os")))
        {
            let mut tag = String::from("<nvram");
            for attr in node.attributes().filter(|a| a.name() != "template") {
                tag.push_str(&format!(" {}='{}'", attr.name(), escape_attr(attr.value())));
            }
            tag.push_str(&format!(">{}</nvram>", escape_attr(path)));
            edits.push((node.range(), tag));
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

fn escape_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The `<disk>` element of disk `target` (its `<target dev=...>`).
fn disk_node<'a, 'input>(
    doc: &'a roxmltree::Document<'input>,
    target: &str,
) -> Result<roxmltree::Node<'a, 'input>, String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children()
                .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
        })
        .ok_or_else(|| format!("the domain has no disk {target}"))
}

/// A disk's current top image and its format, from a domain definition.
pub fn disk_source(xml: &str, target: &str) -> Result<(String, String), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable domain XML: {e}"))?;
    let disk = disk_node(&doc, target)?;
    let file = disk
        .children()
        .find(|c| c.has_tag_name("source"))
        .and_then(|s| s.attribute("file"))
        .ok_or_else(|| format!("disk {target} has no file source"))?;
    let format = disk
        .children()
        .find(|c| c.has_tag_name("driver"))
        .and_then(|d| d.attribute("type"))
        .unwrap_or("raw");
    Ok((file.to_string(), format.to_string()))
}

/// A definition fit for everyone to read: the secrets libvirt includes with
/// `VIR_DOMAIN_XML_SECURE` (the `passwd` of a VNC or SPICE `<graphics>`, and any other
/// `passwd` attribute) are left out. The record keeps them, for a restore to bring them back.
/// XML that does not parse is not shown at all.
pub fn without_secrets(xml: &str) -> String {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return String::new();
    };
    let mut secrets: Vec<std::ops::Range<usize>> = doc
        .descendants()
        .flat_map(|n| n.attributes())
        .filter(|a| a.name() == "passwd")
        .map(|a| a.range())
        .collect();
    secrets.sort_by_key(|r| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for range in secrets {
        out.replace_range(range, "");
    }
    out
}

/// Whether disk `target` of a definition names `image`: as its source or anywhere in its
/// `<backingStore>` chain.
pub fn disk_names_image(xml: &str, target: &str, image: &str) -> Result<bool, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable domain XML: {e}"))?;
    let disk = disk_node(&doc, target)?;
    Ok(disk
        .descendants()
        .filter(|n| n.has_tag_name("source"))
        .any(|s| s.attribute("file") == Some(image)))
}

#[cfg(test)]
mod xml_edit_tests {
    use super::*;

    const XML: &str = "<domain><name>a</name><uuid>u</uuid><os><type>hvm</type>\
        <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>\
        <nvram>/var/lib/libvirt/qemu/nvram/a_VARS.fd</nvram></os><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
        <source file='/i/top.qcow2'/><backingStore type='file'><format type='qcow2'/>\
        <source file='/i/base.qcow2'/></backingStore><target dev='vda' bus='virtio'/></disk>\
        <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>";

    #[test]
    fn secrets_are_left_out_of_the_definition_everyone_reads() {
        let xml = "<domain><name>a</name><devices><graphics type='vnc' port='-1' \
                   passwd='s3cret&amp;' autoport='yes'/><graphics type=\"spice\" \
                   passwd=\"other\"/></devices></domain>";
        let public = without_secrets(xml);
        assert!(
            !public.contains("s3cret") && !public.contains("other"),
            "{public}"
        );
        assert!(!public.contains("passwd"), "{public}");
        let doc = roxmltree::Document::parse(&public).expect("still XML");
        assert_eq!(
            doc.descendants()
                .filter(|n| n.has_tag_name("graphics"))
                .filter_map(|n| n.attribute("autoport"))
                .collect::<Vec<_>>(),
            ["yes"]
        );
        assert_eq!(without_secrets(XML), XML, "nothing else changes");
        assert_eq!(without_secrets("<domain"), "");
    }

    #[test]
    fn disk_names_image_in_source_and_backing_chain() {
        assert_eq!(disk_names_image(XML, "vda", "/i/top.qcow2"), Ok(true));
        assert_eq!(disk_names_image(XML, "vda", "/i/base.qcow2"), Ok(true));
        assert_eq!(disk_names_image(XML, "vda", "/i/other.qcow2"), Ok(false));
        assert!(disk_names_image(XML, "vdz", "/i/top.qcow2").is_err());
    }

    #[test]
    fn set_disk_source_rewrites_path_format_and_drops_backing_store() {
        let out = set_disk_source(XML, "vda", "/i/base.raw", "raw").expect("edits");
        assert_eq!(
            disk_source(&out, "vda").expect("reads"),
            ("/i/base.raw".to_string(), "raw".to_string())
        );
        assert!(!out.contains("backingStore"));
        assert!(set_disk_source(XML, "vdz", "/x", "raw").is_err());
    }

    #[test]
    fn set_disk_source_renames_an_rbd_image_and_keeps_its_hosts_and_auth() {
        let xml = XML.replace(
            "</devices>",
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
             <auth username='libvirt'><secret type='ceph' uuid='u-1'/></auth>\
             <source protocol='rbd' name='rbd/vm1'><host name='127.0.0.1' port='6789'/></source>\
             <target dev='vdb' bus='virtio'/></disk></devices>",
        );
        let out = set_disk_source(&xml, "vdb", "rbd/vm1-vmsnap-r01234567", "raw").expect("edits");
        assert!(out.contains("name='rbd/vm1-vmsnap-r01234567'"), "{out}");
        assert!(out.contains("<host name='127.0.0.1' port='6789'/>"));
        assert!(out.contains("uuid='u-1'"));
    }

    #[test]
    fn new_vm_definition_has_new_name_no_uuid_no_macs_and_own_nvram() {
        let xml = XML.replace(
            "</devices>",
            "<interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface></devices>",
        );
        let xml = xml.replace(
            "</devices>",
            "<serial type='file'><source path='/a-dir/a.console.log'/></serial></devices>",
        );
        let out = for_new_vm(&xml, "a", "clone", Some("/n/clone_VARS.fd")).expect("edits");
        assert!(out.contains("/a-dir/clone.console.log"), "{out}");
        assert!(out.contains("<name>clone</name>"));
        assert!(!out.contains("<uuid>"));
        assert!(!out.contains("52:54:00:12:34:56"));
        assert!(out.contains("<nvram>/n/clone_VARS.fd</nvram>"));
        assert!(roxmltree::Document::parse(&out).is_ok());
    }

    #[test]
    fn finds_nvram_and_tpm_state() {
        let extra = extra_state(XML, "u").expect("parses");
        assert_eq!(
            extra,
            vec![
                ExtraState {
                    kind: "nvram",
                    path: "/var/lib/libvirt/qemu/nvram/a_VARS.fd".into()
                },
                ExtraState {
                    kind: "tpm",
                    path: "/var/lib/libvirt/swtpm/u".into()
                }
            ]
        );
        assert!(extra_state("<domain><os/></domain>", "u")
            .expect("parses")
            .is_empty());
    }
}
