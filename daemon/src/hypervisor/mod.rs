//! What the operation flows ask of the hypervisor, as one contract: read a VM's definitions and
//! state, freeze and thaw its guest under a thaw guard, define, start and stop it. The libvirt
//! implementation is the real one; the unit tests drive the same flows over a simulated one.
//!
//! A [`Host`] is one operation's session (a libvirt connection of its own, opened on the
//! operation's thread): nothing here runs on a tokio worker.

pub mod libvirt;
#[cfg(test)]
pub mod sim;

use std::time::Duration;

use crate::ops::OpResult;

/// Opens sessions; shared by every operation.
pub trait Hypervisor: Send + Sync {
    fn session(&self) -> OpResult<Box<dyn Host>>;
}

/// A VM's run state as the flows need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    ShutOff,
    /// Starting, stopping, crashed, suspended to disk...
    Other,
}

/// Why a freeze failed.
#[derive(Debug, Clone)]
pub struct FreezeFailure {
    /// The agent did not answer in time (QuiesceTimeout rather than QuiesceFailed).
    pub timed_out: bool,
    pub message: String,
}

/// An armed thaw guard. Disarm it after thawing; dropped armed, it thaws the guest at once.
pub trait ThawGuardHandle: Send {
    fn disarm(self: Box<Self>) -> std::io::Result<()>;
}

/// One operation's session with the hypervisor. VMs are named by UUID.
pub trait Host {
    fn run_state(&self, vm: &str) -> OpResult<RunState>;
    fn is_active(&self, vm: &str) -> OpResult<bool>;
    /// Whether a VM of this UUID is defined.
    fn exists(&self, vm: &str) -> OpResult<bool>;
    /// The stored definition, secrets included (to define it again).
    fn definition(&self, vm: &str) -> OpResult<String>;
    /// The stored definition without secrets, as users see it.
    fn public_definition(&self, vm: &str) -> OpResult<String>;
    /// The definition that shows the disks as QEMU uses them: live while running.
    fn current_definition(&self, vm: &str) -> OpResult<String>;
    /// A disk's size as the guest sees it.
    fn disk_capacity(&self, vm: &str, target: &str) -> OpResult<u64>;
    /// Starts a guard that thaws the guest `deadline` from now at the latest, or as soon as
    /// the guard is dropped armed.
    fn arm_thaw_guard(&self, vm: &str, deadline: Duration) -> OpResult<Box<dyn ThawGuardHandle>>;
    /// A hint that `arm_thaw_guard(vm, deadline)` may follow: a host whose guard takes long to
    /// start starts it now, so that it gets ready while the caller prepares. Nothing is armed
    /// (no deadline runs against a freeze) until `arm_thaw_guard`; a guard never armed goes
    /// with the session. A second hint for the same VM keeps the guard the first one started.
    fn prepare_thaw_guard(&self, _vm: &str, _deadline: Duration) {}
    /// Freezes the guest's filesystems; the agent must answer within `answer_within`. With
    /// `only_disks`, only the filesystems that live on those disks alone (where the agent can
    /// tell; all of them otherwise).
    fn freeze(
        &self,
        vm: &str,
        answer_within: Duration,
        only_disks: Option<&[String]>,
    ) -> Result<u32, FreezeFailure>;
    /// Thaws the guest's filesystems (harmless when not frozen).
    fn thaw(&self, vm: &str) -> Result<u32, String>;
    /// Defines (or redefines) a VM; returns its UUID.
    fn define(&self, xml: &str) -> OpResult<String>;
    /// The UUID of the VM named `name`, if one is defined.
    fn lookup_name(&self, name: &str) -> OpResult<Option<String>>;
    fn start(&self, vm: &str) -> OpResult<()>;
    /// Asks the guest to shut down.
    fn shutdown(&self, vm: &str) -> OpResult<()>;
    /// Forces the VM off.
    fn destroy(&self, vm: &str) -> OpResult<()>;
    /// Undefines a VM and its NVRAM file.
    fn undefine(&self, vm: &str) -> OpResult<()>;
    /// The libvirt connection, for backends that work through libvirt (qcow2's snapshots and
    /// block commits); `None` for a simulated host.
    fn libvirt(&self) -> Option<&virt::connect::Connect>;
    /// Every domain as the daemon's inventory last read it (libvirt's events keep it current);
    /// `None` when there is none to trust (not connected, or no inventory in this process).
    fn known_domains(&self) -> Option<crate::libvirt::InventoryView> {
        None
    }
}
