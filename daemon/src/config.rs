//! vmsnapd's configuration: `/etc/vmsnap/vmsnapd.toml`, `--config FILE`, or built-in defaults.
//!
//! Every key is optional; the documented defaults live in `config/vmsnapd.toml`, and a test keeps
//! that file and [`Config::default`] in agreement.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The file read when no `--config` is given. Its absence is not an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmsnap/vmsnapd.toml";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// libvirt connection URI.
    pub libvirt_uri: String,
    /// Where vmsnap keeps its records.
    pub state_dir: PathBuf,
    /// Where vmsnapd locks each VM it works on, for the libvirt hook to see.
    pub vm_lock_dir: PathBuf,
    /// How often the whole VM inventory is re-read from libvirt, as a safety net: libvirt's
    /// domain events keep it current in between.
    #[serde(with = "duration_text")]
    pub refresh_interval: Duration,
    /// How long to wait between attempts to reach libvirt while it is unavailable.
    #[serde(with = "duration_text")]
    pub reconnect_interval: Duration,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive).
    pub log_level: String,
    /// The longest a guest may stay frozen; past it, the guest is thawed whatever else happens.
    #[serde(with = "duration_text")]
    pub freeze_timeout: Duration,
    /// Fail a snapshot whose freeze fails, instead of taking it crash-consistent.
    pub require_quiesce: bool,
    /// A snapshot not finished within this time fails and is rolled back.
    #[serde(with = "duration_text")]
    pub failure_deadline: Duration,
    /// How long a restore with targetReadinessPolicy WaitGracePeriod waits for its VM to be
    /// shut off before it fails.
    #[serde(with = "duration_text")]
    pub restore_grace_period: Duration,
    /// Authorize create, delete and restore through polkit.
    pub polkit: bool,
    /// When to try freezing the guest's filesystems.
    pub quiesce: Quiesce,
    /// How often ready snapshots' images are checked to be there (ReadyToUse follows).
    #[serde(with = "duration_text")]
    pub verify_interval: Duration,
    /// LVM logical volumes.
    pub lvm: LvmConfig,
    /// Ceph RBD images.
    pub rbd: RbdConfig,
}

/// The `[rbd]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RbdConfig {
    /// The Ceph configuration the `rbd` command reads (monitors, keyrings), as users have it.
    pub ceph_conf: PathBuf,
    /// The longest one `rbd` command may run before it is stopped.
    #[serde(with = "duration_text")]
    pub command_timeout: Duration,
}

impl Default for RbdConfig {
    fn default() -> Self {
        RbdConfig {
            ceph_conf: PathBuf::from("/etc/ceph/ceph.conf"),
            command_timeout: Duration::from_secs(60),
        }
    }
}

/// When a snapshot of a running VM tries to freeze its filesystems through the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quiesce {
    /// When libvirt reports the agent connected.
    Auto,
    /// Whenever the VM has an agent channel, even if libvirt does not report the agent's state
    /// (older libvirt, or drivers such as test:/// that do not track it).
    Always,
}

/// The `[lvm]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LvmConfig {
    /// Copy-on-write space of a thick LV's snapshot: a share of the origin ("20%") or a size.
    pub thick_snapshot_size: SnapshotSize,
    /// The least copy-on-write space a thick snapshot gets.
    #[serde(with = "byte_size_text")]
    pub thick_snapshot_min_size: u64,
    /// Warn when a thick snapshot's copy-on-write space is fuller than this (percent).
    pub fill_warning_percent: f64,
    /// How often thick snapshots' copy-on-write space is checked.
    #[serde(with = "duration_text")]
    pub fill_check_interval: Duration,
    /// The longest one LVM command may run before it is stopped.
    #[serde(with = "duration_text")]
    pub command_timeout: Duration,
}

impl Default for LvmConfig {
    fn default() -> Self {
        LvmConfig {
            thick_snapshot_size: SnapshotSize::Percent(20.0),
            thick_snapshot_min_size: 256 << 20,
            fill_warning_percent: 80.0,
            fill_check_interval: Duration::from_secs(10),
            command_timeout: Duration::from_secs(600),
        }
    }
}

impl LvmConfig {
    /// Copy-on-write bytes for a thick snapshot of an origin of `origin_size` bytes.
    pub fn thick_size_for(&self, origin_size: u64) -> u64 {
        match self.thick_snapshot_size {
            SnapshotSize::Percent(p) => {
                vmsnap_lvm::thick_snapshot_size(origin_size, p, self.thick_snapshot_min_size)
            }
            SnapshotSize::Bytes(b) => {
                vmsnap_lvm::thick_snapshot_size(b, 100.0, self.thick_snapshot_min_size)
            }
        }
    }
}

