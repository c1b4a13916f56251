//! The operation flows: create, delete and restore, each written once over the storage
//! backend contract (`crate::backends`) and the hypervisor contract (`crate::hypervisor`).
//!
//! Each operation runs on a thread of its own (an operation thread: nothing here runs on tokio),
//! opens its own hypervisor session, writes its record before every step that changes anything
//! (the record is the journal), and reports progress and saved records to the engine.

pub mod create;
pub mod delete;
mod error;
pub mod restore;
#[cfg(test)]
pub(crate) mod sim_tests;
pub mod transfer;
pub mod vm_lock;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

pub use self::error::{OpError, OpResult, StorageContext};
use crate::backends::Backends;
use crate::config::{LvmConfig, Quiesce, RbdConfig};
use crate::hypervisor::Hypervisor;
use crate::store::{RestoreRecord, SnapshotRecord, Store};
use vm_lock::{VmLock, VmLocks};

/// What an operation tells the engine.
#[derive(Debug)]
pub enum OpEvent {
    Progress {
        uuid: String,
        text: String,
    },
    RestoreProgress {
        uuid: String,
        text: String,
    },
    /// A restore record was saved.
    RestoreSaved(Box<RestoreRecord>),
    /// A record was saved; the engine's copy must follow.
    Saved(Box<SnapshotRecord>),
    /// A record was removed (the snapshot is deleted).
    Removed {
        uuid: String,
    },
    /// The operation on this VM is over; the VM takes new work.
    Finished {
        vm_uuid: String,
    },
    /// An operation given up at its deadline (its VM released) wants its VM back to undo
    /// what a late call did: granted (the VM marked busy) once nothing else runs on it.
    Reclaim {
        vm_uuid: String,
        reply: tokio::sync::oneshot::Sender<()>,
    },
    /// The first record of an operation could not be written, or (`refused`) what it was to
    /// record did not pass its checks: nothing was started.
    NotStarted {
        uuid: String,
        error: String,
        refused: bool,
    },
    /// A finished restore's record file was removed (or could not be).
    RestoreRecordRemoved {
        uuid: String,
        result: Result<(), String>,
    },
    /// A check of succeeded snapshots' images ended: per snapshot, what is missing (None: all
    /// there).
    Verified(Vec<Verification>),
    /// A check of the thick LVM snapshots' copy-on-write space ended.
    CowFill(Result<Vec<crate::backends::lvm::CowFill>, String>),
}

/// What a check of one snapshot's images found.
#[derive(Debug)]
pub struct Verification {
    pub uuid: String,
    /// The volumes as they were checked (a result about volumes an operation has changed
    /// since is stale).
    pub volumes: Vec<crate::store::VolumeRecord>,
    pub missing: Option<String>,
}

/// Everything an operation needs, owned, so it can move to its thread.
#[derive(Clone)]
pub struct OpContext {
    pub hypervisor: Arc<dyn Hypervisor>,
    pub backends: Arc<Backends>,
    pub store: Store,
    pub freeze_timeout: Duration,
    pub require_quiesce: bool,
    pub failure_deadline: Duration,
    /// How long a WaitGracePeriod restore waits for its VM to be shut off.
    pub restore_grace_period: Duration,
    pub quiesce: Quiesce,
    pub verify_interval: Duration,
    pub lvm: LvmConfig,
    pub rbd: RbdConfig,
    pub events: UnboundedSender<OpEvent>,
    pub faults: Faults,
    pub vm_locks: VmLocks,
    /// The VM this operation works on (set by `spawn`).
    vm_uuid: String,
    /// Shared with the engine's deadline watch; holds the VM's lock (set by `spawn`).
    pub gate: OpGate,
}

/// Where an operation stands for the engine's deadline watch. An operation blocked in a call
/// past its deadline is given up (Abandoned) by the engine: shown Failed at once, and its VM
/// released (vmsnapd's own busy mark and the VM lock the libvirt hook reads), so that the VM
/// takes new work and can be started. The operation's thread, when the call returns, takes the
/// VM back (waiting for whatever runs on it then) before it undoes what the late call did.
/// Finishing with success and giving up exclude each other; so do undoing a failure and
/// releasing the VM: a rollback blocked in a call keeps its VM (shown Failed all the same).
#[derive(Debug, Clone, Default)]
pub struct OpGate(Arc<Mutex<Gate>>);

