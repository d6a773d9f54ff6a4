//! `lb decap`: on a backend of a DSR service, attaches the `lb-decap` program (strips the
//! outer header a balancer added and passes the inner packet to the local stack) to an
//! interface through a link pinned under its own pin directory (default
//! [`DEFAULT_DECAP_PIN`]), so it keeps running after the command exits, as `lb run`'s program
//! does; `detach` unpins it (and the maps with the last link), `status` reads the counters.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6,
    decap::{self, DecapKey, DecapSettings},
};

use super::{
    changes,
    host::Iface,
    link,
    loader::{DataplaneError, aya_mode, ensure_bpffs, pin_err},
};
use crate::config::XdpMode;

/// Where `lb decap` pins when neither `--pin-path` nor `LB_PIN_PATH` says.
pub const DEFAULT_DECAP_PIN: &str = "/sys/fs/bpf/lb-decap";
const MAPS: [&str; 3] = [decap::VIPS, decap::SETTINGS, decap::STATS];

/// What `attach` sets up.
pub struct DecapOptions {
    pub pin: PathBuf,
    pub interface: String,
    /// Only packets to these are unwrapped; empty: every encapsulated packet.
    pub vips: Vec<IpAddr>,
    pub mode: XdpMode,
}

fn link_pin(pin: &Path, iface: &str) -> PathBuf {
    pin.join(format!("link-{iface}"))
}

/// Loads the program with its maps pinned under `opts.pin`, writes the VIP filter, and
/// attaches it to `opts.interface` (a link pinned there already is updated in place).
pub fn attach(opts: &DecapOptions) -> Result<link::Linked, DataplaneError> {
    let iface = Iface::lookup(&opts.interface)
        .ok_or_else(|| DataplaneError::NoInterface(opts.interface.clone()))?;
    ensure_bpffs(&opts.pin)?;
    std::fs::create_dir_all(&opts.pin).map_err(|e| pin_err(&opts.pin, e))?;
    let mut ebpf = load(Some(&opts.pin), &opts.vips)?;
    let pin = link_pin(&opts.pin, &iface.name);
    link::attach(program(&mut ebpf)?, &iface, aya_mode(opts.mode), opts.mode.as_str(), Some(&pin))
}

/// Loads the program and writes its VIP filter (`vips`; none: unwrap everything), without
/// attaching it: maps pinned under `pin`, or private to the returned object (packet fixtures).
pub fn load(pin: Option<&Path>, vips: &[IpAddr]) -> Result<Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    if let Some(pin) = pin {
        for name in MAPS {
            loader.map_pin_path(name, pin.join(name));
        }
    }
    let mut ebpf = loader.load(super::DECAP_OBJECT).map_err(DataplaneError::Load)?;
    {
        let map = ebpf.map_mut(decap::VIPS).ok_or(DataplaneError::Missing(decap::VIPS))?;
        let mut map: HashMap<&mut MapData, DecapKey, u8> = HashMap::try_from(map)?;
        let old: Vec<DecapKey> = map.keys().filter_map(Result::ok).collect();
        for k in old {
            map.remove(&k)?;
        }
        for vip in vips {
            map.insert(key(*vip), 1, 0)?;
        }
    }
    {
        let map = ebpf.map_mut(decap::SETTINGS).ok_or(DataplaneError::Missing(decap::SETTINGS))?;
        let mut settings: Array<&mut MapData, DecapSettings> = Array::try_from(map)?;
        let filter = u32::from(!vips.is_empty());
        settings.set(0, DecapSettings { filter, _pad: 0 }, 0)?;
    }
    program(&mut ebpf)?.load()?;
    Ok(ebpf)
}

/// The decap program of a loaded object.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    let prog = ebpf.program_mut(decap::PROGRAM).ok_or(DataplaneError::Missing(decap::PROGRAM))?;
    Ok(prog.try_into()?)
}

/// The counters of a loaded object (see [`counters`] for the pinned ones).
pub fn counters_of(ebpf: &Ebpf) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    let map = ebpf.map(decap::STATS).ok_or(DataplaneError::Missing(decap::STATS))?;
    sum(&PerCpuArray::try_from(map)?)
}

/// Unpins the link of `iface` (the program stops there), and the maps and directory once no
/// link is left. Returns what was removed.
pub fn detach(pin: &Path, iface: &str) -> Result<Vec<String>, DataplaneError> {
    let mut removed = Vec::new();
    let link = link_pin(pin, iface);
    if link.exists() {
        std::fs::remove_file(&link).map_err(|e| pin_err(&link, e))?;
        removed.push(format!("link-{iface}"));
    }
    if links(pin).is_empty() {
        for name in MAPS {
            let path = pin.join(name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                removed.push(name.to_string());
            }
        }
        let _ = std::fs::remove_dir(pin);
        removed.extend(changes::undo(pin)?);
    }
    Ok(removed)
}

/// The rest of a DSR backend's set-up for `vips`: each on `lo` (the unwrapped packet is
/// addressed to it), and ARP for them left to the nodes (`arp_ignore = 1`: answer only for
/// addresses of the asking interface; `arp_announce = 2`: never source ARP from a VIP).
/// Recorded beside the pins like `lb run`'s changes; returns them.
pub fn configure_host(pin: &Path, vips: &[IpAddr]) -> Result<Vec<String>, changes::HostError> {
    let mut host = changes::Changes::open(Some(pin))?;
    for vip in vips {
        host.add_local(*vip)?;
    }
    if vips.iter().any(IpAddr::is_ipv4) {
        host.sysctl(&["net", "ipv4", "conf", "all", "arp_ignore"], "1")?;
        host.sysctl(&["net", "ipv4", "conf", "all", "arp_announce"], "2")?;
    }
    Ok(host.list().iter().map(ToString::to_string).collect())
}

/// The interfaces with a pinned decap link under `pin`.
pub fn links(pin: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pin) else { return Vec::new() };
    let mut out: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("link-").map(String::from))
        .collect();
    out.sort();
    out
}

/// The counters (summed over CPUs) by name, from the pinned stats map.
pub fn counters(pin: &Path) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    let path = pin.join(decap::STATS);
    let data = MapData::from_pin(&path).map_err(|e| pin_err(&path, e))?;
    let map = aya::maps::Map::PerCpuArray(data);
    sum(&PerCpuArray::try_from(map)?)
}

fn sum<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, u64>,
) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
    (0..decap::stat::COUNT)
        .map(|i| {
            let v = stats.get(&i, 0)?;
            Ok((decap::stat::NAMES[i as usize], v.iter().sum()))
        })
        .collect()
}

fn key(addr: IpAddr) -> DecapKey {
    let mut k = DecapKey::default();
    match addr {
        IpAddr::V4(a) => {
            k.addr[..4].copy_from_slice(&a.octets());
            k.family = FAMILY_V4;
        }
        IpAddr::V6(a) => {
            k.addr = a.octets();
            k.family = FAMILY_V6;
        }
    }
    k
}
