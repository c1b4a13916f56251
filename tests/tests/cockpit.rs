//! The web console (cockpit/): the lab's snapshot exercises done in headless Chromium against a
//! real cockpit-ws, the page installed by install.sh, and the real vmsnapd as root serving a
//! system-type dbus-daemon that loads the shipped bus policy, with the lab's polkitd deciding
//! (tests/src/browser.rs says why vmsnapd does not own its name on the lab's shared system bus).
//! Everything a user does happens in the browser; the test only checks the guest's files through
//! its agent and breaks things a user cannot break from the page. Screenshots of each step land
//! in target/test-artifacts/cockpit/<test>/.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use vmsnap_tests::browser::{Browser, CockpitWs, SystemBus, SystemDaemon};
use vmsnap_tests::{config_for, virsh, wait_for, GuestSlot, ScratchOptions, ScratchVm, LAB_URI};

const SHORT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(180);

/// vmsnapd on the lab's libvirt, once it lists `vm`.
fn daemon_for(bus: &SystemBus, vm: &str) -> SystemDaemon {
    let daemon = SystemDaemon::start(bus, &config_for(LAB_URI));
    wait_for(SHORT, "the VM in vmsnapd's inventory", || {
        (daemon.ctl(&["vm", "show", vm]).code == Some(0)).then_some(())
    });
    daemon
}

/// The row of snapshot `name` in the Snapshots tab.
fn snapshot_row(name: &str) -> String {
    format!("tr[data-snapshot='{name}']")
}

/// Opens the page on VM `vm`'s Snapshots tab, from the VM list.
fn open_vm(browser: &Browser, ws: &CockpitWs, vm: &str) {
    browser.goto(&ws.page_url());
    browser.wait_element(&format!("#vm-{vm} .vm-open"), SHORT);
    browser.click(&format!("#vm-{vm} .vm-open"));
    browser.wait_text("#vm-name", vm, SHORT);
    browser.wait_element("#take-snapshot", SHORT);
}

/// Records every text the status cell of snapshot `name` shows from now on (the row may not
/// exist yet), in window.__statusSeen.
fn record_status_texts(browser: &Browser, name: &str) {
    browser.js(
        "window.__statusSeen = []; \
         const look = () => { const c = document.querySelector(arguments[0] + ' .snapshot-status'); \
           if (c) { const t = c.innerText; const seen = window.__statusSeen; \
             if (seen[seen.length - 1] !== t) seen.push(t); } }; \
         new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true}); \
         look();",
        json!([snapshot_row(name)]),
    );
}

/// Takes a snapshot from the Take snapshot dialog (ticking the excluded-disk checkbox when the
/// dialog asks) and waits until its row shows Ready.
fn take_snapshot_in_page(browser: &Browser, name: &str, description: &str) {
    browser.click("#take-snapshot");
    browser.wait_element("#take-snapshot-dialog", SHORT);
    browser.type_into("#snapshot-name", name);
    browser.type_into("#snapshot-description", description);
    if browser.text("#take-snapshot-dialog").contains("I am aware") {
        browser.click("#snapshot-aware");
    }
    browser.click("#snapshot-save");
    browser.wait_gone("#take-snapshot-dialog", LONG);
    browser.wait_text(&snapshot_row(name), "Ready", LONG);
}

/// Chooses `action` in the row's kebab menu.
fn row_action(browser: &Browser, name: &str, action: &str) {
    browser.click(&format!(
        "{} button[aria-label='Kebab toggle']",
        snapshot_row(name)
    ));
    browser.click_text("body", action);
}

