//! The engine: vmsnapd's state and the one place requests are decided.
//!
//! It knows nothing of D-Bus. The bus layer turns method calls into [`Request`]s and applies the
//! [`Change`]s the engine emits to the exported objects, so the engine can be driven and checked
//! in tests without a bus.

use std::collections::{BTreeMap, HashMap};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};
use vmsnap_api::{validate_snapshot_name, ExcludedVolume, SnapshotPhase};

use crate::domain::VmInfo;
use crate::libvirt::LibvirtEvent;
use crate::shutdown::Shutdown;
use crate::snapshot::{self, OpContext, OpEvent};
use crate::store::{SnapshotRecord, Step, RECORD_VERSION};

/// Errors the engine answers requests with. The bus layer maps each to a named D-Bus error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("VM '{0}' not found")]
    VmNotFound(String),
    #[error("snapshot '{name}' of VM '{vm}' not found")]
    SnapshotNotFound { vm: String, name: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("VM '{vm}' already has a snapshot named '{name}'")]
    AlreadyExists { vm: String, name: String },
    #[error("{0}")]
    ExcludedDisks(String),
    #[error("VM '{vm}' is busy: {what}; try again when it has finished")]
    Busy { vm: String, what: String },
    #[error("{0}")]
    InvalidState(String),
    #[error("vmsnapd is shutting down")]
    ShuttingDown,
}

/// Options of a new snapshot.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub description: String,
    pub allow_excluded: bool,
}

