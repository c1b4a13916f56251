import { memo, useEffect, useMemo, useState, useSyncExternalStore } from "react";
import {
    Alert, Breadcrumb, BreadcrumbItem, Button, Checkbox, DescriptionList, DescriptionListDescription,
    DescriptionListGroup, DescriptionListTerm, EmptyState, EmptyStateBody, EmptyStateHeader, Flex,
    Form, FormGroup, FormHelperText, HelperText, HelperTextItem, Label, LabelGroup, List, ListItem,
    Modal, ModalVariant, Page, PageSection, Radio, Spinner, Tab, Tabs, TabTitleText, TextInput,
    Title,
} from "@patternfly/react-core";
import { ActionsColumn, Table, Tbody, Td, Th, Thead, Tr } from "@patternfly/react-table";
import { errorText, validateDescription, validateSnapshotName, validateVmName } from "./store.js";

const cockpit = window.cockpit;

// ---- data helpers ---------------------------------------------------------------------------

function useStoreVersion(store) {
    return useSyncExternalStore(store.subscribe, () => store.state.version);
}

function byCreation(a, b) {
    return (a.CreationTime || "").localeCompare(b.CreationTime || "") ||
        (a.Name || "").localeCompare(b.Name || "");
}

// Snapshots per VM UUID, oldest first; restores by VM name. Recomputed once per change batch.
function useIndex(store, version) {
    return useMemo(() => {
        const snapshotsByVm = new Map();
        for (const s of store.state.snapshots.values()) {
            const list = snapshotsByVm.get(s.VmUuid);
            if (list) list.push(s); else snapshotsByVm.set(s.VmUuid, [s]);
        }
        for (const list of snapshotsByVm.values()) list.sort(byCreation);
        const vms = [...store.state.vms.values()].sort((a, b) => (a.Name || "").localeCompare(b.Name || ""));
        const restores = [...store.state.restores.values()].sort(byCreation);
        return { snapshotsByVm, vms, restores };
    }, [store, version]); // eslint-disable-line react-hooks/exhaustive-deps
}

const RUNNING_STATES = ["running", "paused", "blocked", "pm-suspended", "shutting-down", "crashed"];

export function isRunning(vm) {
    return RUNNING_STATES.includes(vm.State);
}

