//! Attaching through pinned XDP links: a new link is pinned, a pinned link on the same
//! interface is updated in place (no moment without a program), and a pinned link whose
//! interface was deleted (or re-created: a new device, a new index) is replaced, the pinned
//! maps and their tracked flows untouched. The kernel calls such a link "severed"; updating it
//! fails with ENOLINK. Links of interfaces the config no longer names are unpinned.
use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::programs::{
    ProgramError, Xdp, XdpMode as AyaXdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};

use super::{
    host::Iface,
    loader::{DataplaneError, pin_err},
};

/// How an attachment came about, for the log and `lb status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linked {
    /// A new link (pinned when there is a pin directory).
    New,
    /// The pinned link of a previous run now runs this program.
    Updated,
    /// The pinned link was dead (its interface deleted or re-created) and was replaced.
    Replaced { why: String },
}

impl Linked {
    /// The short word `lb status` shows.
    pub fn as_str(&self) -> &'static str {
        match self {
            Linked::New => "new",
            Linked::Updated => "updated in place",
            Linked::Replaced { .. } => "replaced",
        }
    }
}

/// Attaches `prog` to `iface` in `mode`, through the link pinned at `pin` if there is one.
pub fn attach(
    prog: &mut Xdp,
    iface: &Iface,
    mode: AyaXdpMode,
    mode_name: &'static str,
    pin: Option<&Path>,
) -> Result<Linked, DataplaneError> {
    let mut linked = Linked::New;
    if let Some(path) = pin.filter(|p| p.exists()) {
        match pinned_ifindex(path) {
            Ok(index) if index == iface.index => {
                let pinned = PinnedLink::from_pin(path).map_err(|e| pin_err(path, e))?;
                let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(path, e))?;
                prog.attach_to_link(link)?;
                log::info!("XDP program replaced in place on {} (pinned link adopted)", iface.name);
                return Ok(Linked::Updated);
            }
            Ok(index) => {
                let why = if index == 0 {
                    format!("the interface it was attached to is gone; {} is a new one", iface.name)
                } else {
                    format!(
                        "it is attached to interface index {index}, not {} ({})",
                        iface.name, iface.index
                    )
                };
                // Unpinning drops the last reference: the dead link goes; the maps stay.
                std::fs::remove_file(path).map_err(|e| pin_err(path, e))?;
                log::warn!(
                    "replacing the pinned XDP link of {} ({why}); the pinned maps and tracked flows are kept",
                    iface.name
                );
                linked = Linked::Replaced { why };
            }
            Err(e) => return Err(pin_err(path, format!("cannot inspect the pinned link: {e}"))),
        }
    }
    let id = prog.attach(&iface.name, mode).map_err(|source| match source {
        ProgramError::UnknownInterface { name } => DataplaneError::NoInterface(name),
        source => DataplaneError::Attach { iface: iface.name.clone(), mode: mode_name, source },
    })?;
    if let Some(path) = pin {
        let link = prog.take_link(id)?;
        let fd = FdLink::try_from(link).map_err(|e| pin_err(path, e))?;
        fd.pin(path).map_err(|e| pin_err(path, e))?;
    }
    Ok(linked)
}

/// Unpins the links under `pin_dir` of interfaces not in `keep` (served by an earlier config,
/// or deleted since): their program stops on that interface, if it still exists. Returns the
/// interface names.
pub fn prune(pin_dir: &Path, keep: &[String]) -> Result<Vec<String>, DataplaneError> {
    let entries = std::fs::read_dir(pin_dir).map_err(|e| pin_err(pin_dir, e))?;
    let mut pruned = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(iface) = name.strip_prefix("link-") else { continue };
        if keep.iter().any(|k| k == iface) {
            continue;
        }
        std::fs::remove_file(entry.path()).map_err(|e| pin_err(&entry.path(), e))?;
        log::warn!("removed the pinned XDP link of {iface}: it is not in xdp.interfaces");
        pruned.push(iface.to_string());
    }
    Ok(pruned)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The interface index a pinned XDP link is attached to; 0 when it is severed. aya 0.14's
/// `LinkInfo` does not expose the XDP part of `bpf_link_info`, so it is read here.
fn pinned_ifindex(path: &Path) -> std::io::Result<u32> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let get =
        ObjGet { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: bpf(BPF_OBJ_GET) reads the attr (and the NUL-terminated path it points to, alive
    // until the call returns) and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get as *const ObjGet, size_of::<ObjGet>())
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // `struct bpf_link_info`: type, id, prog_id, then the per-type union at byte 16, whose XDP
    // member starts with the ifindex. Zeroed beyond what the kernel fills.
    let mut info = [0u32; 64];
    let req = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &req as *const InfoByFd,
            size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let link_type = info[0];
    if link_type != BPF_LINK_TYPE_XDP {
        return Err(std::io::Error::other(format!("not an XDP link (type {link_type})")));
    }
    Ok(info[4])
}
