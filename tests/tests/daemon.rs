//! vmsnapd as a process: configuration, startup order, libvirt unavailable, shutdown, and the
//! published D-Bus interface. Uses libvirt's test driver (no storage involved) and a private bus.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use vmsnap_api::{ManagerProxy, VirtualMachineProxy};
use vmsnap_tests::{bin, config_for, ctl, find_vm, wait_for, Daemon, PrivateBus};

#[test]
fn malformed_config_is_refused_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmsnapd.toml");
    std::fs::write(
        &path,
        "libvirt_uri = \"test:///default\"\n# comment\nrefresh_interval = fast\n",
    )
    .unwrap();
    let output = Command::new(bin("vmsnapd"))
        .arg("--config")
        .arg(&path)
        .arg("--bus-address")
        .arg("unix:path=/nonexistent/bus")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("vmsnapd: {}:3:", path.display());
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn unknown_config_key_and_missing_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmsnapd.toml");
    std::fs::write(&path, "libvirt_url = \"qemu:///system\"\n").unwrap();
    for config in [path.clone(), dir.path().join("missing.toml")] {
        let output = Command::new(bin("vmsnapd"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&config.display().to_string()), "{stderr}");
    }
}

#[test]
fn inventory_is_served_as_soon_as_the_name_is_owned() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));
    // No retry: objects are registered before the name is taken.
    let list = daemon.ctl(&["vm", "list", "--output", "json"]).json();
    let vm = find_vm(&list, "test").unwrap_or_else(|| panic!("{list}"));
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["agent"], "not-configured");
    let uuid = vm["uuid"].as_str().unwrap().to_string();

    let by_uuid = daemon
        .ctl(&["vm", "show", &uuid, "--output", "json"])
        .json();
    assert_eq!(by_uuid["name"], "test");

    let table = daemon.ctl(&["vm", "list"]).ok().to_string();
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("NAME"));
    assert!(lines.any(|l| l.starts_with("test ") && l.contains("running")));
}

#[test]
fn unknown_vm_is_a_one_line_error() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));
    let out = daemon.ctl(&["vm", "show", "no-such-vm"]);
    assert_eq!(out.failure(), "vmsnapctl: VM 'no-such-vm' not found");
    let json = daemon.ctl(&["vm", "show", "no-such-vm", "--output", "json"]);
    assert_eq!(json.failure(), "vmsnapctl: VM 'no-such-vm' not found");
}

#[test]
fn client_reports_a_daemon_that_is_not_running() {
    let bus = PrivateBus::start();
    let out = ctl(&bus.address, &["vm", "list"]);
    let message = out.failure();
    assert!(message.contains("vmsnapd is not running"), "{message}");
}

#[test]
fn client_reports_an_unreachable_bus() {
    let out = ctl("unix:path=/nonexistent/bus.sock", &["vm", "list"]);
    let message = out.failure();
    assert!(
        message.starts_with("vmsnapctl: cannot connect to"),
        "{message}"
    );
}

#[test]
fn libvirt_down_at_start_is_reported_and_the_daemon_keeps_serving() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(
        &bus,
        &config_for("qemu+unix:///system?socket=/nonexistent/libvirt-sock"),
    );
    let list = daemon.ctl(&["vm", "list", "--output", "json"]);
    assert_eq!(list.json(), serde_json::json!([]));
    assert!(
        list.stderr.contains("cannot reach libvirt"),
        "{}",
        list.stderr
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = bus_connection(&daemon.bus_address).await;
        let manager = ManagerProxy::new(&conn).await.unwrap();
        assert!(!manager.libvirt_connected().await.unwrap());
        let error = manager.libvirt_error().await.unwrap();
        assert!(error.contains("nonexistent"), "{error}");
    });
}

#[test]
fn sigterm_stops_the_daemon_cleanly_and_releases_the_name() {
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config_for("test:///default"));
    let status = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.log_text());
    assert!(!vmsnap_tests::name_has_owner(&bus.address));
    assert!(daemon.log_text().contains("stopped"));
}