#[derive(Debug, Default)]
struct Gate {
    state: GateState,
    /// The VM's lock while this operation holds it (the libvirt hook refuses a start then).
    lock: Option<VmLock>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum GateState {
    #[default]
    Running,
    /// The operation is saving its success; it can no longer be given up.
    Succeeding,
    /// The operation failed and is undoing what it did, holding its VM.
    Undoing,
    /// Given up; the VM was released and the operation's thread must not act on it.
    Abandoned,
    /// Given up, and its thread has taken the VM back to undo what the late call did.
    Reclaimed,
}

/// What giving an operation up did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Already saving its success, or already given up: nothing.
    NotGivenUp,
    /// Given up, and its VM released.
    Released,
    /// Given up while undoing a failure: shown failed, its VM kept until the undo ends.
    VmKept,
}

impl OpGate {
    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn state(&self) -> GateState {
        self.gate().state
    }

    /// The engine gives the operation up, unless it is already saving its success.
    pub fn abandon(&self) -> GiveUp {
        let mut gate = self.gate();
        match gate.state {
            GateState::Running => {
                gate.state = GateState::Abandoned;
                // Dropping the lock lets the libvirt hook allow a start again.
                gate.lock = None;
                GiveUp::Released
            }
            GateState::Undoing => GiveUp::VmKept,
            GateState::Succeeding | GateState::Abandoned | GateState::Reclaimed => {
                GiveUp::NotGivenUp
            }
        }
    }

    pub fn is_abandoned(&self) -> bool {
        matches!(self.state(), GateState::Abandoned | GateState::Reclaimed)
    }

    /// Whether the operation was given up and its VM released, and its thread has not taken
    /// it back: the engine no longer counts the VM as this operation's.
    fn vm_released(&self) -> bool {
        self.state() == GateState::Abandoned
    }

    /// The operation is about to save its success: from now on it is not given up. False
    /// when it already was.
    pub fn succeed(&self) -> bool {
        let mut gate = self.gate();
        if gate.state == GateState::Running {
            gate.state = GateState::Succeeding;
        }
        gate.state == GateState::Succeeding
    }

    fn hold_lock(&self, lock: Option<VmLock>) {
        self.gate().lock = lock;
    }

    fn take_lock(&self) -> Option<VmLock> {
        self.gate().lock.take()
    }
}

impl OpContext {
    /// The VM this operation works on.
    pub fn vm_uuid(&self) -> &str {
        &self.vm_uuid
    }

    pub(crate) fn progress(&self, record: &SnapshotRecord, text: impl Into<String>) {
        let text = text.into();
        if !text.is_empty() {
            info!(vm = %record.vm_name, snapshot = %record.name, "{text}");
        }
        let _ = self.events.send(OpEvent::Progress {
            uuid: record.uuid.clone(),
            text,
        });
    }

    /// Saves a record, then tells the engine. A record that cannot be saved stops the operation:
    /// going on without the journal would break the crash-safety promise.
    pub(crate) fn save(&self, record: &SnapshotRecord) -> OpResult<()> {
        self.faults.journal_step();
        self.store
            .save(record)
            .map_err(|e| OpError::RecordWrite(format!("cannot write the snapshot record: {e}")))?;
        self.faults.journal_step();
        let _ = self.events.send(OpEvent::Saved(Box::new(record.clone())));
        Ok(())
    }

    /// Saves the record that ends a failed operation. Should even that fail (a full or failing
    /// state folder), the engine and the bus still learn that it failed, with a note that the
    /// record on disk is behind: the next start settles it from the journal.
    pub(crate) fn save_failed(&self, record: &mut SnapshotRecord) {
        if let Err(e) = self.save(record) {
            warn!(vm = %record.vm_name, snapshot = %record.name, error = %e, "the failed snapshot's record is not on disk");
            record.error = vmsnap_api::record_error(&format!(
                "{}; {e} (vmsnapd settles it again at its next start)",
                record.error
            ))
            .into();
            let _ = self.events.send(OpEvent::Saved(Box::new(record.clone())));
        }
    }

    pub(crate) fn restore_progress(&self, record: &RestoreRecord, text: impl Into<String>) {
        let text = text.into();
        if !text.is_empty() {
            info!(vm = %record.vm_name, snapshot = %record.snapshot_name, "{text}");
        }
        let _ = self.events.send(OpEvent::RestoreProgress {
            uuid: record.uuid.clone(),
            text,
        });
    }

    pub(crate) fn save_restore(&self, record: &RestoreRecord) -> OpResult<()> {
        self.faults.journal_step();
        self.store
            .save_restore(record)
            .map_err(|e| OpError::RecordWrite(format!("cannot write the restore record: {e}")))?;
        self.faults.journal_step();
        let _ = self
            .events
            .send(OpEvent::RestoreSaved(Box::new(record.clone())));
        Ok(())
    }

