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
    /// How often the VM inventory is re-read from libvirt.
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
    /// Authorize create, delete and restore through polkit.
    pub polkit: bool,
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
            refresh_interval: Duration::from_secs(1),
            reconnect_interval: Duration::from_secs(2),
            log_level: "info".to_string(),
            freeze_timeout: Duration::from_secs(10),
            require_quiesce: false,
            failure_deadline: Duration::from_secs(300),
            polkit: true,
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
        if self.failure_deadline <= self.freeze_timeout {
            return Err("failure_deadline must be longer than freeze_timeout".to_string());
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
    fn missing_explicit_file_is_an_error_naming_it() {
        let err = Config::load(Some(Path::new("/nonexistent/vmsnapd.toml"))).expect_err("missing");
        assert!(err.to_string().starts_with("/nonexistent/vmsnapd.toml: "));
    }
}
