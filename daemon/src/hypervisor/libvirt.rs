//! The hypervisor contract over libvirt: each session is a connection of its own, used on the
//! operation's thread. Connections are kept for the next session when one ends (opening one
//! costs 2-4 ms of each operation), a few at most and for a short while.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use super::{FreezeFailure, Host, Hypervisor, RunState, ThawGuardHandle};
use crate::libvirt::{InventoryView, KnownDomains};
use crate::ops::{OpError, OpResult};
use crate::thaw_guard::{EarlyGuard, ThawGuard};
use crate::virt_ext;

pub const VIR_DOMAIN_XML_SECURE: u32 = 1;
pub const VIR_DOMAIN_XML_INACTIVE: u32 = 2;

/// libvirt at one URI.
pub struct Libvirt {
    pub uri: String,
    /// The daemon's inventory, when this process keeps one.
    pub known: Option<Arc<KnownDomains>>,
}

impl Hypervisor for Libvirt {
    fn session(&self) -> OpResult<Box<dyn Host>> {
        let conn = match idle_connections().take(&self.uri) {
            Some(conn) => conn,
            None => crate::libvirt::open(&self.uri)
                .map_err(|e| OpError::LibvirtUnavailable(e.message().to_string()))?,
        };
        Ok(Box::new(LibvirtHost {
            uri: self.uri.clone(),
            conn: Some(conn),
            known: self.known.clone(),
            pending_guard: EarlyGuard::default(),
            frozen: RefCell::new(None),
        }))
    }
}

/// How many connections wait for the next session (operations on different VMs run at once,
/// each with its own).
const IDLE_MAX: usize = 4;
/// How long a connection waits for the next session; past it, it is closed rather than
/// trusted (a libvirtd restarted meanwhile is noticed by the check below, but a fresh
/// connection after a quiet while costs little).
const IDLE_FOR: Duration = Duration::from_secs(60);

/// Connections of ended sessions, newest last.
#[derive(Default)]
struct IdleConnections(Mutex<Vec<(String, Connect, Instant)>>);

fn idle_connections() -> &'static IdleConnections {
    static IDLE: OnceLock<IdleConnections> = OnceLock::new();
    IDLE.get_or_init(IdleConnections::default)
}

impl IdleConnections {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<(String, Connect, Instant)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A kept connection to `uri` that still answers, if any (the test driver's shared one is
    /// never kept: `crate::libvirt::open` hands it out).
    fn take(&self, uri: &str) -> Option<Connect> {
        let found = {
            let mut list = self.list();
            list.retain(|(_, _, since)| since.elapsed() < IDLE_FOR);
            let mut alive = None;
            while let Some(at) = list.iter().rposition(|(u, _, _)| u == uri) {
                let (_, conn, _) = list.remove(at);
                // Local, no round trip: false once the socket is known closed.
                if conn.is_alive().unwrap_or(false) {
                    alive = Some(conn);
                    break;
                }
            }
            alive
        };
        // One round trip (a fraction of a millisecond, against 2-4 for a new connection)
        // proves it: a libvirtd restarted since may not have been noticed yet.
        found.filter(|conn| conn.lib_version().is_ok())
    }

    fn keep(&self, uri: &str, conn: Connect) {
        if uri.starts_with("test:") || !conn.is_alive().unwrap_or(false) {
            return;
        }
        let mut list = self.list();
        list.push((uri.to_string(), conn, Instant::now()));
        if list.len() > IDLE_MAX {
            list.remove(0);
        }
    }
}

/// One connection, and what one operation's freeze keeps between calls.
pub struct LibvirtHost {
    uri: String,
    /// Always Some until the session ends (then it goes back to the idle connections).
    conn: Option<Connect>,
    known: Option<Arc<KnownDomains>>,
    /// A guard started by `prepare_thaw_guard`, for `arm_thaw_guard` to arm.
    pending_guard: EarlyGuard,
    /// The domain `freeze` froze, so that the thaw inside the frozen window needs no lookup
    /// round trip first.
    frozen: RefCell<Option<(String, Domain)>>,
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        // A guard never armed is stopped (dropped) before its connection's session ends.
        self.pending_guard.stop();
        self.frozen.get_mut().take();
        if let Some(conn) = self.conn.take() {
            idle_connections().keep(&self.uri, conn);
        }
    }
}

