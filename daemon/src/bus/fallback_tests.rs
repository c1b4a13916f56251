//! The snapshots' objects served from the registry through zbus's subtree fallback, compared
//! on a real bus (a private dbus-daemon) with what zbus served and sent for the same
//! `#[interface]` objects registered one by one (how vmsnapd exported snapshots before issue 13).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;
use vmsnap_api::{snapshot_path, ExcludedVolume, ROOT_PATH, SNAPSHOT_INTERFACE};
use zbus::message::Type as MessageType;
use zbus::{Connection, Message, OwnedObjectPath, OwnedVariant};

use super::listing::{self, Listed, Objects, RootObjectManager, SharedRegistry, SnapshotEntry};
use super::snapshot::tests::{decoded, served};
use super::snapshot::SNAPSHOT_FOLDER;
use super::{apply, Authorizer, SnapshotFallback, SnapshotObject};
use crate::engine::{Change, EngineError, Request};
use crate::store::SnapshotRecord;

const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";

/// A private dbus-daemon, stopped when dropped.
struct TestBus {
    child: std::process::Child,
    address: String,
    /// Its config and socket, removed with it. A folder of its own: dbus-daemon watches its
    /// config's folder and reloads on changes there, which in /tmp other tests' buses made.
    _dir: tempfile::TempDir,
}

impl TestBus {
    fn start() -> TestBus {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("a folder for the bus");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                dir.path().join("bus.sock").display()
            ),
        )
        .expect("the bus config is written");
        let mut child = std::process::Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dbus-daemon runs");
        let mut address = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = std::io::BufReader::new(stdout).read_line(&mut address);
        }
        assert!(!address.trim().is_empty(), "dbus-daemon gave no address");
        TestBus {
            child,
            address: address.trim().to_string(),
            _dir: dir,
        }
    }

    async fn connect(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("connected")
    }

    /// A connection whose ObjectServer already answers, as vmsnapd's (built with `serve_at`)
    /// does. zbus starts a connection's ObjectServer task lazily, at `object_server()`, and
    /// that task subscribes to method calls only once it first runs: a call arriving before
    /// that was dropped, and the test waited for an answer that never came. With an object
    /// served at build, `build` returns once the task has subscribed.
    async fn serving(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .serve_at("/vmsnap_test", ServerReady)
            .build()
            .await
            .expect("connected")
    }
}

/// Served by every test server (see [`TestBus::serving`]).
struct ServerReady;

#[zbus::interface(name = "org.vmsnap.Test.ServerReady")]
impl ServerReady {}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of a server's objects on the bus.
struct Client {
    connection: Connection,
    server: String,
}

/// A server and a client on a bus of their own.
async fn pair() -> (Connection, Client, TestBus) {
    let bus = TestBus::start();
    let server = bus.serving().await;
    let connection = bus.connect().await;
    let server_name = server
        .unique_name()
        .expect("a unique name")
        .as_str()
        .to_string();
    (
        server,
        Client {
            connection,
            server: server_name,
        },
        bus,
    )
}

/// A method call's reply, or the error's name and message.
async fn call<B>(
    client: &Client,
    path: &str,
    interface: &str,
    member: &str,
    body: &B,
) -> Result<Message, (String, String)>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    let reply = client.connection.call_method(
        Some(client.server.as_str()),
        path,
        Some(interface),
        member,
        body,
    );
    // A call nobody answers fails the test rather than hanging it.
    let Ok(reply) = tokio::time::timeout(std::time::Duration::from_secs(10), reply).await else {
        return Err((
            "no answer".into(),
            format!("{interface}.{member} on {path}"),
        ));
    };
    reply.map_err(|e| match e {
        zbus::Error::MethodError(name, message, _) => {
            (name.to_string(), message.unwrap_or_default())
        }
        zbus::Error::FDO(e) => {
            use zbus::DBusError;
            (
                e.name().to_string(),
                e.description().unwrap_or_default().to_string(),
            )
        }
        other => ("not a method error".to_string(), other.to_string()),
    })
}

fn entries() -> Vec<SnapshotEntry> {
    let [failed, with_messages] = super::snapshot::tests::varied_records();
    vec![
        SnapshotEntry::idle(Arc::new(failed)),
        SnapshotEntry {
            record: Arc::new(with_messages),
            progress: Arc::from("merging vda"),
        },
    ]
}

