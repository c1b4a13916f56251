//! Safe wrappers for the libvirt calls the `virt` crate has no safe API for: guest filesystem
//! freeze/thaw and block commit jobs.
//!
//! Like every libvirt call these block (freeze/thaw go through the guest agent and can take
//! seconds), so they belong on the libvirt thread or in the thaw guard, never on a tokio worker.
//! Errors come from `virt::error::Error::last_error()`, which libvirt keeps per thread, so it is
//! read on the thread that made the failing call, right after it.

use std::ffi::CString;
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

/// How often [`commit_and_wait`] polls the job once it has run for [`FAST_POLL_FOR`].
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often it polls before: the merge of a fresh snapshot is ready within tens of
/// milliseconds, and a 50 ms poll added up to 50 ms to each such delete (one
/// virDomainGetBlockJobInfo round trip, well under a millisecond, per poll).
const FAST_POLL_INTERVAL: Duration = Duration::from_millis(5);
const FAST_POLL_FOR: Duration = Duration::from_secs(1);

/// The pause before the next poll of a job that started at `started`.
fn poll_pause(started: Instant, now: Instant) -> Duration {
    if now.saturating_duration_since(started) < FAST_POLL_FOR {
        FAST_POLL_INTERVAL
    } else {
        POLL_INTERVAL
    }
}

/// Freezes every mounted filesystem of the guest through its agent (virDomainFSFreeze with no
/// mountpoint list). Returns how many filesystems were frozen.
#[allow(dead_code)] // used by the snapshot engine
pub fn fs_freeze(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: the domain pointer is valid while `dom` lives; a null list with count 0 means all.
    let n = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    count(n)
}

/// Freezes the guest's filesystems mounted at `mountpoints` only (virDomainFSFreeze with a
/// list; the agent's guest-fsfreeze-freeze-list). Returns how many were frozen.
pub fn fs_freeze_mountpoints(dom: &Domain, mountpoints: &[String]) -> Result<u32, Error> {
    let owned: Vec<CString> = mountpoints
        .iter()
        .map(|m| CString::new(m.as_str()))
        .collect::<Result<_, _>>()?;
    let mut pointers: Vec<*const std::os::raw::c_char> = owned.iter().map(|m| m.as_ptr()).collect();
    let n = u32::try_from(pointers.len()).map_err(|_| Error::last_error())?;
    // SAFETY: the domain pointer is valid while `dom` lives; `pointers` holds `n` pointers to
    // NUL-terminated strings owned by `owned`, which outlives the call; libvirt only reads them.
    let frozen = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), pointers.as_mut_ptr(), n, 0) };
    count(frozen)
}

/// One mounted filesystem of the guest, as its agent reports it (virDomainGetFSInfo): where it
/// is mounted and the disk targets (`vda`, ...) it lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFs {
    pub mountpoint: String,
    pub disks: Vec<String>,
}

/// The guest's mounted filesystems and their disks (needs the guest agent).
pub fn fs_info(dom: &Domain) -> Result<Vec<GuestFs>, Error> {
    let mut list: *mut sys::virDomainFSInfoPtr = std::ptr::null_mut();
    // SAFETY: the domain pointer is valid while `dom` lives; libvirt allocates `list`.
    let n = unsafe { sys::virDomainGetFSInfo(dom.as_ptr(), &mut list, 0) };
    let n = usize::try_from(n).map_err(|_| Error::last_error())?;
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: a non-null string libvirt returned, NUL-terminated, alive until freed.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let mut found = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: `list` holds `n` valid info pointers; each is read, then freed once.
        unsafe {
            let info = *list.add(i);
            if info.is_null() {
                continue;
            }
            let aliases = (0..(*info).ndevAlias)
                .map(|d| text(*(*info).devAlias.add(d)))
                .collect();
            found.push(GuestFs {
                mountpoint: text((*info).mountpoint),
                disks: aliases,
            });
            sys::virDomainFSInfoFree(info);
        }
    }
    if !list.is_null() {
        // SAFETY: the array libvirt allocated, its elements freed above.
        unsafe { libc::free(list.cast()) };
    }
    Ok(found)
}

