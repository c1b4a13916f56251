//! The tests that boot a TCG guest of their own and run everything inside it for minutes:
//! vmsnapd on real LVM ([`lvm_daemon`]) and the Debian package under systemd
//! ([`systemd_package`]). They share one test binary so that the harness runs them at once,
//! each guest on a host core of its own: test binaries run one after the other, and these two,
//! run apart, took half of the whole suite's time.

mod lvm_daemon;
mod systemd_package;
