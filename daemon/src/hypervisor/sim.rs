//! The simulated hypervisor of the unit tests, over the simulated backend's world.

use std::time::Duration;

use super::{FreezeFailure, Host, Hypervisor, RunState, ThawGuardHandle};
use crate::backends::sim::{lock, SharedWorld, SimVm};
use crate::ops::{OpError, OpResult};

pub struct SimHypervisor {
    pub world: SharedWorld,
}

impl Hypervisor for SimHypervisor {
    fn session(&self) -> OpResult<Box<dyn Host>> {
        Ok(Box::new(SimHost {
            world: self.world.clone(),
        }))
    }
}

pub struct SimHost {
    world: SharedWorld,
}

/// Thaws when dropped armed, as the real guard process does when its pipe closes.
struct SimGuard {
    world: SharedWorld,
    vm: String,
    armed: bool,
}

impl ThawGuardHandle for SimGuard {
    fn disarm(mut self: Box<Self>) -> std::io::Result<()> {
        self.armed = false;
        Ok(())
    }
}

impl Drop for SimGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Some(vm) = lock(&self.world).vms.get_mut(&self.vm) {
                vm.frozen = false;
            }
        }
    }
}

fn tag_text(xml: &str, tag: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let text = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name(tag))?
        .text()?
        .to_string();
    Some(text)
}

impl SimHost {
    fn with_vm<T>(&self, vm: &str, f: impl FnOnce(&mut SimVm) -> T) -> OpResult<T> {
        let mut world = lock(&self.world);
        let found = world
            .vms
            .get_mut(vm)
            .ok_or_else(|| OpError::VmNotFound(vm.to_string()))?;
        Ok(f(found))
    }

    fn call(&self, what: &str) -> OpResult<()> {
        lock(&self.world).call(what)
    }
}

impl Host for SimHost {
    fn run_state(&self, vm: &str) -> OpResult<RunState> {
        lock(&self.world).asked.push(format!("run_state {vm}"));
        self.with_vm(vm, |v| {
            if v.active {
                RunState::Running
            } else {
                RunState::ShutOff
            }
        })
    }

    fn is_active(&self, vm: &str) -> OpResult<bool> {
        self.with_vm(vm, |v| v.active)
    }

    fn exists(&self, vm: &str) -> OpResult<bool> {
        Ok(lock(&self.world).vms.contains_key(vm))
    }

    fn definition(&self, vm: &str) -> OpResult<String> {
        self.with_vm(vm, |v| v.xml.clone())
    }

    fn public_definition(&self, vm: &str) -> OpResult<String> {
        self.definition(vm)
    }

    fn current_definition(&self, vm: &str) -> OpResult<String> {
        self.definition(vm)
    }

    fn disk_capacity(&self, _vm: &str, _target: &str) -> OpResult<u64> {
        Ok(1 << 30)
    }

    fn prepare_thaw_guard(&self, vm: &str, _deadline: Duration) {
        lock(&self.world)
            .asked
            .push(format!("prepare_thaw_guard {vm}"));
    }

    fn known_domains(&self) -> Option<crate::libvirt::InventoryView> {
        let world = lock(&self.world);
        if !world.inventory {
            return None;
        }
        let vms = world
            .vms
            .values()
            .filter_map(|v| {
                let state = if v.active {
                    vmsnap_api::VmState::Running
                } else {
                    vmsnap_api::VmState::ShutOff
                };
                crate::domain::parse_domain(&v.xml, state, &crate::disks::SysfsLvmProbe)
                    .ok()
                    .map(std::sync::Arc::new)
            })
            .collect();
        Some(crate::libvirt::InventoryView {
            vms: std::sync::Arc::new(vms),
            changed: Default::default(),
        })
    }

    fn arm_thaw_guard(&self, vm: &str, _deadline: Duration) -> OpResult<Box<dyn ThawGuardHandle>> {
        Ok(Box::new(SimGuard {
            world: self.world.clone(),
            vm: vm.to_string(),
            armed: true,
        }))
    }

    fn freeze(
        &self,
        vm: &str,
        _answer_within: Duration,
        _only_disks: Option<&[String]>,
    ) -> Result<u32, FreezeFailure> {
        let failure = |message: String| FreezeFailure {
            timed_out: false,
            message,
        };
        self.call("freeze").map_err(|e| failure(e.to_string()))?;
        self.with_vm(vm, |v| {
            v.frozen = true;
            2
        })
        .map_err(|e| failure(e.to_string()))
    }

    fn thaw(&self, vm: &str) -> Result<u32, String> {
        self.with_vm(vm, |v| {
            v.frozen = false;
            2
        })
        .map_err(|e| e.to_string())
    }

    fn define(&self, xml: &str) -> OpResult<String> {
        self.call("define")?;
        let uuid = tag_text(xml, "uuid").unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let with_uuid = if tag_text(xml, "uuid").is_some() {
            xml.to_string()
        } else {
            xml.replacen("</name>", &format!("</name><uuid>{uuid}</uuid>"), 1)
        };
        let mut world = lock(&self.world);
        let vm = world.vms.entry(uuid.clone()).or_default();
        vm.xml = with_uuid;
        Ok(uuid)
    }

    fn lookup_name(&self, name: &str) -> OpResult<Option<String>> {
        Ok(lock(&self.world)
            .vms
            .iter()
            .find(|(_, v)| tag_text(&v.xml, "name").as_deref() == Some(name))
            .map(|(uuid, _)| uuid.clone()))
    }

    fn start(&self, vm: &str) -> OpResult<()> {
        self.call("start")?;
        self.with_vm(vm, |v| v.active = true)
    }

    fn shutdown(&self, vm: &str) -> OpResult<()> {
        self.with_vm(vm, |v| v.active = false)
    }

    fn destroy(&self, vm: &str) -> OpResult<()> {
        self.with_vm(vm, |v| v.active = false)
    }

    fn undefine(&self, vm: &str) -> OpResult<()> {
        lock(&self.world).vms.remove(vm);
        Ok(())
    }

    fn libvirt(&self) -> Option<&virt::connect::Connect> {
        None
    }
}