/// A thick snapshot's size: a share of its origin or a fixed size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SnapshotSize {
    Percent(f64),
    Bytes(u64),
}

impl<'de> Deserialize<'de> for SnapshotSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parsed = match text.trim().strip_suffix('%') {
            Some(number) => number
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| *p > 0.0 && *p <= 100.0)
                .map(SnapshotSize::Percent)
                .ok_or_else(|| format!("invalid share {text:?}: write a percentage above 0 and at most 100, e.g. \"20%\"")),
            None => parse_byte_size(&text).map(SnapshotSize::Bytes),
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

/// Sizes like "512MiB", "4GiB", "1TiB" or a number of bytes. Only binary units, so that "GB"
/// cannot be mistaken for GiB.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => u32::MAX,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| shift != u32::MAX)
        .and_then(|n| n.checked_mul(1u64 << shift))
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            format!("invalid size {text:?}: write e.g. \"256MiB\" or \"4GiB\" (units B, KiB, MiB, GiB, TiB)")
        })
}

mod byte_size_text {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_byte_size(&text).map_err(serde::de::Error::custom)
    }
}

/// Durations as human-readable text: "500ms", "10s", "5m".
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write e.g. \"500ms\", \"10s\" or \"5m\""
            ))
        })
    }

    #[allow(dead_code)] // serde's `with` wants both halves
    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*value).to_string())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            libvirt_uri: "qemu:///system".to_string(),
            state_dir: PathBuf::from("/var/lib/vmsnap"),
            vm_lock_dir: PathBuf::from("/run/vmsnap/vms"),
            refresh_interval: Duration::from_secs(30),
            reconnect_interval: Duration::from_secs(2),
            log_level: "info".to_string(),
            freeze_timeout: Duration::from_secs(10),
            require_quiesce: false,
            failure_deadline: Duration::from_secs(300),
            restore_grace_period: Duration::from_secs(300),
            polkit: true,
            quiesce: Quiesce::Auto,
            verify_interval: Duration::from_secs(30),
            lvm: LvmConfig::default(),
            rbd: RbdConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Loads `explicit` if given (it must exist), else the default path if it exists, else the
    /// built-in defaults. Returns the config and the file it came from.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let default = PathBuf::from(DEFAULT_CONFIG_PATH);
                if !default.exists() {
                    return Ok((Config::default(), None));
                }
                default
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config = Config::parse(&text, &path.display().to_string())?;
        Ok((config, Some(path)))
    }

    /// Parses config text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_and_column(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: origin.to_string(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.libvirt_uri.trim().is_empty() {
            return Err("libvirt_uri must not be empty".to_string());
        }
        if !self.state_dir.is_absolute() {
            return Err(format!(
                "state_dir must be an absolute path, not {:?}",
                self.state_dir
            ));
        }
        if !self.vm_lock_dir.is_absolute() {
            return Err(format!(
                "vm_lock_dir must be an absolute path, not {:?}",
                self.vm_lock_dir
            ));
        }
        let between = |name: &str, value: Duration, min: Duration, max: Duration| {
            if value < min || value > max {
                Err(format!(
                    "{name} must be between {} and {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ))
            } else {
                Ok(())
            }
        };
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        between("verify_interval", self.verify_interval, secs(1), secs(3600))?;
        between(
            "refresh_interval",
            self.refresh_interval,
            ms(100),
            secs(3600),
        )?;
        between(
            "reconnect_interval",
            self.reconnect_interval,
            ms(100),
            secs(3600),
        )?;
        between("freeze_timeout", self.freeze_timeout, secs(1), secs(600))?;
        between(
            "failure_deadline",
            self.failure_deadline,
            secs(5),
            secs(24 * 3600),
        )?;
        between(
            "restore_grace_period",
            self.restore_grace_period,
            secs(1),
            secs(7 * 24 * 3600),
        )?;
        if self.failure_deadline <= self.freeze_timeout {
            return Err("failure_deadline must be longer than freeze_timeout".to_string());
        }
        between(
            "lvm.fill_check_interval",
            self.lvm.fill_check_interval,
            ms(100),
            secs(3600),
        )?;
        between(
            "lvm.command_timeout",
            self.lvm.command_timeout,
            secs(1),
            secs(24 * 3600),
        )?;
        if !(self.lvm.fill_warning_percent > 0.0 && self.lvm.fill_warning_percent <= 100.0) {
            return Err("lvm.fill_warning_percent must be above 0 and at most 100".to_string());
        }
        between(
            "rbd.command_timeout",
            self.rbd.command_timeout,
            secs(1),
            secs(24 * 3600),
        )?;
        if !self.rbd.ceph_conf.is_absolute() {
            return Err("rbd.ceph_conf must be an absolute path".to_string());
        }
        Ok(())
    }
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("", "x.toml").ok(), Some(Config::default()));
    }

    #[test]
    fn shipped_default_config_matches_built_in_defaults() {
        let text = include_str!("../../config/vmsnapd.toml");
        let uncommented: String = text
            .lines()
            .map(|l| l.strip_prefix("#: ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed = Config::parse(&uncommented, "config/vmsnapd.toml");
        assert_eq!(parsed.ok(), Some(Config::default()));
    }

    #[test]
    fn keys_override_defaults() {
        let c = Config::parse(
            "libvirt_uri = \"test:///default\"\nrefresh_interval = \"250ms\"\n",
            "x.toml",
        )
        .expect("valid");
        assert_eq!(c.libvirt_uri, "test:///default");
        assert_eq!(c.refresh_interval, Duration::from_millis(250));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/vmsnap"));
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = Config::parse(
            "log_level = \"info\"\n\nlibvirt_uri = qemu\n",
            "/etc/v.toml",
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(text.starts_with("/etc/v.toml:3:"), "{text}");
    }

    #[test]
    fn unknown_key_is_an_error_at_its_line() {
        let err = Config::parse("log_level = \"info\"\nlibvirt_url = \"x\"\n", "v.toml")
            .expect_err("unknown key");
        let text = err.to_string();
        assert!(text.starts_with("v.toml:2:1:"), "{text}");
        assert!(text.contains("libvirt_url"), "{text}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = Config::parse("refresh_interval = 5\n", "v.toml").expect_err("type");
        assert!(err.to_string().starts_with("v.toml:1:"), "{err}");
        let err = Config::parse("freeze_timeout = \"fast\"\n", "v.toml").expect_err("duration");
        assert!(err.to_string().contains("invalid duration"), "{err}");
        assert!(err.to_string().starts_with("v.toml:1:"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        for text in [
            "libvirt_uri = \"\"",
            "state_dir = \"relative/dir\"",
            "refresh_interval = \"0s\"",
            "freeze_timeout = \"20m\"\nfailure_deadline = \"10m\"",
        ] {
            assert!(Config::parse(text, "v.toml").is_err(), "{text}");
        }
    }

    #[test]
    fn lvm_sizes_and_quiesce() {
        let c = Config::parse(
            "quiesce = \"always\"\n[lvm]\nthick_snapshot_size = \"8MiB\"\nthick_snapshot_min_size = \"4MiB\"\n",
            "v.toml",
        )
        .expect("valid");
        assert_eq!(c.quiesce, Quiesce::Always);
        assert_eq!(c.lvm.thick_snapshot_size, SnapshotSize::Bytes(8 << 20));
        assert_eq!(c.lvm.thick_size_for(1 << 30), 8 << 20);
        let d = LvmConfig::default();
        assert_eq!(d.thick_size_for(10 << 30), 2 << 30);
        assert_eq!(d.thick_size_for(100 << 20), 256 << 20);
        for text in [
            "[lvm]\nthick_snapshot_size = \"0%\"",
            "[lvm]\nthick_snapshot_size = \"150%\"",
            "[lvm]\nthick_snapshot_size = \"1GB\"",
            "[lvm]\nthick_snapshot_min_size = \"-1MiB\"",
            "[lvm]\nfill_warning_percent = 0.0",
            "quiesce = \"sometimes\"",
        ] {
            let err = Config::parse(text, "v.toml").expect_err(text);
            assert!(err.to_string().starts_with("v.toml:"), "{err}");
        }
    }

    #[test]
    fn missing_explicit_file_is_an_error_naming_it() {
        let err = Config::load(Some(Path::new("/nonexistent/vmsnapd.toml"))).expect_err("missing");
        assert!(err.to_string().starts_with("/nonexistent/vmsnapd.toml: "));
    }
}
