//! `-H [USER@]HOST[:PORT]`: vmsnapd of another hypervisor over SSH, as `systemctl -H` and
//! `busctl -H` do it: D-Bus through `ssh -xT HOST systemd-stdio-bridge` (zbus's `unixexec`
//! transport). The program is `ssh` unless `VMSNAP_SSH` names another (a wrapper that adds
//! options, say); keys, known hosts and the rest come from ssh's own configuration.

/// Environment variable naming the ssh program.
pub const SSH_ENV: &str = "VMSNAP_SSH";

/// A parsed `-H` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `user@host` or `host`, as ssh takes it.
    pub destination: String,
    pub port: Option<u16>,
}

/// Reads `[USER@]HOST[:PORT]` (an IPv6 address in brackets: `[::1]:2222`).
pub fn parse_host(text: &str) -> Result<Host, String> {
    let bad = |why: &str| format!("-H {text:?}: {why} (expected [USER@]HOST[:PORT])");
    if text.is_empty() {
        return Err(bad("empty"));
    }
    if text.starts_with('-') {
        return Err(bad("must not start with '-'"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains a space or a control character"));
    }
    let (user, rest) = match text.rsplit_once('@') {
        Some((user, rest)) => {
            if user.is_empty() || user.starts_with('-') {
                return Err(bad("bad user"));
            }
            (Some(user), rest)
        }
        None => (None, text),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (host, after) = inner.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("junk after ']'"))?,
                ),
            ),
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            Some(_) => (rest, None),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.starts_with('-') {
        return Err(bad("bad host"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("bad port"))?,
        ),
    };
    let destination = match user {
        Some(user) => format!("{user}@{host}"),
        None => host.to_string(),
    };
    Ok(Host { destination, port })
}

/// The arguments of ssh that run `systemd-stdio-bridge` on `host`, on its system bus or on
/// `remote_bus` (a D-Bus address on that host).
pub fn ssh_args(host: &Host, remote_bus: Option<&str>) -> Vec<String> {
    let mut argv: Vec<String> = vec!["-xT".to_string()];
    if let Some(port) = host.port {
        argv.push("-p".to_string());
        argv.push(port.to_string());
    }
    argv.push("--".to_string());
    argv.push(host.destination.clone());
    argv.push("systemd-stdio-bridge".to_string());
    if let Some(bus) = remote_bus {
        // One shell word on the remote side: ssh passes the command through a shell.
        argv.push(format!("--bus-path='{}'", bus.replace('\'', "'\\''")));
    }
    argv
}

/// The `unixexec:` address that runs `ssh` with [`ssh_args`]. Built as a value, not parsed
/// from text, so no argument needs escaping.
pub fn ssh_address(ssh: &str, host: &Host, remote_bus: Option<&str>) -> zbus::Address {
    let args = ssh_args(host, remote_bus)
        .into_iter()
        .map(std::ffi::OsString::from)
        .collect();
    zbus::Address::from(zbus::address::Transport::Unixexec(
        zbus::address::transport::Unixexec::new(
            std::path::PathBuf::from(ssh),
            Some(std::ffi::OsString::from(ssh)),
            args,
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(
            parse_host("root@hv1:2222"),
            Ok(Host {
                destination: "root@hv1".into(),
                port: Some(2222)
            })
        );
        assert_eq!(
            parse_host("hv1.example.org"),
            Ok(Host {
                destination: "hv1.example.org".into(),
                port: None
            })
        );
        assert_eq!(
            parse_host("[::1]:22"),
            Ok(Host {
                destination: "::1".into(),
                port: Some(22)
            })
        );
        assert_eq!(
            parse_host("fe80::1"),
            Ok(Host {
                destination: "fe80::1".into(),
                port: None
            })
        );
        for bad in [
            "",
            "-oProxyCommand=x",
            "a b",
            "root@",
            "@h",
            "h:0",
            "h:x",
            "h:99999",
            "[::1",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_arguments() {
        let host = parse_host("root@127.0.0.1:2222").expect("parses");
        assert_eq!(
            ssh_args(&host, None),
            [
                "-xT",
                "-p",
                "2222",
                "--",
                "root@127.0.0.1",
                "systemd-stdio-bridge"
            ]
        );
        let args = ssh_args(&host, Some("unix:path=/run/it's.sock"));
        assert_eq!(
            args.last().map(String::as_str),
            Some("--bus-path='unix:path=/run/it'\\''s.sock'")
        );
        let address = ssh_address("/x/ssh", &host, None);
        assert!(matches!(
            address.transport(),
            zbus::address::Transport::Unixexec(_)
        ));
    }
}