/// Thaws every frozen filesystem of the guest (virDomainFSThaw). Returns how many were thawed;
/// thawing a guest that is not frozen succeeds with 0. libvirt 9.0 refuses a mountpoint list for
/// thaw, so there is no variant with one.
pub fn fs_thaw(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: the domain pointer is valid while `dom` lives; a null list with count 0 means all.
    let n = unsafe { sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    count(n)
}

fn count(n: std::os::raw::c_int) -> Result<u32, Error> {
    u32::try_from(n).map_err(|_| Error::last_error())
}

/// Starts a block commit job on `disk` (target name such as `vda`, or its source path) merging
/// `top` down into `base` (virDomainBlockCommit, unlimited bandwidth). `active` must be true when
/// `top` is the disk's active (topmost) layer: such a job never ends by itself but becomes ready
/// and must be pivoted or aborted with [`block_job_abort`]. Returns once the job is started.
#[allow(dead_code)] // used by the snapshot engine
pub fn block_commit(
    dom: &Domain,
    disk: &str,
    base: &str,
    top: &str,
    active: bool,
) -> Result<(), Error> {
    let disk = CString::new(disk)?;
    let base = CString::new(base)?;
    let top = CString::new(top)?;
    let flags = if active {
        sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    } else {
        0
    };
    // SAFETY: valid domain pointer; the strings are NUL-terminated and outlive the call.
    let rc = unsafe {
        sys::virDomainBlockCommit(
            dom.as_ptr(),
            disk.as_ptr(),
            base.as_ptr(),
            top.as_ptr(),
            0,
            flags,
        )
    };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// The kind of a block job, as libvirt reports it.
#[allow(dead_code)] // used by the snapshot engine
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockJobKind {
    Pull,
    Copy,
    Commit,
    ActiveCommit,
    Backup,
    /// A kind this code does not know (newer libvirt), with libvirt's number.
    Other(i32),
}

impl BlockJobKind {
    fn from_raw(raw: i32) -> BlockJobKind {
        match u32::try_from(raw) {
            Ok(sys::VIR_DOMAIN_BLOCK_JOB_TYPE_PULL) => BlockJobKind::Pull,
            Ok(sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COPY) => BlockJobKind::Copy,
            Ok(sys::VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT) => BlockJobKind::Commit,
            Ok(sys::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT) => BlockJobKind::ActiveCommit,
            Ok(sys::VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP) => BlockJobKind::Backup,
            _ => BlockJobKind::Other(raw),
        }
    }
}

/// A running block job and its progress (`cur` out of `end`, in unspecified units, bytes in
/// practice).
#[allow(dead_code)] // used by the snapshot engine
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJob {
    pub kind: BlockJobKind,
    pub cur: u64,
    pub end: u64,
}

/// The block job running on `disk`, if any (virDomainGetBlockJobInfo).
#[allow(dead_code)] // used by the snapshot engine
pub fn block_job_info(dom: &Domain, disk: &str) -> Result<Option<BlockJob>, Error> {
    let disk = CString::new(disk)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: valid domain pointer, NUL-terminated disk name, and `info` is a properly laid out
    // struct libvirt only writes into during the call.
    let rc = unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), disk.as_ptr(), &mut info, 0) };
    match rc {
        rc if rc < 0 => Err(Error::last_error()),
        0 => Ok(None),
        _ => Ok(Some(BlockJob {
            kind: BlockJobKind::from_raw(info.type_),
            cur: info.cur,
            end: info.end,
        })),
    }
}

