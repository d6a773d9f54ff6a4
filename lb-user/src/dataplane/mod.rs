//! The XDP data plane: loading the program, attaching it, preparing the host, and keeping its
//! maps in step with the configured services.
pub mod changes;
pub mod decap;
pub mod host;
mod kernel_maps;
mod link;
mod loader;
pub mod snat;
pub mod tables;
mod vip;
pub mod writer;

pub use link::Linked;
pub use loader::{
    Attached, Dataplane, DataplaneError, LoadOptions, attach_pass, detach, detach_keeping_host,
};
pub use vip::vip_key;

/// The compiled XDP object, built by build.rs from lb-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The do-nothing XDP_PASS object (no maps), for veth peers that receive redirected frames.
pub static PASS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-pass"));
/// `lb decap`'s program (`lb-ebpf/src/decap.rs`), with its own three small maps.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));
