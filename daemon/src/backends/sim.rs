//! The simulated backend of the unit tests: volumes are entries in an in-memory world (shared
//! with the simulated hypervisor), each holding a number that stands for its data. Every call
//! that changes something can be made to fail (`World::fail_at`), so the flows' rollback is
//! tested at each one. In-place restores take two journaled steps, as LVM's do.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vmsnap_api::{DiskInfo, VolumeRestore};

use super::{BeforeStep, Env, VolumeBackend};
use crate::ops::{OpError, OpResult};
use crate::store::{Artifact, RestoreRecord, SnapshotRecord, VolumeRecord};

/// The simulated backend's part of a volume record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimVolume {
    /// Which simulated backend made it (a test host has two, like LVM and qcow2 on one VM).
    pub kind: String,
    /// The disk's image, whose data the snapshot copied.
    pub origin: String,
}

/// Everything the simulation holds: images (path to data), VMs, and the fault plan.
#[derive(Debug, Default)]
pub struct World {
    pub images: std::collections::BTreeMap<String, u64>,
    pub vms: std::collections::BTreeMap<String, SimVm>,
    /// Counts the calls that change something; the one numbered `fail_at` fails, and the
    /// daemon dies at the one numbered `crash_at` (before it has any effect).
    pub calls: usize,
    pub fail_at: Option<usize>,
    pub crash_at: Option<usize>,
    /// At this call, the engine gives the operation up (as if the call were blocked past the
    /// deadline); the call itself then completes, late.
    pub abandon_at: Option<(usize, crate::ops::OpGate)>,
    /// Whether the host shows an inventory (`Host::known_domains`) of these VMs.
    pub inventory: bool,
    /// What the host was asked, in order (reads and hints that no fault plan counts).
    pub asked: Vec<String>,
}

/// A simulated VM.
#[derive(Debug, Clone, Default)]
pub struct SimVm {
    pub xml: String,
    pub active: bool,
    pub frozen: bool,
}

impl World {
    /// A fallible call: fails if it is the one planned to.
    pub fn call(&mut self, what: &str) -> OpResult<()> {
        self.calls += 1;
        if self.crash_at == Some(self.calls) {
            std::panic::panic_any(crate::ops::sim_tests::SimulatedCrash);
        }
        if let Some((at, gate)) = &self.abandon_at {
            if *at == self.calls {
                gate.abandon();
            }
        }
        if self.fail_at == Some(self.calls) {
            Err(OpError::Storage(format!(
                "injected failure at call {} ({what})",
                self.calls
            )))
        } else {
            Ok(())
        }
    }
}

pub type SharedWorld = Arc<Mutex<World>>;

pub fn lock(world: &SharedWorld) -> MutexGuard<'_, World> {
    world
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct SimBackend {
    pub world: SharedWorld,
    pub kind: &'static str,
    /// The disks it takes.
    pub targets: &'static [&'static str],
}

fn sim(volume: &VolumeRecord) -> OpResult<&SimVolume> {
    match &volume.artifact {
        Artifact::Sim(s) => Ok(s),
        _ => Err(OpError::Refused("not a simulated volume".into())),
    }
}

/// Where an in-place restore stages the data before switching it in.
fn staged(origin: &str) -> String {
    format!("{origin}.restoring")
}