/// Ends the block job on `disk` and waits until it is gone (virDomainBlockJobAbort without
/// VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC). With `pivot`, a ready copy or active commit job switches
/// the disk to the job's destination (for an active commit: `base` becomes the active layer);
/// without, the job is cancelled and the disk stays as it was.
#[allow(dead_code)] // used by the snapshot engine
pub fn block_job_abort(dom: &Domain, disk: &str, pivot: bool) -> Result<(), Error> {
    let disk = CString::new(disk)?;
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: valid domain pointer and NUL-terminated disk name.
    let rc = unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), disk.as_ptr(), flags) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Commits `top` into `base` on `disk` and waits for the end, calling `progress(cur, end)` at
/// every poll (every 5 ms for the first second, then every 50 ms).
///
/// - Not `active` (`top` is an intermediate layer): done when the job has disappeared and `top`
///   is no longer in the disk's backing chain.
/// - `active` (`top` is the active layer): once the job is ready, pivots so that `base` becomes
///   the active layer, then checks that the job is gone and the disk's source is `base`.
///
/// Past `deadline` the job is aborted without pivot (the disk keeps its chain) and an error says
/// so. Trap: a non-active commit aborted halfway has already written part of `top` into `base`;
/// the guest's view is unchanged (`top` still sits above), but `base` alone is no longer its
/// original point in time.
///
/// The chain checks compare paths only when `base`/`top` are given as absolute paths (not as
/// `vda[2]` indexes). Errors are one line and carry libvirt's message.
#[allow(dead_code)] // used by the snapshot engine
pub fn commit_and_wait(
    dom: &Domain,
    disk: &str,
    base: &str,
    top: &str,
    active: bool,
    deadline: Instant,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), String> {
    let what = format!("block commit of {top} into {base} on {disk}");
    block_commit(dom, disk, base, top, active)
        .map_err(|e| one_line(&format!("cannot start the {what}: {}", e.message())))?;
    let started = Instant::now();
    loop {
        if Instant::now() >= deadline {
            return Err(abort_after_deadline(dom, disk, &what));
        }
        let job = block_job_info(dom, disk)
            .map_err(|e| one_line(&format!("{what}: cannot read the job: {}", e.message())))?;
        match job {
            None if active => {
                // An active commit never ends by itself: it failed or someone else ended it.
                return Err(one_line(&format!(
                    "{what}: the job disappeared before it was ready (it failed, or was ended elsewhere)"
                )));
            }
            None => return check_committed(dom, disk, top, &what),
            Some(job) => {
                progress(job.cur, job.end);
                if active && is_ready(dom, disk, &job) {
                    match block_job_abort(dom, disk, true) {
                        Ok(()) => return check_pivoted(dom, disk, base, &what),
                        // Readiness seen through cur == end can precede libvirt's own ready
                        // state by a moment ("block copy still active: ... not ready for
                        // pivot yet"); keep polling then.
                        Err(e)
                            if matches!(
                                e.code(),
                                virt::enumutil::Enum::Known(
                                    virt::error::ErrorNumber::BlockCopyActive
                                )
                            ) => {}
                        Err(e) => {
                            return Err(one_line(&format!("{what}: pivot failed: {}", e.message())))
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        std::thread::sleep(poll_pause(started, now).min(deadline.saturating_duration_since(now)));
    }
}

/// Whether an active commit job can be pivoted. libvirt reports cur == end only once QEMU says
/// the job is ready; when there was nothing to copy (end == 0) that cannot be told from a job that
/// has not started, so the live XML's `<mirror ready='yes'/>` decides.
fn is_ready(dom: &Domain, disk: &str, job: &BlockJob) -> bool {
    if job.cur != job.end {
        return false;
    }
    if job.end > 0 {
        return true;
    }
    dom.xml_desc(0)
        .ok()
        .is_some_and(|xml| mirror_ready(&xml, disk))
}

fn abort_after_deadline(dom: &Domain, disk: &str, what: &str) -> String {
    match block_job_abort(dom, disk, false) {
        Ok(()) => format!("{what}: not done by the deadline; the job was aborted"),
        Err(e) => one_line(&format!(
            "{what}: not done by the deadline, and aborting the job failed: {}",
            e.message()
        )),
    }
}

fn check_committed(dom: &Domain, disk: &str, top: &str, what: &str) -> Result<(), String> {
    if !top.starts_with('/') {
        return Ok(());
    }
    let chain = live_chain(dom, disk, what)?;
    if chain.iter().any(|p| p == top) {
        return Err(one_line(&format!(
            "{what}: the job ended but {top} is still in the backing chain (the commit failed)"
        )));
    }
    Ok(())
}

fn check_pivoted(dom: &Domain, disk: &str, base: &str, what: &str) -> Result<(), String> {
    match block_job_info(dom, disk) {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Err(one_line(&format!(
                "{what}: a job is still running after the pivot"
            )))
        }
        Err(e) => {
            return Err(one_line(&format!(
                "{what}: cannot read the job after the pivot: {}",
                e.message()
            )))
        }
    }
    if !base.starts_with('/') {
        return Ok(());
    }
    let chain = live_chain(dom, disk, what)?;
    match chain.first() {
        Some(active) if active == base => Ok(()),
        other => Err(one_line(&format!(
            "{what}: after the pivot the active layer is {} instead of {base}",
            other.map_or("unknown", String::as_str)
        ))),
    }
}

fn live_chain(dom: &Domain, disk: &str, what: &str) -> Result<Vec<String>, String> {
    let xml = dom.xml_desc(0).map_err(|e| {
        one_line(&format!(
            "{what}: cannot read the domain XML: {}",
            e.message()
        ))
    })?;
    backing_chain(&xml, disk).ok_or_else(|| format!("{what}: disk {disk} is not in the domain XML"))
}

/// The `<disk>` element for `disk`, given as target name or source path.
fn find_disk<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
    disk: &str,
) -> Option<roxmltree::Node<'a, 'i>> {
    doc.descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children().any(|c| {
                (c.has_tag_name("target") && c.attribute("dev") == Some(disk))
                    || (c.has_tag_name("source") && source_path(c) == Some(disk))
            })
        })
}

fn source_path<'a>(source: roxmltree::Node<'a, '_>) -> Option<&'a str> {
    source
        .attribute("file")
        .or_else(|| source.attribute("dev"))
        .or_else(|| source.attribute("name"))
}

/// The disk's chain of image paths, active layer first, from a live domain XML.
fn backing_chain(xml: &str, disk: &str) -> Option<Vec<String>> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let mut node = find_disk(&doc, disk)?;
    let mut chain = Vec::new();
    loop {
        if let Some(path) = node
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(source_path)
        {
            chain.push(path.to_string());
        }
        match node.children().find(|c| c.has_tag_name("backingStore")) {
            Some(next) => node = next,
            None => return Some(chain),
        }
    }
}

