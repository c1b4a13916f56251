//! Disk classification: which of a domain's disks vmsnap can snapshot, and how.
//!
//! This is the contract the snapshot code relies on: a disk classified `qcow2` or `lvm` is one the
//! corresponding backend knows how to snapshot and restore; every other disk is `excluded`, with a
//! reason a user understands, and is never touched.

use std::path::Path;

use roxmltree::Node;
use vmsnap_api::{DiskBackend, DiskInfo};

/// Answers whether a block device path is an LVM logical volume. Injected so that classification
/// is a pure function of the domain XML in tests.
pub trait LvmProbe {
    fn is_logical_volume(&self, dev: &Path) -> bool;
}

/// Asks the kernel: an LV is a device-mapper device whose dm UUID starts with `LVM-`. The device
/// is found by its number (major:minor), not its name: without udev, LVM makes /dev/VG/LV and
/// /dev/mapper/VG-LV plain device nodes, not links to /dev/dm-N.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysfsLvmProbe;

impl LvmProbe for SysfsLvmProbe {
    fn is_logical_volume(&self, dev: &Path) -> bool {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let Ok(meta) = std::fs::metadata(dev) else {
            return false;
        };
        if !meta.file_type().is_block_device() {
            return false;
        }
        let rdev = meta.rdev();
        // The kernel's encoding of dev_t (glibc's gnu_dev_major/minor).
        let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
        let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
        std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/dm/uuid"))
            .map(|uuid| uuid.starts_with("LVM-"))
            .unwrap_or(false)
    }
}

/// Classifies one `<disk>` element of a domain definition.
pub fn classify_disk(disk: Node<'_, '_>, lvm: &dyn LvmProbe) -> DiskInfo {
    let disk_type = disk.attribute("type").unwrap_or("file");
    let device = disk.attribute("device").unwrap_or("disk");
    let child = |name: &str| disk.children().find(|c| c.has_tag_name(name));
    let target = child("target")
        .and_then(|t| t.attribute("dev"))
        .unwrap_or("")
        .to_string();
    let format = child("driver")
        .and_then(|d| d.attribute("type"))
        .unwrap_or("")
        .to_string();
    let source_el = child("source");
    let source = source_text(disk_type, source_el);

    let decision = decide(disk_type, device, &source, &format, &child, lvm);
    let (backend, reason) = match decision {
        Ok(backend) => (backend, String::new()),
        Err(reason) => (DiskBackend::Excluded, reason),
    };
    DiskInfo {
        target,
        device: device.to_string(),
        source,
        format,
        backend: backend.as_str().to_string(),
        reason,
    }
}

/// The rules, in order: the first that matches decides. Returns the backend, or why the disk is
/// excluded.
fn decide<'a>(
    disk_type: &str,
    device: &str,
    source: &str,
    format: &str,
    child: &dyn Fn(&str) -> Option<Node<'a, 'a>>,
    lvm: &dyn LvmProbe,
) -> Result<DiskBackend, String> {
    match device {
        "disk" => {}
        "cdrom" | "floppy" => {
            return Err(format!(
            "{device} (removable media such as a cloud-init or installer ISO) is not snapshotted"
        ))
        }
        "lun" => {
            return Err(
                "SCSI passthrough (device='lun'): the guest talks to the host device directly"
                    .to_string(),
            )
        }
        other => return Err(format!("device kind '{other}' is not supported")),
    }
    match disk_type {
        "file" | "block" => {}
        "network" => {
            let protocol = child("source")
                .and_then(|s| s.attribute("protocol"))
                .unwrap_or("unknown");
            if protocol != "rbd" {
                return Err(format!(
                    "network disk ({protocol}): vmsnap snapshots only Ceph RBD network disks"
                ));
            }
        }
        "vhostuser" => {
            return Err("vhost-user disk: served by an external process".to_string());
        }
        "nvme" => return Err("NVMe passthrough of a host controller".to_string()),
        "volume" => {
            return Err("storage pool volume: not supported yet, use the volume's path".to_string())
        }
        "dir" => return Err("directory exposed as a virtual FAT disk".to_string()),
        other => return Err(format!("disk type '{other}' is not supported")),
    }
    if source.is_empty() {
        return Err("no source (empty drive)".to_string());
    }
    if child("readonly").is_some() {
        return Err("read-only disk: the guest cannot change it".to_string());
    }
    if child("shareable").is_some() {
        return Err("shareable disk: other VMs may write to it at the same time".to_string());
    }
    if child("transient").is_some() {
        return Err("transient disk: its changes are discarded when the VM stops".to_string());
    }
    if disk_type == "network" {
        return rbd_image(source)
            .map(|_| DiskBackend::Rbd)
            .ok_or_else(|| format!("RBD disk {source} does not name POOL/IMAGE"));
    }
    if disk_type == "file" {
        return match format {
            "qcow2" | "raw" | "" => Ok(DiskBackend::Qcow2),
            other => Err(format!(
                "image format '{other}' is not supported (only qcow2 and raw)"
            )),
        };
    }
    // A block device: only LVM logical volumes have a snapshot mechanism vmsnap drives.
    if lvm.is_logical_volume(Path::new(source)) {
        Ok(DiskBackend::Lvm)
    } else {
        Err(format!(
            "block device {source} is not an LVM logical volume on this host"
        ))
    }
}