/// Everything the bus layer can ask of the engine.
#[derive(Debug)]
pub enum Request {
    /// The UUID of the VM with this name or UUID.
    FindVm {
        key: String,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
    /// All VMs, sorted by name.
    ListVms { reply: oneshot::Sender<Vec<VmInfo>> },
    /// Starts a snapshot; answers with its UUID as soon as it is recorded.
    CreateSnapshot {
        vm: String,
        name: String,
        options: CreateOptions,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
    /// Starts deleting a snapshot.
    DeleteSnapshot {
        uuid: String,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Snapshot UUIDs of one VM (or all when `vm` is empty), oldest first.
    ListSnapshots {
        vm: String,
        reply: oneshot::Sender<Result<Vec<String>, EngineError>>,
    },
    FindSnapshot {
        vm: String,
        name: String,
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
}

/// What the bus layer must reflect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    VmAdded(VmInfo),
    VmUpdated(VmInfo),
    VmRemoved { uuid: String },
    Libvirt { connected: bool, error: String },
    SnapshotAdded(Box<SnapshotRecord>),
    SnapshotUpdated(Box<SnapshotRecord>),
    SnapshotProgress { uuid: String, text: String },
    SnapshotRemoved { uuid: String },
}

/// Whether the engine has heard from libvirt at least once (connected with an inventory, or
/// failed to connect): until then the inventory is not worth serving.
pub type Settled = watch::Receiver<bool>;

pub struct Engine {
    vms: BTreeMap<String, VmInfo>,
    connected: bool,
    changes: mpsc::UnboundedSender<Change>,
    settled: watch::Sender<bool>,
    /// Snapshot records by snapshot UUID.
    snapshots: BTreeMap<String, SnapshotRecord>,
    /// VMs with an operation running (by VM UUID), and what it is. One operation per VM at a
    /// time: a second request gets Busy rather than queueing behind a long merge.
    busy: HashMap<String, String>,
    /// Settings for operations; None in tests that run no operation.
    ops: Option<OpContext>,
    shutting_down: bool,
    /// Set on (re)connecting to libvirt: unfinished records are settled after the next
    /// inventory.
    settle_pending: bool,
}

impl Engine {
    pub fn new(changes: mpsc::UnboundedSender<Change>) -> (Engine, Settled) {
        let (settled, settled_rx) = watch::channel(false);
        (
            Engine {
                vms: BTreeMap::new(),
                connected: false,
                changes,
                settled,
                snapshots: BTreeMap::new(),
                busy: HashMap::new(),
                ops: None,
                shutting_down: false,
                settle_pending: false,
            },
            settled_rx,
        )
    }

    /// Enables snapshot operations and loads the records found on disk. Unsettled ones are
    /// settled once libvirt is reachable.
    pub fn with_operations(mut self, ops: OpContext) -> Self {
        let (records, problems) = ops.store.load_all();
        for problem in problems {
            warn!("skipping an unreadable snapshot record: {problem}");
        }
        for record in records {
            self.emit(Change::SnapshotAdded(Box::new(record.clone())));
            self.snapshots.insert(record.uuid.clone(), record);
        }
        self.ops = Some(ops);
        self
    }

    /// Runs until shutdown or until every request sender is gone. At shutdown, running
    /// operations are waited for (each is bounded by failure_deadline), so none is cut off
    /// mid-step by the daemon itself.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut libvirt: mpsc::UnboundedReceiver<LibvirtEvent>,
        mut op_events: mpsc::UnboundedReceiver<OpEvent>,
        mut shutdown: Shutdown,
    ) {
        loop {
            tokio::select! {
                () = shutdown.wait(), if !self.shutting_down => {
                    self.shutting_down = true;
                    if self.busy.is_empty() {
                        break;
                    }
                    info!(operations = self.busy.len(), "waiting for running operations to finish");
                }
                Some(event) = libvirt.recv() => self.handle_libvirt(event),
                Some(event) = op_events.recv() => {
                    self.handle_op_event(event);
                    if self.shutting_down && self.busy.is_empty() {
                        break;
                    }
                }
                request = requests.recv() => match request {
                    Some(request) => self.handle_request(request),
                    None => break,
                },
            }
        }
    }

    pub fn handle_op_event(&mut self, event: OpEvent) {
        match event {
            OpEvent::Progress { uuid, text } => self.emit(Change::SnapshotProgress { uuid, text }),
            OpEvent::Saved(record) => {
                self.snapshots
                    .insert(record.uuid.clone(), (*record).clone());
                self.emit(Change::SnapshotUpdated(record));
            }
            OpEvent::Removed { uuid } => {
                self.snapshots.remove(&uuid);
                self.emit(Change::SnapshotRemoved { uuid });
            }
            OpEvent::Finished { vm_uuid } => {
                self.busy.remove(&vm_uuid);
            }
        }
    }

    pub fn handle_request(&mut self, request: Request) {
        // A dropped reply means the caller went away; there is nobody to tell.
        match request {
            Request::FindVm { key, reply } => {
                let _ = reply.send(self.find_vm(&key).map(|vm| vm.uuid.clone()));
            }
            Request::ListVms { reply } => {
                let mut vms: Vec<VmInfo> = self.vms.values().cloned().collect();
                vms.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(vms);
            }
            Request::CreateSnapshot {
                vm,
                name,
                options,
                reply,
            } => {
                let _ = reply.send(self.create_snapshot(&vm, name, options));
            }
            Request::DeleteSnapshot { uuid, reply } => {
                let _ = reply.send(self.delete_snapshot(&uuid));
            }
            Request::ListSnapshots { vm, reply } => {
                let _ = reply.send(self.list_snapshots(&vm));
            }
            Request::FindSnapshot { vm, name, reply } => {
                let found = self
                    .find_vm(&vm)
                    .map(|vm| vm.uuid.clone())
                    .and_then(|vm_uuid| {
                        self.snapshots
                            .values()
                            .find(|s| s.vm_uuid == vm_uuid && s.name == name)
                            .map(|s| s.uuid.clone())
                            .ok_or(EngineError::SnapshotNotFound {
                                vm: vm.clone(),
                                name: name.clone(),
                            })
                    });
                let _ = reply.send(found);
            }
        }
    }

    fn ops(&self) -> Result<&OpContext, EngineError> {
        if self.shutting_down {
            return Err(EngineError::ShuttingDown);
        }
        self.ops
            .as_ref()
            .ok_or_else(|| EngineError::InvalidState("snapshots are not enabled".to_string()))
    }

    fn check_idle(&self, vm: &VmInfo) -> Result<(), EngineError> {
        match self.busy.get(&vm.uuid) {
            Some(what) => Err(EngineError::Busy {
                vm: vm.name.clone(),
                what: what.clone(),
            }),
            None => Ok(()),
        }
    }

    fn create_snapshot(
        &mut self,
        vm_key: &str,
        name: String,
        options: CreateOptions,
    ) -> Result<String, EngineError> {
        let vm = self.find_vm(vm_key)?.clone();
        if !self.connected {
            return Err(EngineError::InvalidState(
                "libvirt is unavailable; try again when vmsnapd has reconnected".to_string(),
            ));
        }
        validate_snapshot_name(&name).map_err(EngineError::InvalidName)?;
        if self
            .snapshots
            .values()
            .any(|s| s.vm_uuid == vm.uuid && s.name == name)
        {
            return Err(EngineError::AlreadyExists {
                vm: vm.name.clone(),
                name,
            });
        }
        self.check_idle(&vm)?;
        let excluded: Vec<ExcludedVolume> = vm
            .disks
            .iter()
            .filter(|d| d.backend == vmsnap_api::DiskBackend::Excluded.as_str())
            .map(|d| ExcludedVolume {
                target: d.target.clone(),
                reason: d.reason.clone(),
            })
            .collect();
        if !excluded.is_empty() && !options.allow_excluded {
            return Err(EngineError::ExcludedDisks(snapshot::excluded_message(
                &excluded,
            )));
        }
        let ops = self.ops()?.clone();
        let record = SnapshotRecord {
            version: RECORD_VERSION,
            uuid: uuid::Uuid::new_v4().to_string(),
            name,
            description: options.description,
            vm_name: vm.name.clone(),
            vm_uuid: vm.uuid.clone(),
            phase: SnapshotPhase::InProgress,
            ready_to_use: false,
            creation_time: snapshot::now_rfc3339(),
            indications: Vec::new(),
            error: String::new(),
            freeze_duration_ms: 0,
            frozen_filesystems: 0,
            step: Step::Planned,
            domain_xml: String::new(),
            volumes: Vec::new(),
            excluded,
            extra_state: Vec::new(),
        };
        ops.store.save(&record).map_err(|e| {
            EngineError::InvalidState(format!("cannot write the snapshot record: {e}"))
        })?;
        info!(vm = %vm.name, snapshot = %record.name, "creating snapshot");
        let uuid = record.uuid.clone();
        self.busy.insert(
            vm.uuid.clone(),
            format!("snapshot '{}' is being created", record.name),
        );
        self.snapshots.insert(uuid.clone(), record.clone());
        self.emit(Change::SnapshotAdded(Box::new(record.clone())));
        let allow = options.allow_excluded;
        ops.spawn(vm.uuid, move |ctx| snapshot::create(ctx, record, allow));
        Ok(uuid)
    }

    fn delete_snapshot(&mut self, uuid: &str) -> Result<(), EngineError> {
        let record =
            self.snapshots
                .get(uuid)
                .cloned()
                .ok_or_else(|| EngineError::SnapshotNotFound {
                    vm: String::new(),
                    name: uuid.to_string(),
                })?;
        if matches!(
            record.phase,
            SnapshotPhase::InProgress | SnapshotPhase::Deleting
        ) {
            return Err(EngineError::InvalidState(format!(
                "snapshot '{}' is {}; it can be deleted once it has settled",
                record.name,
                record.phase.as_str()
            )));
        }
        if let Some(what) = self.busy.get(&record.vm_uuid) {
            return Err(EngineError::Busy {
                vm: record.vm_name.clone(),
                what: what.clone(),
            });
        }
        let ops = self.ops()?.clone();
        let others = self.others_of(&record);
        self.busy.insert(
            record.vm_uuid.clone(),
            format!("snapshot '{}' is being deleted", record.name),
        );
        info!(vm = %record.vm_name, snapshot = %record.name, "deleting snapshot");
        let vm_uuid = record.vm_uuid.clone();
        // A Failed snapshot is deleted the same way: its merge steps find nothing left to do
        // or resume an interrupted merge, and leftover overlays are removed.
        ops.spawn(vm_uuid, move |ctx| snapshot::delete(ctx, record, others));
        Ok(())
    }

    /// Every other snapshot record, of every VM: after restores, images are shared across
    /// chains and VMs, and a delete must see every claim on them.
    fn others_of(&self, record: &SnapshotRecord) -> Vec<SnapshotRecord> {
        self.snapshots
            .values()
            .filter(|s| s.uuid != record.uuid)
            .cloned()
            .collect()
    }

    fn list_snapshots(&self, vm_key: &str) -> Result<Vec<String>, EngineError> {
        let vm_uuid = if vm_key.is_empty() {
            None
        } else {
            Some(self.find_vm(vm_key)?.uuid.clone())
        };
        let mut list: Vec<&SnapshotRecord> = self
            .snapshots
            .values()
            .filter(|s| vm_uuid.as_ref().is_none_or(|u| *u == s.vm_uuid))
            .collect();
        list.sort_by(|a, b| {
            (a.creation_time.as_str(), a.name.as_str())
                .cmp(&(b.creation_time.as_str(), b.name.as_str()))
        });
        Ok(list.into_iter().map(|s| s.uuid.clone()).collect())
    }

    /// Starts settling every record left unfinished by an earlier vmsnapd, one VM at a time.
    fn settle_unfinished(&mut self) {
        let Some(ops) = self.ops.clone() else {
            return;
        };
        if self.shutting_down {
            return;
        }
        let unfinished: Vec<SnapshotRecord> = self
            .snapshots
            .values()
            .filter(|s| matches!(s.phase, SnapshotPhase::InProgress | SnapshotPhase::Deleting))
            .cloned()
            .collect();
        for record in unfinished {
            if self.busy.contains_key(&record.vm_uuid) {
                continue;
            }
            let others = self.others_of(&record);
            self.busy.insert(
                record.vm_uuid.clone(),
                format!(
                    "snapshot '{}' is being settled after a restart",
                    record.name
                ),
            );
            let vm_uuid = record.vm_uuid.clone();
            ops.clone()
                .spawn(vm_uuid, move |ctx| snapshot::recover(ctx, record, others));
        }
    }

    fn find_vm(&self, key: &str) -> Result<&VmInfo, EngineError> {
        if key.is_empty() {
            return Err(EngineError::InvalidArgument(
                "a VM name or UUID is required".to_string(),
            ));
        }
        if let Some(vm) = self.vms.get(&key.to_ascii_lowercase()) {
            return Ok(vm);
        }
        self.vms
            .values()
            .find(|vm| vm.name == key)
            .ok_or_else(|| EngineError::VmNotFound(key.to_string()))
    }

    pub fn handle_libvirt(&mut self, event: LibvirtEvent) {
        match event {
            LibvirtEvent::Connected => {
                self.connected = true;
                self.settle_pending = true;
                self.emit(Change::Libvirt {
                    connected: true,
                    error: String::new(),
                });
            }
            LibvirtEvent::Unavailable(error) => {
                // The objects stay as last seen: VMs keep running without libvirtd, and
                // clients can tell the data is stale from the manager's LibvirtConnected.
                self.connected = false;
                self.emit(Change::Libvirt {
                    connected: false,
                    error,
                });
                self.settled.send_replace(true);
            }
            LibvirtEvent::Inventory(vms) => {
                self.apply_inventory(vms);
                self.settled.send_replace(true);
                if std::mem::take(&mut self.settle_pending) {
                    self.settle_unfinished();
                }
            }
        }
    }

    fn apply_inventory(&mut self, vms: Vec<VmInfo>) {
        let mut seen = BTreeMap::new();
        for vm in vms {
            seen.insert(vm.uuid.to_ascii_lowercase(), vm);
        }
        let gone: Vec<String> = self
            .vms
            .keys()
            .filter(|uuid| !seen.contains_key(*uuid))
            .cloned()
            .collect();
        for uuid in gone {
            if let Some(vm) = self.vms.remove(&uuid) {
                info!(vm = %vm.name, uuid = %vm.uuid, "VM removed");
                self.emit(Change::VmRemoved { uuid: vm.uuid });
            }
        }
        for (key, vm) in seen {
            match self.vms.get(&key) {
                None => {
                    info!(vm = %vm.name, uuid = %vm.uuid, "VM added");
                    self.emit(Change::VmAdded(vm.clone()));
                }
                Some(old) if *old != vm => self.emit(Change::VmUpdated(vm.clone())),
                Some(_) => continue,
            }
            self.vms.insert(key, vm);
        }
    }

    fn emit(&self, change: Change) {
        // The bus layer only goes away at shutdown.
        let _ = self.changes.send(change);
    }
}

#[cfg(test)]
mod tests {
    use vmsnap_api::{AgentState, VmState};

    use super::*;

    fn vm(name: &str, uuid: &str, state: VmState) -> VmInfo {
        VmInfo {
            name: name.to_string(),
            uuid: uuid.to_string(),
            state,
            agent: AgentState::NotConfigured,
            disks: Vec::new(),
        }
    }

    fn engine() -> (Engine, mpsc::UnboundedReceiver<Change>, Settled) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (engine, settled) = Engine::new(tx);
        (engine, rx, settled)
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Change>) -> Vec<Change> {
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            out.push(c);
        }
        out
    }

