//! `vmsnapctl wait --for=condition=Ready vmsnapshot/NAME --timeout=DURATION`, and
//! `--for=delete`, with kubectl's messages and exit status (0: every object met the condition;
//! 1: timed out or an object does not exist; 130: interrupted).

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

use super::get::{collect, kind_of};
use super::model::Kind;
use super::time::parse_go_duration;
use crate::bus::Bus;
use crate::Failure;

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The objects: TYPE/NAME (vmsnapshot/my-snap, vmrestore/my-restore), or TYPE NAME...
    #[arg(value_name = "TYPE/NAME", required = true)]
    pub objects: Vec<String>,

    /// What to wait for: condition=Ready (or another condition: Progressing, Failure;
    /// condition=Ready=false waits for it to be false), or delete (until the object is gone).
    #[arg(long = "for", value_name = "CONDITION")]
    pub condition: String,

    /// How long to wait, as a Go duration (30s, 5m, 1h); 0 checks once. Default: 30s.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub timeout: String,
}

/// What `--for` asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// A condition of `status.conditions` with this status ("True" or "False").
    Status {
        kind: String,
        status: String,
    },
    Delete,
}

pub fn parse_condition(text: &str) -> Result<Condition, String> {
    if text == "delete" {
        return Ok(Condition::Delete);
    }
    let Some(rest) = text.strip_prefix("condition=") else {
        return Err(format!(
            "unrecognized condition: {text:?} (use condition=NAME[=VALUE] or delete)"
        ));
    };
    let (kind, status) = match rest.split_once('=') {
        Some((kind, value)) => (kind, value),
        None => (rest, "true"),
    };
    if kind.is_empty() {
        return Err(format!("unrecognized condition: {text:?}"));
    }
    let status = match status.to_ascii_lowercase().as_str() {
        "true" => "True",
        "false" => "False",
        _ => {
            return Err(format!(
                "unrecognized condition value {status:?} (use true or false)"
            ))
        }
    };
    Ok(Condition::Status {
        kind: kind.to_string(),
        status: status.to_string(),
    })
}

/// The objects named on the command line: `TYPE/NAME ...` or `TYPE NAME ...`.
pub fn parse_objects(words: &[String]) -> Result<Vec<(Kind, String)>, String> {
    if words.iter().all(|w| w.contains('/')) {
        return words
            .iter()
            .map(|w| {
                let (resource, name) = w.split_once('/').unwrap_or((w, ""));
                if name.is_empty() {
                    return Err(format!("{w:?}: the name after / is missing"));
                }
                Ok((kind_of(resource)?, name.to_string()))
            })
            .collect();
    }
    match words.split_first() {
        Some((resource, names)) if !names.is_empty() && !names.iter().any(|n| n.contains('/')) => {
            let kind = kind_of(resource)?;
            Ok(names.iter().map(|n| (kind, n.clone())).collect())
        }
        _ => Err(
            "name the objects as TYPE/NAME ... or TYPE NAME ... (e.g. vmsnapshot/my-snap)"
                .to_string(),
        ),
    }
}

/// Whether one object meets a condition.
pub fn meets(object: &Value, kind: &str, status: &str) -> bool {
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            c["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case(kind))
                && c["status"].as_str() == Some(status)
        })
}

const POLL: Duration = Duration::from_millis(200);

pub async fn run(bus: &Bus, args: WaitArgs) -> Result<(), Failure> {
    let condition = parse_condition(&args.condition)?;
    let objects = parse_objects(&args.objects)?;
    let timeout = parse_go_duration(&args.timeout).map_err(|e| format!("--timeout: {e}"))?;
    let deadline = Instant::now() + timeout;
    for (kind, name) in &objects {
        wait_one(bus, *kind, name, &condition, deadline).await?;
        let what = if condition == Condition::Delete {
            "deleted"
        } else {
            "condition met"
        };
        println!("{} {what}", kind.qualified_name(&super::cell(name)));
    }
    Ok(())
}

async fn wait_one(
    bus: &Bus,
    kind: Kind,
    name: &str,
    condition: &Condition,
    deadline: Instant,
) -> Result<(), Failure> {
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let items = collect(bus, kind, Some(name)).await?;
        let done = match condition {
            Condition::Delete => items.is_empty(),
            Condition::Status { kind: c, status } => {
                if items.is_empty() {
                    return Err(kind.not_found(name).into());
                }
                items.iter().all(|i| meets(&i.object, c, status))
            }
        };
        if done {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "timed out waiting for the condition on {}/{}",
                kind.plural(),
                super::cell(name)
            )
            .into());
        }
        let pause = POLL.min(deadline - now);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut interrupt => {
                return Err(Failure::interrupted("stopped waiting"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions() {
        assert_eq!(parse_condition("delete"), Ok(Condition::Delete));
        assert_eq!(
            parse_condition("condition=Ready"),
            Ok(Condition::Status {
                kind: "Ready".into(),
                status: "True".into()
            })
        );
        assert_eq!(
            parse_condition("condition=Ready=false"),
            Ok(Condition::Status {
                kind: "Ready".into(),
                status: "False".into()
            })
        );
        for bad in [
            "Ready",
            "condition=",
            "condition=Ready=maybe",
            "jsonpath={.x}",
        ] {
            assert!(parse_condition(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn objects() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_objects(&words(&["vmsnapshot/a", "vmrestore/b"])),
            Ok(vec![
                (Kind::Snapshot, "a".into()),
                (Kind::Restore, "b".into())
            ])
        );
        assert_eq!(
            parse_objects(&words(&["vmsnapshots", "a", "b"])),
            Ok(vec![
                (Kind::Snapshot, "a".into()),
                (Kind::Snapshot, "b".into())
            ])
        );
        assert!(parse_objects(&words(&["vmsnapshot"])).is_err());
        assert!(parse_objects(&words(&["vmsnapshot/"])).is_err());
        assert!(parse_objects(&words(&["pods/a"])).is_err());
    }

    #[test]
    fn meets_reads_conditions() {
        let object = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"}, {"type": "Progressing", "status": "False"}]}});
        assert!(meets(&object, "Ready", "True"));
        assert!(meets(&object, "ready", "True"));
        assert!(!meets(&object, "Ready", "False"));
        assert!(!meets(&object, "Failure", "True"));
    }
}
