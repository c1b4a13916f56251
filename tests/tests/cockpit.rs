//! The web console (cockpit/): the lab's snapshot exercises done in headless Chromium against a
//! real cockpit-ws, the page installed by install.sh, and the real vmsnapd serving a system-type
//! dbus-daemon that loads the shipped bus policy, with polkitd deciding (see tests/src/browser.rs
//! for why vmsnapd does not own the name on the lab's shared system bus). Screenshots of each
//! step land in target/test-artifacts/cockpit/<test>/.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use vmsnap_tests::browser::{Browser, CockpitWs, SystemBus, SystemDaemon};
use vmsnap_tests::config_for;

const SHORT: Duration = Duration::from_secs(30);

#[test]
fn the_page_lists_the_hosts_vms() {
    let bus = SystemBus::start();
    let daemon = SystemDaemon::start(&bus, &config_for("test:///default"));
    let ws = CockpitWs::start(&bus, None);
    let browser = Browser::start("vm-list");
    browser.goto(&ws.page_url());
    let row = browser.wait_text("#vm-test", "test", SHORT);
    browser.screenshot("vm-list");
    assert!(row.contains("Running"), "{row}");
    drop(daemon);
    let _ = json!(null);
}