function formatTime(rfc3339) {
    if (!rfc3339) return "";
    const date = new Date(rfc3339);
    if (isNaN(date.getTime())) return rfc3339;
    return date.toLocaleString(undefined, {
        year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
}

function formatSize(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = Number(bytes);
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
        value /= 1024;
        unit += 1;
    }
    return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

const AGENT_WORDS = {
    connected: "Connected",
    disconnected: "Not connected",
    "not-configured": "Not configured",
};

const STATE_WORDS = {
    running: "Running",
    paused: "Paused",
    "shut-off": "Shut off",
    "shutting-down": "Shutting down",
    crashed: "Crashed",
    blocked: "Blocked",
    "pm-suspended": "Suspended",
    "no-state": "No state",
    unknown: "Unknown",
};

const INDICATION_WORDS = {
    Online: "Online: taken while the VM ran",
    GuestAgent: "Guest agent: filesystems frozen (application-consistent)",
    NoGuestAgent: "No guest agent: crash-consistent",
    QuiesceFailed: "Freeze failed: crash-consistent",
    Paused: "Paused: not frozen, consistent as of the pause",
};

function indicationWords(snapshot) {
    const list = snapshot.Indications || [];
    if (list.length === 0 && snapshot.Phase === "Succeeded") return ["Offline: the VM was shut off"];
    return list.map(i => INDICATION_WORDS[i] || i);
}

function freezeWindow(snapshot) {
    if (!snapshot.FrozenFilesystems) return "No freeze";
    const fs = snapshot.FrozenFilesystems === 1 ? "1 filesystem" : `${snapshot.FrozenFilesystems} filesystems`;
    return `${snapshot.FreezeDurationMs} ms (${fs})`;
}

function snapshotStatus(snapshot) {
    switch (snapshot.Phase) {
    case "Succeeded":
        return snapshot.ReadyToUse ? { text: "Ready", color: "green" } : { text: "Not ready", color: "orange" };
    case "InProgress":
        return { text: "In progress", color: "blue", detail: snapshot.Progress };
    case "Failed":
        return { text: "Failed", color: "red", detail: snapshot.Error };
    case "Deleting":
        return { text: "Deleting", color: "grey", detail: snapshot.Progress };
    default:
        return { text: snapshot.Phase || "Unknown", color: "grey" };
    }
}

function restoreStatus(restore) {
    switch (restore.Phase) {
    case "Succeeded":
        return { text: "Succeeded", color: "green" };
    case "InProgress":
        return { text: "In progress", color: "blue", detail: restore.Progress };
    case "Failed":
        return { text: "Failed", color: "red", detail: restore.Error };
    default:
        return { text: restore.Phase || "Unknown", color: "grey" };
    }
}

function StatusCell({ status, id }) {
    return (
        <span id={id} className="vmsnap-status">
            <Label color={status.color} isCompact>{status.text}</Label>
            {status.detail && <span className={status.color === "red" ? "vmsnap-error" : "vmsnap-muted"}> {status.detail}</span>}
        </span>
    );
}

function diskWords(disk) {
    const [target, device, , , backend, reason] = disk;
    if (backend === "excluded") return `${target}: excluded (${reason || device})`;
    return `${target}: ${backend}`;
}

function excludedDisks(vm) {
    return (vm.Disks || []).filter(d => d[4] === "excluded");
}

function suggestName(existing) {
    const now = new Date();
    const pad = n => String(n).padStart(2, "0");
    const base = `snapshot-${now.getFullYear()}${pad(now.getMonth() + 1)}${pad(now.getDate())}-` +
        `${pad(now.getHours())}${pad(now.getMinutes())}${pad(now.getSeconds())}`;
    let name = base;
    for (let i = 2; existing.has(name); i++) name = `${base}-${i}`;
    return name;
}

function startVm(store, name) {
    const uri = (store.state.manager && store.state.manager.LibvirtUri) || "qemu:///system";
    return cockpit.spawn(["virsh", "-c", uri, "start", "--", name], { superuser: "try", err: "message" });
}

// ---- the app --------------------------------------------------------------------------------

export function App({ store }) {
    const version = useStoreVersion(store);
    const index = useIndex(store, version);
    const [path, setPath] = useState(cockpit.location.path);

    useEffect(() => {
        const onLocation = () => setPath(cockpit.location.path);
        cockpit.addEventListener("locationchanged", onLocation);
        return () => cockpit.removeEventListener("locationchanged", onLocation);
    }, []);

    const { state } = store;
    if (!state.loaded) {
        return (
            <Page>
                <PageSection>
                    <EmptyState>
                        <EmptyStateHeader titleText="Loading" icon={<Spinner size="xl" />} headingLevel="h1" />
                    </EmptyState>
                </PageSection>
            </Page>
        );
    }

    let body;
    if (path[0] === "vm" && path[1]) {
        const vm = index.vms.find(v => v.Name === path[1]);
        if (!vm) {
            body = (
                <PageSection>
                    <Alert variant="warning" isInline title={`Not found: there is no VM named ${path[1]}`}>
                        <Button variant="link" isInline onClick={() => cockpit.location.go([])}>Virtual machines</Button>
                    </Alert>
                </PageSection>
            );
        } else if (path[2] === "snapshot" && path[3]) {
            body = <SnapshotPage store={store} index={index} vm={vm} name={path[3]} />;
        } else {
            body = <VmPage store={store} index={index} vm={vm} tab={path[2] || "snapshots"} />;
        }
    } else {
        body = <VmList index={index} />;
    }

    return (
        <Page>
            {state.error && (
                <PageSection variant="light" padding={{ default: "noPadding" }}>
                    <Alert id="connection-error" variant="danger" isInline title={errorText(state.error)} />
                </PageSection>
            )}
            {state.daemonGone && (
                <PageSection variant="light" padding={{ default: "noPadding" }}>
                    <Alert id="daemon-gone" variant="warning" isInline
                           title="vmsnapd has stopped: this is what it last reported. The page follows it again when it is back." />
                </PageSection>
            )}
            {state.manager && state.manager.LibvirtConnected === false && (
                <PageSection variant="light" padding={{ default: "noPadding" }}>
                    <Alert variant="warning" isInline
                           title={`libvirt is unavailable: ${state.manager.LibvirtError}. VMs show their last known state.`} />
                </PageSection>
            )}
            {body}
        </Page>
    );
}

// ---- Virtual machines -----------------------------------------------------------------------

const VmRow = memo(function VmRow({ vm, count }) {
    return (
        <Tr id={`vm-${vm.Name}`} data-vm={vm.Name}>
            <Td dataLabel="Name">
                <Button variant="link" isInline className="vm-open" onClick={() => cockpit.location.go(["vm", vm.Name])}>
                    {vm.Name}
                </Button>
            </Td>
            <Td dataLabel="State" className="vm-state">{STATE_WORDS[vm.State] || vm.State}</Td>
            <Td dataLabel="Guest agent" className="vm-agent">{AGENT_WORDS[vm.Agent] || vm.Agent}</Td>
            <Td dataLabel="Disks" className="vm-disks">
                {(vm.Disks || []).map(d => <div key={d[0]}>{diskWords(d)}</div>)}
            </Td>
            <Td dataLabel="Snapshots" className="vm-snapshots">{count}</Td>
        </Tr>
    );
});

function VmList({ index }) {
    return (
        <PageSection>
            <Title headingLevel="h1" size="2xl">Virtual machines</Title>
            {index.vms.length === 0
                ? <EmptyState><EmptyStateHeader titleText="No virtual machines" headingLevel="h2" /></EmptyState>
                : (
                    <Table id="vm-list" aria-label="Virtual machines" variant="compact">
                        <Thead>
                            <Tr>
                                <Th>Name</Th>
                                <Th>State</Th>
                                <Th>Guest agent</Th>
                                <Th>Disks</Th>
                                <Th>Snapshots</Th>
                            </Tr>
                        </Thead>
                        <Tbody>
                            {index.vms.map(vm => (
                                <VmRow key={vm.path} vm={vm} count={(index.snapshotsByVm.get(vm.Uuid) || []).length} />
                            ))}
                        </Tbody>
                    </Table>
                )}
        </PageSection>
    );
}

// ---- A VM's page ----------------------------------------------------------------------------

function VmHeader({ store, vm, children }) {
    const [starting, setStarting] = useState(false);
    const [error, setError] = useState(null);
    const start = () => {
        setStarting(true);
        setError(null);
        startVm(store, vm.Name)
                .catch(ex => setError(ex.message || String(ex)))
                .finally(() => setStarting(false));
    };
    return (
        <PageSection variant="light">
            <Breadcrumb>
                <BreadcrumbItem to="#/" onClick={ev => { ev.preventDefault(); cockpit.location.go([]) }}>
                    Virtual machines
                </BreadcrumbItem>
                <BreadcrumbItem isActive>{vm.Name}</BreadcrumbItem>
            </Breadcrumb>
            <Flex alignItems={{ default: "alignItemsCenter" }}>
                <Title headingLevel="h1" size="2xl" id="vm-name">{vm.Name}</Title>
                <Label id="vm-state">{STATE_WORDS[vm.State] || vm.State}</Label>
                <span className="vmsnap-muted" id="vm-agent">Guest agent: {AGENT_WORDS[vm.Agent] || vm.Agent}</span>
                {vm.State === "shut-off" && (
                    <Button id="vm-start" variant="secondary" onClick={start} isLoading={starting} isDisabled={starting}>
                        Start
                    </Button>
                )}
            </Flex>
            {error && <Alert id="vm-start-error" variant="danger" isInline title={`The VM could not be started: ${error}`} />}
            {children}
        </PageSection>
    );
}

function VmPage({ store, index, vm, tab }) {
    const snapshots = index.snapshotsByVm.get(vm.Uuid) || [];
    const restores = index.restores.filter(r => r.VmName === vm.Name || r.Target === vm.Name);
    return (
        <>
            <VmHeader store={store} vm={vm} />
            <PageSection>
                <Tabs activeKey={tab} onSelect={(_ev, key) => cockpit.location.go(["vm", vm.Name, key])}>
                    <Tab eventKey="snapshots" id="tab-snapshots" title={<TabTitleText>Snapshots</TabTitleText>}>
                        <SnapshotsTab store={store} vm={vm} snapshots={snapshots} />
                    </Tab>
                    <Tab eventKey="restores" id="tab-restores" title={<TabTitleText>Restores</TabTitleText>}>
                        <RestoresTable restores={restores} />
                    </Tab>
                    <Tab eventKey="disks" id="tab-disks" title={<TabTitleText>Disks</TabTitleText>}>
                        <DisksTable vm={vm} />
                    </Tab>
                </Tabs>
            </PageSection>
        </>
    );
}

function DisksTable({ vm }) {
    return (
        <Table aria-label="Disks" variant="compact">
            <Thead><Tr><Th>Target</Th><Th>Device</Th><Th>Source</Th><Th>Backend</Th></Tr></Thead>
            <Tbody>
                {(vm.Disks || []).map(([target, device, source, , backend, reason]) => (
                    <Tr key={target}>
                        <Td>{target}</Td>
                        <Td>{device}</Td>
                        <Td>{source}</Td>
                        <Td>{backend === "excluded" ? `Excluded: ${reason}` : backend}</Td>
                    </Tr>
                ))}
            </Tbody>
        </Table>
    );
}

function SnapshotsTab({ store, vm, snapshots }) {
    const [dialog, setDialog] = useState(null);
    const close = () => setDialog(null);
    return (
        <>
            <Flex justifyContent={{ default: "justifyContentFlexEnd" }} className="pf-v5-u-my-md">
                <Button id="take-snapshot" variant="primary" onClick={() => setDialog({ kind: "take" })}>
                    Take snapshot
                </Button>
            </Flex>
            {snapshots.length === 0
                ? (
                    <EmptyState id="no-snapshots">
                        <EmptyStateHeader titleText="No snapshots" headingLevel="h2" />
                        <EmptyStateBody>Take a snapshot to be able to restore this VM later.</EmptyStateBody>
                    </EmptyState>
                )
                : (
                    <Table id="snapshot-list" aria-label="Snapshots" variant="compact">
                        <Thead>
                            <Tr>
                                <Th>Name</Th>
                                <Th>Description</Th>
                                <Th>Created</Th>
                                <Th>Status</Th>
                                <Th>Indications</Th>
                                <Th>Freeze window</Th>
                                <Th screenReaderText="Actions" />
                            </Tr>
                        </Thead>
                        <Tbody>
                            {snapshots.map(s => (
                                <SnapshotRow key={s.path} vm={vm} snapshot={s} setDialog={setDialog} />
                            ))}
                        </Tbody>
                    </Table>
                )}
            {dialog && dialog.kind === "take" &&
                <TakeSnapshotModal store={store} vm={vm} snapshots={snapshots} onClose={close} />}
            {dialog && dialog.kind === "restore" &&
                <RestoreModal store={store} vm={vm} snapshot={dialog.snapshot} onClose={close} />}
            {dialog && dialog.kind === "delete" &&
                <DeleteModal store={store} vm={vm} snapshot={dialog.snapshot} onClose={close} />}
        </>
    );
}

const SnapshotRow = memo(function SnapshotRow({ vm, snapshot, setDialog }) {
    const status = snapshotStatus(snapshot);
    const ready = snapshot.Phase === "Succeeded" && snapshot.ReadyToUse;
    const actions = [
        { title: "Restore", isDisabled: !ready, onClick: () => setDialog({ kind: "restore", snapshot }) },
        { title: "Details", onClick: () => cockpit.location.go(["vm", vm.Name, "snapshot", snapshot.Name]) },
        { isSeparator: true },
        { title: "Delete", isDisabled: snapshot.Phase === "Deleting", onClick: () => setDialog({ kind: "delete", snapshot }) },
    ];
    return (
        <Tr data-snapshot={snapshot.Name}>
            <Td dataLabel="Name">
                <Button variant="link" isInline className="snapshot-open"
                        onClick={() => cockpit.location.go(["vm", vm.Name, "snapshot", snapshot.Name])}>
                    {snapshot.Name}
                </Button>
            </Td>
            <Td dataLabel="Description" className="snapshot-description">{snapshot.Description}</Td>
            <Td dataLabel="Created" className="vmsnap-nowrap">{formatTime(snapshot.CreationTime)}</Td>
            <Td dataLabel="Status" className="snapshot-status"><StatusCell status={status} /></Td>
            <Td dataLabel="Indications" className="snapshot-indications">
                {indicationWords(snapshot).map(w => <div key={w}>{w}</div>)}
            </Td>
            <Td dataLabel="Freeze window" className="snapshot-freeze">{freezeWindow(snapshot)}</Td>
            <Td isActionCell>
                <ActionsColumn items={actions} />
            </Td>
        </Tr>
    );
});

// ---- Take snapshot --------------------------------------------------------------------------

function TakeSnapshotModal({ store, vm, snapshots, onClose }) {
    const existing = useMemo(() => new Set(snapshots.map(s => s.Name)), [snapshots]);
    const [name, setName] = useState(() => suggestName(existing));
    const [description, setDescription] = useState("");
    const [aware, setAware] = useState(false);
    const [pending, setPending] = useState(false);
    const [error, setError] = useState(null);
    const excluded = excludedDisks(vm);
    const nameError = validateSnapshotName(name) ||
        (existing.has(name) ? `a snapshot named "${name}" already exists for VM ${vm.Name}` : null);
    const descriptionError = validateDescription(description);
    const canSave = !nameError && !descriptionError && (excluded.length === 0 || aware) && !pending;

    const save = () => {
        setPending(true);
        setError(null);
        store.createSnapshot(vm.Uuid, name, description, excluded.length > 0 && aware)
                .then(() => onClose())
                .catch(ex => {
                    setError(errorText(ex));
                    setPending(false);
                });
    };

    return (
        <Modal id="take-snapshot-dialog" variant={ModalVariant.medium} isOpen onClose={onClose}
               title="Take snapshot"
               actions={[
                   <Button key="save" id="snapshot-save" variant="primary" isDisabled={!canSave}
                           isLoading={pending} onClick={save}>Save</Button>,
                   <Button key="cancel" variant="link" onClick={onClose}>Cancel</Button>,
               ]}>
            <Form onSubmit={ev => { ev.preventDefault(); if (canSave) save() }}>
                {error && <Alert id="snapshot-error" variant="danger" isInline title={error} />}
                <FormGroup label="Snapshot name" isRequired fieldId="snapshot-name">
                    <TextInput id="snapshot-name" value={name} onChange={(_ev, v) => setName(v)}
                               validated={nameError ? "error" : "default"} />
                    {nameError && (
                        <FormHelperText>
                            <HelperText><HelperTextItem id="snapshot-name-error" variant="error">{nameError}</HelperTextItem></HelperText>
                        </FormHelperText>
                    )}
                </FormGroup>
                <FormGroup label="Description" fieldId="snapshot-description">
                    <TextInput id="snapshot-description" value={description}
                               onChange={(_ev, v) => setDescription(v)}
                               validated={descriptionError ? "error" : "default"} />
                    {descriptionError && (
                        <FormHelperText>
                            <HelperText><HelperTextItem id="snapshot-description-error" variant="error">{descriptionError}</HelperTextItem></HelperText>
                        </FormHelperText>
                    )}
                </FormGroup>
                {vm.Agent !== "connected" && isRunning(vm) && (
                    <Alert variant="info" isInline
                           title="No guest agent is connected: the snapshot will be crash-consistent (filesystems are not frozen)." />
                )}
                {excluded.length > 0 && (
                    <Alert id="excluded-warning" variant="warning" isInline
                           title="Some disks cannot be included in the snapshot and will not be restored">
                        <List>
                            {excluded.map(([target, device, source, , , reason]) => (
                                <ListItem key={target}>{target}{source ? ` (${source})` : ` (${device})`}: {reason}</ListItem>
                            ))}
                        </List>
                        <Checkbox id="snapshot-aware" label="I am aware of this warning and wish to proceed"
                                  isChecked={aware} onChange={(_ev, v) => setAware(v)} />
                    </Alert>
                )}
            </Form>
        </Modal>
    );
}

// ---- Restore --------------------------------------------------------------------------------

function RestoreModal({ store, vm, snapshot, onClose }) {
    const [mode, setMode] = useState("in-place");
    const [newName, setNewName] = useState(`${vm.Name}-${snapshot.Name}`.slice(0, 200));
    const [pending, setPending] = useState(false);
    const [error, setError] = useState(null);
    const [restorePath, setRestorePath] = useState(null);
    const [starting, setStarting] = useState(false);
    const [startError, setStartError] = useState(null);
    const [started, setStarted] = useState(false);
    useStoreVersion(store);

    const restore = restorePath ? store.state.restores.get(restorePath) : null;
    const running = isRunning(vm);
    const inPlace = mode === "in-place";
    const nameTaken = !inPlace && [...store.state.vms.values()].some(v => v.Name === newName);
    const newNameError = !inPlace &&
        (validateVmName(newName) || (nameTaken ? `a VM named ${newName} already exists` : null));

    const run = (stop) => {
        setPending(true);
        setError(null);
        store.restore(vm.Uuid, snapshot.Name, { target: inPlace ? "" : newName, stop })
                .then(path => setRestorePath(path))
                .catch(ex => {
                    setError(errorText(ex));
                    setPending(false);
                });
    };
    const target = restore ? restore.Target : (inPlace ? vm.Name : newName);
    const targetVm = [...store.state.vms.values()].find(v => v.Name === target);
    const start = () => {
        setStarting(true);
        setStartError(null);
        startVm(store, target)
                .then(() => setStarted(true))
                .catch(ex => setStartError(ex.message || String(ex)))
                .finally(() => setStarting(false));
    };

    let actions;
    let body;
    if (restorePath) {
        const done = restore && restore.Phase !== "InProgress";
        actions = [];
        if (restore && restore.Phase === "Succeeded" && targetVm && targetVm.State === "shut-off" && !started)
            actions.push(<Button key="start" id="restore-start" variant="primary" isLoading={starting}
                                 isDisabled={starting} onClick={start}>Start {target}</Button>);
        actions.push(<Button key="close" id="restore-close" variant={done ? "secondary" : "link"} onClick={onClose}>
            {done ? "Close" : "Close (the restore goes on)"}
        </Button>);
        body = <RestoreProgress restore={restore} startError={startError} started={started} target={target} />;
    } else {
        const disabled = pending || !!newNameError;
        actions = inPlace && running
            ? [<Button key="stop" id="restore-stop-and-restore" variant="danger" isDisabled={disabled} isLoading={pending}
                       onClick={() => run(true)}>Stop and restore</Button>]
            : [<Button key="restore" id="restore-confirm" variant="danger" isDisabled={disabled} isLoading={pending}
                       onClick={() => run(false)}>Restore</Button>];
        actions.push(<Button key="cancel" variant="link" onClick={onClose}>Cancel</Button>);
        body = (
            <Form onSubmit={ev => ev.preventDefault()}>
                {error && <Alert id="restore-error" variant="danger" isInline title={error} />}
                <p id="restore-summary">
                    Restore VM <b>{vm.Name}</b> from snapshot <b>{snapshot.Name}</b>
                    {snapshot.CreationTime ? ` (taken ${formatTime(snapshot.CreationTime)})` : ""}.
                </p>
                <FormGroup role="radiogroup" fieldId="restore-mode" label="Restore to" isStack>
                    <Radio id="restore-in-place" name="restore-mode" label={`This VM (${vm.Name})`}
                           isChecked={inPlace} onChange={() => setMode("in-place")} />
                    <Radio id="restore-new-vm" name="restore-mode" label="A new VM"
                           isChecked={!inPlace} onChange={() => setMode("new")} />
                </FormGroup>
                {!inPlace && (
                    <FormGroup label="New VM name" isRequired fieldId="restore-new-name">
                        <TextInput id="restore-new-name" value={newName} onChange={(_ev, v) => setNewName(v)}
                                   validated={newNameError ? "error" : "default"} />
                        {newNameError && (
                            <FormHelperText><HelperText><HelperTextItem id="restore-new-name-error" variant="error">{newNameError}</HelperTextItem></HelperText></FormHelperText>
                        )}
                    </FormGroup>
                )}
                <div id="restore-explanation">
                    {inPlace
                        ? (
                            <List>
                                <ListItem>A safety snapshot of the current state (pre-restore-…) is taken first, so this restore can itself be undone.</ListItem>
                                <ListItem>Every disk in the snapshot and the VM's definition go back to the snapshot's state; changes made since are kept only in the safety snapshot.</ListItem>
                                <ListItem>Disks attached since the snapshot are detached (their images are kept).</ListItem>
                                {(snapshot.ExcludedVolumes || []).length > 0 && (
                                    <ListItem>Disks the snapshot left out keep their current content: {snapshot.ExcludedVolumes.map(([t, r]) => `${t} (${r})`).join(", ")}.</ListItem>
                                )}
                            </List>
                        )
                        : (
                            <List>
                                <ListItem>A new VM is created from the snapshot, with a new UUID, new MAC addresses and disks of its own.</ListItem>
                                <ListItem>{vm.Name} is left as it is.</ListItem>
                            </List>
                        )}
                </div>
                {inPlace && running && (
                    <Alert id="restore-running" variant="warning" isInline
                           title={`The VM ${vm.Name} is running. It must be stopped before it can be restored.`}>
                        “Stop and restore” shuts it down (gracefully first), then restores it.
                    </Alert>
                )}
            </Form>
        );
    }

    return (
        <Modal id="restore-dialog" variant={ModalVariant.medium} isOpen onClose={onClose}
               title={restorePath ? `Restore of ${vm.Name} from snapshot ${snapshot.Name}` : `Restore ${vm.Name} from snapshot ${snapshot.Name}?`}
               titleIconVariant={restorePath ? undefined : "warning"}
               actions={actions}>
            {body}
        </Modal>
    );
}

function RestoreProgress({ restore, startError, started, target }) {
    if (!restore) return <Spinner size="lg" aria-label="Starting the restore" />;
    const status = restoreStatus(restore);
    return (
        <div id="restore-result">
            {restore.Phase === "InProgress" && (
                <Flex alignItems={{ default: "alignItemsCenter" }}>
                    <Spinner size="md" aria-label="Restoring" />
                    <span id="restore-progress">Restoring: {restore.Progress || "starting"}</span>
                </Flex>
            )}
            {restore.Phase === "Succeeded" && (
                <Alert id="restore-succeeded" variant="success" isInline
                       title={restore.NewVm ? `Restored as the new VM ${restore.Target}` : `${restore.Target} restored from ${restore.Snapshot}`}>
                    <RestoreFacts restore={restore} />
                </Alert>
            )}
            {restore.Phase === "Failed" && (
                <Alert id="restore-failed" variant="danger" isInline title={`The restore failed: ${restore.Error}`}>
                    <RestoreFacts restore={restore} />
                </Alert>
            )}
            {restore.Phase !== "InProgress" && restore.Phase !== "Succeeded" && restore.Phase !== "Failed" &&
                <StatusCell status={status} />}
            {started && <Alert id="restore-started" variant="info" isInline title={`${target} is starting`} />}
            {startError && <Alert id="restore-start-error" variant="danger" isInline title={`${target} could not be started: ${startError}`} />}
        </div>
    );
}

function RestoreFacts({ restore }) {
    return (
        <List>
            {restore.SafetySnapshot && <ListItem>Safety snapshot: {restore.SafetySnapshot}</ListItem>}
            {(restore.DetachedDisks || []).length > 0 &&
                <ListItem>Detached: {restore.DetachedDisks.map(([t, s]) => `${t} (${s})`).join(", ")}</ListItem>}
            {(restore.NotRestored || []).length > 0 &&
                <ListItem>Not restored: {restore.NotRestored.map(([t, r]) => `${t} (${r})`).join(", ")}</ListItem>}
        </List>
    );
}

function RestoresTable({ restores }) {
    if (restores.length === 0)
        return <EmptyState><EmptyStateHeader titleText="No restores" headingLevel="h2" /></EmptyState>;
    return (
        <Table id="restore-list" aria-label="Restores" variant="compact">
            <Thead>
                <Tr>
                    <Th>Requested</Th>
                    <Th>Snapshot</Th>
                    <Th>Target</Th>
                    <Th>Status</Th>
                    <Th>Completed</Th>
                    <Th>Safety snapshot</Th>
                    <Th>Detached disks</Th>
                </Tr>
            </Thead>
            <Tbody>
                {restores.map(r => (
                    <Tr key={r.path} data-restore={r.Uuid}>
                        <Td className="vmsnap-nowrap">{formatTime(r.CreationTime)}</Td>
                        <Td>{r.VmName} / {r.Snapshot}</Td>
                        <Td>{r.NewVm ? `New VM ${r.Target}` : `${r.Target} (in place)`}</Td>
                        <Td className="restore-status"><StatusCell status={restoreStatus(r)} /></Td>
                        <Td className="vmsnap-nowrap">{formatTime(r.RestoreTime)}</Td>
                        <Td>{r.SafetySnapshot}</Td>
                        <Td>{(r.DetachedDisks || []).map(([t, s]) => `${t} (${s})`).join(", ")}</Td>
                    </Tr>
                ))}
            </Tbody>
        </Table>
    );
}

// ---- Delete ---------------------------------------------------------------------------------

function DeleteModal({ store, vm, snapshot, onClose, onDeleted }) {
    const [pending, setPending] = useState(false);
    const [error, setError] = useState(null);
    const remove = () => {
        setPending(true);
        setError(null);
        store.deleteSnapshot(snapshot.path)
                .then(() => {
                    onClose();
                    if (onDeleted) onDeleted();
                })
                .catch(ex => {
                    setError(errorText(ex));
                    setPending(false);
                });
    };
    return (
        <Modal id="delete-dialog" variant={ModalVariant.small} isOpen onClose={onClose}
               title={`Delete snapshot ${snapshot.Name}?`} titleIconVariant="warning"
               actions={[
                   <Button key="delete" id="delete-confirm" variant="danger" isLoading={pending}
                           isDisabled={pending} onClick={remove}>Delete</Button>,
                   <Button key="cancel" variant="link" onClick={onClose}>Cancel</Button>,
               ]}>
            {error && <Alert id="delete-error" variant="danger" isInline title={error} />}
            <p>
                The snapshot <b>{snapshot.Name}</b> of VM <b>{vm.Name}</b> is deleted: its data is merged into
                the images that still need it or removed. It cannot be restored afterwards.
            </p>
        </Modal>
    );
}

// ---- Snapshot details -----------------------------------------------------------------------

function SnapshotPage({ store, index, vm, name }) {
    const [dialog, setDialog] = useState(null);
    const snapshots = index.snapshotsByVm.get(vm.Uuid) || [];
    const snapshot = snapshots.find(s => s.Name === name);
    const restores = index.restores.filter(r => r.VmName === vm.Name && r.Snapshot === name);
    if (!snapshot) {
        return (
            <VmHeader store={store} vm={vm}>
                <Alert variant="warning" isInline title={`Not found: VM ${vm.Name} has no snapshot named ${name}`}>
                    <Button variant="link" isInline onClick={() => cockpit.location.go(["vm", vm.Name])}>Snapshots</Button>
                </Alert>
            </VmHeader>
        );
    }
    const status = snapshotStatus(snapshot);
    const ready = snapshot.Phase === "Succeeded" && snapshot.ReadyToUse;
    return (
        <>
            <VmHeader store={store} vm={vm} />
            <PageSection id="snapshot-details">
                <Flex justifyContent={{ default: "justifyContentSpaceBetween" }}>
                    <Title headingLevel="h2" size="xl">Snapshot {snapshot.Name}</Title>
                    <Flex>
                        <Button id="details-restore" variant="secondary" isDisabled={!ready}
                                onClick={() => setDialog("restore")}>Restore</Button>
                        <Button id="details-delete" variant="danger" isDisabled={snapshot.Phase === "Deleting"}
                                onClick={() => setDialog("delete")}>Delete</Button>
                    </Flex>
                </Flex>
                <DescriptionList isHorizontal className="pf-v5-u-mt-md">
                    <Fact term="Description">{snapshot.Description || "—"}</Fact>
                    <Fact term="Created">{formatTime(snapshot.CreationTime)}</Fact>
                    <Fact term="Status"><StatusCell id="details-status" status={status} /></Fact>
                    <Fact term="Indications">
                        <LabelGroup numLabels={10}>
                            {indicationWords(snapshot).map(w => <Label key={w} isCompact>{w}</Label>)}
                        </LabelGroup>
                    </Fact>
                    <Fact term="Freeze window">{freezeWindow(snapshot)}</Fact>
                    {snapshot.CowFillPercent > 0 && <Fact term="Copy-on-write space used">{snapshot.CowFillPercent.toFixed(1)} %</Fact>}
                </DescriptionList>
                <Title headingLevel="h3" className="pf-v5-u-mt-lg">Included volumes</Title>
                <Table id="included-volumes" aria-label="Included volumes" variant="compact">
                    <Thead><Tr><Th>Disk</Th><Th>Backend</Th><Th>Snapshot data</Th><Th>Size</Th></Tr></Thead>
                    <Tbody>
                        {(snapshot.IncludedVolumes || []).map(([target, backend, image, size]) => (
                            <Tr key={target}><Td>{target}</Td><Td>{backend}</Td><Td>{image}</Td><Td>{formatSize(size)}</Td></Tr>
                        ))}
                    </Tbody>
                </Table>
                <Title headingLevel="h3" className="pf-v5-u-mt-lg">Excluded volumes</Title>
                {(snapshot.ExcludedVolumes || []).length === 0
                    ? <p id="excluded-volumes">None</p>
                    : (
                        <List id="excluded-volumes">
                            {snapshot.ExcludedVolumes.map(([target, reason]) => <ListItem key={target}>{target}: {reason}</ListItem>)}
                        </List>
                    )}
                <Title headingLevel="h3" className="pf-v5-u-mt-lg">Restores from this snapshot</Title>
                <RestoresTable restores={restores} />
            </PageSection>
            {dialog === "restore" && <RestoreModal store={store} vm={vm} snapshot={snapshot} onClose={() => setDialog(null)} />}
            {dialog === "delete" &&
                <DeleteModal store={store} vm={vm} snapshot={snapshot} onClose={() => setDialog(null)}
                             onDeleted={() => cockpit.location.go(["vm", vm.Name])} />}
        </>
    );
}

function Fact({ term, children }) {
    return (
        <DescriptionListGroup>
            <DescriptionListTerm>{term}</DescriptionListTerm>
            <DescriptionListDescription>{children}</DescriptionListDescription>
        </DescriptionListGroup>
    );
}