    const A: &str = "11111111-1111-1111-1111-111111111111";
    const B: &str = "22222222-2222-2222-2222-222222222222";

    #[test]
    fn inventory_diff_emits_added_updated_removed() {
        let (mut engine, mut rx, settled) = engine();
        assert!(!*settled.borrow());
        engine.handle_libvirt(LibvirtEvent::Inventory(vec![
            vm("a", A, VmState::Running),
            vm("b", B, VmState::ShutOff),
        ]));
        assert!(*settled.borrow());
        assert_eq!(
            drain(&mut rx),
            vec![
                Change::VmAdded(vm("a", A, VmState::Running)),
                Change::VmAdded(vm("b", B, VmState::ShutOff)),
            ]
        );
        // Same inventory: nothing to say.
        engine.handle_libvirt(LibvirtEvent::Inventory(vec![
            vm("a", A, VmState::Running),
            vm("b", B, VmState::ShutOff),
        ]));
        assert!(drain(&mut rx).is_empty());
        // b started, a undefined.
        engine.handle_libvirt(LibvirtEvent::Inventory(vec![vm("b", B, VmState::Running)]));
        assert_eq!(
            drain(&mut rx),
            vec![
                Change::VmRemoved {
                    uuid: A.to_string()
                },
                Change::VmUpdated(vm("b", B, VmState::Running)),
            ]
        );
    }

