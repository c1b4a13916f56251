//! The web console under test: a system-type dbus-daemon with the shipped bus policy, vmsnapd as
//! root on it, the Cockpit page installed by install.sh, a real cockpit-ws serving one session,
//! and headless Chromium driven over the W3C WebDriver protocol (Debian's chromedriver; a small
//! HTTP client here, so the tests need nothing but std and serde_json).
//!
//! Why vmsnapd does not own `org.vmsnap.VmSnap1` on the lab's real system bus: that bus is
//! shared by every test binary running at once (and by other people's work on the same machine);
//! two tests owning the name there would queue behind each other and one test's page would talk
//! to another test's daemon. Each test gets its own system-type dbus-daemon instead, with the
//! stock system bus's default policy (no name owned, no method called unless allowed) plus the
//! shipped `config/dbus/system.d/org.vmsnap.VmSnap1.conf` included, so the same rules are
//! enforced; vmsnapd runs as root as it would under systemd, and authorization is still the real
//! polkitd's on the lab's system bus, asked about the caller's process (vmsnapd learns the
//! bridge's pid from the bus; see daemon/src/bus/auth.rs). cockpit-ws and its bridge get
//! `DBUS_SYSTEM_BUS_ADDRESS` pointing at that bus, which the bridge uses for `bus: "system"`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::{bin, name_has_owner, wait_for};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A free TCP port on 127.0.0.1 (the kernel's pick; released before use).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub use crate::SystemBus;

/// vmsnapd as root on a [`SystemBus`], with polkit (polkitd on the lab's system bus decides for
/// the callers' processes). Stopped (SIGTERM) on drop.
pub struct SystemDaemon {
    child: Option<Child>,
    pub bus_address: String,
    pub log: PathBuf,
    dir: TempDir,
}

