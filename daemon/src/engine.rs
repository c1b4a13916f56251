//! The engine: vmsnapd's state and the one place requests are decided.
//!
//! It knows nothing of D-Bus. The bus layer turns method calls into [`Request`]s and applies the
//! [`Change`]s the engine emits to the exported objects, so the engine can be driven and checked
//! in tests without a bus.

use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

use crate::domain::VmInfo;
use crate::libvirt::LibvirtEvent;
use crate::shutdown::Shutdown;

/// Errors the engine answers requests with. The bus layer maps each to a named D-Bus error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("VM '{0}' not found")]
    VmNotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
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
}

/// What the bus layer must reflect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    VmAdded(VmInfo),
    VmUpdated(VmInfo),
    VmRemoved { uuid: String },
    Libvirt { connected: bool, error: String },
}

/// Whether the engine has heard from libvirt at least once (connected with an inventory, or
/// failed to connect): until then the inventory is not worth serving.
pub type Settled = watch::Receiver<bool>;

pub struct Engine {
    vms: BTreeMap<String, VmInfo>,
    connected: bool,
    changes: mpsc::UnboundedSender<Change>,
    settled: watch::Sender<bool>,
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
            },
            settled_rx,
        )
    }

    /// Runs until shutdown or until every request sender is gone.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut libvirt: mpsc::UnboundedReceiver<LibvirtEvent>,
        mut shutdown: Shutdown,
    ) {
        loop {
            tokio::select! {
                () = shutdown.wait() => break,
                Some(event) = libvirt.recv() => self.handle_libvirt(event),
                request = requests.recv() => match request {
                    Some(request) => self.handle_request(request),
                    None => break,
                },
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
