//! The VM inventory against the lab: real libvirtd (qemu:///system), real TCG guests, a real
//! qemu-ga. Needs lab/up.sh.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use vmsnap_api::{ManagerProxy, VirtualMachineProxy};
use vmsnap_tests::{
    config_for, find_vm, require_lab, virsh, wait_for, Daemon, PrivateBus, LAB_AGENT_VM,
    LAB_MIXED_VM, LAB_NOAGENT_VM, LAB_URI,
};

fn lab_daemon() -> (PrivateBus, Daemon) {
    require_lab();
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    (bus, daemon)
}

#[test]
fn lab_vms_are_listed_with_their_agent_state() {
    let (_bus, daemon) = lab_daemon();
    let list = daemon.ctl(&["vm", "list", "--output", "json"]).json();
    for (name, agent) in [
        (LAB_AGENT_VM, "connected"),
        (LAB_NOAGENT_VM, "not-configured"),
        (LAB_MIXED_VM, "disconnected"),
    ] {
        let vm = find_vm(&list, name).unwrap_or_else(|| panic!("{name} missing: {list}"));
        assert_eq!(vm["state"], "running", "{name}");
        assert_eq!(vm["agent"], agent, "{name}");
        // The daemon's view agrees with libvirt's own.
        let uuid = virsh(&["domuuid", name]);
        assert_eq!(vm["uuid"], uuid.trim(), "{name}");
    }
    let table = daemon.ctl(&["vm", "list"]).ok().to_string();
    let agent_line = table.lines().find(|l| l.starts_with(LAB_AGENT_VM)).unwrap();
    assert!(agent_line.contains("connected"), "{table}");
}

#[test]
fn disks_are_classified_with_reasons() {
    let (_bus, daemon) = lab_daemon();
    let vm = daemon
        .ctl(&["vm", "show", LAB_MIXED_VM, "--output", "json"])
        .json();
    let disks = vm["disks"].as_array().unwrap();
    let disk = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        disks
            .iter()
            .find(|d| pred(d))
            .unwrap_or_else(|| panic!("{vm}"))
            .clone()
    };
    let vda = disk(&|d| d["target"] == "vda");
    assert_eq!(vda["backend"], "qcow2");
    assert_eq!(vda["format"], "qcow2");
    assert_eq!(vda["reason"], "");
    assert!(std::path::Path::new(vda["source"].as_str().unwrap()).exists());

    let cdrom = disk(&|d| d["device"] == "cdrom");
    assert_eq!(cdrom["backend"], "excluded");
    assert!(cdrom["reason"].as_str().unwrap().contains("cloud-init"));

    let readonly = disk(&|d| d["target"] == "vdb");
    assert_eq!(readonly["backend"], "excluded");
    assert!(readonly["reason"].as_str().unwrap().contains("read-only"));

    let table = daemon.ctl(&["vm", "show", LAB_MIXED_VM]).ok().to_string();
    assert!(table.contains("read-only disk"), "{table}");
    assert!(table.contains("Agent:  disconnected"), "{table}");
}

#[test]
fn vm_show_by_uuid_and_unknown_vm() {
    let (_bus, daemon) = lab_daemon();
    let uuid = virsh(&["domuuid", LAB_AGENT_VM]).trim().to_string();
    let vm = daemon
        .ctl(&["vm", "show", &uuid, "--output", "json"])
        .json();
    assert_eq!(vm["name"], LAB_AGENT_VM);
    assert_eq!(
        daemon.ctl(&["vm", "show", "vmsnap-lab-nope"]).failure(),
        "vmsnapctl: VM 'vmsnap-lab-nope' not found"
    );
}

/// A scratch domain made from the no-agent lab VM without its disks and console log, so it can be
/// started and stopped without disturbing the lab.
struct ScratchDomain {
    name: String,
}