    /// Removes a deleted snapshot's record: the delete's last journal step.
    pub(crate) fn remove_record(&self, record: &SnapshotRecord) -> OpResult<()> {
        self.faults.journal_step();
        self.store
            .remove(record)
            .map_err(|e| OpError::RecordWrite(format!("cannot remove the snapshot record: {e}")))?;
        self.faults.journal_step();
        let _ = self.events.send(OpEvent::Removed {
            uuid: record.uuid.clone(),
        });
        Ok(())
    }

    /// As [`OpContext::save_failed`], for a restore.
    pub(crate) fn save_restore_failed(&self, record: &mut RestoreRecord) {
        if let Err(e) = self.save_restore(record) {
            warn!(vm = %record.vm_name, error = %e, "the failed restore's record is not on disk");
            record.error = vmsnap_api::record_error(&format!(
                "{}; {e} (vmsnapd settles it again at its next start)",
                record.error
            ));
            let _ = self
                .events
                .send(OpEvent::RestoreSaved(Box::new(record.clone())));
        }
    }

    pub(crate) fn lvm_tool(&self) -> vmsnap_lvm::Lvm {
        crate::backends::lvm::tool(&self.lvm)
    }

    fn finished(&self, vm_uuid: &str) {
        let _ = self.events.send(OpEvent::Finished {
            vm_uuid: vm_uuid.to_string(),
        });
    }

    /// Gives up the VM's lock before vmsnapd starts the VM itself: the libvirt hook would
    /// refuse the start otherwise. Nothing of the VM changes after that but its run state.
    pub(crate) fn release_vm_lock(&self) {
        drop(self.gate.take_lock());
    }

    /// Called before an operation acts on its VM after a failure (to undo what it did): marks
    /// it undoing, so that a deadline no longer releases the VM under the undo; or, when the
    /// engine already gave it up and released the VM, takes the VM back first, waiting until
    /// whatever runs on it now has finished.
    pub(crate) fn hold_vm(&self) {
        {
            let mut gate = self.gate.gate();
            match gate.state {
                GateState::Running => {
                    gate.state = GateState::Undoing;
                    return;
                }
                GateState::Abandoned => {}
                GateState::Succeeding | GateState::Undoing | GateState::Reclaimed => return,
            }
        }
        let (reply, granted) = tokio::sync::oneshot::channel();
        let asked = self.events.send(OpEvent::Reclaim {
            vm_uuid: self.vm_uuid.clone(),
            reply,
        });
        // Without an engine (vmsnapd is shutting down) nothing else runs on the VM either.
        if asked.is_ok() {
            let _ = granted.blocking_recv();
        }
        let lock = self.take_vm_lock_again();
        let mut gate = self.gate.gate();
        gate.state = GateState::Reclaimed;
        gate.lock = lock;
    }

    /// The VM's lock again, for an undo after a give-up: waits while another vmsnapd holds it.
    fn take_vm_lock_again(&self) -> Option<VmLock> {
        let what = "undoing what a call given up at its deadline did";
        loop {
            match self.vm_locks.take(&self.vm_uuid, what) {
                Ok(lock) => return Some(lock),
                Err(vm_lock::VmLockRefused::Held(by)) => {
                    info!(vm_uuid = %self.vm_uuid, held_by = %by, "waiting for the VM's lock to undo a late call");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(vm_lock::VmLockRefused::Unusable(e)) => {
                    warn!(error = %e, "no VM lock for the undo: the libvirt hook cannot refuse a start meanwhile");
                    return None;
                }
            }
        }
    }

    /// Starts `work` on a new operation thread, holding `lock` (the VM's, if taken) until it
    /// ends; the VM is released when it ends.
    pub fn spawn(
        self,
        vm_uuid: String,
        lock: Option<VmLock>,
        gate: OpGate,
        work: impl FnOnce(&OpContext) + Send + 'static,
    ) {
        let mut ctx = self.clone();
        gate.hold_lock(lock);
        ctx.gate = gate;
        ctx.vm_uuid = vm_uuid.clone();
        let spawned = std::thread::Builder::new()
            .name("libvirt-op".to_string())
            .spawn(move || {
                work(&ctx);
                ctx.release_vm_lock();
                // A VM released at a give-up and never taken back is no longer this
                // operation's: whatever runs on it now ends by itself.
                if !ctx.gate.vm_released() {
                    ctx.finished(&ctx.vm_uuid);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start an operation thread");
            self.finished(&vm_uuid);
        }
    }
}

impl OpContext {
    /// The settings and channels every operation shares; no VM lock held.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        hypervisor: Arc<dyn Hypervisor>,
        backends: Arc<Backends>,
        store: Store,
        vm_locks: VmLocks,
        config: &crate::config::Config,
        events: UnboundedSender<OpEvent>,
        faults: Faults,
    ) -> OpContext {
        OpContext {
            hypervisor,
            backends,
            store,
            freeze_timeout: config.freeze_timeout,
            require_quiesce: config.require_quiesce,
            failure_deadline: config.failure_deadline,
            restore_grace_period: config.restore_grace_period,
            quiesce: config.quiesce,
            verify_interval: config.verify_interval,
            lvm: config.lvm.clone(),
            rbd: config.rbd.clone(),
            events,
            faults,
            vm_locks,
            vm_uuid: String::new(),
            gate: OpGate::default(),
        }
    }
}

/// Fault injection for the crash-safety tests. In the daemon: when VMSNAP_TEST_CRASH_AT names
/// a crash point, the daemon dies there, as a SIGKILL or power cut would leave it; when
/// VMSNAP_TEST_PAUSE_AT names it, the operation waits 3 s there, for a test to act meanwhile
/// as another admin would. In the unit tests: a simulated crash before or after any journal
/// write.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    crash_at: Option<String>,
    pause_at: Option<String>,
    /// VMSNAP_TEST_CRASH_AT_JOURNAL: the daemon dies at this journal step (each write of a
    /// record is two steps, before and after it; counted from the daemon's start).
    journal_crash_at: Option<usize>,
    journal_steps: Arc<std::sync::atomic::AtomicUsize>,
    #[cfg(test)]
    pub journal: Option<Arc<sim_tests::JournalFaults>>,
}

impl Faults {
    // The update fills the test-only fields.
    #[allow(clippy::needless_update)]
    pub fn from_env() -> Faults {
        Faults {
            crash_at: std::env::var("VMSNAP_TEST_CRASH_AT").ok(),
            pause_at: std::env::var("VMSNAP_TEST_PAUSE_AT").ok(),
            journal_crash_at: std::env::var("VMSNAP_TEST_CRASH_AT_JOURNAL")
                .ok()
                .and_then(|n| n.parse().ok()),
            ..Faults::default()
        }
    }

