//! vmsnap patch: subtree fallbacks (see VMSNAP-PATCH.md at the crate's root).
//!
//! A [`Fallback`] registered at a prefix with [`ObjectServer::set_fallback`] serves the objects
//! under that prefix that have no node of their own: for a call to such a path, the object
//! server asks the fallback for the object there and dispatches the call to it (methods, the
//! standard `Properties` and `Introspectable` interfaces) exactly as it would to a registered
//! node with the same interfaces. Nothing is held per object between calls, so an
//! application with many objects that it already keeps in its own structures does not pay for
//! a node each.
//!
//! [`ObjectServer::set_fallback`]: crate::ObjectServer::set_fallback

use std::{fmt, sync::Arc};

use crate::{ObjectPath, names::InterfaceName};

use super::{ArcInterface, Interface, Node};

/// The objects under a prefix that have no node of their own (vmsnap patch).
///
/// Both methods are called with the object server's tree locked: they must answer at once,
/// without blocking, and must not call back into the object server.
pub trait Fallback: Send + Sync + 'static {
    /// The object at `path` (a path strictly under the prefix), or `None` if there is none
    /// there: the caller then gets `org.freedesktop.DBus.Error.UnknownObject`, as for any path
    /// without a node.
    fn object(&self, path: &ObjectPath<'_>) -> Option<FallbackObject>;

    /// The names of the objects directly under the prefix (the last element of their paths),
    /// listed as children in the prefix node's introspection so that tools walking the tree
    /// (`busctl tree`) find them. Their own introspection comes from [`Fallback::object`].
    fn children(&self) -> Vec<String>;
}

/// An object served by a [`Fallback`] for one call: its interfaces, on top of the standard
/// `Peer`, `Introspectable` and `Properties` every node has. Built anew for each call and
/// dropped after it.
#[derive(Debug)]
pub struct FallbackObject {
    pub(crate) node: Node,
}

impl FallbackObject {
    /// An object at `path` with only the standard interfaces.
    pub fn new(path: ObjectPath<'_>) -> Self {
        Self {
            node: Node::new(path.into_owned().into()),
        }
    }

    /// Adds an interface; one of the same name already there is kept.
    pub fn with<I: Interface>(mut self, iface: I) -> Self {
        self.node
            .add_arc_interface(I::name(), ArcInterface::new(iface));
        self
    }

    /// The interface named `name`, if the object has it.
    pub(crate) fn interface_lock(&self, name: InterfaceName<'_>) -> Option<ArcInterface> {
        self.node.interface_lock(name)
    }
}

/// A registered fallback, kept on the prefix's node.
#[derive(Clone)]
pub(crate) struct FallbackRef(pub(crate) Arc<dyn Fallback>);

impl fmt::Debug for FallbackRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arc<dyn Fallback>").finish_non_exhaustive()
    }
}