fn libvirt_error(e: virt::error::Error) -> OpError {
    OpError::Libvirt(e.message().to_string())
}

/// How many times a VM start is tried when libvirt's device cgroup program was interrupted, as
/// libbpf tries a program load (`PROG_LOAD_ATTEMPTS`).
const START_ATTEMPTS: u32 = 5;

/// Runs `start` again while it fails because the kernel's BPF verifier was interrupted. libvirt 9
/// loads a BPF program to guard each VM's devices where cgroup v2 device control is available;
/// the verifier gives up with EAGAIN when a signal is pending for the loading thread (another
/// libvirtd child exiting, as when VMs start at once), and libvirt does not retry. That start
/// failed before the VM ran, so trying again is what libvirt would have done.
fn start_retrying_interrupted(mut start: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let mut attempts = 1;
    loop {
        match start() {
            Err(message)
                if attempts < START_ATTEMPTS
                    && message.contains(
                        "failed to load cgroup BPF prog: Resource temporarily unavailable",
                    ) =>
            {
                debug!(
                    attempts,
                    "libvirt's device cgroup program was interrupted; starting again"
                );
                attempts += 1;
            }
            done => return done,
        }
    }
}

impl LibvirtHost {
    fn conn(&self) -> OpResult<&Connect> {
        self.conn
            .as_ref()
            .ok_or_else(|| OpError::LibvirtUnavailable("the session has ended".to_string()))
    }

    fn domain(&self, vm: &str) -> OpResult<Domain> {
        self.conn()?.lookup_domain_by_uuid_string(vm).map_err(|e| {
            if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) {
                OpError::VmNotFound(vm.to_string())
            } else {
                OpError::Libvirt(format!("VM {vm}: {}", e.message()))
            }
        })
    }
}

impl ThawGuardHandle for ThawGuard {
    fn disarm(self: Box<Self>) -> std::io::Result<()> {
        ThawGuard::disarm(*self)
    }
}

impl Host for LibvirtHost {
    fn run_state(&self, vm: &str) -> OpResult<RunState> {
        let info = self.domain(vm)?.info().map_err(libvirt_error)?;
        Ok(match info.state {
            Enum::Known(DomainState::Running) => RunState::Running,
            Enum::Known(DomainState::Paused) => RunState::Paused,
            Enum::Known(DomainState::Shutoff) => RunState::ShutOff,
            Enum::Known(_) => RunState::Other,
            Enum::Unknown(_) => {
                return Err(OpError::Refused("the VM is in an unknown state".into()))
            }
        })
    }

    fn is_active(&self, vm: &str) -> OpResult<bool> {
        self.domain(vm)?.is_active().map_err(libvirt_error)
    }