#[test]
fn a_second_daemon_cannot_take_the_name() {
    let bus = PrivateBus::start();
    let _first = Daemon::start(&bus, &config_for("test:///default"));
    let mut second = Daemon::spawn(&bus, &config_for("test:///default"));
    let status = wait_for(
        Duration::from_secs(20),
        "the second vmsnapd to exit",
        || second_exit(&mut second),
    );
    assert!(!status.success());
    assert!(
        second.log_text().contains("cannot own the bus name"),
        "{}",
        second.log_text()
    );
}

fn second_exit(daemon: &mut Daemon) -> Option<std::process::ExitStatus> {
    daemon.try_wait()
}

#[test]
fn properties_read_through_the_api_proxies() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = bus_connection(&daemon.bus_address).await;
        let manager = ManagerProxy::new(&conn).await.unwrap();
        assert_eq!(manager.libvirt_uri().await.unwrap(), "test:///default");
        assert!(manager.libvirt_connected().await.unwrap());
        assert_eq!(manager.version().await.unwrap(), env!("CARGO_PKG_VERSION"));
        let path = manager.find_vm("test").await.unwrap();
        assert_eq!(manager.list_vms().await.unwrap(), vec![path.clone()]);
        let vm = VirtualMachineProxy::builder(&conn)
            .path(path)
            .build()
            .await
            .unwrap();
        assert_eq!(vm.name().await.unwrap(), "test");
        let disks = vm.disks().await.unwrap();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].target, "vda");

        let objects = managed_objects(&conn).await;
        let interfaces: Vec<String> = objects
            .values()
            .flat_map(|ifaces| ifaces.keys().map(|i| i.to_string()))
            .collect();
        assert!(interfaces.contains(&vmsnap_api::MANAGER_INTERFACE.to_string()));
        assert!(interfaces.contains(&vmsnap_api::VM_INTERFACE.to_string()));
    });
}

