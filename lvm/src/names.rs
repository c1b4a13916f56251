//! LVM's naming rules, vmsnap's tags and device paths.

use std::path::Path;

use crate::{Error, Result};

/// Longest VG or LV name LVM accepts (its NAME_LEN is 128 with the terminating NUL).
pub const MAX_NAME_LEN: usize = 127;
/// Longest tag LVM accepts.
const MAX_TAG_LEN: usize = 1024;

/// The tag on every LV vmsnap creates: `lvs @vmsnap` lists them.
pub const TAG_VMSNAP: &str = "vmsnap";

/// LV names may not start with these (LVM: `Names starting "snapshot" are reserved`).
const RESERVED_PREFIXES: [&str; 2] = ["snapshot", "pvmove"];
/// LV names may not contain these (LVM's internal sub-LV suffixes, as lvm 2.03.16 lists them).
const RESERVED_SUBSTRINGS: [&str; 18] = [
    "_cdata",
    "_cmeta",
    "_corig",
    "_cpool",
    "_cvol",
    "_imeta",
    "_iorig",
    "_mimage",
    "_mimagetmp",
    "_mlog",
    "_pmspare",
    "_rimage",
    "_rmeta",
    "_tdata",
    "_tmeta",
    "_vdata",
    "_vorigin",
    "_wcorig",
];

fn invalid(kind: &'static str, name: &str, reason: impl Into<String>) -> Error {
    Error::InvalidName {
        kind,
        name: name.to_string(),
        reason: reason.into(),
    }
}

fn check_common(kind: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(invalid(kind, name, "empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            kind,
            name,
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')))
    {
        return Err(invalid(
            kind,
            name,
            format!("{c:?} is not one of A-Z a-z 0-9 + _ . -"),
        ));
    }
    if name.starts_with('-') {
        return Err(invalid(kind, name, "starts with '-'"));
    }
    if name == "." || name == ".." {
        return Err(invalid(kind, name, "reserved"));
    }
    Ok(())
}

/// Checks a VG name against LVM's rules: 1-127 characters of `A-Za-z0-9+_.-`, not starting with
/// `-`, not `.` or `..`.
pub fn validate_vg_name(name: &str) -> Result<()> {
    check_common("volume group name", name)
}

/// Checks an LV name against LVM's rules: those of [`validate_vg_name`], and not starting with
/// `snapshot` or `pvmove`, and not containing one of LVM's sub-LV suffixes (`_tmeta`, `_rimage`,
/// ...). (LVM reserves `snapshot`/`pvmove` only as prefixes: `xsnapshot` is a valid name.)
pub fn validate_lv_name(name: &str) -> Result<()> {
    const KIND: &str = "logical volume name";
    check_common(KIND, name)?;
    if let Some(p) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(**p)) {
        return Err(invalid(
            KIND,
            name,
            format!("names starting {p:?} are reserved"),
        ));
    }
    if let Some(s) = RESERVED_SUBSTRINGS.iter().find(|s| name.contains(**s)) {
        return Err(invalid(
            KIND,
            name,
            format!("names including {s:?} are reserved"),
        ));
    }
    Ok(())
}

/// Checks an LVM tag: 1-1024 characters of `A-Za-z0-9_+.-/=!:&#`, not starting with `-`.
pub fn validate_tag(tag: &str) -> Result<()> {
    const KIND: &str = "tag";
    if tag.is_empty() {
        return Err(invalid(KIND, tag, "empty"));
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(invalid(KIND, tag, "longer than 1024 characters"));
    }
    if tag.starts_with('-') {
        return Err(invalid(KIND, tag, "starts with '-'"));
    }
    if let Some(c) = tag.chars().find(|c| {
        !(c.is_ascii_alphanumeric()
            || matches!(c, '_' | '+' | '.' | '-' | '/' | '=' | '!' | ':' | '&' | '#'))
    }) {
        return Err(invalid(KIND, tag, format!("{c:?} is not allowed in a tag")));
    }
    Ok(())
}

/// The tags of a vmsnap snapshot LV: `vmsnap`, `vmsnap-vm-<vm uuid>`, `vmsnap-snap-<snapshot
/// uuid>`, so `lvs @vmsnap` lists every one and `lvs @vmsnap-vm-<uuid>` those of one VM.
pub fn vmsnap_tags(vm_uuid: &str, snapshot_uuid: &str) -> Result<Vec<String>> {
    let tags = vec![
        TAG_VMSNAP.to_string(),
        format!("vmsnap-vm-{vm_uuid}"),
        format!("vmsnap-snap-{snapshot_uuid}"),
    ];
    for tag in &tags {
        validate_tag(tag)?;
    }
    Ok(tags)
}

/// Directories of /dev that are not volume groups.
const DEV_DIRS: [&str; 20] = [
    "block",
    "bsg",
    "bus",
    "char",
    "cpu",
    "disk",
    "dma_heap",
    "dri",
    "fd",
    "hugepages",
    "input",
    "mqueue",
    "net",
    "pts",
    "shm",
    "snd",
    "usb",
    "vfio",
    "vhost-net",
    "virtio-ports",
];

/// The (VG, LV) an LVM device path names, from its spelling alone: `/dev/VG/LV`, or
/// `/dev/mapper/VG-LV` where a `-` inside a name is written `--`. `None` for anything else,
/// including device-mapper names with a layer suffix (`VG-LV-real`, `VG-pool-tpool`) and
/// /dev subdirectories that are not VGs (`/dev/disk/...`). Symlinks are not followed and the LV
/// may not exist: confirm with [`crate::Lvm::find_lv`].
pub fn resolve_device(path: &Path) -> Option<(String, String)> {
    let text = path.to_str()?;
    let rest = text.strip_prefix("/dev/")?;
    let mut parts = rest.split('/');
    let (first, second) = (parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (vg, lv) = if first == "mapper" {
        split_dm_name(second)?
    } else {
        if DEV_DIRS.contains(&first) {
            return None;
        }
        (first.to_string(), second.to_string())
    };
    (validate_vg_name(&vg).is_ok() && validate_lv_name(&lv).is_ok()).then_some((vg, lv))
}

/// Splits a device-mapper name `VG-LV` (with `-` doubled inside each name) into its parts;
/// `None` when there is no separator or there is a third part (a layer such as `-real`).
fn split_dm_name(name: &str) -> Option<(String, String)> {
    let mut parts: Vec<String> = vec![String::new()];
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '-' {
            if chars.peek() == Some(&'-') {
                chars.next();
                parts.last_mut()?.push('-');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut()?.push(c);
        }
    }
    let mut parts = parts.into_iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(vg), Some(lv), None) if !vg.is_empty() && !lv.is_empty() => Some((vg, lv)),
        _ => None,
    }
}
