//! The tests that boot a TCG guest of their own and run everything inside it for minutes:
//! vmsnapd on real LVM ([`lvm_daemon`]), the LVM library's self-test ([`lvm_selftest`]) and
//! the Debian package under systemd ([`systemd_package`]). They share one test binary so that
//! the harness runs two at once, each guest on a host core of its own: test binaries run one
//! after the other, and these, run apart, took half of the whole suite's time.

mod lvm_daemon;
mod lvm_selftest;
mod systemd_package;
