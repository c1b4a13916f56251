// vmsnapd's objects, as the ObjectManager on the system bus reports them: one watch on the
// root path, kept up to date by the bridge from InterfacesAdded/Removed and PropertiesChanged
// (no polling). Consumers subscribe and re-render at most once per frame of changes.

const cockpit = window.cockpit;

export const BUS_NAME = "org.vmsnap.VmSnap1";
export const ROOT_PATH = "/org/vmsnap/VmSnap1";
export const MANAGER_PATH = ROOT_PATH + "/Manager";
export const MANAGER_IFACE = "org.vmsnap.VmSnap1.Manager";
export const VM_IFACE = "org.vmsnap.VmSnap1.VirtualMachine";
export const SNAPSHOT_IFACE = "org.vmsnap.VmSnap1.Snapshot";
export const RESTORE_IFACE = "org.vmsnap.VmSnap1.Restore";

const KINDS = {
    [VM_IFACE]: "vms",
    [SNAPSHOT_IFACE]: "snapshots",
    [RESTORE_IFACE]: "restores",
};

export function createStore() {
    const state = {
        vms: new Map(),
        snapshots: new Map(),
        restores: new Map(),
        manager: null,
        loaded: false,
        error: null,
        // vmsnapd left the bus: what is shown is what it last reported.
        daemonGone: false,
        version: 0,
    };
    const listeners = new Set();
    let scheduled = null;
    let client = null;

    function changed() {
        state.version += 1;
        if (scheduled === null) {
            scheduled = window.setTimeout(() => {
                scheduled = null;
                for (const listener of listeners) listener(state.version);
            }, 0);
        }
    }

    function apply(path, iface, props) {
        if (iface === MANAGER_IFACE) {
            state.manager = props === null ? null : { ...(state.manager || {}), ...props, path };
            return;
        }
        const kind = KINDS[iface];
        if (!kind) return;
        const map = state[kind];
        if (props === null) {
            map.delete(path);
        } else {
            // A new object for every change, so unchanged rows keep their identity.
            map.set(path, { ...(map.get(path) || {}), ...props, path });
        }
    }

    // One client and one watch of the ObjectManager's tree. When vmsnapd comes back after it
    // left the bus, a fresh client reads everything again.
    function connect() {
        const current = cockpit.dbus(BUS_NAME, { bus: "system", superuser: "try" });
        client = current;
        let owner = null;
        current.addEventListener("notify", (_event, data) => {
            if (client !== current) return;
            for (const path of Object.keys(data)) {
                const ifaces = data[path];
                if (ifaces === null) {
                    for (const kind of Object.values(KINDS)) state[kind].delete(path);
                    continue;
                }
                for (const iface of Object.keys(ifaces)) apply(path, iface, ifaces[iface]);
            }
            changed();
        });
        current.addEventListener("owner", (_event, newOwner) => {
            if (client !== current) return;
            if (newOwner === null && owner !== null) {
                state.daemonGone = true;
                changed();
            } else if (newOwner !== null && state.daemonGone) {
                state.daemonGone = false;
                for (const kind of Object.values(KINDS)) state[kind].clear();
                state.manager = null;
                client = null;
                current.close();
                connect();
                changed();
                return;
            }
            owner = newOwner;
        });
        current.addEventListener("close", (_event, options) => {
            if (client !== current) return;
            state.error = { problem: options.problem || "disconnected", message: options.message || "" };
            changed();
        });
        current.watch({ path_namespace: ROOT_PATH })
                .then(() => {
                    state.loaded = true;
                    changed();
                })
                .catch(ex => {
                    if (client !== current) return;
                    state.error = ex;
                    state.loaded = true;
                    changed();
                });
    }
    connect();

    // Cockpit's administrative access: when it is turned on or off, the calls must go through
    // the other bridge, so a fresh client is made (the bridge routes superuser: "try" channels
    // when they open).
    const superuser = cockpit.dbus(null, { bus: "internal" }).proxy("cockpit.Superuser", "/superuser");
    let privileges = null;
    superuser.addEventListener("changed", () => {
        const current = superuser.Current;
        if (current === "init") return;
        if (privileges !== null && current !== privileges) {
            const old = client;
            client = null;
            if (old) old.close();
            for (const kind of Object.values(KINDS)) state[kind].clear();
            state.manager = null;
            connect();
            changed();
        }
        privileges = current;
    });

    return {
        state,
        subscribe(listener) {
            listeners.add(listener);
            return () => listeners.delete(listener);
        },
        createSnapshot(vm, name, description, allowExcluded) {
            return client.call(MANAGER_PATH, MANAGER_IFACE, "CreateSnapshot",
                               [vm, name, {
                                   description: { t: "s", v: description },
                                   allow_excluded: { t: "b", v: allowExcluded },
                               }], { type: "ssa{sv}" })
                    .then(([path]) => path);
        },
        restore(vm, snapshot, { target, stop }) {
            return client.call(MANAGER_PATH, MANAGER_IFACE, "Restore",
                               [vm, snapshot, {
                                   target: { t: "s", v: target || "" },
                                   stop_target: { t: "b", v: !!stop },
                               }], { type: "ssa{sv}" })
                    .then(([path]) => path);
        },
        deleteSnapshot(path) {
            return client.call(path, SNAPSHOT_IFACE, "Delete", [], { type: "" });
        },
    };
}

