//! Following a snapshot or restore object while vmsnapd works on it.
//!
//! A [`Watch`] subscribes, before anything is read or called, to
//! - PropertiesChanged of the object (Phase and Progress),
//! - ObjectManager InterfacesRemoved on the root path (the object went away),
//! - the owner of vmsnapd's bus name (vmsnapd stopped or was replaced),
//! - Ctrl-C.
//!
//! Signals are queued by zbus in the order the bus delivered them, so no change is lost or
//! reordered, however fast vmsnapd goes. The caller reads the object's state once after
//! subscribing: anything that changed before the subscription shows in that read, anything after
//! it arrives here.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use futures_util::StreamExt;
use vmsnap_api::{BUS_NAME, ROOT_PATH};
use zbus::fdo::{
    InterfacesRemoved, InterfacesRemovedStream, ObjectManagerProxy, PropertiesChanged,
    PropertiesChangedStream, PropertiesProxy,
};
use zbus::names::InterfaceName;
use zbus::proxy::{CacheProperties, OwnerChangedStream};
use zbus::OwnedObjectPath;

use crate::bus::Bus;

/// Something that happened to the watched object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The Phase property changed.
    Phase(String),
    /// The Progress property changed.
    Progress(String),
    /// The object is gone.
    Removed,
    /// vmsnapd left the bus (or another vmsnapd took its name).
    DaemonGone,
    /// The user pressed Ctrl-C.
    Interrupted,
}

enum Step {
    Changed(Option<PropertiesChanged>),
    Removed(Option<InterfacesRemoved>),
    OwnerChanged,
    Interrupt(std::io::Result<()>),
}

/// Progress lines on standard error, each shown once.
#[derive(Default)]
pub struct Progress {
    last: String,
}

impl Progress {
    pub fn show(&mut self, text: &str) {
        if !text.is_empty() && text != self.last && !crate::emit::quiet() {
            eprintln!("vmsnapctl: {}", vmsnap_api::terminal_safe(text));
        }
        self.last = text.to_string();
    }
}

pub struct Watch {
    bus: Bus,
    path: OwnedObjectPath,
    /// The object's interface (Snapshot or Restore): the one whose Phase and Progress count.
    interface: &'static str,
    properties: PropertiesProxy<'static>,
    changes: PropertiesChangedStream,
    removals: InterfacesRemovedStream,
    owner: OwnerChangedStream<'static>,
    interrupt: Pin<Box<dyn Future<Output = std::io::Result<()>>>>,
    interrupt_armed: bool,
    pending: VecDeque<Event>,
}

impl Watch {
    /// Subscribes to everything about the object at `path` that implements `interface`
    /// (`SNAPSHOT_INTERFACE` or `RESTORE_INTERFACE`). Returns once the bus has the match rules,
    /// so every later change is seen.
    pub async fn subscribe(
        bus: &Bus,
        path: &OwnedObjectPath,
        interface: &'static str,
    ) -> Result<Watch, String> {
        let describe = |e: zbus::Error| bus.describe(&e);
        let properties = PropertiesProxy::builder(bus.connection())
            .destination(BUS_NAME)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(describe)?;
        let changes = properties
            .receive_properties_changed()
            .await
            .map_err(describe)?;
        let object_manager = ObjectManagerProxy::builder(bus.connection())
            .destination(BUS_NAME)
            .path(ROOT_PATH)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(describe)?;
        let removals = object_manager
            .receive_interfaces_removed()
            .await
            .map_err(describe)?;
        let owner = properties
            .inner()
            .receive_owner_changed()
            .await
            .map_err(describe)?;
        Ok(Watch {
            bus: bus.clone(),
            path: path.clone(),
            interface,
            properties,
            changes,
            removals,
            owner,
            interrupt: Box::pin(tokio::signal::ctrl_c()),
            interrupt_armed: true,
            pending: VecDeque::new(),
        })
    }

    /// The next event. Errors only when the bus connection itself is lost or a property cannot
    /// be re-read.
    pub async fn next(&mut self) -> Result<Event, String> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let step = tokio::select! {
                changed = self.changes.next() => Step::Changed(changed),
                removed = self.removals.next() => Step::Removed(removed),
                _ = self.owner.next() => Step::OwnerChanged,
                result = &mut self.interrupt, if self.interrupt_armed => Step::Interrupt(result),
            };
            match step {
                Step::Changed(Some(signal)) => self.queue_changes(&signal).await?,
                Step::Removed(Some(signal)) => {
                    if self.is_removal(&signal) {
                        return Ok(Event::Removed);
                    }
                }
                Step::Changed(None) | Step::Removed(None) => {
                    return Err("lost the connection to the bus while waiting for vmsnapd".into())
                }
                Step::OwnerChanged => return Ok(Event::DaemonGone),
                Step::Interrupt(Ok(())) => return Ok(Event::Interrupted),
                // No Ctrl-C handler could be installed: wait without one.
                Step::Interrupt(Err(_)) => self.interrupt_armed = false,
            }
        }
    }

    /// Turns one PropertiesChanged signal into events: Progress before Phase, so the last
    /// progress line comes before the outcome.
    async fn queue_changes(&mut self, signal: &PropertiesChanged) -> Result<(), String> {
        // A signal that does not parse is not ours to judge; the next one will tell.
        let Ok(args) = signal.args() else {
            return Ok(());
        };
        if args.interface_name().as_str() != self.interface {
            return Ok(());
        }
        for (property, make) in [
            ("Progress", Event::Progress as fn(String) -> Event),
            ("Phase", Event::Phase as fn(String) -> Event),
        ] {
            if let Some(value) = args.changed_properties().get(property) {
                if let Ok(text) = <&str>::try_from(value) {
                    self.pending.push_back(make(text.to_string()));
                }
            } else if args.invalidated_properties().contains(&property) {
                match self.get_string(property).await? {
                    Some(text) => self.pending.push_back(make(text)),
                    None => self.pending.push_back(Event::Removed),
                }
            }
        }
        Ok(())
    }

    /// Reads one string property; `None` when the object is gone.
    async fn get_string(&self, property: &str) -> Result<Option<String>, String> {
        let interface = InterfaceName::from_static_str_unchecked(self.interface);
        match self.properties.get(interface, property).await {
            Ok(value) => Ok(<&str>::try_from(&value).ok().map(str::to_string)),
            Err(e) => {
                let e = zbus::Error::from(e);
                if Bus::object_vanished(&e) {
                    Ok(None)
                } else {
                    Err(self.bus.describe(&e))
                }
            }
        }
    }

    fn is_removal(&self, signal: &InterfacesRemoved) -> bool {
        let Ok(args) = signal.args() else {
            return false;
        };
        args.object_path().as_str() == self.path.as_str()
            && args
                .interfaces()
                .iter()
                .any(|i| i.as_str() == self.interface)
    }
}
