//! libvirtd stopped and restarted under a running vmsnapd. A test binary of its own, so no other
//! test runs while libvirtd is down.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use vmsnap_api::ManagerProxy;
use vmsnap_tests::{
    config_for, find_vm, require_lab, wait_for, Daemon, PrivateBus, LAB_AGENT_VM, LAB_URI,
};
use vmsnap_tests::{stop_libvirtd, RestartLibvirtdOnDrop};

#[test]
fn libvirtd_restart_is_survived_and_reported() {
    require_lab();
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for(LAB_URI));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt.block_on(async {
        zbus::connection::Builder::address(daemon.bus_address.as_str())
            .build()
            .await
            .unwrap()
    });
    let manager = rt.block_on(ManagerProxy::new(&conn)).unwrap();
    assert!(rt.block_on(manager.libvirt_connected()).unwrap());

    let _guard = RestartLibvirtdOnDrop;
    stop_libvirtd();
    wait_for(Duration::from_secs(30), "LibvirtConnected=false", || {
        (!rt.block_on(manager.libvirt_connected()).unwrap()).then_some(())
    });
    // Still serving: the last known VMs, with a warning.
    let list = daemon.ctl(&["vm", "list", "--output", "json"]);
    assert!(find_vm(&list.json(), LAB_AGENT_VM).is_some(), "{list:?}");
    assert!(list.stderr.contains("cannot reach libvirt"), "{list:?}");
    assert!(!rt.block_on(manager.libvirt_error()).unwrap().is_empty());

    assert!(Command::new("libvirtd")
        .arg("-d")
        .status()
        .unwrap()
        .success());
    wait_for(Duration::from_secs(60), "LibvirtConnected=true", || {
        rt.block_on(manager.libvirt_connected())
            .unwrap()
            .then_some(())
    });
    assert_eq!(rt.block_on(manager.libvirt_error()).unwrap(), "");
    let list = daemon.ctl(&["vm", "list", "--output", "json"]);
    let vm = find_vm(&list.json(), LAB_AGENT_VM).cloned().unwrap();
    assert_eq!(vm["state"], "running");
    assert!(list.stderr.is_empty(), "{list:?}");
    // The guests kept running through the restart, and the agent is reachable again.
    wait_for(
        Duration::from_secs(30),
        "the agent to be seen again",
        || {
            let list = daemon.ctl(&["vm", "list", "--output", "json"]).json();
            (find_vm(&list, LAB_AGENT_VM).unwrap()["agent"] == "connected").then_some(())
        },
    );
}