/// GetVmObjects, GetSnapshotObjects and GetRestoreObjects answer what GetManagedObjects and
/// each object's GetAll answer, for just those objects; GetSnapshotList the same values as
/// structures.
#[test]
fn listing_methods_answer_what_the_objects_serve() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));
    // The test driver refuses disk-only snapshots: this one ends Failed, an object all the same.
    let snapshot = daemon
        .ctl(&[
            "snapshot",
            "create",
            "test",
            "listed",
            "--no-wait",
            "--output",
            "json",
        ])
        .json();
    let snapshot_uuid = snapshot["uuid"].as_str().unwrap().to_string();
    wait_for(Duration::from_secs(10), "the snapshot to fail", || {
        daemon
            .ctl(&["snapshot", "list", "test"])
            .stdout
            .contains("Failed")
            .then_some(())
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = bus_connection(&daemon.bus_address).await;
        let manager = ManagerProxy::new(&conn).await.unwrap();
        let all = managed_objects(&conn).await;
        let vm_path = manager.find_vm("test").await.unwrap();
        let vms = manager.get_vm_objects().await.unwrap();
        assert_eq!(vms.keys().collect::<Vec<_>>(), vec![&vm_path]);
        assert_eq!(vms[&vm_path], all[&vm_path]);
        let properties = zbus::fdo::PropertiesProxy::builder(&conn)
            .destination(vmsnap_api::BUS_NAME)
            .path(vm_path.clone())
            .build()
            .await
            .unwrap()
            .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
                vmsnap_api::VM_INTERFACE,
            ))
            .await
            .unwrap();
        let interface =
            zbus::names::OwnedInterfaceName::try_from(vmsnap_api::VM_INTERFACE).unwrap();
        assert_eq!(vms[&vm_path][&interface], properties);
        let typed = manager.get_vm_objects_typed().await.unwrap();
        let vm = &typed[&vm_path][vmsnap_api::VM_INTERFACE];
        assert_eq!(vm.name.as_deref(), Some("test"));
        assert_eq!(vm.disks.as_ref().map(Vec::len), Some(1));

        let snapshot_path =
            zbus::OwnedObjectPath::try_from(vmsnap_api::snapshot_path(&snapshot_uuid)).unwrap();
        for vm in ["test", ""] {
            let snapshots = manager.get_snapshot_objects(vm).await.unwrap();
            assert_eq!(snapshots.keys().collect::<Vec<_>>(), vec![&snapshot_path]);
            assert_eq!(snapshots[&snapshot_path], all[&snapshot_path]);
        }
        let rows = manager.get_snapshot_list("test").await.unwrap();
        assert_eq!(rows.len(), 1);
        let snapshot_interface =
            zbus::names::OwnedInterfaceName::try_from(vmsnap_api::SNAPSHOT_INTERFACE).unwrap();
        let served = &all[&snapshot_path][&snapshot_interface];
        let string = |name: &str| String::try_from(served[name].try_clone().unwrap()).unwrap();
        assert_eq!(rows[0].name, string("Name"));
        assert_eq!(rows[0].uuid, snapshot_uuid);
        assert_eq!(rows[0].phase, string("Phase"));
        assert_eq!(rows[0].error, string("Error"));
        assert_eq!(rows[0].error_name, string("ErrorName"));
        assert_eq!(rows[0].creation_time, string("CreationTime"));
        assert_eq!(manager.get_snapshot_list("").await.unwrap(), rows);
        let typed = manager.get_snapshot_objects_typed("test").await.unwrap();
        let s = &typed[&snapshot_path][vmsnap_api::SNAPSHOT_INTERFACE];
        assert_eq!(s.name.as_deref(), Some("listed"));
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert!(manager.get_restore_objects().await.unwrap().is_empty());
        // Every object GetManagedObjects lists is the manager, a VM, a snapshot, or a folder
        // holding them (listed with no interface, as zbus does).
        assert_eq!(all.len(), 5, "{:?}", all.keys().collect::<Vec<_>>());
    });
    // vmsnapctl lists VMs with GetVmObjects, as before with one read per VM.
    let list = daemon.ctl(&["vm", "list", "--output", "json"]).json();
    assert_eq!(find_vm(&list, "test").unwrap()["disks"][0]["target"], "vda");
}

/// The committed introspection XML (config/dbus/<interface>.xml) is what the daemon serves.
/// Regenerate with VMSNAP_UPDATE_INTROSPECTION=1 after a deliberate API change. (The Restore
/// interface needs a real restore: tests/tests/lab_restore.rs checks it.)
#[test]
fn served_interfaces_match_the_committed_introspection_xml() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));
    let list = daemon.ctl(&["vm", "list", "--output", "json"]).json();
    let uuid = find_vm(&list, "test").unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    // The test driver refuses disk-only snapshots, so this one ends Failed; its object is
    // there all the same.
    let snapshot = daemon
        .ctl(&[
            "snapshot",
            "create",
            "test",
            "intro",
            "--no-wait",
            "--output",
            "json",
        ])
        .json();
    let snapshot_uuid = snapshot["uuid"].as_str().unwrap().to_string();
    for (path, interface) in [
        (
            vmsnap_api::MANAGER_PATH.to_string(),
            vmsnap_api::MANAGER_INTERFACE,
        ),
        (
            vmsnap_api::snapshot_path(&snapshot_uuid),
            vmsnap_api::SNAPSHOT_INTERFACE,
        ),
        (vmsnap_api::vm_path(&uuid), vmsnap_api::VM_INTERFACE),
    ] {
        vmsnap_tests::check_introspection(&bus.address, &path, interface);
    }
}