// The daemon's errors in words. `ex` is what cockpit.dbus() rejects with: a D-Bus error
// (name, message) or a transport problem.
export function errorText(ex) {
    if (!ex) return "";
    const name = ex.name || "";
    const message = ex.message || String(ex);
    const short = name.replace(/^org\.vmsnap\.VmSnap1\.Error\./, "");
    switch (short) {
    case "AccessDenied":
        return "Not authorized: " + message.replace(/^not authorized:\s*/i, "") + ". Turn on administrative access (the “Limited access” " +
            "button in Cockpit's top bar) or ask an administrator to grant this right.";
    case "VmRunning":
        return "The VM is running: " + message;
    case "Busy":
        return "Busy: " + message;
    case "NotFound":
        return "Not found: " + message;
    case "InvalidName":
    case "InvalidArgument":
        return "Invalid: " + message;
    case "AlreadyExists":
        return "Already exists: " + message;
    case "ExcludedDisks":
        return "Disks cannot be included: " + message;
    case "RecordWriteFailed":
        return "vmsnapd could not write its record (is its state folder full?): " + message;
    case "StorageFailed":
        return "A storage step failed: " + message;
    case "DeadlineExceeded":
        return "It did not finish in time: " + message;
    case "LibvirtUnavailable":
        return "libvirt is unavailable: " + message;
    case "ShuttingDown":
        return "vmsnapd is shutting down: " + message;
    default:
        break;
    }
    if (name === "org.freedesktop.DBus.Error.ServiceUnknown" || ex.problem === "not-found")
        return "vmsnapd is not running: " + message;
    if (ex.problem === "access-denied" || name === "org.freedesktop.DBus.Error.AccessDenied")
        return "Not authorized: " + message + ". Turn on administrative access or ask an administrator.";
    if (ex.problem === "disconnected")
        return "The connection to the host was lost: reload the page.";
    return message;
}

// vmsnapd's rules for names and descriptions (vmsnap_api's text.rs), in the same words, so
// the dialogs answer before the daemon is asked.
const EXCERPT_CHARS = 64;

function isUnsafeChar(c) {
    const code = c.codePointAt(0);
    return code < 0x20 || (code >= 0x7f && code <= 0x9f) ||
        code === 0x061c || code === 0x200e || code === 0x200f ||
        (code >= 0x202a && code <= 0x202e) || (code >= 0x2066 && code <= 0x2069);
}

// Rust's char::escape_default.
function escapeChar(c) {
    const named = { "\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", "'": "\\'", "\"": "\\\"" };
    if (named[c]) return named[c];
    const code = c.codePointAt(0);
    return code >= 0x20 && code <= 0x7e ? c : `\\u{${code.toString(16)}}`;
}

function excerpt(s) {
    let shown = "";
    let width = 0;
    let taken = 0;
    const chars = [...s];
    for (const c of chars) {
        const escaped = isUnsafeChar(c) ? escapeChar(c) : c;
        if (width + [...escaped].length > EXCERPT_CHARS) break;
        shown += escaped;
        width += [...escaped].length;
        taken += 1;
    }
    const left = chars.length - taken;
    return left > 0 ? `${shown}...[${left} more characters]` : shown;
}

function validateName(what, name, max, allowed, isAllowed) {
    if (name.length === 0) return `${what} must not be empty`;
    const described = `${what} "${excerpt(name)}"`;
    const bytes = new TextEncoder().encode(name).length;
    if (bytes > max) return `${described} is ${bytes} bytes long; the limit is ${max}`;
    const bad = [...name].find(c => !isAllowed(c));
    if (bad !== undefined) {
        return `${described} contains '${escapeChar(bad)}'; use only ${allowed}`;
    }
    if (name.startsWith(".") || name.startsWith("-")) return `${described} must not start with '.' or '-'`;
    return null;
}

export function validateSnapshotName(name) {
    return validateName("snapshot name", name, 63, "A-Z a-z 0-9 . _ -", c => /^[A-Za-z0-9._-]$/.test(c));
}

export function validateVmName(name) {
    return validateName("VM name", name, 200, "A-Z a-z 0-9 . _ - +", c => /^[A-Za-z0-9._+-]$/.test(c));
}

export function validateDescription(description) {
    const bytes = new TextEncoder().encode(description).length;
    if (bytes > 4096) return `the description is ${bytes} bytes long; the limit is 4096`;
    const bad = [...description].find(isUnsafeChar);
    if (bad !== undefined) return `the description contains the control character ${escapeChar(bad)}; use one line of text`;
    return null;
}
