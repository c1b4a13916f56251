//! Safe wrappers for the libvirt calls the `virt` crate has no safe API for. (helper: in progress)
