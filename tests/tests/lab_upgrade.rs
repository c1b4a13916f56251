//! An upgraded vmsnapd keeps every snapshot the previous release made usable: a state folder
//! whose records are in format 1 (as `daemon/tests/fixtures/records-v1` holds them, written by
//! that release's own serializer) loads, and its snapshots restore and delete as before.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vmsnap_tests::{
    config_for, flat_sum, wait_for, write_pattern, Daemon, PrivateBus, ScratchOptions, ScratchVm,
    LAB_URI,
};

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../daemon/tests/fixtures/records-v1")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn keys(object: &Value) -> BTreeSet<String> {
    object.as_object().unwrap().keys().cloned().collect()
}

fn records_of(state: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for vm in std::fs::read_dir(state.join("snapshots"))
        .unwrap()
        .flatten()
    {
        for file in std::fs::read_dir(vm.path()).unwrap().flatten() {
            if file.path().extension().is_some_and(|e| e == "json") {
                found.push(file.path());
            }
        }
    }
    found
}

#[test]
fn snapshots_recorded_in_format_1_restore_and_delete_after_an_upgrade() {
    let vm = ScratchVm::define("vmsnap-t11-upgrade", ScratchOptions::default(), &[]);
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config_for(LAB_URI));
    wait_for(Duration::from_secs(30), "the VM in the inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    write_pattern(&vm.disk_source(), 0xaa, 1024);
    let then = flat_sum(&vm.disk_source());
    let taken = daemon
        .ctl(&["snapshot", "create", &vm.name, "before", "--output", "json"])
        .json();
    assert_eq!(taken["phase"], "Succeeded", "{taken}");
    write_pattern(&vm.disk_source(), 0xbb, 1024);
    let now = flat_sum(&vm.disk_source());
    assert_ne!(then, now);

    // The state folder as the previous release left it: its record in format 1, with
    // exactly the fields that release wrote.
    daemon.stop();
    let records = records_of(&daemon.state_dir());
    assert_eq!(records.len(), 1, "{records:?}");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&records[0]).unwrap()).unwrap();
    assert_eq!(record["version"], 2, "the current release writes format 2");
    record["version"] = 1.into();
    let old = fixture("snapshot-mixed.json");
    assert_eq!(keys(&record), keys(&old), "a format 1 record's fields");
    assert_eq!(
        keys(&record["volumes"][0]),
        keys(&old["volumes"][0]),
        "a format 1 qcow2 volume's fields"
    );
    std::fs::write(&records[0], serde_json::to_vec_pretty(&record).unwrap()).unwrap();

    // The upgraded daemon offers it, restores it, and deletes it.
    daemon.restart_with_env(&[]);
    let shown = vmsnap_tests::show_snapshot(&daemon, &vm.name, "before");
    assert_eq!(shown["readyToUse"], true, "{shown}");
    let restored = daemon.ctl(&["restore", &vm.name, "before", "--output", "json"]);
    assert_eq!(restored.code, Some(0), "{restored:?}");
    assert_eq!(
        flat_sum(&vm.disk_source()),
        then,
        "the VM sees the snapshot's data"
    );
    let deleted = daemon.ctl(&["snapshot", "delete", &vm.name, "before"]);
    assert_eq!(deleted.code, Some(0), "{deleted:?}");
    assert_eq!(
        flat_sum(&vm.disk_source()),
        then,
        "the delete kept the VM's data"
    );
}
