//! Authorization of the calls that change anything (create, delete, restore) through polkit.
//!
//! The subject is always the caller, taken from the message header, never vmsnapd itself. On the
//! system bus polkit knows the caller by its unique bus name. On a private bus (`--bus-address`)
//! that name means nothing to polkit, so the caller's process is looked up on that bus and
//! polkit, reached on the system bus, is asked about the process. With `polkit = false` in the
//! configuration (tests, single-user use on a private bus) every caller is allowed.

use std::collections::HashMap;

use tracing::warn;
use vmsnap_api::VmSnapError;
use zbus::message::Header;
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

pub const ACTION_CREATE: &str = "org.vmsnap.snapshot.create";
pub const ACTION_DELETE: &str = "org.vmsnap.snapshot.delete";
pub const ACTION_RESTORE: &str = "org.vmsnap.restore";

#[derive(Clone)]
pub enum Authorizer {
    /// Every caller may do everything (configured `polkit = false`).
    Disabled,
    Polkit {
        /// The system bus, where polkitd is; None if it could not be reached at start.
        system: Option<Connection>,
        /// Whether vmsnapd serves on the system bus itself.
        serving_system_bus: bool,
    },
}

impl Authorizer {
    pub async fn new(enabled: bool, serving_system_bus: bool) -> Authorizer {
        if !enabled {
            warn!("polkit authorization is off: every caller may create, delete and restore");
            return Authorizer::Disabled;
        }
        let system = match Connection::system().await {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "cannot reach the system bus: changes will be refused");
                None
            }
        };
        Authorizer::Polkit {
            system,
            serving_system_bus,
        }
    }

    /// Ok if the caller of the message `header` came in on may perform `action`.
    pub async fn check(
        &self,
        served: &Connection,
        header: &Header<'_>,
        action: &str,
    ) -> Result<(), VmSnapError> {
        let Authorizer::Polkit {
            system,
            serving_system_bus,
        } = self
        else {
            return Ok(());
        };
        let Some(system) = system else {
            return Err(VmSnapError::AccessDenied(format!(
                "cannot check authorization for {action}: the system bus (and polkit) cannot be reached"
            )));
        };
        let subject = if *serving_system_bus {
            Subject::new_for_message_header(header).map_err(|e| denied(action, &e.to_string()))?
        } else {
            caller_process(served, header)
                .await
                .map_err(|e| denied(action, &e))?
        };
        let authority = AuthorityProxy::new(system)
            .await
            .map_err(|e| unreachable_polkit(action, &e.to_string()))?;
        let result = authority
            .check_authorization(
                &subject,
                action,
                &HashMap::new(),
                CheckAuthorizationFlags::ALLOW_USER_INTERACTION,
                "",
            )
            .await
            .map_err(|e| match e {
                zbus::Error::MethodError(..) | zbus::Error::FDO(_) => {
                    VmSnapError::AccessDenied(format!("polkit could not check {action}: {e}"))
                }
                other => unreachable_polkit(action, &other.to_string()),
            })?;
        if result.is_authorized {
            Ok(())
        } else {
            Err(VmSnapError::AccessDenied(format!(
                "not authorized: polkit denies {action} to the caller"
            )))
        }
    }
}

fn denied(action: &str, why: &str) -> VmSnapError {
    VmSnapError::AccessDenied(format!("cannot identify the caller for {action}: {why}"))
}

fn unreachable_polkit(action: &str, why: &str) -> VmSnapError {
    VmSnapError::AccessDenied(format!(
        "cannot check authorization for {action}: polkit cannot be reached ({why})"
    ))
}

/// The calling process, as the bus we serve knows it.
async fn caller_process(served: &Connection, header: &Header<'_>) -> Result<Subject, String> {
    let sender = header
        .sender()
        .ok_or_else(|| "the message has no sender".to_string())?;
    let dbus = zbus::fdo::DBusProxy::new(served)
        .await
        .map_err(|e| e.to_string())?;
    let name = zbus::names::BusName::from(sender.clone());
    let pid = dbus
        .get_connection_unix_process_id(name.clone())
        .await
        .map_err(|e| e.to_string())?;
    let uid = dbus
        .get_connection_unix_user(name)
        .await
        .map_err(|e| e.to_string())?;
    Subject::new_for_pid(pid, None, Some(uid)).map_err(|e| e.to_string())
}