impl VolumeBackend for SimBackend {
    fn name(&self) -> &'static str {
        self.kind
    }

    fn takes(&self, disk: &DiskInfo) -> bool {
        disk.backend == vmsnap_api::DiskBackend::Qcow2.as_str()
            && self.targets.contains(&disk.target.as_str())
    }

    fn owns(&self, volume: &VolumeRecord) -> bool {
        matches!(&volume.artifact, Artifact::Sim(s) if s.kind == self.kind)
    }

    fn plan(
        &self,
        _env: &Env,
        snapshot: &SnapshotRecord,
        _live_xml: &str,
        disk: &DiskInfo,
    ) -> OpResult<VolumeRecord> {
        let world = lock(&self.world);
        if !world.images.contains_key(&disk.source) {
            return Err(OpError::Refused(format!(
                "disk {}: {} is missing",
                disk.target, disk.source
            )));
        }
        Ok(VolumeRecord {
            target: disk.target.clone(),
            image: format!("{}@{}", disk.source, snapshot.uuid),
            virtual_size: 1 << 30,
            artifact: Artifact::Sim(SimVolume {
                kind: self.kind.to_string(),
                origin: disk.source.clone(),
            }),
        })
    }

    fn prepare(
        &self,
        _env: &Env,
        _snapshot: &SnapshotRecord,
        _volumes: &[VolumeRecord],
    ) -> OpResult<()> {
        lock(&self.world).call("prepare")
    }

    fn capture(
        &self,
        _env: &Env,
        _snapshot: &SnapshotRecord,
        volumes: &[VolumeRecord],
        _disks: &[DiskInfo],
    ) -> OpResult<()> {
        let mut world = lock(&self.world);
        world.call("capture")?;
        for volume in volumes {
            let origin = &sim(volume)?.origin;
            let data = *world
                .images
                .get(origin)
                .ok_or_else(|| OpError::Storage(format!("{origin} is missing")))?;
            world.images.insert(volume.image.clone(), data);
        }
        Ok(())
    }

    fn is_captured(
        &self,
        _env: &Env,
        _snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<bool> {
        Ok(lock(&self.world).images.contains_key(&volume.image))
    }

    fn undo(&self, env: &Env, snapshot: &SnapshotRecord, volumes: &[VolumeRecord]) {
        self.discard(env, snapshot, volumes);
    }

    fn discard(&self, _env: &Env, _snapshot: &SnapshotRecord, volumes: &[VolumeRecord]) {
        let mut world = lock(&self.world);
        for volume in volumes {
            world.images.remove(&volume.image);
        }
    }

    fn check_intact(
        &self,
        _env: &Env,
        snapshot: &SnapshotRecord,
        volume: &VolumeRecord,
    ) -> OpResult<()> {
        if lock(&self.world).images.contains_key(&volume.image) {
            Ok(())
        } else {
            Err(OpError::Refused(format!(
                "snapshot '{}' cannot be restored: its image {} is missing",
                snapshot.name, volume.image
            )))
        }
    }

    fn release(
        &self,
        env: &Env,
        deleting: &mut SnapshotRecord,
        _others: &mut [Arc<SnapshotRecord>],
        volume: &VolumeRecord,
        _deadline: Instant,
    ) -> OpResult<()> {
        // As the real backends do: a delete shows its step.
        env.ctx
            .progress(deleting, format!("releasing disk {}", volume.target));
        let mut world = lock(&self.world);
        world.call("release")?;
        world.images.remove(&volume.image);
        Ok(())
    }

    fn plan_restore(
        &self,
        restore: &RestoreRecord,
        volume: &VolumeRecord,
    ) -> OpResult<VolumeRestore> {
        let to_image = if restore.new_vm {
            format!("{}-r{}", volume.image, restore.uuid)
        } else {
            sim(volume)?.origin.clone()
        };
        Ok(VolumeRestore {
            target: volume.target.clone(),
            from_image: volume.image.clone(),
            to_image,
        })
    }

    fn check_restore_target(
        &self,
        _env: &Env,
        _new_vm: bool,
        _volume: &VolumeRecord,
    ) -> OpResult<()> {
        Ok(())
    }

    fn stage_restore(
        &self,
        _env: &Env,
        restore: &RestoreRecord,
        volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> OpResult<()> {
        let mut world = lock(&self.world);
        world.call("stage")?;
        if restore.new_vm {
            let data = *world
                .images
                .get(&volume.image)
                .ok_or_else(|| OpError::Storage("snapshot image missing".into()))?;
            world.images.insert(planned.to_image.clone(), data);
        }
        Ok(())
    }

    fn restores_in_place(&self, _volume: &VolumeRecord) -> bool {
        true
    }

    fn restore_in_place(
        &self,
        _env: &Env,
        volume: &VolumeRecord,
        before: &mut BeforeStep,
    ) -> OpResult<()> {
        let origin = sim(volume)?.origin.clone();
        before("copy")?;
        {
            let mut world = lock(&self.world);
            world.call("copy")?;
            let data = *world
                .images
                .get(&volume.image)
                .ok_or_else(|| OpError::Storage("snapshot image missing".into()))?;
            world.images.insert(staged(&origin), data);
        }
        before("switch")?;
        let mut world = lock(&self.world);
        world.call("switch")?;
        switch(&mut world, &origin)
    }

    fn finish_in_place(
        &self,
        env: &Env,
        volume: &VolumeRecord,
        last_step: Option<&str>,
    ) -> OpResult<()> {
        let origin = sim(volume)?.origin.clone();
        match last_step {
            Some("switch") => {
                let mut world = lock(&self.world);
                if world.images.contains_key(&staged(&origin)) {
                    switch(&mut world, &origin)?;
                }
                Ok(())
            }
            _ => self.restore_in_place(env, volume, &mut |_| Ok(())),
        }
    }

    fn restored_source(
        &self,
        new_vm: bool,
        _volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) -> Option<(String, &'static str)> {
        new_vm.then(|| (planned.to_image.clone(), "qcow2"))
    }

    fn discard_restored(
        &self,
        _env: &Env,
        restore: &RestoreRecord,
        _volume: &VolumeRecord,
        planned: &VolumeRestore,
    ) {
        if restore.new_vm {
            lock(&self.world).images.remove(&planned.to_image);
        }
    }
}

fn switch(world: &mut World, origin: &str) -> OpResult<()> {
    let data = world
        .images
        .remove(&staged(origin))
        .ok_or_else(|| OpError::Storage("nothing staged".into()))?;
    world.images.insert(origin.to_string(), data);
    Ok(())
}
