//! Authorization through a real polkitd (started by lab/up.sh on the system bus, with vmsnap's
//! actions installed): an unprivileged user reads but cannot change; root can; a polkit rule can
//! grant one right to a group; without polkit, changes are refused. vmsnapd serves a private bus
//! here, so it identifies callers by their process (see daemon/src/bus/auth.rs). A test binary of
//! its own: it adds a polkit rule that other tests must not see.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use vmsnap_tests::{bin, config_for, wait_for, CtlOutput, Daemon, PrivateBus};

const USER: &str = "vmsnap-authz-user";
const GROUP: &str = "vmsnap-authz";
const RULE: &str = "/etc/polkit-1/rules.d/49-vmsnap-test.rules";

fn ensure_user() {
    if Command::new("id")
        .arg(USER)
        .output()
        .unwrap()
        .status
        .success()
    {
        return;
    }
    let _ = Command::new("groupadd").args(["--system", GROUP]).status();
    assert!(Command::new("useradd")
        .args(["--system", "--no-create-home", "--groups", GROUP, USER])
        .status()
        .unwrap()
        .success());
}

/// vmsnapctl run as the unprivileged user.
fn ctl_as_user(daemon: &Daemon, args: &[&str]) -> CtlOutput {
    let output = Command::new("runuser")
        .args(["-u", USER, "--"])
        .arg(bin("vmsnapctl"))
        .arg("--bus-address")
        .arg(&daemon.bus_address)
        .args(args)
        .output()
        .unwrap();
    CtlOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

struct RemoveRule;

impl Drop for RemoveRule {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(RULE);
    }
}

#[test]
fn users_read_but_only_authorized_callers_change() {
    ensure_user();
    let _ = std::fs::remove_file(RULE);
    let bus = PrivateBus::start();
    let daemon = Daemon::start(&bus, &config_for("test:///default"));

    // Reading needs nothing.
    let list = ctl_as_user(&daemon, &["vm", "list", "--output", "json"]);
    assert_eq!(list.json()[0]["name"], "test");

    // Root may (polkit says so; the daemon has no bypass). The test driver cannot take disk
    // snapshots, so the snapshot itself fails, after authorization.
    let root = daemon.ctl(&["snapshot", "create", "test", "by-root", "--no-wait"]);
    assert_eq!(root.code, Some(0), "{root:?}");
    wait_for(Duration::from_secs(10), "the snapshot to settle", || {
        let out = daemon.ctl(&["snapshot", "show", "test", "by-root", "--output", "json"]);
        (out.json()["phase"] != "InProgress").then_some(())
    });

    // The unprivileged user may not create, delete or restore; nothing changes.
    for args in [
        &["snapshot", "create", "test", "by-user"][..],
        &["snapshot", "delete", "test", "by-root"][..],
        &["restore", "test", "by-root"][..],
    ] {
        let out = ctl_as_user(&daemon, args);
        let message = out.failure();
        assert!(message.contains("access denied"), "{args:?}: {message}");
        assert!(message.contains("org.vmsnap."), "{args:?}: {message}");
    }
    let names: Vec<String> = daemon
        .ctl(&["snapshot", "list", "--output", "json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["by-root"]);

    // A rule granting the group the create right: the user may create, still not restore.
    let _cleanup = RemoveRule;
    std::fs::write(
        RULE,
        format!(
            "polkit.addRule(function(action, subject) {{\n  if (action.id == \"org.vmsnap.snapshot.create\" && subject.isInGroup(\"{GROUP}\")) {{\n    return polkit.Result.YES;\n  }}\n}});\n"
        ),
    )
    .unwrap();
    // polkitd notices new rules by itself, within moments.
    wait_for(Duration::from_secs(20), "polkitd to load the rule", || {
        let out = ctl_as_user(
            &daemon,
            &["snapshot", "create", "test", "by-user", "--no-wait"],
        );
        (out.code == Some(0)).then_some(())
    });
    let restore = ctl_as_user(&daemon, &["restore", "test", "by-root"]);
    assert!(restore.failure().contains("access denied"), "{restore:?}");
}

#[test]
fn changes_are_refused_when_polkit_cannot_be_reached() {
    let bus = PrivateBus::start();
    let daemon = Daemon::spawn_with_env(
        &bus,
        &config_for("test:///default"),
        &[(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/system_bus_socket",
        )],
    );
    wait_for(Duration::from_secs(20), "vmsnapd to serve", || {
        vmsnap_tests::name_has_owner(&bus.address).then_some(())
    });
    assert_eq!(
        daemon.ctl(&["vm", "list", "--output", "json"]).json()[0]["name"],
        "test"
    );
    let out = daemon.ctl(&["snapshot", "create", "test", "s1"]);
    let message = out.failure();
    assert!(message.contains("cannot be reached"), "{message}");
    assert_eq!(
        daemon.ctl(&["snapshot", "list", "--output", "json"]).json(),
        serde_json::json!([])
    );
}
