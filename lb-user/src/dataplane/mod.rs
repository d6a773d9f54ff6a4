//! The XDP data plane: loading the program, attaching it and talking to its maps.
mod loader;
mod vip;

pub use loader::{Dataplane, DataplaneError, attach_pass};
pub use vip::vip_key;

/// The compiled XDP object, built by build.rs from lb-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The do-nothing XDP_PASS object (no maps), for veth peers that receive redirected frames.
pub static PASS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-pass"));