    /// A named point in a flow.
    pub fn point(&self, name: &str) {
        if self.crash_at.as_deref() == Some(name) {
            warn!(point = name, "VMSNAP_TEST_CRASH_AT: aborting");
            std::process::abort();
        }
        if self.pause_at.as_deref() == Some(name) {
            warn!(point = name, "VMSNAP_TEST_PAUSE_AT: pausing 3 s");
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    /// Whether the daemon is to die at `name` (for points that must set something up first).
    pub fn crashes_at(&self, name: &str) -> bool {
        self.crash_at.as_deref() == Some(name)
    }

    /// Before and after every journal write.
    fn journal_step(&self) {
        let step = self
            .journal_steps
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        tracing::debug!(step, "journal step");
        if self.journal_crash_at == Some(step) {
            warn!(step, "VMSNAP_TEST_CRASH_AT_JOURNAL: aborting");
            std::process::abort();
        }
        #[cfg(test)]
        if let Some(journal) = &self.journal {
            journal.step();
        }
    }
}

/// RFC 3339 UTC time, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The message of an operation given up at its deadline while blocked in a call.
pub const ABANDONED: &str = "did not finish within failure_deadline: a call to libvirt or QEMU \
     was blocked (a stopped or hung QEMU?); what it did is undone when that call returns";

impl OpContext {
    /// Fails when the engine gave this operation up while it was blocked.
    /// Takes the VM back first (see [`OpContext::hold_vm`]): the caller undoes next.
    pub(crate) fn check_abandoned(&self, what: &str) -> OpResult<()> {
        if self.gate.is_abandoned() {
            self.hold_vm();
            Err(OpError::DeadlineExceeded(format!("the {what} {ABANDONED}")))
        } else {
            Ok(())
        }
    }
}

pub(crate) fn check_deadline(deadline: Instant, what: &str) -> OpResult<()> {
    if Instant::now() > deadline {
        Err(OpError::DeadlineExceeded(format!(
            "the {what} did not finish within failure_deadline"
        )))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;

    #[test]
    fn a_give_up_releases_the_vm_unless_the_operation_succeeds_or_undoes() {
        let gate = OpGate::default();
        assert_eq!(gate.abandon(), GiveUp::Released);
        assert!(gate.vm_released());
        assert!(!gate.succeed(), "a given-up operation does not succeed");
        assert_eq!(gate.abandon(), GiveUp::NotGivenUp, "once");

        let succeeding = OpGate::default();
        assert!(succeeding.succeed());
        assert_eq!(succeeding.abandon(), GiveUp::NotGivenUp);

        let undoing = OpGate::default();
        undoing.gate().state = GateState::Undoing;
        assert_eq!(undoing.abandon(), GiveUp::VmKept);
        assert!(!undoing.vm_released());
    }
}