impl ScratchDomain {
    fn define(name: &str) -> ScratchDomain {
        let _ = std::process::Command::new("virsh")
            .args(["-c", LAB_URI, "destroy", name])
            .output();
        let _ = std::process::Command::new("virsh")
            .args(["-c", LAB_URI, "undefine", name])
            .output();
        let xml = virsh(&["dumpxml", "--inactive", LAB_NOAGENT_VM]);
        let xml = strip_elements(&xml, &["uuid", "disk", "serial", "console", "interface"]);
        let xml = xml.replace(
            &format!("<name>{LAB_NOAGENT_VM}</name>"),
            &format!("<name>{name}</name>"),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("domain.xml");
        std::fs::write(&path, xml).unwrap();
        virsh(&["define", path.to_str().unwrap()]);
        ScratchDomain {
            name: name.to_string(),
        }
    }
}

impl Drop for ScratchDomain {
    fn drop(&mut self) {
        let _ = std::process::Command::new("virsh")
            .args(["-c", LAB_URI, "destroy", &self.name])
            .output();
        let _ = std::process::Command::new("virsh")
            .args(["-c", LAB_URI, "undefine", &self.name])
            .output();
    }
}

/// Removes every element (with its subtree) whose tag is in `tags`, by byte range.
fn strip_elements(xml: &str, tags: &[&str]) -> String {
    let doc = roxmltree::Document::parse(xml).unwrap();
    let mut ranges: Vec<_> = doc
        .descendants()
        .filter(|n| n.is_element() && tags.contains(&n.tag_name().name()))
        .map(|n| n.range())
        .collect();
    ranges.sort_by_key(|r| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    let mut last_start = usize::MAX;
    for r in ranges {
        // Nested matches are covered by their parent's range.
        if r.end <= last_start {
            out.replace_range(r.clone(), "");
            last_start = r.start;
        }
    }
    out
}

#[test]
fn domains_defined_started_stopped_undefined_are_followed() {
    let (_bus, daemon) = lab_daemon();
    let name = "vmsnap-test-scratch";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt.block_on(async {
        zbus::connection::Builder::address(daemon.bus_address.as_str())
            .build()
            .await
            .unwrap()
    });
    let manager = rt.block_on(ManagerProxy::new(&conn)).unwrap();

    let scratch = ScratchDomain::define(name);
    let path = wait_for(Duration::from_secs(20), "the new domain's object", || {
        rt.block_on(manager.find_vm(name)).ok()
    });
    let vm = rt
        .block_on(
            VirtualMachineProxy::builder(&conn)
                .path(path.clone())
                .build(),
        )
        .unwrap();
    assert_eq!(rt.block_on(vm.state()).unwrap(), "shut-off");
    assert_eq!(rt.block_on(vm.agent()).unwrap(), "not-configured");

    // Started, then destroyed: each change arrives as PropertiesChanged.
    let mut changes = rt.block_on(vm.receive_state_changed());
    virsh(&["start", name]);
    let seen = rt.block_on(next_state(&mut changes, "running"));
    assert_eq!(seen, "running");
    virsh(&["destroy", name]);
    let seen = rt.block_on(next_state(&mut changes, "shut-off"));
    assert_eq!(seen, "shut-off");

    drop(scratch);
    wait_for(
        Duration::from_secs(20),
        "the undefined domain to vanish",
        || {
            let list = daemon.ctl(&["vm", "list", "--output", "json"]).json();
            find_vm(&list, name).is_none().then_some(())
        },
    );
    assert!(matches!(
        rt.block_on(manager.find_vm(name)),
        Err(vmsnap_api::VmSnapError::NotFound(_))
    ));
}

async fn next_state(changes: &mut zbus::proxy::PropertyStream<'_, String>, wanted: &str) -> String {
    let wait = async {
        while let Some(change) = changes.next().await {
            let value = change.get().await.unwrap();
            if value == wanted {
                return value;
            }
        }
        panic!("property stream ended");
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("no State={wanted} signal within 30 s"))
}