/// The pool, namespace and image an RBD disk's source (`rbd:POOL[/NAMESPACE]/IMAGE`) names;
/// None for anything else, a snapshot (`@SNAP`, read-only) among them.
pub fn rbd_image(source: &str) -> Option<(&str, Option<&str>, &str)> {
    let name = source.strip_prefix("rbd:")?;
    if name.contains('@') {
        return None;
    }
    let parts: Vec<&str> = name.split('/').collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [pool, image] => (*pool, None, *image),
        [pool, namespace, image] => (*pool, Some(*namespace), *image),
        _ => return None,
    };
    let fine = |part: &str| {
        !part.is_empty()
            && part.len() <= 128
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with('-')
            && !part.starts_with('.')
    };
    (fine(pool) && namespace.is_none_or(fine) && fine(image)).then_some((pool, namespace, image))
}

fn source_text(disk_type: &str, source: Option<Node<'_, '_>>) -> String {
    let Some(source) = source else {
        return String::new();
    };
    let attr = |name| source.attribute(name).unwrap_or("").to_string();
    match disk_type {
        "file" => attr("file"),
        "block" => attr("dev"),
        "dir" => attr("dir"),
        "network" => match (source.attribute("protocol"), source.attribute("name")) {
            (Some(p), Some(n)) => format!("{p}:{n}"),
            (Some(p), None) => p.to_string(),
            _ => String::new(),
        },
        "volume" => match (source.attribute("pool"), source.attribute("volume")) {
            (Some(p), Some(v)) => format!("{p}/{v}"),
            _ => String::new(),
        },
        "vhostuser" => attr("path"),
        "nvme" => attr("type"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says yes for paths under /dev/vg0 and /dev/mapper/vg0-*, as LVM would on a host with a
    /// volume group vg0.
    struct FakeLvm;
    impl LvmProbe for FakeLvm {
        fn is_logical_volume(&self, dev: &Path) -> bool {
            let s = dev.to_string_lossy();
            s.starts_with("/dev/vg0/") || s.starts_with("/dev/mapper/vg0-")
        }
    }

    fn classify(xml: &str) -> DiskInfo {
        let doc = roxmltree::Document::parse(xml).expect("test XML parses");
        classify_disk(doc.root_element(), &FakeLvm)
    }

    fn assert_excluded(xml: &str, reason_part: &str) {
        let d = classify(xml);
        assert_eq!(d.backend, "excluded", "{d:?}");
        assert!(
            d.reason.contains(reason_part),
            "reason {:?} should mention {reason_part:?}",
            d.reason
        );
    }

    #[test]
    fn qcow2_file_disk_uses_qcow2_backend() {
        let d = classify(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/var/lib/libvirt/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>",
        );
        assert_eq!(
            d,
            DiskInfo {
                target: "vda".into(),
                device: "disk".into(),
                source: "/var/lib/libvirt/images/web.qcow2".into(),
                format: "qcow2".into(),
                backend: "qcow2".into(),
                reason: String::new(),
            }
        );
    }

    #[test]
    fn raw_file_disk_uses_qcow2_backend() {
        let d = classify(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='/srv/db.img'/><target dev='vdb' bus='virtio'/></disk>",
        );
        assert_eq!((d.backend.as_str(), d.format.as_str()), ("qcow2", "raw"));
    }

    #[test]
    fn file_disk_without_driver_type_is_treated_as_raw() {
        let d = classify(
            "<disk type='file' device='disk'><source file='/srv/a.img'/><target dev='vdc'/></disk>",
        );
        assert_eq!(d.backend, "qcow2");
    }

    #[test]
    fn other_image_formats_are_excluded() {
        assert_excluded(
            "<disk type='file' device='disk'><driver name='qemu' type='vmdk'/>\
             <source file='/srv/a.vmdk'/><target dev='vdc'/></disk>",
            "format 'vmdk'",
        );
    }

    #[test]
    fn lvm_block_disks_use_lvm_backend() {
        for dev in ["/dev/vg0/web-root", "/dev/mapper/vg0-web--root"] {
            let d = classify(&format!(
                "<disk type='block' device='disk'><driver name='qemu' type='raw'/>\
                 <source dev='{dev}'/><target dev='vda' bus='virtio'/></disk>"
            ));
            assert_eq!(d.backend, "lvm", "{dev}");
            assert_eq!(d.source, dev);
        }
    }

    #[test]
    fn non_lvm_block_device_is_excluded() {
        assert_excluded(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>\
             <source dev='/dev/sdb'/><target dev='vdb'/></disk>",
            "/dev/sdb is not an LVM logical volume",
        );
    }

    #[test]
    fn cloud_init_cdrom_is_excluded() {
        assert_excluded(
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
             <source file='/var/lib/libvirt/images/seed.iso'/><target dev='sda' bus='sata'/>\
             <readonly/></disk>",
            "cloud-init",
        );
    }

    #[test]
    fn floppy_is_excluded() {
        assert_excluded(
            "<disk type='file' device='floppy'><source file='/srv/f.img'/><target dev='fda'/></disk>",
            "floppy",
        );
    }

    #[test]
    fn readonly_disk_is_excluded() {
        assert_excluded(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/srv/base.qcow2'/><target dev='vdb'/><readonly/></disk>",
            "read-only",
        );
    }

    #[test]
    fn shareable_disk_is_excluded() {
        assert_excluded(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='/srv/cluster.img'/><target dev='vdb'/><shareable/></disk>",
            "shareable",
        );
    }

    #[test]
    fn transient_disk_is_excluded() {
        assert_excluded(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/srv/scratch.qcow2'/><target dev='vdb'/><transient/></disk>",
            "transient",
        );
    }

    #[test]
    fn network_disks_other_than_rbd_are_excluded_with_their_protocol() {
        for protocol in ["iscsi", "nbd", "gluster", "http"] {
            let d = classify(&format!(
                "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
                 <source protocol='{protocol}' name='pool/image'><host name='10.0.0.1'/></source>\
                 <target dev='vdb'/></disk>"
            ));
            assert_eq!(d.backend, "excluded");
            assert!(d.reason.contains(protocol), "{d:?}");
            assert_eq!(d.source, format!("{protocol}:pool/image"));
        }
    }

    #[test]
    fn rbd_disks_are_taken_unless_shared_read_only_or_not_an_image() {
        let disk = |source: &str, extra: &str| {
            classify(&format!(
                "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
                 <source protocol='rbd' name='{source}'><host name='10.0.0.1' port='6789'/></source>\
                 {extra}<target dev='vdb'/></disk>"
            ))
        };
        let d = disk("rbd/vm-1", "");
        assert_eq!(
            (d.backend.as_str(), d.source.as_str()),
            ("rbd", "rbd:rbd/vm-1")
        );
        assert_eq!(disk("pool/ns/img", "").backend, "rbd");
        for bad in ["pool/img@snap", "pool", "pool/../img", "a/b/c/d", "pool/-x"] {
            assert_eq!(disk(bad, "").backend, "excluded", "{bad}");
        }
        assert_eq!(disk("rbd/vm-1", "<shareable/>").backend, "excluded");
        assert_eq!(disk("rbd/vm-1", "<readonly/>").backend, "excluded");
    }

    #[test]
    fn scsi_passthrough_lun_is_excluded() {
        assert_excluded(
            "<disk type='block' device='lun'><driver name='qemu' type='raw'/>\
             <source dev='/dev/vg0/passthrough'/><target dev='sdb' bus='scsi'/></disk>",
            "passthrough",
        );
    }

    #[test]
    fn vhost_user_disk_is_excluded() {
        assert_excluded(
            "<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>\
             <source type='unix' path='/tmp/vhost-blk.sock'><reconnect enabled='yes' timeout='10'/></source>\
             <target dev='vdb' bus='virtio'/></disk>",
            "vhost-user",
        );
    }

    #[test]
    fn disk_without_source_is_excluded() {
        assert_excluded(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><target dev='vdb'/></disk>",
            "no source",
        );
    }

    #[test]
    fn empty_cdrom_drive_is_excluded_as_cdrom() {
        assert_excluded(
            "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>",
            "cdrom",
        );
    }

    #[test]
    fn nvme_volume_and_dir_disks_are_excluded() {
        assert_excluded(
            "<disk type='nvme' device='disk'><driver name='qemu' type='raw'/>\
             <source type='pci' managed='yes' namespace='1'><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>\
             <target dev='vde' bus='virtio'/></disk>",
            "NVMe",
        );
        assert_excluded(
            "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>\
             <source pool='default' volume='a.qcow2'/><target dev='vdf'/></disk>",
            "storage pool volume",
        );
        assert_excluded(
            "<disk type='dir' device='disk'><driver name='qemu' type='fat'/>\
             <source dir='/srv/share'/><target dev='hdb'/></disk>",
            "directory",
        );
    }

    #[test]
    fn sysfs_probe_rejects_paths_that_are_not_dm_devices() {
        assert!(!SysfsLvmProbe.is_logical_volume(Path::new("/dev/null")));
        assert!(!SysfsLvmProbe.is_logical_volume(Path::new("/nonexistent/vg/lv")));
    }
}