    #[test]
    fn losing_libvirt_keeps_objects_and_reports_it() {
        let (mut engine, mut rx, settled) = engine();
        engine.handle_libvirt(LibvirtEvent::Connected);
        engine.handle_libvirt(LibvirtEvent::Inventory(vec![vm("a", A, VmState::Running)]));
        drain(&mut rx);
        engine.handle_libvirt(LibvirtEvent::Unavailable("gone".into()));
        assert!(*settled.borrow());
        assert_eq!(
            drain(&mut rx),
            vec![Change::Libvirt {
                connected: false,
                error: "gone".into()
            }]
        );
        let (reply, mut answer) = oneshot::channel();
        engine.handle_request(Request::FindVm {
            key: "a".into(),
            reply,
        });
        assert_eq!(answer.try_recv().ok(), Some(Ok(A.to_string())));
    }

    fn snapshot_record(name: &str, phase: SnapshotPhase) -> SnapshotRecord {
        SnapshotRecord {
            version: RECORD_VERSION,
            uuid: format!("uuid-{name}"),
            name: name.to_string(),
            description: String::new(),
            vm_name: "a".into(),
            vm_uuid: A.into(),
            phase,
            ready_to_use: phase == SnapshotPhase::Succeeded,
            creation_time: "2026-11-26T14:00:00Z".into(),
            indications: vec![],
            error: String::new(),
            freeze_duration_ms: 0,
            frozen_filesystems: 0,
            step: Step::Done,
            domain_xml: String::new(),
            volumes: vec![],
            excluded: vec![],
            extra_state: vec![],
        }
    }