#[test]
fn snapshot_requests_are_validated_before_anything_is_done() {
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));
    assert_eq!(
        daemon.ctl(&["snapshot", "create", "nope", "s"]).failure(),
        "vmsnapctl: VM 'nope' not found"
    );
    let message = daemon
        .ctl(&["snapshot", "create", "test", "bad/name"])
        .failure()
        .to_string();
    assert!(message.contains("snapshot name"), "{message}");
    // The test driver cannot take disk snapshots: the failure is recorded on the snapshot.
    let out = daemon.ctl(&["snapshot", "create", "test", "s1", "--output", "json"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let failed = daemon
        .ctl(&["snapshot", "show", "test", "s1", "--output", "json"])
        .json();
    assert_eq!(failed["phase"], "Failed");
    assert_eq!(failed["readyToUse"], false);
    assert!(!failed["error"].as_str().unwrap().is_empty());
    let list = daemon.ctl(&["snapshot", "list", "--output", "json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // A failed snapshot is not offered for restore.
    let refused = daemon.ctl(&["restore", "test", "s1"]);
    let message = refused.failure().to_string();
    assert!(
        message.contains("only a Succeeded snapshot can be restored"),
        "{message}"
    );
    // A failed snapshot can be deleted.
    daemon.ctl(&["snapshot", "delete", "test", "s1"]).ok();
    assert_eq!(
        daemon.ctl(&["snapshot", "list", "--output", "json"]).json(),
        serde_json::json!([])
    );
}

#[test]
fn a_second_daemon_on_the_same_state_folder_is_refused_before_it_reads_anything() {
    let bus = PrivateBus::start();
    let first = Daemon::start(&bus, &config_for("test:///default"));
    let state = first.state_dir();
    // Another bus, so the bus name does not stop it: only the state folder is shared.
    let other_bus = PrivateBus::start();
    let config = format!(
        "state_dir = \"{}\"\n{}",
        state.display(),
        config_for("test:///default")
    );
    let mut second = Daemon::spawn(&other_bus, &config);
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    let log = second.log_text();
    let expected = format!(
        "another vmsnapd (pid {}) uses the state folder {}",
        first.pid().unwrap(),
        state.display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(!vmsnap_tests::name_has_owner(&other_bus.address));
    // The first one goes on serving.
    let list = first.ctl(&["vm", "list", "--output", "json"]).json();
    assert!(find_vm(&list, "test").is_some(), "{list}");
}

#[test]
fn every_record_is_exported_before_the_name_is_owned() {
    // Thousands of records: exporting them takes a while, and a client that sees the name must
    // see every one of them.
    const RECORDS: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let vm_uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
    let records = dir.path().join("state/snapshots").join(vm_uuid);
    std::fs::create_dir_all(&records).unwrap();
    for i in 0..RECORDS {
        let uuid = format!("00000000-0000-4000-8000-{i:012}");
        let record = serde_json::json!({
            "version": 1, "uuid": uuid, "name": format!("s{i}"), "description": "",
            "vmName": "test", "vmUuid": vm_uuid, "phase": "Succeeded", "readyToUse": true,
            "creationTime": format!("2026-11-01T00:{:02}:{:02}Z", i / 60 % 60, i % 60),
            "indications": [], "error": "", "freezeDurationMs": 0, "frozenFilesystems": 0,
            "step": {"step": "done"}, "domainXml": "", "volumes": [], "excluded": [],
            "extraState": []
        });
        std::fs::write(records.join(format!("{uuid}.json")), record.to_string()).unwrap();
    }
    let bus = PrivateBus::start();
    let config = format!(
        "state_dir = \"{}\"\n{}",
        dir.path().join("state").display(),
        config_for("test:///default")
    );
    let daemon = Daemon::start(&bus, &config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let exported = rt.block_on(async {
        let conn = bus_connection(&bus.address).await;
        let objects = managed_objects(&conn).await;
        objects
            .keys()
            .filter(|path| path.as_str().contains("/snapshot/"))
            .count()
    });
    assert_eq!(exported, RECORDS, "exported when the name was owned");
    drop(daemon);
}

/// A snapshot's definition is no property (GetManagedObjects would carry thousands of them):
/// GetDomainXml reads it from the record on disk, graphics passwords left out.
#[test]
fn a_definition_is_read_from_the_record_with_get_domain_xml() {
    let dir = tempfile::tempdir().unwrap();
    let vm_uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
    let records = dir.path().join("state/snapshots").join(vm_uuid);
    std::fs::create_dir_all(&records).unwrap();
    let uuid = "00000000-0000-4000-8000-000000000001";
    let xml = "<domain type='test'><name>test</name><devices>\
        <graphics type='vnc' passwd='secret'/></devices></domain>";
    let record = serde_json::json!({
        "version": 2, "uuid": uuid, "name": "s1", "description": "",
        "vmName": "test", "vmUuid": vm_uuid, "phase": "Succeeded", "readyToUse": true,
        "creationTime": "2026-11-01T00:00:00Z", "indications": [], "error": "",
        "freezeDurationMs": 0, "frozenFilesystems": 0, "step": {"step": "done"},
        "domainXml": xml, "volumes": [], "excluded": [], "extraState": []
    });
    let file = records.join(format!("{uuid}.json"));
    std::fs::write(&file, record.to_string()).unwrap();
    let bus = PrivateBus::start();
    let config = format!(
        "state_dir = \"{}\"\n{}",
        dir.path().join("state").display(),
        config_for("test:///default")
    );
    let daemon = Daemon::start(&bus, &config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = bus_connection(&bus.address).await;
        let path = vmsnap_api::snapshot_path(uuid);
        let snapshot = vmsnap_api::SnapshotProxy::builder(&conn)
            .path(path.clone())
            .build()
            .await
            .unwrap();
        assert_eq!(
            snapshot.get_domain_xml().await.unwrap(),
            "<domain type='test'><name>test</name><devices><graphics type='vnc' />\
             </devices></domain>"
        );
        let objects = managed_objects(&conn).await;
        let properties = objects
            .iter()
            .find(|(p, _)| p.as_str() == path)
            .and_then(|(_, i)| i.get(vmsnap_api::SNAPSHOT_INTERFACE))
            .expect("the snapshot is exported");
        assert_eq!(
            properties.get("Name").map(|v| v.to_string()),
            Some("\"s1\"".into())
        );
        assert!(!properties.contains_key("DomainXml"), "{properties:?}");
        // A record that can no longer be read is a storage failure, named as such.
        std::fs::write(&file, b"{not json").unwrap();
        match snapshot.get_domain_xml().await {
            Err(vmsnap_api::VmSnapError::StorageFailed(m)) => assert!(m.contains("s1"), "{m}"),
            other => panic!("{other:?}"),
        }
    });
    drop(daemon);
}

/// A bus that goes away (dbus-daemon stopped, or dropping vmsnapd for a reply over its size
/// limit) ends vmsnapd with a failure, so that the service manager starts it again; it does not
/// serve on without a bus.
#[test]
fn losing_the_bus_ends_the_daemon_with_a_failure() {
    let mut bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, &config_for("test:///default"));
    bus.kill();
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    assert!(
        daemon
            .log_text()
            .contains("the connection to the D-Bus bus closed"),
        "{}",
        daemon.log_text()
    );
}

/// vmsnapd's GetManagedObjects, as any ObjectManager client calls it.
async fn managed_objects(conn: &zbus::Connection) -> zbus::fdo::ManagedObjects {
    zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination(vmsnap_api::BUS_NAME)
        .path(vmsnap_api::ROOT_PATH)
        .build()
        .await
        .unwrap()
        .get_managed_objects()
        .await
        .unwrap()
}

/// A connection to the bus at `address`.
async fn bus_connection(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .unwrap()
}