    fn exists(&self, vm: &str) -> OpResult<bool> {
        match self.domain(vm) {
            Ok(_) => Ok(true),
            Err(OpError::VmNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn definition(&self, vm: &str) -> OpResult<String> {
        self.domain(vm)?
            .xml_desc(VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE)
            .map_err(libvirt_error)
    }

    fn public_definition(&self, vm: &str) -> OpResult<String> {
        self.domain(vm)?
            .xml_desc(VIR_DOMAIN_XML_INACTIVE)
            .map_err(libvirt_error)
    }

    fn current_definition(&self, vm: &str) -> OpResult<String> {
        let dom = self.domain(vm)?;
        let flags = if dom.is_active().map_err(libvirt_error)? {
            0
        } else {
            VIR_DOMAIN_XML_INACTIVE
        };
        dom.xml_desc(flags).map_err(libvirt_error)
    }

    fn disk_capacity(&self, vm: &str, target: &str) -> OpResult<u64> {
        self.domain(vm)?
            .block_info(target, 0)
            .map(|info| info.capacity)
            .map_err(|e| OpError::Libvirt(format!("disk {target}: {}", e.message())))
    }

    fn arm_thaw_guard(&self, vm: &str, deadline: Duration) -> OpResult<Box<dyn ThawGuardHandle>> {
        let armed = match self.pending_guard.take(vm) {
            // Started with the same deadline: `prepare_thaw_guard` is called with it.
            Some(pending) => {
                let waited = Instant::now();
                match pending.armed() {
                    Ok(guard) => {
                        debug!(
                            vm,
                            waited_us = waited.elapsed().as_micros() as u64,
                            "thaw guard armed (started early)"
                        );
                        Ok(guard)
                    }
                    // A guard that passed its own deadline before the arm (the preparation
                    // took longer than freeze_timeout), or died: a fresh one is started.
                    Err(e) => {
                        warn!(vm, error = %e, "the thaw guard started early could not be armed; starting another");
                        ThawGuard::arm(&self.uri, vm, deadline)
                    }
                }
            }
            None => ThawGuard::arm(&self.uri, vm, deadline),
        };
        armed
            .map(|g| Box::new(g) as Box<dyn ThawGuardHandle>)
            .map_err(|e| OpError::Refused(format!("cannot start the thaw guard: {e}")))
    }

    fn prepare_thaw_guard(&self, vm: &str, deadline: Duration) {
        self.pending_guard.prepare(&self.uri, vm, deadline);
    }

    fn freeze(
        &self,
        vm: &str,
        answer_within: Duration,
        only_disks: Option<&[String]>,
    ) -> Result<u32, FreezeFailure> {
        let dom = self.domain(vm).map_err(|e| FreezeFailure {
            timed_out: false,
            message: e.to_string(),
        })?;
        let seconds = answer_within.as_secs().clamp(1, 60) as i32;
        if let Err(e) = virt_ext::agent_set_response_timeout(&dom, seconds) {
            // Drivers without it (test:///) are expected; anything else is worth a warning.
            if matches!(e.code(), Enum::Known(ErrorNumber::NoSupport)) {
                debug!(error = %e.message(), "cannot bound the agent's response time");
            } else {
                warn!(error = %e.message(), "cannot bound the agent's response time");
            }
        }
        let mountpoints = only_disks.and_then(|disks| mountpoints_on(&dom, disks));
        let frozen = match &mountpoints {
            Some(list) => virt_ext::fs_freeze_mountpoints(&dom, list),
            None => virt_ext::fs_freeze(&dom),
        };
        // The bounded response time stays for the thaw, which the flow always calls next and
        // which puts libvirt's default back after it: resetting it here would be one more round
        // trip while the guest is frozen.
        *self.frozen.borrow_mut() = Some((vm.to_string(), dom));
        frozen.map_err(|e| FreezeFailure {
            timed_out: matches!(e.code(), Enum::Known(ErrorNumber::AgentUnresponsive)),
            message: e.message().to_string(),
        })
    }

    fn thaw(&self, vm: &str) -> Result<u32, String> {
        let frozen = self
            .frozen
            .borrow_mut()
            .take()
            .filter(|(for_vm, _)| for_vm == vm);
        let dom = match frozen {
            Some((_, dom)) => dom,
            None => self.domain(vm).map_err(|e| e.to_string())?,
        };
        let thawed = virt_ext::fs_thaw(&dom).map_err(|e| e.message().to_string());
        // Back to libvirt's default for everyone else who uses this agent (`freeze` bounded
        // it); harmless when it was not changed.
        let _ = virt_ext::agent_set_response_timeout(
            &dom,
            virt::sys::VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT,
        );
        thawed
    }

    fn define(&self, xml: &str) -> OpResult<String> {
        let dom = self.conn()?.define_domain_xml(xml).map_err(libvirt_error)?;
        dom.uuid_string().map_err(libvirt_error)
    }

    fn lookup_name(&self, name: &str) -> OpResult<Option<String>> {
        match self.conn()?.lookup_domain_by_name(name) {
            Ok(dom) => dom.uuid_string().map(Some).map_err(libvirt_error),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) => Ok(None),
            Err(e) => Err(libvirt_error(e)),
        }
    }

    fn start(&self, vm: &str) -> OpResult<()> {
        let dom = self.domain(vm)?;
        start_retrying_interrupted(|| dom.create().map(drop).map_err(|e| e.message().to_string()))
            .map_err(OpError::Libvirt)
    }

    fn shutdown(&self, vm: &str) -> OpResult<()> {
        self.domain(vm)?
            .shutdown()
            .map(|_| ())
            .map_err(libvirt_error)
    }

    fn destroy(&self, vm: &str) -> OpResult<()> {
        self.domain(vm)?
            .destroy()
            .map(|_| ())
            .map_err(libvirt_error)
    }

    fn undefine(&self, vm: &str) -> OpResult<()> {
        self.domain(vm)?
            .undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM)
            .map(|_| ())
            .map_err(libvirt_error)
    }

    fn libvirt(&self) -> Option<&Connect> {
        self.conn.as_ref()
    }

    fn known_domains(&self) -> Option<InventoryView> {
        self.known.as_ref().and_then(|known| known.get())
    }
}

/// The mountpoints of the guest's filesystems that live on `disks` alone, so that a snapshot
/// of those disks freezes only what it captures; None (freeze everything) when the agent cannot
/// tell (no guest-get-fsinfo) or no filesystem qualifies.
fn mountpoints_on(dom: &virt::domain::Domain, disks: &[String]) -> Option<Vec<String>> {
    let filesystems = match virt_ext::fs_info(dom) {
        Ok(found) => found,
        Err(e) => {
            debug!(error = %e.message(), "the agent cannot list filesystems; freezing all");
            return None;
        }
    };
    let chosen = chosen_mountpoints(&filesystems, disks);
    (!chosen.is_empty()).then_some(chosen)
}

/// Of `filesystems`, those on `disks` alone.
fn chosen_mountpoints(filesystems: &[virt_ext::GuestFs], disks: &[String]) -> Vec<String> {
    filesystems
        .iter()
        .filter(|fs| !fs.disks.is_empty() && fs.disks.iter().all(|d| disks.contains(d)))
        .map(|fs| fs.mountpoint.clone())
        .collect()
}

#[cfg(test)]
mod freeze_tests {
    use super::*;

