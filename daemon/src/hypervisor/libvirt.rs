//! The hypervisor contract over libvirt: each session is a connection of its own, opened on the
//! operation's thread.

use std::time::Duration;

use tracing::{debug, warn};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use std::sync::Arc;

use super::{FreezeFailure, Host, Hypervisor, RunState, ThawGuardHandle};
use crate::libvirt::{InventoryView, KnownDomains};
use crate::ops::{OpError, OpResult};
use crate::thaw_guard::ThawGuard;
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
        let conn = crate::libvirt::open(&self.uri)
            .map_err(|e| OpError::LibvirtUnavailable(e.message().to_string()))?;
        Ok(Box::new(LibvirtHost {
            uri: self.uri.clone(),
            conn,
            known: self.known.clone(),
        }))
    }
}

/// One connection.
pub struct LibvirtHost {
    uri: String,
    conn: Connect,
    known: Option<Arc<KnownDomains>>,
}

fn libvirt_error(e: virt::error::Error) -> OpError {
    OpError::Libvirt(e.message().to_string())
}

impl LibvirtHost {
    fn domain(&self, vm: &str) -> OpResult<Domain> {
        self.conn.lookup_domain_by_uuid_string(vm).map_err(|e| {
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
        ThawGuard::arm(&self.uri, vm, deadline)
            .map(|g| Box::new(g) as Box<dyn ThawGuardHandle>)
            .map_err(|e| OpError::Refused(format!("cannot start the thaw guard: {e}")))
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
        // Back to libvirt's default for everyone else who uses this agent.
        let _ = virt_ext::agent_set_response_timeout(
            &dom,
            virt::sys::VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT,
        );
        frozen.map_err(|e| FreezeFailure {
            timed_out: matches!(e.code(), Enum::Known(ErrorNumber::AgentUnresponsive)),
            message: e.message().to_string(),
        })
    }

    fn thaw(&self, vm: &str) -> Result<u32, String> {
        let dom = self.domain(vm).map_err(|e| e.to_string())?;
        virt_ext::fs_thaw(&dom).map_err(|e| e.message().to_string())
    }

    fn define(&self, xml: &str) -> OpResult<String> {
        let dom = self.conn.define_domain_xml(xml).map_err(libvirt_error)?;
        dom.uuid_string().map_err(libvirt_error)
    }

    fn lookup_name(&self, name: &str) -> OpResult<Option<String>> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => dom.uuid_string().map(Some).map_err(libvirt_error),
            Err(e) if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) => Ok(None),
            Err(e) => Err(libvirt_error(e)),
        }
    }

    fn start(&self, vm: &str) -> OpResult<()> {
        self.domain(vm)?.create().map(|_| ()).map_err(libvirt_error)
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
        Some(&self.conn)
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
