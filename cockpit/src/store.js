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

// vmsnapd's snapshot name rules (vmsnap_api::validate_snapshot_name), in the same words.
export function validateSnapshotName(name) {
    if (name.length === 0) return "snapshot name must not be empty";
    const bytes = new TextEncoder().encode(name).length;
    if (bytes > 63) return `snapshot name is ${bytes} characters long; the limit is 63`;
    const bad = [...name].find(c => !/^[A-Za-z0-9._-]$/.test(c));
    if (bad !== undefined) return `snapshot name "${name}" contains '${bad}'; use only A-Z a-z 0-9 . _ -`;
    if (name.startsWith(".") || name.startsWith("-")) return `snapshot name "${name}" must not start with '.' or '-'`;
    return null;
}

// vmsnapd's rules for a new VM's name (and never "." or "..", which no tool should hand to
// libvirt).
export function validateVmName(name) {
    if (name.length === 0) return "the new VM needs a name";
    if (name.length > 200) return `the name is ${name.length} characters long; the limit is 200`;
    if (name === "." || name === "..") return `"${name}" cannot be a VM's name`;
    if (name.startsWith("-")) return "the name must not start with '-'";
    const bad = [...name].find(c => !/^[A-Za-z0-9._+-]$/.test(c));
    if (bad !== undefined) return `the name contains '${bad}'; use only A-Z a-z 0-9 . _ - +`;
    return null;
}