impl SystemDaemon {
    pub fn start(bus: &SystemBus, config: &str) -> SystemDaemon {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("vmsnapd.toml");
        std::fs::write(
            &config_path,
            format!(
                "state_dir = \"{}\"\nvm_lock_dir = \"{}\"\n{config}",
                dir.path().join("state").display(),
                dir.path().join("locks").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("vmsnapd.log");
        let child = Command::new(bin("vmsnapd"))
            .arg("--config")
            .arg(&config_path)
            .arg("--bus-address")
            .arg(&bus.address)
            .env("VMSNAP_LOG", "debug")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut daemon = SystemDaemon {
            child: Some(child),
            bus_address: bus.address.clone(),
            log,
            dir,
        };
        wait_for(Duration::from_secs(30), "vmsnapd to own its name", || {
            if let Some(child) = daemon.child.as_mut() {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("vmsnapd exited early ({status}):\n{}", daemon.log_text());
                }
            }
            name_has_owner(&daemon.bus_address).then_some(())
        });
        daemon
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// vmsnapd's process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// vmsnapctl (as root) against this daemon.
    pub fn ctl(&self, args: &[&str]) -> crate::CtlOutput {
        crate::ctl(&self.bus_address, args)
    }

    /// Stops vmsnapd (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for SystemDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An unprivileged account for a Cockpit session that is not an administrator (created once).
pub fn unprivileged_user(name: &str) -> (u32, u32) {
    // useradd locks /etc/passwd: two at once, one fails. Test binaries run one at a time.
    static USERADD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = USERADD.lock().unwrap_or_else(|e| e.into_inner());
    let exists = Command::new("id")
        .arg(name)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let status = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", name])
            .status()
            .unwrap();
        assert!(status.success(), "useradd {name} failed");
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// cockpit-ws serving one logged-in session (`--local-session=cockpit-bridge`) on a free port,
/// as root or as another user, with the page installed by install.sh into its own prefix (where
/// the bridge finds it through XDG_DATA_DIRS) and the bridge's system bus pointed at `bus`.
pub struct CockpitWs {
    pub port: u16,
    child: Child,
    pub log: PathBuf,
    _dir: TempDir,
}

impl CockpitWs {
    pub fn start(bus: &SystemBus, user: Option<(u32, u32)>) -> CockpitWs {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let destdir = dir.path().join("root");
        let install = Command::new("bash")
            .arg(workspace_root().join("install.sh"))
            .arg("--from")
            .arg(bin("vmsnapd").parent().unwrap())
            .env("DESTDIR", &destdir)
            .env_remove("PREFIX")
            .output()
            .unwrap();
        assert!(
            install.status.success(),
            "install.sh failed (is cockpit/dist built? lab/build-cockpit.sh): {}",
            String::from_utf8_lossy(&install.stderr)
        );
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let port = free_port();
        let log = dir.path().join("cockpit-ws.log");
        let mut command = match user {
            None => Command::new("/usr/lib/cockpit/cockpit-ws"),
            Some((uid, gid)) => {
                std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("/usr/lib/cockpit/cockpit-ws");
                c
            }
        };
        command
            .args(["--no-tls", "--local-session=cockpit-bridge"])
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
            .env(
                "XDG_DATA_DIRS",
                format!("{}:/usr/share", destdir.join("usr/share").display()),
            )
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &home)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            // Its own process group: the bridge starts a session dbus-daemon and an ssh-agent
            // that outlive the session unless the whole group is stopped.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = command.spawn().unwrap();
        let ws = CockpitWs {
            port,
            child,
            log,
            _dir: dir,
        };
        wait_for(Duration::from_secs(20), "cockpit-ws to listen", || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        ws
    }

    /// The page's address.
    pub fn page_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/cockpit/@localhost/vmsnap/index.html",
            self.port
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The manifests of every package the session's bridge found (what Cockpit's shell builds
    /// its menu from).
    pub fn manifests(&self) -> Value {
        let (status, body) = http(self.port, "GET", "/cockpit/@localhost/manifests.json", None);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

impl Drop for CockpitWs {
    fn drop(&mut self) {
        // cockpit-ws, its bridges (the sudo one too), the session bus and ssh-agent they start.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to 127.0.0.1:port; returns the status and the body.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let payload = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP status line {status_line:?}"));
    let mut chunked = false;
    let mut length: Option<usize> = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).unwrap();
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .unwrap_or(0);
            if size == 0 {
                break;
            }
            let mut chunk = vec![0u8; size];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk);
            let mut crlf = String::new();
            reader.read_line(&mut crlf).unwrap();
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        reader.read_exact(&mut body).unwrap();
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    (status, body)
}

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Headless Chromium through chromedriver: one session, a fresh profile; closed on drop.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    artifacts: PathBuf,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session. Screenshots go to
    /// target/test-artifacts/cockpit/<name>/.
    pub fn start(name: &str) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (lab/install-packages.sh installs chromium-driver)");
        wait_for(Duration::from_secs(30), "chromedriver to answer", || {
            TcpStream::connect(("127.0.0.1", port)).ok()?;
            let (status, body) = http(port, "GET", "/status", None);
            let v: Value = serde_json::from_slice(&body).ok()?;
            (status == 200 && v["value"]["ready"] == true).then_some(())
        });
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let (status, body) = http(port, "POST", "/session", Some(&caps));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 200, "new session: {v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        let artifacts = workspace_root()
            .join("target/test-artifacts/cockpit")
            .join(name);
        let _ = std::fs::remove_dir_all(&artifacts);
        std::fs::create_dir_all(&artifacts).unwrap();
        Browser {
            driver,
            port,
            session,
            artifacts,
            _profile: profile,
        }
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("/session/{}{path}", self.session);
        let (status, bytes) = http(self.port, method, &url, body.as_ref());
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("WebDriver {path}: not JSON ({e})"));
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    /// Like `command`, but a WebDriver error is returned, not a panic.
    fn try_command(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Value> {
        let url = format!("/session/{}{path}", self.session);
        let (status, bytes) = http(self.port, method, &url, body.as_ref());
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(v["value"].clone())
        }
    }

    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; returns its value.
    pub fn js(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Polls `script` until it returns something other than null/false; returns that value.
    pub fn wait_js(&self, timeout: Duration, what: &str, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script, args.clone());
            if !(v.is_null() || v == Value::Bool(false)) {
                return v;
            }
            if Instant::now() > deadline {
                let text = self.body_text();
                self.screenshot("timeout");
                panic!("timed out waiting for {what}; the page shows:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// All visible text of the page (dialogs included).
    pub fn body_text(&self) -> String {
        self.js("return document.body.innerText;", json!([]))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the element `css` exists and is visible; returns its WebDriver reference.
    pub fn wait_element(&self, css: &str, timeout: Duration) -> Value {
        self.wait_js(
            timeout,
            &format!("element {css}"),
            "const e = document.querySelector(arguments[0]); \
             return e && e.getClientRects().length > 0 ? e : null;",
            json!([css]),
        )
    }

    /// Waits until no element matches `css` (a dialog has closed).
    pub fn wait_gone(&self, css: &str, timeout: Duration) {
        self.wait_js(
            timeout,
            &format!("{css} to go away"),
            "return document.querySelector(arguments[0]) === null;",
            json!([css]),
        );
    }

    /// Waits until the text of `css` contains `text`; returns the whole text.
    pub fn wait_text(&self, css: &str, text: &str, timeout: Duration) -> String {
        self.wait_js(
            timeout,
            &format!("{css} to show {text:?}"),
            "const e = document.querySelector(arguments[0]); \
             return e && e.innerText.includes(arguments[1]) ? e.innerText : null;",
            json!([css, text]),
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// The visible text of `css` (empty if absent).
    pub fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            json!([css]),
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// A real click (WebDriver element click: scrolled into view, refused if covered or not yet
    /// interactable; waited for, within 10 s).
    pub fn click_element(&self, element: &Value) {
        let id = element[ELEMENT_KEY].as_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_command("POST", &format!("/element/{id}/click"), Some(json!({}))) {
                Ok(_) => return,
                // A modal fading in can cover it for a moment, and a menu that has just opened
                // is not interactable until it has been positioned next to its toggle.
                Err(e)
                    if Instant::now() < deadline
                        && (e["error"] == "element click intercepted"
                            || e["error"] == "element not interactable") =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("click failed: {e}"),
            }
        }
    }

    pub fn click(&self, css: &str) {
        let element = self.wait_element(css, Duration::from_secs(20));
        self.click_element(&element);
    }

    /// Clicks the visible button, link or menu item (inside `scope`) whose text is `text`.
    pub fn click_text(&self, scope: &str, text: &str) {
        let element = self.wait_js(
            Duration::from_secs(20),
            &format!("a {text:?} button in {scope}"),
            "const scope = document.querySelector(arguments[0]); if (!scope) return null; \
             for (const e of scope.querySelectorAll('button, a, [role=menuitem]')) { \
               if (e.innerText.trim() === arguments[1] && e.getClientRects().length > 0) return e; } \
             return null;",
            json!([scope, text]),
        );
        self.click_element(&element);
    }

    /// Replaces the text of an input or textarea, as typed: select all, delete, type (WebDriver's
    /// element clear changes the DOM value without the input event React listens to, so a
    /// controlled field would put its old value back). Waits until the field holds `text`.
    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.wait_element(css, Duration::from_secs(20));
        let id = element[ELEMENT_KEY].as_str().unwrap().to_string();
        // Control+A, release modifiers, Backspace, then the text.
        let keys = format!("\u{E009}a\u{E000}\u{E003}{text}");
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": keys })),
        );
        self.wait_js(
            Duration::from_secs(20),
            &format!("{css} to hold {text:?}"),
            "const e = document.querySelector(arguments[0]); return !!e && e.value === arguments[1];",
            json!([css, text]),
        );
    }

    /// Whether the element `css` is disabled (attribute or aria-disabled).
    pub fn is_disabled(&self, css: &str) -> bool {
        self.wait_element(css, Duration::from_secs(20));
        self.js(
            "const e = document.querySelector(arguments[0]); \
             return e.disabled === true || e.getAttribute('aria-disabled') === 'true';",
            json!([css]),
        ) == Value::Bool(true)
    }

    /// Saves a screenshot of the page as NN-name.png in the test's artifact directory.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let value = self.command("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap_or_default())
            .unwrap();
        // Numbered in the order taken.
        let step = std::fs::read_dir(&self.artifacts)
            .map(|d| d.count())
            .unwrap_or(0);
        let path = self.artifacts.join(format!("{:02}-{name}.png", step + 1));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub fn artifacts(&self) -> &Path {
        &self.artifacts
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.try_command("DELETE", "", None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
