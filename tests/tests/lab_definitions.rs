//! Definitions kept true: after deletes that change a disk's backing chain, online then offline,
//! libvirt's definition names the real chain and the VM boots with its data.
#![allow(clippy::unwrap_used)]

use vmsnap_tests::{config_for, virsh, Daemon, PrivateBus, ScratchVm, LAB_URI};

/// Every file a disk's chain in `xml` names (source and backingStore sources) exists.
fn named_images_exist(xml: &str) -> Result<(), String> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    for source in doc.descendants().filter(|n| n.has_tag_name("source")) {
        if let Some(file) = source.attribute("file") {
            if file.ends_with(".qcow2") && !std::path::Path::new(file).exists() {
                return Err(format!(
                    "the definition names {file}, which is gone:\n{xml}"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn a_vm_boots_after_an_online_then_an_offline_delete() {
    let _slot = vmsnap_tests::GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t12-defs");
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    vmsnap_tests::wait_agent_connected(&daemon, &vm.name);
    for name in ["s1", "s2", "s3"] {
        vm.write_file(&format!("f-{name}"), 200 << 10);
        let out = daemon
            .ctl(&["snapshot", "create", &vm.name, name, "--output", "json"])
            .json();
        assert_eq!(out["phase"], "Succeeded", "{out}");
    }
    vm.write_file("f-live", 100 << 10);
    let live = vm.guest_checksums();

    daemon.ctl(&["snapshot", "delete", &vm.name, "s2"]).ok();
    vmsnap_tests::shut_down_by_agent(&vm.name);
    daemon.ctl(&["snapshot", "delete", &vm.name, "s1"]).ok();

    let inactive = virsh(&["dumpxml", "--inactive", &vm.name]);
    named_images_exist(&inactive).unwrap();
    vm.start(true);
    assert_eq!(vm.guest_checksums(), live, "the guest sees its data");
    named_images_exist(&virsh(&["dumpxml", &vm.name])).unwrap();
    named_images_exist(&virsh(&["dumpxml", "--inactive", &vm.name])).unwrap();
}
