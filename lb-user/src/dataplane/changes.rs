//! What `lb run` changed on the host (sysctls, VIP addresses, managed neighbours), each with
//! the state before it: logged when made, listed by `lb status`, and kept in a record file
//! under [`RECORD_DIR`] so that `lb detach` (a later process) can undo them. bpffs holds only
//! BPF objects, so the record cannot sit beside the pins.
use std::{
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where the records live: one file per pin directory (`/run` is cleared at boot, as bpffs is).
pub const RECORD_DIR: &str = "/run/lb";

#[derive(Debug, Error)]
pub enum HostError {
    #[error(
        "cannot set {key} = {value}: {message}. Set it on the host (`sysctl -w {key}={value}`; the DaemonSet's init container does) or run lb as root (CAP_NET_ADMIN) with a writable /proc/sys"
    )]
    Sysctl { key: String, value: String, message: String },
    #[error("cannot {action}: {message}")]
    Ip { action: String, message: String },
    #[error("host change record {path}: {message}")]
    Record { path: PathBuf, message: String },
}

/// What kind of host object a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A file under /proc/sys (`target` is its dotted name).
    Sysctl,
    /// A VIP address added to `lo` (`target`: `ADDR/LEN dev lo`).
    Address,
    /// A managed neighbour entry (`target`: `ADDR dev IFACE`).
    Neighbour,
    /// A filesystem lb mounted (bpffs on /sys/fs/bpf). Not undone: other programs may pin
    /// there too, and the mount goes at reboot.
    Mount,
    /// A VIP route announced in a routing table for a BGP daemon (`target`: `blackhole
    /// ADDR/LEN table N`).
    Route,
}

/// One change `lb run` made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostChange {
    pub kind: Kind,
    pub target: String,
    /// The value before lb's first change (`absent` for an added object).
    pub before: String,
    pub after: String,
}

impl std::fmt::Display for HostChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Sysctl => "sysctl",
            Kind::Address => "address",
            Kind::Neighbour => "neighbour",
            Kind::Mount => "mount",
            Kind::Route => "route",
        };
        write!(f, "{kind} {}: {} -> {}", self.target, self.before, self.after)
    }
}

/// The record file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// Inode of the network namespace the changes were made in: sysctls and addresses are per
    /// namespace, and undoing them in another one would change the wrong host.
    netns: u64,
    changes: Vec<HostChange>,
}

/// The record file for the pins under `pin_dir`.
pub fn record_path(pin_dir: &Path) -> PathBuf {
    let name = pin_dir.to_string_lossy().trim_matches('/').replace('/', "-");
    Path::new(RECORD_DIR).join(format!("{name}.json"))
}

fn netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).unwrap_or(0)
}

fn record_err(path: &Path, e: impl std::fmt::Display) -> HostError {
    HostError::Record { path: path.to_path_buf(), message: e.to_string() }
}

fn read_record(path: &Path) -> Result<Option<Record>, HostError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            let hint = "not a record of this lb version: if no lb uses these pins, remove it (the host changes it listed are then yours to undo)";
            record_err(path, format!("{e}; {hint}"))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(record_err(path, e)),
    }
}

/// The changes of this daemon (and of the earlier runs on the same pins), saved after each one.
#[derive(Debug, Default)]
pub struct Changes {
    /// `None` for an unpinned data plane: nothing outlives the process, so nothing is recorded.
    path: Option<PathBuf>,
    record: Record,
}

impl Changes {
    /// Opens the record of `pin_dir`, keeping what earlier runs recorded: their `before`
    /// values are the host's own, while the current values are lb's.
    pub fn open(pin_dir: Option<&Path>) -> Result<Self, HostError> {
        let netns = netns_inode();
        let Some(dir) = pin_dir else {
            return Ok(Self { path: None, record: Record { netns, changes: Vec::new() } });
        };
        let path = record_path(dir);
        let record = match read_record(&path)? {
            Some(r) if r.netns == netns => r,
            Some(r) => {
                log::warn!(
                    "host: {} records changes made in another network namespace (inode {}); starting a new record",
                    path.display(),
                    r.netns
                );
                Record { netns, changes: Vec::new() }
            }
            None => Record { netns, changes: Vec::new() },
        };
        Ok(Self { path: Some(path), record })
    }