    #[test]
    fn unsettled_snapshots_cannot_be_deleted_and_busy_vms_refuse_work() {
        let (mut engine, _rx, _settled) = engine();
        engine.handle_libvirt(LibvirtEvent::Connected);
        engine.handle_libvirt(LibvirtEvent::Inventory(vec![vm("a", A, VmState::Running)]));
        for phase in [SnapshotPhase::InProgress, SnapshotPhase::Deleting] {
            let record = snapshot_record("s", phase);
            engine.snapshots.insert(record.uuid.clone(), record);
            assert!(matches!(
                engine.delete_snapshot("uuid-s"),
                Err(EngineError::InvalidState(m)) if m.contains("once it has settled")
            ));
        }
        let done = snapshot_record("done", SnapshotPhase::Succeeded);
        engine.snapshots.insert(done.uuid.clone(), done);
        engine
            .busy
            .insert(A.into(), "snapshot 's' is being created".into());
        assert!(matches!(
            engine.delete_snapshot("uuid-done"),
            Err(EngineError::Busy { .. })
        ));
        assert!(matches!(
            engine.create_snapshot("a", "new".into(), CreateOptions::default()),
            Err(EngineError::Busy { .. })
        ));
        // Name rules and uniqueness come before anything else.
        assert!(matches!(
            engine.create_snapshot("a", "-x".into(), CreateOptions::default()),
            Err(EngineError::InvalidName(_))
        ));
        assert!(matches!(
            engine.create_snapshot("a", "done".into(), CreateOptions::default()),
            Err(EngineError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn find_vm_by_name_or_uuid() {
        let (mut engine, _rx, _settled) = engine();
        engine.handle_libvirt(LibvirtEvent::Inventory(vec![vm("a", A, VmState::Running)]));
        for (key, expected) in [
            ("a", Ok(A.to_string())),
            (A, Ok(A.to_string())),
            ("11111111-1111-1111-1111-111111111111", Ok(A.to_string())),
            ("nope", Err(EngineError::VmNotFound("nope".into()))),
        ] {
            let (reply, mut answer) = oneshot::channel();
            engine.handle_request(Request::FindVm {
                key: key.into(),
                reply,
            });
            assert_eq!(answer.try_recv().ok(), Some(expected), "{key}");
        }
        let (reply, mut answer) = oneshot::channel();
        engine.handle_request(Request::FindVm {
            key: String::new(),
            reply,
        });
        assert!(matches!(
            answer.try_recv(),
            Ok(Err(EngineError::InvalidArgument(_)))
        ));
    }
}
