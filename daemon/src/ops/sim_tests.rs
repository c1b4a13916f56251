//! The journal, recovery and rollback of create, delete and restore, over the simulated
//! hypervisor and backend: for every journal write of each flow, the daemon dies just before it
//! and just after it, a new daemon settles what it finds, and the invariants hold; and every
//! call that changes something fails once, with the same invariants after the flow and a
//! settle. Names contain `crash` or `recover`: `cargo test -p vmsnapd crash` runs them alone.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use vmsnap_api::{RestorePhase, SnapshotPhase};

use super::{create, delete, restore, Faults, OpContext};
use crate::backends::sim::{lock, SharedWorld, SimBackend, SimVm, World};
use crate::backends::Backends;
use crate::hypervisor::sim::SimHypervisor;
use crate::store::{RestoreRecord, RestoreStep, SnapshotRecord, Step, Store, RECORD_VERSION};

/// Counts journal writes (two steps each: before, after) and dies at step `crash_at`.
#[derive(Debug)]
pub struct JournalFaults {
    steps: AtomicUsize,
    crash_at: usize,
}

/// The panic payload of a simulated crash.
pub(crate) struct SimulatedCrash;

impl JournalFaults {
    pub fn step(&self) {
        let step = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        if step == self.crash_at {
            std::panic::panic_any(SimulatedCrash);
        }
    }
}

/// Simulated crashes unwind quietly; every other panic is reported as usual.
fn quiet_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<SimulatedCrash>().is_none() {
                default(info);
            }
        }));
    });
}

const VM: &str = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
const DISKS: [&str; 2] = ["/sim/web-vda", "/sim/web-vdb"];

fn domain_xml(name: &str, uuid: Option<&str>) -> String {
    let uuid = uuid
        .map(|u| format!("<uuid>{u}</uuid>"))
        .unwrap_or_default();
    let disks: String = DISKS
        .iter()
        .zip(["vda", "vdb"])
        .map(|(path, target)| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
            )
        })
        .collect();
    format!(
        "<domain type='test'><name>{name}</name>{uuid}<devices>{disks}\
         <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' \
         state='connected'/></channel></devices></domain>"
    )
}

/// One simulated host and state folder.
struct Lab {
    world: SharedWorld,
    dir: tempfile::TempDir,
}