#[test]
fn lab_story_snapshot_destroy_refused_while_running_stop_restore_start_every_file_back() {
    let _slot = GuestSlot::take();
    let vm = ScratchVm::define(
        "vmsnap-t14-story",
        ScratchOptions {
            agent: true,
            cdrom: true,
            ..Default::default()
        },
        &[("f-seed", b"seeded before the first boot\n")],
    );
    vm.start(true);
    vm.write_file("f-one", 300_000);
    vm.write_file("f-two", 70_000);
    let before = vm.guest_checksums();
    assert_eq!(before.lines().count(), 3, "{before}");

    let bus = SystemBus::start();
    let daemon = daemon_for(&bus, &vm.name);
    vmsnap_tests::wait_for(Duration::from_secs(60), "the agent in vmsnapd", || {
        let out = daemon.ctl(&["vm", "show", &vm.name, "--output", "json"]);
        (out.code == Some(0) && out.json()["agent"] == "connected").then_some(())
    });
    let ws = CockpitWs::start(&bus, None);
    let browser = Browser::start("lab-story");

    // The VM list: state, agent, each disk's backend or why it is excluded, the count.
    browser.goto(&ws.page_url());
    let row = format!("#vm-{}", vm.name);
    let text = browser.wait_text(&row, "Connected", SHORT);
    assert!(text.contains("Running"), "{text}");
    assert!(text.contains("vda: qcow2"), "{text}");
    assert!(text.contains("sda: excluded (cdrom"), "{text}");
    assert_eq!(browser.text(&format!("{row} .vm-snapshots")), "0");
    browser.screenshot("vm-list");

    // The VM's Snapshots tab.
    browser.click(&format!("{row} .vm-open"));
    browser.wait_text("#vm-name", &vm.name, SHORT);
    browser.wait_text("#no-snapshots", "No snapshots", SHORT);

    // Take snapshot: a valid suggested name; the daemon's name rules inline; the excluded cdrom
    // listed with its reason; Save disabled until the warning is acknowledged.
    browser.click("#take-snapshot");
    browser.wait_element("#take-snapshot-dialog", SHORT);
    let suggested = browser
        .js(
            "return document.querySelector('#snapshot-name').value;",
            json!([]),
        )
        .as_str()
        .unwrap()
        .to_string();
    assert!(suggested.starts_with("snapshot-"), "{suggested}");
    let warning = browser.wait_text("#excluded-warning", "sda", SHORT);
    assert!(warning.contains("cdrom"), "{warning}");
    assert!(warning.contains("I am aware of this warning and wish to proceed"));
    assert!(
        browser.is_disabled("#snapshot-save"),
        "Save before the checkbox"
    );
    browser.type_into("#snapshot-name", "before wipe");
    let error = browser.wait_text("#snapshot-name-error", "contains", SHORT);
    // The daemon's own words for the same name (through vmsnapctl, which uses its rules).
    let refused = daemon.ctl(&["snapshot", "create", &vm.name, "before wipe"]);
    let words = refused.failure().trim_start_matches("vmsnapctl: ");
    assert!(
        words.contains(error.trim()),
        "page: {error:?}, vmsnapd: {words:?}"
    );
    browser.type_into("#snapshot-name", "before-wipe");
    browser.type_into("#snapshot-description", "all files as written");
    assert!(browser.text("#snapshot-name-error").is_empty());
    assert!(
        browser.is_disabled("#snapshot-save"),
        "Save stays disabled without the checkbox"
    );
    browser.screenshot("take-snapshot-warning");
    browser.click("#snapshot-aware");
    assert!(!browser.is_disabled("#snapshot-save"));
    browser.screenshot("take-snapshot-acknowledged");
    record_status_texts(&browser, "before-wipe");
    browser.click("#snapshot-save");
    browser.wait_gone("#take-snapshot-dialog", LONG);

    // In progress, then Ready, live; indications and the freeze window in words.
    let snap_row = snapshot_row("before-wipe");
    let text = browser.wait_text(&snap_row, "Ready", LONG);
    let seen = browser.js("return window.__statusSeen;", json!([]));
    assert!(
        seen.as_array().unwrap()[0]
            .as_str()
            .unwrap()
            .starts_with("In progress"),
        "the row showed {seen} (first In progress, then Ready)"
    );
    assert!(text.contains("all files as written"), "{text}");
    assert!(text.contains("Online"), "{text}");
    assert!(
        text.contains("Guest agent: filesystems frozen"),
        "indications in words: {text}"
    );
    let freeze = browser.text(&format!("{snap_row} .snapshot-freeze"));
    assert!(
        freeze.contains(" ms (") && freeze.contains("filesystem"),
        "{freeze}"
    );
    browser.screenshot("snapshot-ready");

    // The accident.
    vm.exec("rm -f /mnt/data/f-* && head -c 5000 /dev/urandom > /mnt/data/f-one && sync");
    assert_ne!(vm.guest_checksums(), before);

    // Restore while the VM runs: the popup says it must be stopped and offers to stop it.
    row_action(&browser, "before-wipe", "Restore");
    browser.wait_element("#restore-dialog", SHORT);
    let dialog = browser.wait_text(
        "#restore-dialog",
        "must be stopped before it can be restored",
        SHORT,
    );
    assert!(
        dialog.contains(&vm.name) && dialog.contains("before-wipe"),
        "{dialog}"
    );
    assert!(dialog.contains("safety snapshot"), "{dialog}");
    assert!(dialog.contains("Disks attached since the snapshot are detached"));
    assert!(
        browser
            .text("#restore-dialog button#restore-confirm")
            .is_empty(),
        "no plain Restore for a running VM"
    );
    browser.screenshot("restore-running-vm");

    // Stop and restore, from the popup; progress and the result live.
    browser.js(
        "window.__progressSeen = []; const look = () => { const p = document.querySelector('#restore-progress'); \
           if (p && !window.__progressSeen.includes(p.innerText)) window.__progressSeen.push(p.innerText); }; \
         new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true});",
        json!([]),
    );
    let started = Instant::now();
    browser.click("#restore-stop-and-restore");
    let result = browser.wait_text("#restore-result", "restored from before-wipe", LONG);
    eprintln!("stop and restore took {:?}", started.elapsed());
    assert!(result.contains("Safety snapshot: pre-restore-"), "{result}");
    assert!(result.contains("Not restored: sda"), "{result}");
    let progress = browser.js("return window.__progressSeen;", json!([]));
    assert!(
        progress
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("Restoring: ")),
        "the restore's progress was shown: {progress}"
    );
    eprintln!("restore progress shown: {progress}");
    browser.screenshot("restore-succeeded");
    browser.click("#restore-close");
    browser.wait_gone("#restore-dialog", SHORT);

    // Start the VM from the page.
    browser.wait_text("#vm-state", "Shut off", SHORT);
    browser.click("#vm-start");
    browser.wait_text("#vm-state", "Running", SHORT);
    vmsnap_tests::wait_guest_ready(&vm.name);
    assert_eq!(vm.guest_checksums(), before, "every file back");

    // The list now holds the snapshot and the safety snapshot, oldest first; the Restores tab
    // the restore.
    let list = browser.wait_text("#snapshot-list", "pre-restore-", SHORT);
    let first = list.find("before-wipe").unwrap();
    let safety = list.find("pre-restore-").unwrap();
    assert!(first < safety, "oldest first: {list}");
    browser.wait_text("#vm-agent", "Connected", SHORT);
    browser.screenshot("snapshots-tab");
    browser.click_text(".pf-v5-c-tabs", "Restores");
    let restores = browser.wait_text("#restore-list", "Succeeded", SHORT);
    assert!(restores.contains("before-wipe"), "{restores}");
    assert!(restores.contains("(in place)"), "{restores}");
    browser.screenshot("restores-tab");
    drop(daemon);
}