    #[test]
    fn only_filesystems_wholly_on_the_captured_disks_are_chosen() {
        let fs = |m: &str, d: &[&str]| virt_ext::GuestFs {
            mountpoint: m.into(),
            disks: d.iter().map(|s| s.to_string()).collect(),
        };
        let found = [
            fs("/", &["vda"]),
            fs("/mnt/data", &["vdb"]),
            fs("/spanning", &["vda", "vdc"]),
            fs("/proc-like", &[]),
        ];
        let captured = ["vda".to_string(), "vdb".to_string()];
        assert_eq!(chosen_mountpoints(&found, &captured), ["/", "/mnt/data"]);
        assert!(chosen_mountpoints(&found, &["vdz".to_string()]).is_empty());
    }
}

#[cfg(test)]
mod start_tests {
    use super::*;

    const INTERRUPTED: &str = "failed to load cgroup BPF prog: Resource temporarily unavailable";

    fn run(failures: &[&str]) -> (Result<(), String>, usize) {
        let mut calls = 0;
        let result = start_retrying_interrupted(|| {
            calls += 1;
            match failures.get(calls - 1) {
                Some(message) => Err(message.to_string()),
                None => Ok(()),
            }
        });
        (result, calls)
    }

    #[test]
    fn a_start_interrupted_in_the_bpf_verifier_is_tried_again() {
        assert_eq!(run(&[INTERRUPTED, INTERRUPTED]), (Ok(()), 3));
    }

    #[test]
    fn any_other_start_failure_is_reported_at_once() {
        let refused = "Hook script execution failed: vmsnapd holds this VM";
        assert_eq!(run(&[refused]), (Err(refused.to_string()), 1));
        // The cause of the second failure is the one reported.
        assert_eq!(run(&[INTERRUPTED, refused]), (Err(refused.to_string()), 2));
    }

    #[test]
    fn an_interrupted_start_is_tried_five_times_at_most() {
        let always = [INTERRUPTED; 8];
        assert_eq!(run(&always), (Err(INTERRUPTED.to_string()), 5));
    }
}
