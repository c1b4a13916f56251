//! `lvs --reportformat json` parsing.

use serde::{Deserialize, Deserializer};

/// What kind of LV, from its segment type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LvKind {
    /// A thin LV (`segtype` thin), a thin snapshot included.
    Thin,
    /// A fully allocated LV (linear, striped, mirror, raid...), a thick snapshot included.
    Thick,
    /// A thin pool.
    ThinPool,
    /// Anything else (cache, vdo, integrity, ...), with its segtype.
    Other(String),
}

impl LvKind {
    fn from_segtype(segtype: &str) -> LvKind {
        match segtype {
            "thin" => LvKind::Thin,
            "thin-pool" => LvKind::ThinPool,
            "linear" | "striped" | "mirror" => LvKind::Thick,
            s if s.starts_with("raid") => LvKind::Thick,
            s => LvKind::Other(s.to_string()),
        }
    }
}

/// One LV as `lvs` reports it (fields [`crate::LV_FIELDS`], sizes in bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct LvInfo {
    pub name: String,
    pub vg: String,
    pub uuid: String,
    /// Size in bytes (the virtual size of a thin LV; the copy-on-write size of a thick
    /// snapshot).
    pub size: u64,
    /// `lv_attr`, 10 characters: type, permissions, allocation, fixed minor, state, open,
    /// target type, zero, health, skip activation (see lvs(8)).
    pub attr: String,
    pub segtype: String,
    pub kind: LvKind,
    /// The thin pool of a thin LV.
    pub pool_lv: Option<String>,
    /// The origin of a snapshot (thin or thick); `None` once a thin snapshot's origin is gone.
    pub origin: Option<String>,
    pub data_percent: Option<f64>,
    pub snap_percent: Option<f64>,
    pub tags: Vec<String>,
    /// `/dev/VG/LV` (`None` for hidden LVs).
    pub path: Option<String>,
}

impl LvInfo {
    fn attr_char(&self, index: usize) -> Option<char> {
        self.attr.chars().nth(index)
    }

    /// A thick (copy-on-write) snapshot: attr type `s`, or `S` while merging.
    pub fn is_thick_snapshot(&self) -> bool {
        matches!(self.attr_char(0), Some('s' | 'S'))
    }

    /// A thin snapshot: a thin LV with an origin. A thin LV restored by
    /// [`crate::Lvm::restore_thin`] is one too (its origin is the snapshot it was made from,
    /// until that is removed): tell vmsnap's snapshots by their tags.
    pub fn is_thin_snapshot(&self) -> bool {
        self.kind == LvKind::Thin && self.origin.is_some()
    }

    pub fn is_snapshot(&self) -> bool {
        self.is_thick_snapshot() || self.is_thin_snapshot()
    }

    /// A snapshot being merged into its origin, or an origin with a merging snapshot (attr
    /// type `S` / `O`).
    pub fn is_merging(&self) -> bool {
        matches!(self.attr_char(0), Some('S' | 'O'))
    }

    /// Active (attr state `a`).
    pub fn is_active(&self) -> bool {
        self.attr_char(4) == Some('a')
    }

    /// Open (attr `o`): mounted or used by a process such as QEMU.
    pub fn is_open(&self) -> bool {
        self.attr_char(5) == Some('o')
    }

    /// Flagged to be skipped on activation (attr `k`; LVM sets it on thin snapshots by
    /// default).
    pub fn activation_skip(&self) -> bool {
        self.attr_char(9) == Some('k')
    }

    /// A thick snapshot that is no longer usable: attr state `I` (LVM invalidated it when its
    /// copy-on-write space filled up), or full copy-on-write space (`snap_percent` 100, seen
    /// before the kernel reports the invalidation). Thin LVs report their data use in
    /// `snap_percent` too, so it counts only for thick snapshots.
    pub fn is_invalid(&self) -> bool {
        self.attr_char(4) == Some('I')
            || (self.is_thick_snapshot() && self.snap_percent.is_some_and(|p| p >= 100.0))
    }

    /// How full it is in percent: a thick snapshot's copy-on-write space, a thin LV's or thin
    /// pool's data; `None` if LVM reports none (a plain thick LV, an inactive LV).
    pub fn fill_percent(&self) -> Option<f64> {
        if self.is_thick_snapshot() {
            self.snap_percent
        } else {
            match self.kind {
                LvKind::Thin | LvKind::ThinPool => self.data_percent,
                _ => None,
            }
        }
    }
}

#[derive(Deserialize)]
struct Report {
    report: Vec<ReportSection>,
}

#[derive(Deserialize)]
struct ReportSection {
    #[serde(default)]
    lv: Vec<RawLv>,
}

/// A report row. lvm 2.03.16's `json` format gives every value as a string ("" when unset);
/// `json_std` (2.03.17+) gives numbers and null: both are accepted.
#[derive(Deserialize)]
struct RawLv {
    lv_name: String,
    vg_name: String,
    #[serde(default)]
    lv_uuid: String,
    #[serde(deserialize_with = "number_or_string")]
    lv_size: Option<Value>,
    lv_attr: String,
    #[serde(default)]
    segtype: String,
    #[serde(default, deserialize_with = "opt_string")]
    pool_lv: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    origin: Option<String>,
    #[serde(default, deserialize_with = "number_or_string")]
    data_percent: Option<Value>,
    #[serde(default, deserialize_with = "number_or_string")]
    snap_percent: Option<Value>,
    #[serde(default, deserialize_with = "tags")]
    lv_tags: Vec<String>,
    #[serde(default, deserialize_with = "opt_string")]
    lv_path: Option<String>,
}

enum Value {
    Text(String),
    Number(serde_json::Number),
}

impl Value {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Text(s) => s.trim().trim_end_matches(['B', 'b']).parse().ok(),
            Value::Number(n) => n.as_u64(),
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Text(s) => s.trim().trim_end_matches('%').parse().ok(),
            Value::Number(n) => n.as_f64(),
        }
    }
}

fn number_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) if s.trim().is_empty() => None,
        serde_json::Value::String(s) => Some(Value::Text(s)),
        serde_json::Value::Number(n) => Some(Value::Number(n)),
        _ => None,
    })
}

fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()))
}

fn tags<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .filter(|t| !t.is_empty())
            .collect(),
        _ => Vec::new(),
    })
}

/// Parses the output of `lvs --reportformat json --units b --nosuffix -o`
/// [`crate::LV_FIELDS`]. Hidden LVs (`[pool_tdata]`) keep their brackets in `name`.
pub fn parse_lvs_report(text: &str) -> Result<Vec<LvInfo>, String> {
    let report: Report = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for raw in report.report.into_iter().flat_map(|s| s.lv) {
        let size = raw
            .lv_size
            .as_ref()
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("LV {}/{}: no size in bytes", raw.vg_name, raw.lv_name))?;
        if raw.lv_attr.chars().count() < 10 {
            return Err(format!(
                "LV {}/{}: lv_attr {:?} is not 10 characters",
                raw.vg_name, raw.lv_name, raw.lv_attr
            ));
        }
        out.push(LvInfo {
            kind: LvKind::from_segtype(&raw.segtype),
            name: raw.lv_name,
            vg: raw.vg_name,
            uuid: raw.lv_uuid,
            size,
            attr: raw.lv_attr,
            segtype: raw.segtype,
            pool_lv: raw.pool_lv,
            origin: raw.origin,
            data_percent: raw.data_percent.as_ref().and_then(Value::as_f64),
            snap_percent: raw.snap_percent.as_ref().and_then(Value::as_f64),
            tags: raw.lv_tags,
            path: raw.lv_path,
        });
    }
    Ok(out)
}