/// Removes a VM the test made through the page (a restore as a new VM), also on failure.
struct RemoveVmOnDrop(&'static str);

impl Drop for RemoveVmOnDrop {
    fn drop(&mut self) {
        for args in [
            &["destroy", self.0][..],
            &["undefine", self.0, "--nvram"][..],
            &["undefine", self.0][..],
        ] {
            let _ = std::process::Command::new("virsh")
                .args(["-c", LAB_URI])
                .args(args)
                .output();
        }
    }
}

#[test]
fn details_restore_as_a_new_vm_and_delete_with_confirmation() {
    const CLONE: &str = "vmsnap-t14-clone";
    let _remove_clone = RemoveVmOnDrop(CLONE);
    let vm = ScratchVm::define(
        "vmsnap-t14-offline",
        ScratchOptions::default(),
        &[("f-data", b"offline data\n")],
    );
    let bus = SystemBus::start();
    let _daemon = daemon_for(&bus, &vm.name);
    let ws = CockpitWs::start(&bus, None);
    // The installed package is in Cockpit's menu.
    let manifests = ws.manifests();
    assert_eq!(
        manifests["vmsnap"]["menu"]["index"]["label"], "VM snapshots",
        "{manifests}"
    );
    let browser = Browser::start("new-vm-and-delete");
    open_vm(&browser, &ws, &vm.name);
    assert!(browser.text("#vm-agent").contains("Not configured"));

    // No excluded disk: no warning, Save enabled at once.
    browser.click("#take-snapshot");
    browser.wait_element("#take-snapshot-dialog", SHORT);
    assert!(browser
        .text("#take-snapshot-dialog")
        .contains("Snapshot name"));
    assert!(!browser.text("#take-snapshot-dialog").contains("I am aware"));
    browser.type_into("#snapshot-name", "offline-1");
    assert!(!browser.is_disabled("#snapshot-save"));
    browser.click("#snapshot-save");
    browser.wait_gone("#take-snapshot-dialog", LONG);
    browser.wait_text(&snapshot_row("offline-1"), "Ready", LONG);
    // A second one with the same name is refused inline, before the daemon is asked.
    browser.click("#take-snapshot");
    browser.type_into("#snapshot-name", "offline-1");
    browser.wait_text("#snapshot-name-error", "already exists", SHORT);
    assert!(browser.is_disabled("#snapshot-save"));
    browser.click_text("#take-snapshot-dialog", "Cancel");
    browser.wait_gone("#take-snapshot-dialog", SHORT);

    // The snapshot's details.
    browser.click(&format!("{} .snapshot-open", snapshot_row("offline-1")));
    let details = browser.wait_text("#snapshot-details", "Included volumes", SHORT);
    assert!(
        details.contains("Offline: the VM was shut off"),
        "{details}"
    );
    assert!(details.contains("No freeze"), "{details}");
    let included = browser.text("#included-volumes");
    assert!(
        included.contains("vda") && included.contains("qcow2"),
        "{included}"
    );
    assert_eq!(browser.text("#excluded-volumes"), "None");
    assert!(details.contains("No restores"), "{details}");
    browser.screenshot("snapshot-details");

    // Restore from the details as a new VM: it asks for the name.
    browser.click("#details-restore");
    browser.wait_element("#restore-dialog", SHORT);
    browser.click("#restore-new-vm");
    // vmsnapd's rules for a VM name, inline.
    for bad in ["bad name", ".", "-x"] {
        browser.type_into("#restore-new-name", bad);
        browser.wait_element("#restore-new-name-error", SHORT);
        assert!(browser.is_disabled("#restore-confirm"), "{bad:?}");
    }
    browser.type_into("#restore-new-name", &vm.name);
    browser.wait_text("#restore-new-name-error", "already exists", SHORT);
    browser.type_into("#restore-new-name", CLONE);
    let dialog = browser.wait_text("#restore-dialog", "A new VM is created", SHORT);
    assert!(dialog.contains("is left as it is"), "{dialog}");
    browser.screenshot("restore-as-new-vm");
    browser.click("#restore-confirm");
    let result = browser.wait_text("#restore-result", &format!("new VM {CLONE}"), LONG);
    assert!(!result.contains("Safety snapshot"), "{result}");
    browser.screenshot("restored-as-new-vm");
    browser.click("#restore-close");
    browser.wait_gone("#restore-dialog", SHORT);
    // The restore is listed on the snapshot; the new VM exists in libvirt and on the page.
    let restores = browser.wait_text("#snapshot-details", &format!("New VM {CLONE}"), SHORT);
    assert!(restores.contains("Succeeded"), "{restores}");
    assert_eq!(virsh(&["domstate", CLONE]).trim(), "shut off");
    browser.click_text(".pf-v5-c-breadcrumb", "Virtual machines");
    browser.wait_text(&format!("#vm-{CLONE}"), "Shut off", SHORT);
    assert_eq!(browser.text(&format!("#vm-{} .vm-snapshots", vm.name)), "1");

    // Delete, with a confirmation naming the snapshot; the row goes away live.
    browser.click(&format!("#vm-{} .vm-open", vm.name));
    row_action(&browser, "offline-1", "Delete");
    let confirm = browser.wait_text("#delete-dialog", "cannot be restored afterwards", SHORT);
    assert!(confirm.contains("offline-1") && confirm.contains(&vm.name));
    browser.screenshot("delete-confirmation");
    browser.click("#delete-confirm");
    browser.wait_gone("#delete-dialog", LONG);
    browser.wait_text("#no-snapshots", "No snapshots", LONG);
    browser.screenshot("deleted");
}

#[test]
fn a_daemon_error_is_shown_in_place_and_nothing_is_left_half_done() {
    let vm = ScratchVm::define(
        "vmsnap-t14-error",
        ScratchOptions::default(),
        &[("f-data", b"data\n")],
    );
    let bus = SystemBus::start();
    let daemon = daemon_for(&bus, &vm.name);
    let ws = CockpitWs::start(&bus, None);
    let browser = Browser::start("daemon-error");
    open_vm(&browser, &ws, &vm.name);
    take_snapshot_in_page(&browser, "s1", "");
    take_snapshot_in_page(&browser, "s2", "");

    // Another administrator deletes s2 (with vmsnapctl) while the popup is open: Not found.
    row_action(&browser, "s2", "Restore");
    browser.wait_element("#restore-dialog", SHORT);
    daemon.ctl(&["snapshot", "delete", &vm.name, "s2"]).ok();
    browser.wait_gone(&snapshot_row("s2"), SHORT);
    browser.click("#restore-confirm");
    let error = browser.wait_text("#restore-error", "Not found", SHORT);
    assert!(error.contains("s2"), "{error}");
    browser.screenshot("restore-not-found");
    browser.click_text("#restore-dialog", "Cancel");
    browser.wait_gone("#restore-dialog", SHORT);

    // Someone removes the snapshot's image behind vmsnapd's back: the daemon refuses the
    // restore, and the popup says so in its own words.
    let snapshot = vmsnap_tests::ctl(
        &daemon.bus_address,
        &["snapshot", "show", &vm.name, "s1", "--output", "json"],
    )
    .json();
    let image = vmsnap_tests::image_of(&snapshot);
    std::fs::remove_file(&image).unwrap();
    row_action(&browser, "s1", "Restore");
    browser.click("#restore-confirm");
    let error = browser.wait_text("#restore-error", "cannot be restored", SHORT);
    assert!(error.contains(&image), "{error}");
    // Nothing half-done: the dialog can be used again or closed, no restore appears.
    assert!(!browser.is_disabled("#restore-confirm"));
    assert!(browser.text("#restore-dialog").contains("Restore to"));
    browser.screenshot("restore-refused-in-place");
    browser.click_text("#restore-dialog", "Cancel");
    browser.wait_gone("#restore-dialog", SHORT);
    browser.click_text(".pf-v5-c-tabs", "Restores");
    browser.wait_text("#vm-name", &vm.name, SHORT);
    let restores = browser.wait_js(
        SHORT,
        "the Restores tab",
        "const e = document.querySelector('.pf-v5-c-tab-content:not([hidden])'); return e ? e.innerText : null;",
        json!([]),
    );
    assert!(
        restores.as_str().unwrap().contains("No restores"),
        "{restores}"
    );

    // vmsnapd stops: the page says so instead of showing a stale view as current, and an
    // attempt is refused in words.
    let mut daemon = daemon;
    daemon.stop();
    browser.wait_text("#daemon-gone", "vmsnapd has stopped", SHORT);
    browser.click_text(".pf-v5-c-tabs", "Snapshots");
    row_action(&browser, "s1", "Delete");
    browser.click("#delete-confirm");
    let error = browser.wait_text("#delete-error", "vmsnapd is not running", SHORT);
    browser.screenshot("daemon-stopped");
    browser.click_text("#delete-dialog", "Cancel");
    browser.wait_gone("#delete-dialog", SHORT);
    assert!(!error.is_empty());

    // A vmsnapd comes back (with a state of its own: no snapshots): the page follows it.
    let _again = daemon_for(&bus, &vm.name);
    browser.wait_gone("#daemon-gone", SHORT);
    browser.wait_text("#no-snapshots", "No snapshots", SHORT);
    browser.screenshot("daemon-back");
}

#[test]
fn an_unprivileged_session_reads_but_is_refused_changes_with_a_pointer_to_administrative_access() {
    let user = vmsnap_tests::browser::unprivileged_user("vmsnap-cockpit-test");
    let bus = SystemBus::start();
    let daemon = SystemDaemon::start(&bus, &config_for("test:///default"));
    // A snapshot by root, for the delete below (the test driver cannot take disk snapshots, so
    // it fails, but it is there).
    let out = daemon.ctl(&["snapshot", "create", "test", "by-root", "--no-wait"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let ws = CockpitWs::start(&bus, Some(user));
    let browser = Browser::start("unprivileged");
    open_vm(&browser, &ws, "test");
    // Failed, with the daemon's error in the row.
    let failed = browser.wait_text(&snapshot_row("by-root"), "Failed", SHORT);
    let shown = daemon
        .ctl(&["snapshot", "show", "test", "by-root", "--output", "json"])
        .json();
    let reason = shown["error"].as_str().unwrap();
    assert!(!reason.is_empty(), "{shown}");
    assert!(failed.contains(reason), "{failed} shows {reason}");
    assert!(
        failed.contains("No guest agent: crash-consistent"),
        "indications in words: {failed}"
    );

    browser.click("#take-snapshot");
    browser.type_into("#snapshot-name", "by-user");
    browser.click("#snapshot-save");
    let error = browser.wait_text("#snapshot-error", "Not authorized", SHORT);
    assert!(error.contains("administrative access"), "{error}");
    assert!(!browser.is_disabled("#snapshot-save"), "usable again");
    browser.screenshot("create-refused");
    browser.click_text("#take-snapshot-dialog", "Cancel");
    browser.wait_gone("#take-snapshot-dialog", SHORT);

    row_action(&browser, "by-root", "Delete");
    browser.click("#delete-confirm");
    let error = browser.wait_text("#delete-error", "Not authorized", SHORT);
    assert!(error.contains("administrative access"), "{error}");
    browser.screenshot("delete-refused");
    browser.click_text("#delete-dialog", "Cancel");
    browser.wait_gone("#delete-dialog", SHORT);

    let names: Vec<String> = daemon
        .ctl(&["snapshot", "list", "--output", "json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["by-root"], "nothing changed");
    assert!(browser.text("#snapshot-list").contains("by-root"));
}

/// Lets `user` run anything through sudo without a password, keeping the test bus's address
/// (sudo resets the environment), as an admin with Cockpit's "administrative access" would;
/// removed on drop.
struct SudoRule(std::path::PathBuf);

impl SudoRule {
    fn allow(user: &str) -> SudoRule {
        let path = std::path::PathBuf::from("/etc/sudoers.d/vmsnap-cockpit-test");
        std::fs::write(
            &path,
            format!(
                "Defaults:{user} env_keep += \"DBUS_SYSTEM_BUS_ADDRESS\"\n{user} ALL=(ALL) NOPASSWD: ALL\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o440))
            .unwrap();
        SudoRule(path)
    }
}

impl Drop for SudoRule {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn an_admin_turns_on_administrative_access_and_may_then_take_snapshots() {
    const ADMIN: &str = "vmsnap-cockpit-admin";
    let user = vmsnap_tests::browser::unprivileged_user(ADMIN);
    let _sudo = SudoRule::allow(ADMIN);
    let bus = SystemBus::start();
    let daemon = SystemDaemon::start(&bus, &config_for("test:///default"));
    let ws = CockpitWs::start(&bus, Some(user));
    let browser = Browser::start("administrative-access");
    open_vm(&browser, &ws, "test");

    // Limited access: refused, with the pointer.
    browser.click("#take-snapshot");
    browser.type_into("#snapshot-name", "limited");
    browser.click("#snapshot-save");
    browser.wait_text("#snapshot-error", "administrative access", SHORT);
    browser.click_text("#take-snapshot-dialog", "Cancel");
    browser.wait_gone("#take-snapshot-dialog", SHORT);

    // Turn on administrative access, as Cockpit's "Limited access" button does (the bridge's
    // superuser Start with the sudo bridge); the page follows without a reload.
    let started = browser.wait_js(
        SHORT,
        "administrative access",
        "if (window.__superuser === undefined) { window.__superuser = null; \
           cockpit.dbus(null, {bus: 'internal'}).call('/superuser', 'cockpit.Superuser', 'Start', ['sudo']) \
             .then(() => { window.__superuser = 'ok'; }, e => { window.__superuser = 'failed: ' + (e.message || e.problem); }); } \
         return window.__superuser;",
        json!([]),
    );
    assert_eq!(started, json!("ok"), "{}", ws.log_text());
    browser.wait_element("#take-snapshot", SHORT);
    browser.click("#take-snapshot");
    browser.type_into("#snapshot-name", "as-admin");
    browser.click("#snapshot-save");
    browser.wait_gone("#take-snapshot-dialog", SHORT);
    browser.wait_element(&snapshot_row("as-admin"), SHORT);
    browser.screenshot("admin-snapshot");
    let names: Vec<String> = daemon
        .ctl(&["snapshot", "list", "--output", "json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["as-admin"]);
}

#[test]
fn busy_while_a_snapshot_waits_for_a_hung_agent_then_crash_consistent_in_words() {
    let _slot = GuestSlot::take();
    let vm = ScratchVm::running_with_agent("vmsnap-t14-busy");
    let bus = SystemBus::start();
    let daemon = daemon_for(&bus, &vm.name);
    wait_for(Duration::from_secs(60), "the agent in vmsnapd", || {
        let out = daemon.ctl(&["vm", "show", &vm.name, "--output", "json"]);
        (out.code == Some(0) && out.json()["agent"] == "connected").then_some(())
    });
    let ws = CockpitWs::start(&bus, None);
    let browser = Browser::start("busy");
    open_vm(&browser, &ws, &vm.name);

    // The agent stops answering for 25 s (every agent call then waits 5 s and fails), detached
    // from the guest-exec that asks for it.
    vm.exec(
        "setsid sh -c 'sleep 1; kill -STOP $(pidof qemu-ga); sleep 25; kill -CONT $(pidof qemu-ga)' \
         </dev/null >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_secs(2));

    browser.click("#take-snapshot");
    browser.type_into("#snapshot-name", "first");
    browser.click("#snapshot-save");
    browser.wait_gone("#take-snapshot-dialog", SHORT);
    browser.wait_text(&snapshot_row("first"), "In progress", SHORT);

    // A second one while the first waits for the agent: Busy, in place; nothing else happens.
    browser.click("#take-snapshot");
    browser.type_into("#snapshot-name", "second");
    browser.click("#snapshot-save");
    let error = browser.wait_text("#snapshot-error", "Busy", SHORT);
    assert!(
        browser.text(&snapshot_row("first")).contains("In progress"),
        "Busy while the first runs: {error}"
    );
    browser.screenshot("busy");
    browser.click_text("#take-snapshot-dialog", "Cancel");
    browser.wait_gone("#take-snapshot-dialog", SHORT);

    // The first ends crash-consistent, and says so in words: the agent did not answer in time.
    let row = browser.wait_text(&snapshot_row("first"), "Ready", LONG);
    assert!(row.contains("Freeze timed out"), "{row}");
    assert!(row.contains("crash-consistent"), "{row}");
    browser.screenshot("quiesce-failed");
    assert!(browser.text(&snapshot_row("second")).is_empty());
}

#[test]
fn a_vm_started_behind_the_pages_back_is_refused_in_words_then_restored_and_started_from_the_result(
) {
    let _slot = GuestSlot::take();
    let vm = ScratchVm::define(
        "vmsnap-t14-race",
        ScratchOptions {
            agent: true,
            ..Default::default()
        },
        &[("f-kept", b"as at the snapshot\n")],
    );
    let bus = SystemBus::start();
    let daemon = SystemDaemon::start(&bus, &format!("libvirt_uri = \"{LAB_URI}\"\n"));
    wait_for(SHORT, "the VM in vmsnapd's inventory", || {
        (daemon.ctl(&["vm", "show", &vm.name]).code == Some(0)).then_some(())
    });
    let ws = CockpitWs::start(&bus, None);
    let browser = Browser::start("vm-running-race");
    open_vm(&browser, &ws, &vm.name);
    take_snapshot_in_page(&browser, "kept", "");

    row_action(&browser, "kept", "Restore");
    browser.wait_element("#restore-confirm", SHORT);
    // vmsnapd follows libvirt's events, so the page would learn of a start within milliseconds:
    // vmsnapd is held still (SIGSTOP) while the VM starts and the click goes out, as when
    // someone starts the VM between the popup and the click.
    let pid = daemon.pid().expect("vmsnapd runs").to_string();
    let signal = |name: &str| {
        assert!(std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    virsh(&["start", &vm.name]);
    browser.click("#restore-confirm");
    signal("-CONT");
    let error = browser.wait_text("#restore-error", "The VM is running", SHORT);
    assert!(error.contains(&vm.name), "{error}");
    browser.screenshot("restore-refused-vm-running");
    // Nothing half-done: no restore was made, and the popup, now knowing the VM runs, offers
    // to stop it first.
    browser.wait_element("#restore-stop-and-restore", SHORT);
    assert!(!browser.is_disabled("#restore-stop-and-restore"));
    let restores = daemon.ctl(&["restore", "list", "--output", "json"]).json();
    assert_eq!(restores, json!([]), "no restore was recorded");

    // Stopped again (behind the page's back too), the same popup restores; Start in the result.
    virsh(&["destroy", &vm.name]);
    browser.wait_element("#restore-confirm", SHORT);
    browser.click("#restore-confirm");
    browser.wait_text("#restore-result", "restored from kept", LONG);
    browser.click("#restore-start");
    browser.wait_element("#restore-started", SHORT);
    wait_for(SHORT, "the VM to run", || {
        virsh(&["domstate", &vm.name])
            .contains("running")
            .then_some(())
    });
    vmsnap_tests::wait_guest_ready(&vm.name);
    let kept = vm.exec("cat /mnt/data/f-kept");
    assert_eq!(kept, "as at the snapshot\n");
    browser.screenshot("restored-and-started");
}