    pub fn list(&self) -> &[HostChange] {
        &self.record.changes
    }

    fn find(&self, kind: Kind, target: &str) -> Option<usize> {
        self.record.changes.iter().position(|c| c.kind == kind && c.target == target)
    }

    /// Records a change (an earlier record of the same target keeps its `before`) and saves.
    fn note(
        &mut self,
        kind: Kind,
        target: &str,
        before: &str,
        after: &str,
    ) -> Result<(), HostError> {
        match self.find(kind, target) {
            Some(i) => self.record.changes[i].after = after.to_string(),
            None => self.record.changes.push(HostChange {
                kind,
                target: target.to_string(),
                before: before.to_string(),
                after: after.to_string(),
            }),
        }
        self.save()
    }

    fn forget(&mut self, kind: Kind, target: &str) -> Result<(), HostError> {
        if let Some(i) = self.find(kind, target) {
            self.record.changes.remove(i);
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), HostError> {
        let Some(path) = &self.path else { return Ok(()) };
        std::fs::create_dir_all(RECORD_DIR).map_err(|e| record_err(path, e))?;
        let text = serde_json::to_string_pretty(&self.record).map_err(|e| record_err(path, e))?;
        // Written whole then renamed: a crash leaves the old record or the new one.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| record_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| record_err(path, e))
    }

    /// Sets the sysctl `parts` (`["net", "ipv4", "conf", "eth0", "forwarding"]`) to `value`
    /// unless it already has it; returns whether it wrote. A sysctl the kernel lacks is `None`.
    pub fn sysctl(&mut self, parts: &[&str], value: &str) -> Result<Option<bool>, HostError> {
        let (path, key) = sysctl_names(parts);
        let Some(cur) = read_sysctl(&path) else { return Ok(None) };
        if cur == value {
            return Ok(Some(false));
        }
        write_sysctl(&path, &key, value)?;
        log::info!("host: set {key} = {value} (was {cur})");
        self.note(Kind::Sysctl, &key, &cur, value)?;
        Ok(Some(true))
    }

    /// Reads a sysctl; `None` when the kernel has no such entry.
    pub fn read(&self, parts: &[&str]) -> Option<String> {
        read_sysctl(&sysctl_names(parts).0)
    }

    /// Writes a sysctl without recording it (a guard that is restored at once).
    pub fn write_unrecorded(&self, parts: &[&str], value: &str) -> Result<(), HostError> {
        let (path, key) = sysctl_names(parts);
        write_sysctl(&path, &key, value)
    }

    /// Adds `addr` as a host address on `lo`, unless some interface has it already (then it is
    /// the operator's and stays theirs).
    pub fn add_local(&mut self, addr: IpAddr) -> Result<(), HostError> {
        let target = local_target(addr);
        if self.find(Kind::Address, &target).is_some() && has_address(addr) {
            return Ok(());
        }
        if has_address(addr) {
            log::info!("host: VIP {addr} is already a local address; left as it is");
            return Ok(());
        }
        ip(&addr_args("add", addr))?;
        log::info!(
            "host: added VIP {target} (local: the kernel answers what XDP does not balance)"
        );
        self.note(Kind::Address, &target, "absent", "present")
    }

    /// Removes a VIP address this daemon (or an earlier run) added, if it is recorded.
    pub fn remove_local(&mut self, addr: IpAddr) -> Result<(), HostError> {
        let target = local_target(addr);
        if self.find(Kind::Address, &target).is_none() {
            return Ok(());
        }
        if has_address(addr) {
            ip(&addr_args("del", addr))?;
        }
        log::info!("host: removed VIP {target}");
        self.forget(Kind::Address, &target)
    }

    /// Announces `addr` (a VIP with a backend up) as a blackhole route in routing table
    /// `table`, for a BGP daemon to export: bird2's kernel protocol does not learn `local`
    /// routes, and a blackhole in a table no rule consults changes no forwarding here.
    pub fn announce(&mut self, addr: IpAddr, table: u32) -> Result<(), HostError> {
        let target = route_target(addr, table);
        let mut args = vec!["route", "replace"];
        args.extend(target.split_whitespace());
        args.extend(["proto", "static"]);
        ip(&args)?;
        if self.find(Kind::Route, &target).is_none() {
            log::info!("announce: {addr} announced (route in table {table})");
        }
        self.note(Kind::Route, &target, "absent", "present")
    }

    /// Withdraws the route of `addr` from `table`, if this daemon announced it.
    pub fn withdraw(&mut self, addr: IpAddr, table: u32) -> Result<(), HostError> {
        let target = route_target(addr, table);
        if self.find(Kind::Route, &target).is_none() {
            return Ok(());
        }
        let mut args = vec!["route", "del"];
        args.extend(target.split_whitespace());
        // Gone already (flushed by hand) is withdrawn too.
        let _ = ip(&args);
        log::info!("announce: {addr} withdrawn (no backend up, or stopping)");
        self.forget(Kind::Route, &target)
    }

    /// The VIPs announced in `table`.
    pub fn announced(&self, table: u32) -> Vec<IpAddr> {
        let suffix = format!(" table {table}");
        self.record
            .changes
            .iter()
            .filter(|c| c.kind == Kind::Route && c.target.ends_with(&suffix))
            .filter_map(|c| c.target.split_whitespace().nth(1)?.split('/').next()?.parse().ok())
            .collect()
    }

    /// The VIP addresses lb added and still holds.
    pub fn locals(&self) -> Vec<IpAddr> {
        self.record
            .changes
            .iter()
            .filter(|c| c.kind == Kind::Address)
            .filter_map(|c| c.target.split('/').next()?.parse().ok())
            .collect()
    }

    /// Records that lb mounted bpffs on /sys/fs/bpf.
    pub fn mounted_bpffs(&mut self) -> Result<(), HostError> {
        self.note(Kind::Mount, "bpffs on /sys/fs/bpf", "absent", "mounted")
    }

    /// Records a managed neighbour entry lb made.
    pub fn neighbour(&mut self, hop: IpAddr, dev: &str, before: &str) -> Result<(), HostError> {
        self.note(Kind::Neighbour, &format!("{hop} dev {dev}"), before, "managed")
    }
}

/// Refuses when the record of `pin_dir` was made in another network namespace: `lb detach`
/// checks this before it removes anything, so it never half-runs in the wrong place.
pub fn check_namespace(pin_dir: &Path) -> Result<(), HostError> {
    let path = record_path(pin_dir);
    match read_record(&path)? {
        Some(r) if r.netns != netns_inode() => Err(record_err(
            &path,
            format!(
                "its changes were made in network namespace inode {}, this is {}: run `lb detach` there (e.g. with `ip netns exec`); nothing was removed",
                r.netns,
                netns_inode()
            ),
        )),
        _ => Ok(()),
    }
}

/// Undoes what the record of `pin_dir` lists, newest first, then deletes the record. Returns
/// what was undone. Changes made in another network namespace are refused (left recorded).
pub fn undo(pin_dir: &Path) -> Result<Vec<String>, HostError> {
    check_namespace(pin_dir)?;
    let path = record_path(pin_dir);
    let Some(record) = read_record(&path)? else { return Ok(Vec::new()) };
    let mut undone = Vec::new();
    let mut failed = Vec::new();
    for c in record.changes.iter().rev() {
        let r = match c.kind {
            Kind::Sysctl => {
                let path = sysctl_path(&c.target);
                // Only what still has lb's value: an operator's later change stays.
                match read_sysctl(&path) {
                    Some(cur) if cur == c.after => write_sysctl(&path, &c.target, &c.before),
                    _ => continue,
                }
            }
            Kind::Address => match c.target.split('/').next().and_then(|a| a.parse().ok()) {
                Some(addr) if has_address(addr) => ip(&addr_args("del", addr)),
                _ => continue,
            },
            Kind::Mount => continue,
            // Already gone (withdrawn by hand, or the table flushed): nothing to undo.
            Kind::Route => {
                let mut args = vec!["route", "del"];
                args.extend(c.target.split_whitespace());
                let _ = ip(&args);
                Ok(())
            }
            Kind::Neighbour => {
                let mut args = vec!["neigh", "del"];
                args.extend(c.target.split_whitespace());
                // Gone with its interface, or already deleted: nothing to undo.
                let _ = ip(&args);
                Ok(())
            }
        };
        match r {
            Ok(()) => {
                log::info!("host: undid {c}");
                undone.push(c.to_string());
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    if !failed.is_empty() {
        return Err(record_err(&path, failed.join("; ")));
    }
    let _ = std::fs::remove_file(&path);
    Ok(undone)
}

/// Deletes the record of `pin_dir` without undoing anything (its namespace is gone).
pub fn forget(pin_dir: &Path) {
    let _ = std::fs::remove_file(record_path(pin_dir));
}

/// The /proc/sys path and the dotted name of a sysctl. Interface names may contain dots, so
/// the parts are kept apart until here.
fn sysctl_names(parts: &[&str]) -> (PathBuf, String) {
    let mut path = PathBuf::from("/proc/sys");
    path.extend(parts);
    (path, parts.join("."))
}

/// The /proc/sys path of a dotted name [`sysctl_names`] made: `net.ipvN.conf.IFACE.LEAF`
/// keeps the dots of IFACE.
fn sysctl_path(key: &str) -> PathBuf {
    let parts: Vec<&str> = key.splitn(4, '.').collect();
    match (parts.as_slice(), key.rsplit_once('.')) {
        ([net, fam, conf, rest], Some((_, leaf))) if *conf == "conf" && rest.len() > leaf.len() => {
            let iface = &rest[..rest.len() - leaf.len() - 1];
            sysctl_names(&[net, fam, conf, iface, leaf]).0
        }
        _ => sysctl_names(&key.split('.').collect::<Vec<_>>()).0,
    }
}

fn read_sysctl(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn write_sysctl(path: &Path, key: &str, value: &str) -> Result<(), HostError> {
    std::fs::write(path, value).map_err(|e| HostError::Sysctl {
        key: key.to_string(),
        value: value.to_string(),
        message: e.to_string(),
    })
}

fn local_target(addr: IpAddr) -> String {
    let len = if addr.is_ipv4() { 32 } else { 128 };
    format!("{addr}/{len} dev lo")
}

fn route_target(addr: IpAddr, table: u32) -> String {
    let len = if addr.is_ipv4() { 32 } else { 128 };
    format!("blackhole {addr}/{len} table {table}")
}

fn addr_args(verb: &str, addr: IpAddr) -> Vec<String> {
    let len = if addr.is_ipv4() { 32 } else { 128 };
    ["addr", verb, &format!("{addr}/{len}"), "dev", "lo"].map(String::from).to_vec()
}

/// True when any interface has `addr`.
fn has_address(addr: IpAddr) -> bool {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return false };
    addrs.filter_map(|a| a.address).any(|s| {
        s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(addr)
            || s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(addr)
    })
}

/// Runs `ip ARGS`: Ok, or its stderr.
pub fn ip<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<(), HostError> {
    let shown = || args.iter().map(|a| a.as_ref().to_string_lossy()).collect::<Vec<_>>().join(" ");
    let out = Command::new("ip").args(args).output().map_err(|e| HostError::Ip {
        action: format!("run `ip {}` (iproute2)", shown()),
        message: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(HostError::Ip {
        action: format!("`ip {}`", shown()),
        message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_follow_the_pin_directory() {
        assert_eq!(
            record_path(Path::new("/sys/fs/bpf/lb")),
            Path::new("/run/lb/sys-fs-bpf-lb.json")
        );
        let (path, key) = sysctl_names(&["net", "ipv4", "conf", "eth0.100", "forwarding"]);
        assert_eq!(path, Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding"));
        assert_eq!(key, "net.ipv4.conf.eth0.100.forwarding");
        assert_eq!(sysctl_path(&key), path);
        assert_eq!(
            sysctl_path("net.ipv6.conf.all.forwarding"),
            Path::new("/proc/sys/net/ipv6/conf/all/forwarding")
        );
    }

    #[test]
    fn a_second_change_keeps_the_first_before() {
        let mut c = Changes::open(None).unwrap();
        c.note(Kind::Sysctl, "net.ipv6.conf.eth0.accept_ra", "1", "2").unwrap();
        c.note(Kind::Sysctl, "net.ipv6.conf.eth0.accept_ra", "2", "2").unwrap();
        assert_eq!(c.list().len(), 1);
        assert_eq!(c.list()[0].before, "1");
        assert_eq!(c.list()[0].to_string(), "sysctl net.ipv6.conf.eth0.accept_ra: 1 -> 2");
    }
}
