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
pub mod vm_lock;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

pub use self::error::{OpError, OpResult, StorageContext};
use crate::backends::Backends;
use crate::config::{LvmConfig, Quiesce};
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
    /// The first record of an operation could not be written: nothing was started.
    NotStarted {
        uuid: String,
        error: String,
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
    pub events: UnboundedSender<OpEvent>,
    pub faults: Faults,
    pub vm_locks: VmLocks,
    /// The lock on this operation's VM, while it holds one (set by `spawn`).
    held_lock: Arc<Mutex<Option<VmLock>>>,
    /// Shared with the engine's deadline watch (set by `spawn`).
    pub gate: OpGate,
}

/// Where an operation stands for the engine's deadline watch: an operation blocked in a call
/// past its deadline is given up (Abandoned) by the engine, which reports it failed at once;
/// the operation's thread, when the call returns, sees that and undoes what it did. Finishing
/// with success and giving up exclude each other.
#[derive(Debug, Clone, Default)]
pub struct OpGate(Arc<Mutex<GateState>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum GateState {
    #[default]
    Running,
    /// The operation is saving its success; it can no longer be given up.
    Succeeding,
    Abandoned,
}

impl OpGate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The engine gives the operation up, unless it is already saving its success.
    pub fn abandon(&self) -> bool {
        let mut state = self.state();
        if *state == GateState::Running {
            *state = GateState::Abandoned;
            true
        } else {
            false
        }
    }

    pub fn is_abandoned(&self) -> bool {
        *self.state() == GateState::Abandoned
    }

    /// The operation is about to save its success: from now on it is not given up. False
    /// when it already was.
    pub fn succeed(&self) -> bool {
        let mut state = self.state();
        if *state == GateState::Running {
            *state = GateState::Succeeding;
        }
        *state == GateState::Succeeding
    }
}

impl OpContext {
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
            ));
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
        let lock = self
            .held_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(lock);
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
        ctx.held_lock = Arc::new(Mutex::new(lock));
        ctx.gate = gate;
        let released = vm_uuid.clone();
        let spawned = std::thread::Builder::new()
            .name("libvirt-op".to_string())
            .spawn(move || {
                work(&ctx);
                ctx.release_vm_lock();
                ctx.finished(&released);
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
            events,
            faults,
            vm_locks,
            held_lock: Arc::new(Mutex::new(None)),
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
    pub(crate) fn check_abandoned(&self, what: &str) -> OpResult<()> {
        if self.gate.is_abandoned() {
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