/// Whether the disk's block job mirror is ready (`<mirror ... ready='yes'/>` in the live XML).
fn mirror_ready(xml: &str, disk: &str) -> bool {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return false;
    };
    find_disk(&doc, disk).is_some_and(|d| {
        d.children()
            .any(|c| c.has_tag_name("mirror") && c.attribute("ready") == Some("yes"))
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Sets how long libvirt waits for the guest agent's answers on this domain
/// (virDomainAgentSetResponseTimeout): seconds, or `VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT`
/// (-1) for libvirt's default. libvirt's FSFreeze otherwise waits as long as the agent takes,
/// so a hung agent would hold the snapshot for good.
pub fn agent_set_response_timeout(dom: &Domain, seconds: i32) -> Result<(), Error> {
    // SAFETY: valid domain pointer for the duration of the call.
    let rc = unsafe { sys::virDomainAgentSetResponseTimeout(dom.as_ptr(), seconds, 0) };
    if rc < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt::connect::Connect;

    fn test_domain() -> (Connect, Domain) {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some("test:///default")).expect("test driver opens");
        let dom = conn.lookup_domain_by_name("test").expect("test domain");
        (conn, dom)
    }

    #[test]
    fn virt_ext_freeze_and_thaw_on_the_test_driver() {
        let (_conn, dom) = test_domain();
        // The test driver simulates two filesystems (/ and /boot).
        assert_eq!(fs_freeze(&dom).expect("freeze"), 2);
        assert_eq!(fs_thaw(&dom).expect("thaw"), 2);
        // Thawing a thawed guest is not an error.
        assert_eq!(fs_thaw(&dom).expect("second thaw"), 0);
    }

    #[test]
    fn virt_ext_block_job_errors_carry_libvirts_message() {
        let (_conn, dom) = test_domain();
        // The test driver has no block jobs: the errors must come through, on one line.
        let err = block_commit(&dom, "vda", "/a", "/b", false).expect_err("unsupported");
        assert!(!err.message().is_empty());
        let mut calls = 0;
        let err = commit_and_wait(
            &dom,
            "vda",
            "/a",
            "/b",
            true,
            Instant::now() + Duration::from_secs(5),
            &mut |_, _| calls += 1,
        )
        .expect_err("unsupported");
        assert!(
            err.starts_with("cannot start the block commit of /b into /a on vda: "),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        assert_eq!(calls, 0);
        assert!(block_commit(&dom, "vd\0a", "/a", "/b", false).is_err());
    }

    #[test]
    fn virt_ext_job_kinds() {
        assert_eq!(BlockJobKind::from_raw(3), BlockJobKind::Commit);
        assert_eq!(BlockJobKind::from_raw(4), BlockJobKind::ActiveCommit);
        assert_eq!(BlockJobKind::from_raw(0), BlockJobKind::Other(0));
        assert_eq!(BlockJobKind::from_raw(-1), BlockJobKind::Other(-1));
        assert_eq!(BlockJobKind::from_raw(99), BlockJobKind::Other(99));
    }

    const LIVE_XML: &str = r#"<domain type='qemu'><devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/d/top.qcow2' index='3'/>
        <backingStore type='file' index='2'>
          <format type='qcow2'/>
          <source file='/d/mid.qcow2'/>
          <backingStore type='file' index='1'>
            <format type='qcow2'/>
            <source file='/d/base.qcow2'/>
            <backingStore/>
          </backingStore>
        </backingStore>
        <mirror type='file' job='active-commit' ready='yes'>
          <format type='qcow2'/>
          <source file='/d/base.qcow2' index='1'/>
        </mirror>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='file' device='disk'>
        <source file='/d/other.raw'/>
        <target dev='vdb' bus='virtio'/>
      </disk>
    </devices></domain>"#;

    #[test]
    fn virt_ext_reads_the_chain_and_mirror_state() {
        let chain = backing_chain(LIVE_XML, "vda").expect("vda");
        assert_eq!(chain, ["/d/top.qcow2", "/d/mid.qcow2", "/d/base.qcow2"]);
        assert_eq!(
            backing_chain(LIVE_XML, "/d/top.qcow2").expect("by path"),
            chain
        );
        assert_eq!(
            backing_chain(LIVE_XML, "vdb").expect("vdb"),
            ["/d/other.raw"]
        );
        assert!(backing_chain(LIVE_XML, "vdc").is_none());
        assert!(mirror_ready(LIVE_XML, "vda"));
        assert!(!mirror_ready(LIVE_XML, "vdb"));
        assert!(!mirror_ready("not xml", "vda"));
        assert_eq!(one_line("a\n  b\tc "), "a b c");
    }

    #[test]
    fn virt_ext_polls_a_young_job_often_and_an_old_one_less() {
        let start = Instant::now();
        assert_eq!(poll_pause(start, start), FAST_POLL_INTERVAL);
        assert_eq!(
            poll_pause(start, start + FAST_POLL_FOR - Duration::from_millis(1)),
            FAST_POLL_INTERVAL
        );
        assert_eq!(poll_pause(start, start + FAST_POLL_FOR), POLL_INTERVAL);
        assert!(FAST_POLL_INTERVAL < POLL_INTERVAL);
    }
}