/// A server serving `entries` through the fallback, as vmsnapd does now.
async fn served_by_fallback(
    entries: &[SnapshotEntry],
    engine: &mpsc::Sender<Request>,
    auth: Authorizer,
) -> (Connection, Client, SharedRegistry, TestBus) {
    let registry = SharedRegistry::default();
    for entry in entries {
        listing::write(&registry).snapshots.insert(entry.clone());
    }
    let (server, client, bus) = pair().await;
    let fallback = SnapshotFallback::new(registry.clone(), engine.clone(), auth);
    server
        .object_server()
        .set_fallback(SNAPSHOT_FOLDER, Some(Arc::new(fallback)))
        .await
        .expect("the fallback is set");
    (server, client, registry, bus)
}

/// A call's outcome without the reply's body.
fn outcome(result: Result<Message, (String, String)>) -> Result<(), (String, String)> {
    result.map(|_| ())
}

/// The `<node name="..."/>` children an introspection lists.
fn children(xml: &str) -> BTreeSet<String> {
    xml.split("<node name=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

async fn get_all(client: &Client, path: &str) -> HashMap<String, OwnedVariant> {
    call(client, path, PROPERTIES, "GetAll", &(SNAPSHOT_INTERFACE,))
        .await
        .expect("GetAll answers")
        .body()
        .deserialize()
        .expect("a{sv}")
}

async fn get(client: &Client, path: &str, name: &str) -> OwnedVariant {
    call(client, path, PROPERTIES, "Get", &(SNAPSHOT_INTERFACE, name))
        .await
        .expect("Get answers")
        .body()
        .deserialize()
        .expect("a variant")
}

async fn introspect(client: &Client, path: &str) -> String {
    call(client, path, INTROSPECTABLE, "Introspect", &())
        .await
        .expect("Introspect answers")
        .body()
        .deserialize()
        .expect("a string")
}

#[tokio::test]
async fn the_fallback_serves_what_a_registered_object_served() {
    let (engine, _requests) = mpsc::channel(1);
    let entries = entries();
    let (_new_server, new, _registry, _new_bus) =
        served_by_fallback(&entries, &engine, Authorizer::Disabled).await;
    let (old_server, old, _old_bus) = pair().await;
    for entry in &entries {
        let object = SnapshotObject::new(entry, engine.clone(), Authorizer::Disabled);
        old_server
            .object_server()
            .at(snapshot_path(&entry.record.uuid), object)
            .await
            .expect("registered");
    }

    for entry in &entries {
        let path = snapshot_path(&entry.record.uuid);
        let object = SnapshotObject::new(entry, engine.clone(), Authorizer::Disabled);
        let all = get_all(&new, &path).await;
        assert_eq!(all, get_all(&old, &path).await);
        assert_eq!(all, served(&object));
        let listed = decoded(&Objects(vec![Listed::Snapshot(entry.clone())]));
        let owned = OwnedObjectPath::try_from(path.as_str()).expect("a path");
        let interface =
            zbus::names::OwnedInterfaceName::try_from(SNAPSHOT_INTERFACE).expect("a name");
        assert_eq!(listed[&owned][&interface], all);
        assert_eq!(all.len(), 18);
        for (name, value) in &all {
            let got = get(&new, &path, name).await;
            assert_eq!(got, get(&old, &path, name).await, "{name}");
            assert_eq!(&got, value, "{name}");
        }

        // What is refused is refused alike: Set of a read-only property, an unknown property,
        // another interface, an unknown method.
        let value = zbus::Variant::from("renamed");
        let set = &(SNAPSHOT_INTERFACE, "Name", &value);
        let unknown = &(SNAPSHOT_INTERFACE, "Nope");
        let vm = &(vmsnap_api::VM_INTERFACE,);
        for (interface, member, new_call, old_call) in [
            (
                PROPERTIES,
                "Set",
                call(&new, &path, PROPERTIES, "Set", set).await,
                call(&old, &path, PROPERTIES, "Set", set).await,
            ),
            (
                PROPERTIES,
                "Get",
                call(&new, &path, PROPERTIES, "Get", unknown).await,
                call(&old, &path, PROPERTIES, "Get", unknown).await,
            ),
            (
                PROPERTIES,
                "GetAll",
                call(&new, &path, PROPERTIES, "GetAll", vm).await,
                call(&old, &path, PROPERTIES, "GetAll", vm).await,
            ),
            (
                SNAPSHOT_INTERFACE,
                "Nope",
                call(&new, &path, SNAPSHOT_INTERFACE, "Nope", &()).await,
                call(&old, &path, SNAPSHOT_INTERFACE, "Nope", &()).await,
            ),
        ] {
            let refused = outcome(new_call);
            assert!(refused.is_err(), "{interface}.{member}: {refused:?}");
            assert_eq!(refused, outcome(old_call), "{interface}.{member}");
        }

        // The same introspection, and Peer on the path.
        let xml = introspect(&new, &path).await;
        assert!(xml.contains(&format!("<interface name=\"{SNAPSHOT_INTERFACE}\">")));
        assert_eq!(xml, introspect(&old, &path).await);
        call(&new, &path, "org.freedesktop.DBus.Peer", "Ping", &())
            .await
            .expect("Peer answers on any path");
    }

    // The folder lists every snapshot, so that `busctl tree` finds them.
    let listed = children(&introspect(&new, SNAPSHOT_FOLDER).await);
    assert_eq!(listed, children(&introspect(&old, SNAPSHOT_FOLDER).await));
    assert_eq!(listed, BTreeSet::from(["uuid_a".into(), "uuid_bb".into()]));
    let root = introspect(&new, ROOT_PATH).await;
    assert!(root.contains("<node name=\"snapshot\">"), "{root}");

    // Paths of no snapshot are unknown objects, as they were.
    for path in [
        format!("{SNAPSHOT_FOLDER}/uuid_zz"),
        format!("{SNAPSHOT_FOLDER}/uuid_a/deeper"),
        format!("{SNAPSHOT_FOLDER}/uuid_a_"),
    ] {
        let body = &(SNAPSHOT_INTERFACE,);
        let unknown = outcome(call(&new, &path, PROPERTIES, "GetAll", body).await);
        assert_eq!(
            unknown,
            outcome(call(&old, &path, PROPERTIES, "GetAll", body).await)
        );
        assert_eq!(
            unknown.expect_err("no object").0,
            "org.freedesktop.DBus.Error.UnknownObject",
            "{path}"
        );
        let unknown = outcome(call(&new, &path, INTROSPECTABLE, "Introspect", &()).await);
        assert_eq!(
            unknown,
            outcome(call(&old, &path, INTROSPECTABLE, "Introspect", &()).await)
        );
        assert!(unknown.is_err());
    }
}

#[tokio::test]
async fn the_methods_become_requests_with_their_answers() {
    let (engine, mut requests) = mpsc::channel(4);
    let entries = entries();
    let (_server, client, _registry, _bus) =
        served_by_fallback(&entries, &engine, Authorizer::Disabled).await;
    let asked = tokio::spawn(async move {
        let mut asked = Vec::new();
        // The three calls below, then the stub ends.
        while asked.len() < 3 {
            let Some(request) = requests.recv().await else {
                break;
            };
            match request {
                Request::DeleteSnapshot { uuid, reply } => {
                    let answer = if asked.is_empty() {
                        Ok(())
                    } else {
                        Err(EngineError::ShuttingDown)
                    };
                    asked.push(format!("delete {uuid}"));
                    let _ = reply.send(answer);
                }
                Request::GetDomainXml { uuid, reply } => {
                    asked.push(format!("xml {uuid}"));
                    let _ = reply.send(Ok(format!("<domain>{uuid}</domain>")));
                }
                _ => asked.push("something else".into()),
            }
        }
        asked
    });
    let path = snapshot_path("uuid-bb");
    call(&client, &path, SNAPSHOT_INTERFACE, "Delete", &())
        .await
        .expect("deleted");
    let (name, _) = call(&client, &path, SNAPSHOT_INTERFACE, "Delete", &())
        .await
        .expect_err("refused by the engine");
    assert_eq!(name, "org.vmsnap.VmSnap1.Error.ShuttingDown");
    let xml = call(&client, &path, SNAPSHOT_INTERFACE, "GetDomainXml", &())
        .await
        .expect("the definition")
        .body()
        .deserialize::<String>()
        .expect("a string");
    assert_eq!(xml, "<domain>uuid-bb</domain>");
    assert_eq!(
        asked.await.expect("the engine stub ends"),
        ["delete uuid-bb", "delete uuid-bb", "xml uuid-bb"]
    );

    // Refused by polkit (here: unreachable) before anything is asked of the engine.
    let (engine, mut requests) = mpsc::channel(4);
    let polkit = Authorizer::Polkit {
        system: None,
        serving_system_bus: false,
    };
    let (_server, client, _registry, _bus) = served_by_fallback(&entries, &engine, polkit).await;
    let (name, _) = call(&client, &path, SNAPSHOT_INTERFACE, "Delete", &())
        .await
        .expect_err("refused");
    assert_eq!(name, "org.vmsnap.VmSnap1.Error.AccessDenied");
    assert!(requests.try_recv().is_err(), "nothing reached the engine");
}

/// Every signal `client` received: its path, interface, member and body read generically.
async fn signals(client: &Client, stream: &mut zbus::MessageStream) -> Vec<String> {
    use futures_util::StreamExt;
    // A ping round trip: every signal sent before it has arrived.
    call(client, ROOT_PATH, "org.freedesktop.DBus.Peer", "Ping", &())
        .await
        .expect("a ping");
    let mut seen = Vec::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(std::time::Duration::from_millis(50), stream.next()).await
    {
        if message.message_type() != MessageType::Signal {
            continue;
        }
        let header = message.header();
        let body = message.body();
        let text = match header.member().map(|m| m.as_str()) {
            Some("InterfacesAdded") => {
                let (path, interfaces) = body
                    .deserialize::<(
                        OwnedObjectPath,
                        HashMap<String, HashMap<String, OwnedVariant>>,
                    )>()
                    .expect("oa{sa{sv}}");
                let mut interfaces: Vec<_> = interfaces
                    .into_iter()
                    .map(|(i, p)| {
                        let mut p: Vec<_> =
                            p.into_iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                        p.sort();
                        format!("{i}: {p:?}")
                    })
                    .collect();
                interfaces.sort();
                format!("{path} {interfaces:?}")
            }
            Some("PropertiesChanged") => {
                let (interface, changed, invalidated) = body
                    .deserialize::<(String, HashMap<String, OwnedVariant>, Vec<String>)>()
                    .expect("sa{sv}as");
                let mut changed: Vec<_> =
                    changed.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                changed.sort();
                format!("{interface} {changed:?} {invalidated:?}")
            }
            _ => format!("{:?}", body.deserialize::<zbus::Structure<'_>>()),
        };
        seen.push(format!(
            "{} {} {} {text}",
            header.path().map(|p| p.as_str()).unwrap_or_default(),
            header.interface().map(|i| i.as_str()).unwrap_or_default(),
            header.member().map(|m| m.as_str()).unwrap_or_default(),
        ));
    }
    seen
}

/// The signals the client's server sends.
async fn signal_stream(client: &Client) -> zbus::MessageStream {
    let rule = zbus::MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(client.server.as_str())
        .build()
        .expect("a rule");
    zbus::MessageStream::for_match_rule(rule, &client.connection, None)
        .await
        .expect("subscribed")
}

fn changed(record: &SnapshotRecord) -> SnapshotRecord {
    let mut record = record.clone();
    record.phase = vmsnap_api::SnapshotPhase::Failed;
    record.ready_to_use = false;
    record.error = "it broke".into();
    record.error_name = "org.vmsnap.VmSnap1.Error.StorageFailed".into();
    record.cow_fill_percent = 100.0;
    record.excluded = vec![ExcludedVolume {
        target: "sdb".into(),
        reason: "cdrom".into(),
    }]
    .into();
    record
}

#[tokio::test]
async fn the_publisher_sends_what_zbus_sent_for_registered_objects() {
    let (engine, _requests) = mpsc::channel(1);
    let record = Arc::new(crate::store::tests::record("a"));
    let updated = Arc::new(changed(&record));
    let uuid = record.uuid.clone();
    let path = snapshot_path(&uuid);

    // Now: the publisher, with the fallback.
    let registry = SharedRegistry::default();
    let (new_server, new, _new_bus) = pair().await;
    new_server
        .object_server()
        .at(ROOT_PATH, RootObjectManager::new(registry.clone()))
        .await
        .expect("the object manager");
    let mut new_stream = signal_stream(&new).await;
    let auth = Authorizer::Disabled;
    for change in [
        Change::SnapshotAdded(record.clone()),
        // Known already: nothing is sent (zbus announced an object only when its path was free).
        Change::SnapshotAdded(record.clone()),
        Change::SnapshotProgress {
            uuid: uuid.clone(),
            text: "merging vda".into(),
        },
        Change::SnapshotUpdated(updated.clone()),
        // Unchanged: nothing is sent.
        Change::SnapshotUpdated(updated.clone()),
        Change::SnapshotProgress {
            uuid: uuid.clone(),
            text: "merging vda".into(),
        },
        Change::SnapshotRemoved { uuid: uuid.clone() },
    ] {
        apply(&new_server, &engine, &auth, &registry, change)
            .await
            .expect("applied");
    }
    // Changes of an unknown snapshot are refused and send nothing.
    for change in [
        Change::SnapshotUpdated(updated.clone()),
        Change::SnapshotProgress {
            uuid: uuid.clone(),
            text: "x".into(),
        },
        Change::SnapshotRemoved { uuid: uuid.clone() },
    ] {
        assert!(apply(&new_server, &engine, &auth, &registry, change)
            .await
            .is_err());
    }
    let sent = signals(&new, &mut new_stream).await;

    // Before: the same steps on an `#[interface]` object registered under the ObjectManager.
    let (old_server, old, _old_bus) = pair().await;
    let server = old_server.object_server();
    server
        .at(ROOT_PATH, RootObjectManager::new(SharedRegistry::default()))
        .await
        .expect("the object manager");
    let mut old_stream = signal_stream(&old).await;
    let entry = SnapshotEntry::idle(record.clone());
    server
        .at(
            path.as_str(),
            SnapshotObject::new(&entry, engine.clone(), Authorizer::Disabled),
        )
        .await
        .expect("registered");
    let again = server
        .at(
            path.as_str(),
            SnapshotObject::new(&entry, engine.clone(), Authorizer::Disabled),
        )
        .await
        .expect("answered");
    assert!(again.is_some(), "not registered twice");
    let iface = server
        .interface::<_, SnapshotObject>(path.as_str())
        .await
        .expect("there");
    let emitter = iface.signal_emitter().clone();
    let progress: Arc<str> = Arc::from("merging vda");
    let mut object = iface.get_mut().await;
    object
        .set_progress(progress.clone(), &emitter)
        .await
        .expect("sent");
    object
        .update(updated.clone(), &emitter)
        .await
        .expect("sent");
    object
        .update(updated.clone(), &emitter)
        .await
        .expect("sent");
    object.set_progress(progress, &emitter).await.expect("sent");
    drop(object);
    server
        .remove::<SnapshotObject, _>(path.as_str())
        .await
        .expect("removed");
    let expected = signals(&old, &mut old_stream).await;

    assert_eq!(sent, expected);
    let members: Vec<&str> = sent.iter().filter_map(|s| s.split(' ').nth(2)).collect();
    assert_eq!(
        members,
        [
            "InterfacesAdded",
            "PropertiesChanged", // Progress
            "PropertiesChanged", // ExcludedVolumes
            "PropertiesChanged", // Error
            "PropertiesChanged", // ErrorName
            "PropertiesChanged", // ReadyToUse
            "PropertiesChanged", // CowFillPercent
            "PropertiesChanged", // Phase, last
            "InterfacesRemoved",
        ]
    );
    assert!(sent[7].contains("Phase"), "{}", sent[7]);
    assert!(listing::read(&registry).snapshots.is_empty());
}

#[tokio::test]
async fn the_fallback_outlives_an_object_registered_and_removed_under_it() {
    let (engine, _requests) = mpsc::channel(1);
    let entries = entries();
    let (server, client, _registry, _bus) =
        served_by_fallback(&entries, &engine, Authorizer::Disabled).await;
    let other = format!("{SNAPSHOT_FOLDER}/other");
    let object = SnapshotObject::new(&entries[0], engine.clone(), Authorizer::Disabled);
    let server = server.object_server();
    server.at(other.as_str(), object).await.expect("registered");
    assert_eq!(get_all(&client, &other).await.len(), 18);
    server
        .remove::<SnapshotObject, _>(other.as_str())
        .await
        .expect("removed");
    // The folder's node, left with no child, still holds the fallback.
    let path = snapshot_path(&entries[0].record.uuid);
    assert_eq!(get_all(&client, &path).await.len(), 18);
    let listed = children(&introspect(&client, SNAPSHOT_FOLDER).await);
    assert_eq!(listed.len(), 2);
}