impl Lab {
    /// A running VM with two disks holding data 1 and 2.
    fn new() -> Lab {
        quiet_crashes();
        let mut world = World::default();
        world.images.insert(DISKS[0].to_string(), 1);
        world.images.insert(DISKS[1].to_string(), 2);
        world.vms.insert(
            VM.to_string(),
            SimVm {
                xml: domain_xml("web", Some(VM)),
                active: true,
                frozen: false,
            },
        );
        Lab {
            world: Arc::new(Mutex::new(world)),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn store(&self) -> Store {
        Store::new(self.dir.path())
    }

    fn ctx(&self, journal: Option<Arc<JournalFaults>>) -> OpContext {
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        self.ctx_telling(journal, events)
    }

    /// A context whose operations' events (progress, saves) go to `events`.
    fn ctx_telling(
        &self,
        journal: Option<Arc<JournalFaults>>,
        events: tokio::sync::mpsc::UnboundedSender<super::OpEvent>,
    ) -> OpContext {
        let config = crate::config::Config {
            failure_deadline: Duration::from_secs(60),
            restore_grace_period: Duration::from_secs(1),
            ..crate::config::Config::default()
        };
        OpContext::new(
            Arc::new(SimHypervisor {
                world: self.world.clone(),
            }),
            Arc::new(Backends::new(vec![
                Arc::new(SimBackend {
                    world: self.world.clone(),
                    kind: "sim-a",
                    targets: &["vda"],
                }),
                Arc::new(SimBackend {
                    world: self.world.clone(),
                    kind: "sim-b",
                    targets: &["vdb"],
                }),
            ])),
            self.store(),
            super::vm_lock::VmLocks {
                dir: self.dir.path().join("locks"),
            },
            &config,
            events,
            Faults {
                journal,
                ..Faults::default()
            },
        )
    }

    /// The guest writes: each disk's data changes.
    fn write(&self, data: [u64; 2]) {
        let mut world = lock(&self.world);
        for (disk, value) in DISKS.iter().zip(data) {
            world.images.insert(disk.to_string(), value);
        }
    }

    fn disk_data(&self) -> [u64; 2] {
        let world = lock(&self.world);
        DISKS.map(|d| world.images.get(d).copied().unwrap_or(0))
    }

    /// A snapshot request as the engine saves it before the operation starts.
    fn request(&self, name: &str) -> SnapshotRecord {
        let record =
            SnapshotRecord::request(name.to_string(), String::new(), "web", VM, Vec::new());
        self.store().save(&record).expect("save");
        record
    }

    fn restore_request(
        &self,
        snapshot: &SnapshotRecord,
        new_vm: Option<&str>,
        safety: bool,
    ) -> RestoreRecord {
        let record = RestoreRecord {
            version: RECORD_VERSION,
            uuid: uuid::Uuid::new_v4().to_string(),
            vm_name: "web".into(),
            vm_uuid: VM.into(),
            snapshot_name: snapshot.name.clone(),
            snapshot_uuid: snapshot.uuid.clone(),
            target_name: new_vm.unwrap_or("web").to_string(),
            target_uuid: if new_vm.is_some() {
                String::new()
            } else {
                VM.into()
            },
            new_vm: new_vm.is_some(),
            stop_target: true,
            start: false,
            take_safety_snapshot: safety,
            phase: RestorePhase::InProgress,
            complete: false,
            creation_time: super::now_rfc3339(),
            restore_time: String::new(),
            restores: Vec::new(),
            detached: Vec::new(),
            not_restored: Vec::new(),
            safety_snapshot: String::new(),
            error: String::new(),
            step: RestoreStep::Planned,
            name: String::new(),
            readiness_policy: String::new(),
            error_name: String::new(),
        };
        self.store().save_restore(&record).expect("save");
        record
    }

    fn snapshots(&self) -> Vec<Arc<SnapshotRecord>> {
        let (records, problems) = self.store().load_all();
        assert!(problems.is_empty(), "{problems:?}");
        records.into_iter().map(Arc::new).collect()
    }

    fn restores(&self) -> Vec<RestoreRecord> {
        let (records, problems) = self.store().load_restores();
        assert!(problems.is_empty(), "{problems:?}");
        records
    }

    /// A new daemon's start: every unfinished restore, then every unfinished snapshot, is
    /// settled, as the engine does.
    fn restart(&self) {
        let ctx = self.ctx(None);
        for record in self.restores() {
            if record.phase == RestorePhase::InProgress
                || matches!(record.step, RestoreStep::Committed { .. })
            {
                restore::recover(&ctx, record, self.snapshots());
            }
        }
        for record in self.snapshots() {
            if matches!(
                record.phase,
                SnapshotPhase::InProgress | SnapshotPhase::Deleting
            ) {
                let others = self
                    .snapshots()
                    .into_iter()
                    .filter(|o| o.uuid != record.uuid)
                    .collect();
                delete::recover(&ctx, SnapshotRecord::clone(&record), others);
            }
        }
    }

    /// A snapshot taken with no fault.
    fn snapshot(&self, name: &str) -> SnapshotRecord {
        let taken = create::create(&self.ctx(None), self.request(name), false);
        assert_eq!(taken.phase, SnapshotPhase::Succeeded, "{}", taken.error);
        taken
    }

    /// What every test checks after everything settled.
    fn check_invariants(&self, kept: &[(&SnapshotRecord, [u64; 2])]) {
        let world = lock(&self.world);
        for vm in world.vms.values() {
            assert!(!vm.frozen, "a guest is left frozen");
        }
        let snapshots = self.snapshots();
        for s in &snapshots {
            assert_eq!(
                s.step,
                Step::Done,
                "snapshot {} unsettled: {:?}",
                s.name,
                s.step
            );
            assert!(
                matches!(s.phase, SnapshotPhase::Succeeded | SnapshotPhase::Failed),
                "snapshot {} is {:?}",
                s.name,
                s.phase
            );
            if s.phase == SnapshotPhase::Succeeded {
                assert!(s.ready_to_use);
                for v in &s.volumes {
                    assert!(
                        world.images.contains_key(&v.image),
                        "{} lost {}",
                        s.name,
                        v.image
                    );
                }
            }
        }
        for r in self.restores() {
            assert_eq!(r.step, RestoreStep::Done, "restore unsettled: {:?}", r.step);
            assert!(matches!(
                r.phase,
                RestorePhase::Succeeded | RestorePhase::Failed
            ));
        }
        // Other snapshots' content never changes.
        for (snapshot, data) in kept {
            let now: Vec<u64> = snapshot
                .volumes
                .iter()
                .map(|v| world.images.get(&v.image).copied().unwrap_or(0))
                .collect();
            assert_eq!(now, data.to_vec(), "snapshot {} changed", snapshot.name);
        }
        // Every image is claimed: a VM's disk or a snapshot record's volume (a failed one's
        // leftovers go when it is deleted).
        for image in world.images.keys() {
            let by_vm = world
                .vms
                .values()
                .any(|vm| vm.xml.contains(&format!("'{image}'")));
            let by_snapshot = snapshots
                .iter()
                .any(|s| s.volumes.iter().any(|v| &v.image == image));
            assert!(by_vm || by_snapshot, "{image} is claimed by nothing");
        }
    }
}

/// A lab in its starting state and the operation to run in it.
type Scenario = (Lab, Box<dyn Fn(&Lab, &OpContext)>);

/// Runs `op` once with no fault and returns how many journal steps it took.
fn count_steps(lab_for: impl Fn() -> Scenario) -> usize {
    let (lab, op) = lab_for();
    let journal = Arc::new(JournalFaults {
        steps: AtomicUsize::new(0),
        crash_at: usize::MAX,
    });
    op(&lab, &lab.ctx(Some(journal.clone())));
    journal.steps.load(Ordering::SeqCst)
}

/// For each journal step: a fresh lab, the operation dies there, a restart settles it, and
/// `check` judges the result.
fn crash_at_every_step(lab_for: impl Fn() -> Scenario, check: impl Fn(&Lab, usize)) {
    let steps = count_steps(&lab_for);
    assert!(steps >= 4, "only {steps} journal steps");
    for crash_at in 1..=steps {
        let (lab, op) = lab_for();
        let journal = Arc::new(JournalFaults {
            steps: AtomicUsize::new(0),
            crash_at,
        });
        let ctx = lab.ctx(Some(journal));
        let crashed = catch_unwind(AssertUnwindSafe(|| op(&lab, &ctx)));
        assert!(crashed.is_err(), "no crash at step {crash_at} of {steps}");
        lab.restart();
        check(&lab, crash_at);
    }
}

/// What happens at the chosen call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AtCall {
    /// The call fails; the operation ends by itself, then a restart settles anything left.
    Fails,
    /// The daemon dies just before it; a restart settles.
    Crash,
    /// The engine gives the operation up while the call is "blocked" (the call then
    /// completes); the operation ends by itself, no restart.
    GivenUp,
}

/// For each call that changes something: a fresh lab, `what` happens at that call, and
/// `check` judges the result.
fn at_every_call(what: AtCall, lab_for: impl Fn() -> Scenario, check: impl Fn(&Lab, usize)) {
    let (lab, op) = lab_for();
    let before = lock(&lab.world).calls;
    op(&lab, &lab.ctx(None));
    let calls = lock(&lab.world).calls - before;
    assert!(calls >= 2, "only {calls} calls");
    for nth in 1..=calls {
        let (lab, op) = lab_for();
        let ctx = lab.ctx(None);
        let at = lock(&lab.world).calls + nth;
        {
            let mut world = lock(&lab.world);
            match what {
                AtCall::Fails => world.fail_at = Some(at),
                AtCall::Crash => world.crash_at = Some(at),
                AtCall::GivenUp => world.abandon_at = Some((at, ctx.gate.clone())),
            }
        }
        let ended = catch_unwind(AssertUnwindSafe(|| op(&lab, &ctx)));
        {
            let mut world = lock(&lab.world);
            (world.fail_at, world.crash_at, world.abandon_at) = (None, None, None);
        }
        assert_eq!(
            ended.is_err(),
            what == AtCall::Crash,
            "{what:?} at call {nth} of {calls}"
        );
        if what != AtCall::GivenUp {
            lab.restart();
        }
        check(&lab, nth);
    }
}

// ---------------------------------------------------------------------------------------------
// Create

fn create_lab() -> Scenario {
    let lab = Lab::new();
    lab.snapshot("s0");
    lab.write([11, 12]);
    (
        lab,
        Box::new(|lab: &Lab, ctx: &OpContext| {
            create::create(ctx, lab.request("s1"), false);
        }),
    )
}

fn check_create(lab: &Lab, at: usize) {
    let all = lab.snapshots();
    let s0 = all.iter().find(|s| s.name == "s0").expect("s0 kept");
    lab.check_invariants(&[(s0, [1, 2])]);
    let s1 = all
        .iter()
        .find(|s| s.name == "s1")
        .expect("s1's record is kept");
    if s1.phase == SnapshotPhase::Succeeded {
        let data: Vec<u64> = s1
            .volumes
            .iter()
            .map(|v| lock(&lab.world).images.get(&v.image).copied().unwrap_or(0))
            .collect();
        assert_eq!(
            data,
            vec![11, 12],
            "at {at}: s1 holds the data written before it"
        );
        assert_eq!(s1.volumes.len(), 2);
    } else {
        assert!(!s1.error.is_empty(), "at {at}: a failed snapshot says why");
    }
    // A snapshot never changes the disk the VM uses, and leaves it running.
    assert_eq!(lab.disk_data(), [11, 12], "at {at}");
    assert!(lock(&lab.world).vms[VM].active, "at {at}: the VM stopped");
}

#[test]
fn create_crash_before_and_after_every_journal_step_settles_on_recover() {
    crash_at_every_step(create_lab, check_create);
}

#[test]
fn create_crash_at_every_storage_and_hypervisor_call_settles_on_recover() {
    at_every_call(AtCall::Crash, create_lab, check_create);
}

#[test]
fn create_given_up_while_blocked_in_any_call_is_undone_when_the_call_returns() {
    at_every_call(AtCall::GivenUp, create_lab, |lab, at| {
        check_create(lab, at);
        let s1 = lab
            .snapshots()
            .into_iter()
            .find(|s| s.name == "s1")
            .expect("s1");
        assert_eq!(
            s1.phase,
            SnapshotPhase::Failed,
            "at {at}: a given-up snapshot succeeded"
        );
        assert!(
            s1.error_name.ends_with(".DeadlineExceeded"),
            "at {at}: {}",
            s1.error_name
        );
    });
}

#[test]
fn delete_given_up_while_blocked_keeps_others_and_can_be_retried() {
    at_every_call(AtCall::GivenUp, delete_lab, check_delete);
}

#[test]
fn create_failure_of_every_call_leaves_nothing_half_done_or_recovers() {
    at_every_call(AtCall::Fails, create_lab, check_create);
}

// ---------------------------------------------------------------------------------------------
// Delete

fn delete_lab() -> Scenario {
    let lab = Lab::new();
    lab.snapshot("s0");
    lab.write([11, 12]);
    lab.snapshot("s1");
    lab.write([21, 22]);
    lab.snapshot("s2");
    (
        lab,
        Box::new(|lab: &Lab, ctx: &OpContext| {
            let all = lab.snapshots();
            let target = all
                .iter()
                .find(|s| s.name == "s1")
                .map(|s| SnapshotRecord::clone(s))
                .expect("s1");
            let others = all.into_iter().filter(|s| s.name != "s1").collect();
            delete::delete(ctx, target, others);
        }),
    )
}

fn check_delete(lab: &Lab, at: usize) {
    let all = lab.snapshots();
    let s0 = all.iter().find(|s| s.name == "s0").expect("s0 kept");
    let s2 = all.iter().find(|s| s.name == "s2").expect("s2 kept");
    lab.check_invariants(&[(s0, [1, 2]), (s2, [21, 22])]);
    if let Some(s1) = all.iter().find(|s| s.name == "s1") {
        // A delete that never began left the snapshot as it was; one that failed says so and
        // is not offered for restore again. Deleting it again finishes the job.
        match s1.phase {
            SnapshotPhase::Succeeded => lab.check_invariants(&[(s1, [11, 12])]),
            _ => {
                assert_eq!(s1.phase, SnapshotPhase::Failed, "at {at}");
                assert!(
                    s1.error.starts_with("delete failed"),
                    "at {at}: {}",
                    s1.error
                );
            }
        }
        let others = all.iter().filter(|s| s.name != "s1").cloned().collect();
        delete::delete(&lab.ctx(None), SnapshotRecord::clone(s1), others);
        assert!(lab.snapshots().iter().all(|s| s.name != "s1"), "at {at}");
        lab.check_invariants(&[(s0, [1, 2]), (s2, [21, 22])]);
    }
    assert_eq!(lab.disk_data(), [21, 22], "at {at}");
}

#[test]
fn delete_crash_before_and_after_every_journal_step_settles_on_recover() {
    crash_at_every_step(delete_lab, check_delete);
}

#[test]
fn delete_crash_at_every_storage_call_settles_on_recover() {
    at_every_call(AtCall::Crash, delete_lab, check_delete);
}

#[test]
fn delete_failure_of_every_call_keeps_others_and_can_be_retried() {
    at_every_call(AtCall::Fails, delete_lab, check_delete);
}

/// However a create or a delete ends, each snapshot it reported progress on ends with none: a
/// failed one does not keep showing its last step ("snapshotting the disks") beside its error.
#[test]
fn a_create_or_delete_that_fails_at_any_call_ends_with_no_progress_shown() {
    for (what, lab_for) in [
        ("create", create_lab as fn() -> Scenario),
        ("delete", delete_lab),
    ] {
        let (lab, op) = lab_for();
        let before = lock(&lab.world).calls;
        op(&lab, &lab.ctx(None));
        let calls = lock(&lab.world).calls - before;
        let mut steps_shown = false;
        for nth in 1..=calls {
            let (lab, op) = lab_for();
            let (events, mut told) = tokio::sync::mpsc::unbounded_channel();
            let ctx = lab.ctx_telling(None, events);
            {
                let mut world = lock(&lab.world);
                world.fail_at = Some(world.calls + nth);
            }
            op(&lab, &ctx);
            lock(&lab.world).fail_at = None;
            let mut last: std::collections::BTreeMap<String, String> = Default::default();
            while let Ok(event) = told.try_recv() {
                if let super::OpEvent::Progress { uuid, text } = event {
                    steps_shown |= !text.is_empty();
                    last.insert(uuid, text);
                }
            }
            for (uuid, text) in last {
                assert_eq!(
                    text, "",
                    "{what}, call {nth} fails: {uuid} still shows progress"
                );
            }
        }
        assert!(steps_shown, "{what} showed no step: nothing was checked");
    }
}

// ---------------------------------------------------------------------------------------------
// Restore

fn restore_lab(new_vm: Option<&'static str>, safety: bool) -> Scenario {
    let lab = Lab::new();
    lab.snapshot("s0");
    lab.write([11, 12]);
    (
        lab,
        Box::new(move |lab: &Lab, ctx: &OpContext| {
            let all = lab.snapshots();
            let s0 = all.iter().find(|s| s.name == "s0").cloned().expect("s0");
            let request = lab.restore_request(&s0, new_vm, safety);
            restore::restore(ctx, request, SnapshotRecord::clone(&s0), all);
        }),
    )
}

fn check_restore_in_place(lab: &Lab, at: usize) {
    let all = lab.snapshots();
    let s0 = all.iter().find(|s| s.name == "s0").expect("s0 kept");
    lab.check_invariants(&[(s0, [1, 2])]);
    let restore = lab.restores().pop().expect("the restore's record");
    let definition = lock(&lab.world).vms[VM].xml.clone();
    assert_eq!(
        definition,
        domain_xml("web", Some(VM)),
        "at {at}: the definition is the VM's"
    );
    match restore.phase {
        RestorePhase::Succeeded => {
            assert_eq!(
                lab.disk_data(),
                [1, 2],
                "at {at}: the guest sees the snapshot's data"
            );
        }
        _ => {
            // Nothing changed: the data the VM had, and the VM running again if it was
            // stopped for the restore... or, after a crash, off but intact.
            assert_eq!(
                lab.disk_data(),
                [11, 12],
                "at {at}: a failed restore changed the data"
            );
            assert!(!restore.error.is_empty());
        }
    }
    // A safety snapshot that was kept holds what the VM had before.
    for safety in all.iter().filter(|s| s.name.starts_with("pre-restore-")) {
        if safety.phase == SnapshotPhase::Succeeded {
            let data: Vec<u64> = safety
                .volumes
                .iter()
                .map(|v| lock(&lab.world).images.get(&v.image).copied().unwrap_or(0))
                .collect();
            assert_eq!(data, vec![11, 12], "at {at}");
        }
    }
}

fn check_restore_as_new(lab: &Lab, at: usize) {
    let all = lab.snapshots();
    let s0 = all.iter().find(|s| s.name == "s0").expect("s0 kept");
    lab.check_invariants(&[(s0, [1, 2])]);
    assert_eq!(
        lab.disk_data(),
        [11, 12],
        "at {at}: the source VM's disks changed"
    );
    let restore = lab.restores().pop().expect("the restore's record");
    let world = lock(&lab.world);
    let clone = world
        .vms
        .iter()
        .find(|(_, vm)| vm.xml.contains("<name>clone</name>"));
    match restore.phase {
        RestorePhase::Succeeded => {
            let (uuid, vm) = clone.expect("the new VM is defined");
            assert_eq!(uuid, &restore.target_uuid, "at {at}");
            for r in &restore.restores {
                assert!(vm.xml.contains(&r.to_image), "at {at}");
                assert_eq!(
                    world.images.get(&r.to_image),
                    world.images.get(&r.from_image)
                );
            }
        }
        _ => assert!(
            clone.is_none(),
            "at {at}: a failed restore left the new VM defined"
        ),
    }
}

#[test]
fn restore_in_place_crash_before_and_after_every_journal_step_settles_on_recover() {
    crash_at_every_step(|| restore_lab(None, false), check_restore_in_place);
}

#[test]
fn restore_in_place_with_safety_snapshot_crash_at_every_step_settles_on_recover() {
    crash_at_every_step(|| restore_lab(None, true), check_restore_in_place);
}

#[test]
fn restore_as_new_vm_crash_before_and_after_every_journal_step_settles_on_recover() {
    crash_at_every_step(|| restore_lab(Some("clone"), false), check_restore_as_new);
}

#[test]
fn restore_crash_at_every_storage_and_hypervisor_call_settles_on_recover() {
    at_every_call(
        AtCall::Crash,
        || restore_lab(None, true),
        check_restore_in_place,
    );
    at_every_call(
        AtCall::Crash,
        || restore_lab(Some("clone"), false),
        check_restore_as_new,
    );
}

#[test]
fn restore_failure_of_every_call_changes_nothing_or_completes_on_recover() {
    at_every_call(
        AtCall::Fails,
        || restore_lab(None, true),
        check_restore_in_place,
    );
    at_every_call(
        AtCall::Fails,
        || restore_lab(Some("clone"), false),
        check_restore_as_new,
    );
}

#[test]
fn the_thaw_guard_starts_before_the_vm_is_read_when_the_inventory_shows_a_guest_to_freeze() {
    let lab = Lab::new();
    lab.snapshot("without-inventory");
    let asked_without = std::mem::take(&mut lock(&lab.world).asked);
    let first = |asked: &[String]| asked.first().cloned().unwrap_or_default();
    assert_eq!(first(&asked_without), format!("run_state {VM}"));
    assert!(asked_without.contains(&format!("prepare_thaw_guard {VM}")));

    lock(&lab.world).inventory = true;
    lab.snapshot("with-inventory");
    let asked = std::mem::take(&mut lock(&lab.world).asked);
    assert_eq!(
        first(&asked),
        format!("prepare_thaw_guard {VM}"),
        "{asked:?}"
    );

    // Shut off: no guard at all.
    lock(&lab.world).vms.get_mut(VM).expect("vm").active = false;
    lab.snapshot("shut-off");
    let asked = std::mem::take(&mut lock(&lab.world).asked);
    assert!(
        !asked.iter().any(|a| a.starts_with("prepare_thaw_guard")),
        "{asked:?}"
    );
}
