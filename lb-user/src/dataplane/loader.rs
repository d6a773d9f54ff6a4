//! Loads the embedded XDP object (adopting pinned maps when a previous daemon left them),
//! attaches it to interfaces through pinned links, and answers for its maps.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, xdp::DevMapHash},
    programs::{ProgramError, Xdp, XdpMode as AyaXdpMode},
};
use lb_common::{
    BackendInfo, Counter, MAX_BACKENDS, RING_SIZE, Settings, SnatPool, VipInfo, VipKey, maps,
    programs, stat,
};
use thiserror::Error;

use super::{
    OBJECT,
    changes::HostError,
    host::{Host, Iface},
    kernel_maps::KernelMaps,
    link::{self, Linked},
    snat::Pool,
    tables::{BackendView, TableError, Tables},
};
use crate::config::{ServiceConfig, XdpConfig, XdpMode};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error(
        "cannot load the XDP program: {0}. lb needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; CAP_SYS_ADMIN instead of the first two where a seccomp profile admits bpf(2) only with it) and a kernel with BPF enabled"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {0}: the build is broken, rebuild with `cargo build`")]
    Missing(&'static str),
    #[error("interface {0:?} does not exist: check the name with `ip link`")]
    NoInterface(String),
    #[error(
        "attaching XDP in {mode} mode to {iface} was refused: {source}. If the driver has no native XDP support, set mode = \"generic\" in [xdp]"
    )]
    Attach { iface: String, mode: &'static str, source: ProgramError },
    #[error(
        "cannot pin under {path}: {message}. Is bpffs mounted? (`mount -t bpf bpf /sys/fs/bpf`)"
    )]
    Pin { path: PathBuf, message: String },
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("XDP map: {0}")]
    Map(#[from] MapError),
    #[error(
        "the maps pinned under {dir} come from another version of lb ({map} holds {found}-byte values, this build uses {expected}): run `lb detach` (tracked flows are lost) and start again"
    )]
    IncompatiblePins { dir: PathBuf, map: &'static str, found: u32, expected: u32 },
    #[error(transparent)]
    Table(#[from] TableError),
    /// Transparent: a prefix with `#[from]` (a source) printed every host error twice in an
    /// error chain (`host: cannot set X: cannot set X`).
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Snat(#[from] super::snat::SnatError),
}

/// How to load the program.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pin maps and links here (and adopt what is there); `None` keeps everything private to
    /// this process, detached when it exits.
    pub pin_dir: Option<PathBuf>,
    pub max_flows: u32,
    /// Capacity of the unconfirmed flow and NAT tables (each).
    pub max_unconfirmed_flows: u32,
    pub settings: Settings,
}

impl LoadOptions {
    /// Unpinned, default sizes: for tests and tools.
    pub fn private() -> Self {
        Self {
            pin_dir: None,
            max_flows: lb_common::DEFAULT_MAX_FLOWS,
            max_unconfirmed_flows: lb_common::DEFAULT_MAX_UNCONFIRMED_FLOWS,
            settings: default_settings(),
        }
    }

    pub fn from_config(xdp: &XdpConfig) -> Self {
        Self {
            pin_dir: Some(xdp.pin_path.clone()),
            max_flows: xdp.max_flows,
            max_unconfirmed_flows: xdp.max_unconfirmed(),
            settings: Settings {
                udp_idle_ns: xdp.udp_idle_timeout.saturating_mul(1_000_000_000),
                tcp_syn_ns: xdp.tcp_syn_timeout.saturating_mul(1_000_000_000),
                tcp_idle_ns: xdp.tcp_idle_timeout.saturating_mul(1_000_000_000),
                nat_port_min: xdp.nat_ports[0],
                nat_port_max: xdp.nat_ports[1],
                ..default_settings()
            },
        }
    }
}

fn default_settings() -> Settings {
    Settings {
        udp_idle_ns: lb_common::DEFAULT_UDP_IDLE_NS,
        tcp_closed_ns: lb_common::DEFAULT_TCP_CLOSED_NS,
        tcp_syn_ns: lb_common::DEFAULT_TCP_SYN_NS,
        tcp_idle_ns: lb_common::DEFAULT_TCP_IDLE_NS,
        nat_port_min: lb_common::DEFAULT_NAT_PORT_MIN,
        nat_port_max: lb_common::DEFAULT_NAT_PORT_MAX,
        cpus: aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1),
    }
}

/// Services and backends read back from pinned maps.
type PinnedTables = (Vec<(VipKey, VipInfo)>, Vec<(u32, BackendInfo)>);

/// One interface the balancer runs on.
#[derive(Debug, Clone)]
pub struct Attached {
    pub interface: String,
    pub mode: XdpMode,
    pub linked: Linked,
}

/// The loaded program, its tables, its attachments and its host changes.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attached: Vec<Attached>,
    tables: Tables,
    host: Host,
    /// True when this daemon adopted maps a previous one pinned.
    pub adopted: bool,
}

pub(super) fn pin_err(path: &Path, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Pin { path: path.to_path_buf(), message: e.to_string() }
}

impl Dataplane {
    /// True when a previous daemon left its maps pinned under `dir` (a load adopts them).
    pub fn pinned_at(dir: &Path) -> bool {
        dir.join(maps::VIPS).exists()
    }

    /// Loads the program into the kernel without attaching it anywhere.
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::FLOWS, opts.max_flows);
        loader.map_max_entries(maps::NAT, opts.max_flows);
        loader.map_max_entries(maps::FLOWS_NEW, opts.max_unconfirmed_flows);
        loader.map_max_entries(maps::NAT_NEW, opts.max_unconfirmed_flows);
        let mut adopted = false;
        let mut mounted = false;
        if let Some(dir) = &opts.pin_dir {
            mounted = ensure_bpffs(dir)?;
            std::fs::create_dir_all(dir).map_err(|e| pin_err(dir, e))?;
            adopted = Self::pinned_at(dir);
            if adopted {
                check_pinned_layouts(dir)?;
            }
            for name in maps::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        // Before anything is loaded and pinned: an unreadable record stops the start here.
        let host = Host::open(opts.pin_dir.as_deref())?;
        let mut ebpf = loader.load(OBJECT).map_err(DataplaneError::Load)?;
        for name in maps::ALL {
            if ebpf.map(name).is_none() {
                return Err(DataplaneError::Missing(name));
            }
        }
        let prog: &mut Xdp = ebpf
            .program_mut(programs::BALANCER)
            .ok_or(DataplaneError::Missing(programs::BALANCER))?
            .try_into()?;
        prog.load()?;
        let mut dp = Self {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            attached: Vec::new(),
            tables: Tables::new(RING_SIZE),
            host,
            adopted,
        };
        if mounted {
            dp.host.mounted_bpffs()?;
        }
        dp.write_settings(&opts.settings)?;
        if adopted {
            let (vips, backends) = dp.read_tables()?;
            // Pins from a version without the filters get them filled here.
            let mut maps = KernelMaps(&mut dp.ebpf);
            for (key, _) in &vips {
                maps.mark(key, true, true)?;
            }
            dp.tables.recover(&vips, &backends);
            let pools: HashMap<&MapData, u32, SnatPool> =
                HashMap::try_from(dp.map(maps::SNAT_POOLS)?)?;
            let pools = pools.iter().collect::<Result<Vec<_>, _>>()?;
            dp.tables.recover_snat(&pools);
        }
        Ok(dp)
    }

    fn write_settings(&mut self, s: &Settings) -> Result<(), DataplaneError> {
        let mut m: Array<&mut MapData, Settings> = Array::try_from(self.map_mut(maps::SETTINGS)?)?;
        m.set(0, s, 0)?;
        Ok(())
    }

    fn read_tables(&self) -> Result<PinnedTables, DataplaneError> {
        let vips: HashMap<&MapData, VipKey, VipInfo> = HashMap::try_from(self.map(maps::VIPS)?)?;
        let vips = vips.iter().collect::<Result<Vec<_>, _>>()?;
        let backends: Array<&MapData, BackendInfo> = Array::try_from(self.map(maps::BACKENDS)?)?;
        let backends = (1..MAX_BACKENDS)
            .filter_map(|i| backends.get(&i, 0).ok().map(|b| (i, b)))
            .filter(|(_, b)| b.flags != 0 || b.generation != 0)
            .collect();
        Ok((vips, backends))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DataplaneError> {
        self.ebpf.map(name).ok_or(DataplaneError::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.ebpf.map_mut(name).ok_or(DataplaneError::Missing(name))
    }

    /// Attaches the balancer to `iface` and registers the interface (its addresses become SNAT
    /// sources, and it becomes a redirect target). With a pin directory the link is pinned;
    /// a previous run's pinned link is updated in place, or replaced when its interface was
    /// deleted or re-created (`link::attach`).
    pub fn attach(&mut self, iface: &Iface, mode: XdpMode) -> Result<Linked, DataplaneError> {
        self.register(iface)?;
        let link_pin = self.pin_dir.as_ref().map(|d| d.join(format!("link-{}", iface.name)));
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(programs::BALANCER)
            .ok_or(DataplaneError::Missing(programs::BALANCER))?
            .try_into()?;
        let linked = link::attach(prog, iface, aya_mode(mode), mode.as_str(), link_pin.as_deref())?;
        self.attached.push(Attached {
            interface: iface.name.clone(),
            mode,
            linked: linked.clone(),
        });
        Ok(linked)
    }

    /// Unpins the links of interfaces other than `interfaces` (see `link::prune`).
    pub fn prune_links(&self, interfaces: &[String]) -> Result<Vec<String>, DataplaneError> {
        match &self.pin_dir {
            Some(dir) => link::prune(dir, interfaces),
            None => Ok(Vec::new()),
        }
    }

    /// Registers a served interface without attaching to it: its addresses become SNAT
    /// sources and it becomes a redirect target. `attach` does this too.
    pub fn register(&mut self, iface: &Iface) -> Result<(), DataplaneError> {
        {
            let mut ifaces: HashMap<&mut MapData, u32, lb_common::IfaceAddrs> =
                HashMap::try_from(self.map_mut(maps::IFACES)?)?;
            ifaces.insert(iface.index, iface.addrs(), 0)?;
        }
        {
            let mut dev: DevMapHash<&mut MapData> =
                DevMapHash::try_from(self.map_mut(maps::DEVMAP)?)?;
            dev.insert(iface.index, iface.index, None, 0)
                .map_err(|e| DataplaneError::Map(MapError::InvalidName { name: e.to_string() }))?;
        }
        Ok(())
    }

    /// The interfaces the balancer is attached to, with the mode in use.
    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    /// What lb changed on the host, and the means to change it.
    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn host_mut(&mut self) -> &mut Host {
        &mut self.host
    }

    /// Makes the SNAT address pools exactly `pools`; returns what changed, for the log.
    pub fn apply_snat(&mut self, pools: &[Pool]) -> Result<Vec<String>, DataplaneError> {
        Ok(self.tables.apply_snat(pools, &mut KernelMaps(&mut self.ebpf))?)
    }

    /// Makes the kernel's services exactly `services`; returns the backends whose runtime
    /// drain that ended ([`Tables::apply`]).
    pub fn apply(
        &mut self,
        services: &[ServiceConfig],
    ) -> Result<Vec<(String, std::net::SocketAddr)>, DataplaneError> {
        Ok(self.tables.apply(services, &mut KernelMaps(&mut self.ebpf))?)
    }

    pub fn add_backend(
        &mut self,
        service: &str,
        addr: std::net::SocketAddr,
        weight: u32,
    ) -> Result<(), DataplaneError> {
        Ok(self.tables.add_backend(service, addr, weight, &mut KernelMaps(&mut self.ebpf))?)
    }

    pub fn remove_backend(
        &mut self,
        service: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(), DataplaneError> {
        Ok(self.tables.remove_backend(service, addr, &mut KernelMaps(&mut self.ebpf))?)
    }

    pub fn set_draining(
        &mut self,
        service: &str,
        addr: std::net::SocketAddr,
        draining: bool,
    ) -> Result<(), DataplaneError> {
        Ok(self.tables.set_draining(service, addr, draining, &mut KernelMaps(&mut self.ebpf))?)
    }

    pub fn set_weight(
        &mut self,
        service: &str,
        addr: std::net::SocketAddr,
        weight: u32,
    ) -> Result<(), DataplaneError> {
        Ok(self.tables.set_weight(service, addr, weight, &mut KernelMaps(&mut self.ebpf))?)
    }

    pub fn set_health(
        &mut self,
        service: &str,
        addr: std::net::SocketAddr,
        healthy: bool,
    ) -> Result<(), DataplaneError> {
        Ok(self.tables.set_health(service, addr, healthy, &mut KernelMaps(&mut self.ebpf))?)
    }

    /// The control-plane view of the services.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// A service's backends with their counters.
    pub fn backends(&self, service: &str) -> Result<Vec<(BackendView, Counter)>, DataplaneError> {
        let views = self.tables.backends(service)?;
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.map(maps::BACKEND_STATS)?)?;
        views
            .into_iter()
            .map(|v| {
                let c = sum(&stats, v.id)?;
                Ok((v, c))
            })
            .collect()
    }

    /// Per-service counters summed over CPUs.
    pub fn service_counter(&self, service_id: u32) -> Result<Counter, DataplaneError> {
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.map(maps::SERVICE_STATS)?)?;
        sum(&stats, service_id)
    }

    /// Global reason counters summed over CPUs, as (name, value).
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(maps::STATS)?)?;
        (0..stat::COUNT)
            .map(|i| Ok((stat::NAMES[i as usize], map.get(&i, 0)?.iter().sum())))
            .collect()
    }

    /// Confirmed flows per backend id (walks `LB_FLOWS`, not the unconfirmed table; for tests
    /// and diagnostics).
    pub fn flows_per_backend(&self) -> Result<std::collections::HashMap<u32, u64>, DataplaneError> {
        let flows: HashMap<&MapData, lb_common::FlowKey, lb_common::FlowState> =
            HashMap::try_from(self.map(maps::FLOWS)?)?;
        let mut out = std::collections::HashMap::new();
        for entry in flows.iter() {
            let (_, st) = entry?;
            *out.entry(st.backend_id).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Removes the NAT entry `key` from both NAT tables, as an LRU eviction would: fault
    /// injection for tests (the daemon never calls it). True when an entry was there.
    #[doc(hidden)]
    pub fn evict_nat(&mut self, key: &lb_common::NatKey) -> Result<bool, DataplaneError> {
        let mut found = false;
        for name in [maps::NAT, maps::NAT_NEW] {
            let mut nat: HashMap<&mut MapData, lb_common::NatKey, lb_common::NatState> =
                HashMap::try_from(self.map_mut(name)?)?;
            found |= nat.remove(key).is_ok();
        }
        Ok(found)
    }

    /// The loaded balancer program, for `test_run`.
    pub fn balancer(&self) -> Result<&Xdp, DataplaneError> {
        Ok(self
            .ebpf
            .program(programs::BALANCER)
            .ok_or(DataplaneError::Missing(programs::BALANCER))?
            .try_into()?)
    }
}

fn sum(map: &PerCpuArray<&MapData, Counter>, index: u32) -> Result<Counter, DataplaneError> {
    let mut total = Counter::default();
    for c in map.get(&index, 0)?.iter() {
        total.add(c);
    }
    Ok(total)
}

/// Refuses pins whose value layouts differ from this build's: adopting them would fail in the
/// verifier (or worse, misread state), with a message that does not say what to do.
fn check_pinned_layouts(dir: &Path) -> Result<(), DataplaneError> {
    use std::mem::size_of;
    let layouts = [
        (maps::SETTINGS, size_of::<Settings>()),
        (maps::BACKENDS, size_of::<BackendInfo>()),
        (maps::FLOWS, size_of::<lb_common::FlowState>()),
        (maps::NAT, size_of::<lb_common::NatState>()),
        (maps::FLOWS_NEW, size_of::<lb_common::FlowState>()),
        (maps::NAT_NEW, size_of::<lb_common::NatState>()),
        (maps::SNAT_POOLS, size_of::<SnatPool>()),
    ];
    for (map, expected) in layouts {
        let path = dir.join(map);
        if !path.exists() {
            // A map this version added: the load creates and pins it.
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| pin_err(&path, e))?;
        if info.value_size() as usize != expected {
            return Err(DataplaneError::IncompatiblePins {
                dir: dir.to_path_buf(),
                map,
                found: info.value_size(),
                expected: expected as u32,
            });
        }
    }
    Ok(())
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `dir` lies on a bpffs. The default place, /sys/fs/bpf, is mounted when it is not
/// (a fresh host, or `ip netns exec`, which remounts /sys); elsewhere the operator decides.
/// True when it mounted one.
pub(super) fn ensure_bpffs(dir: &Path) -> Result<bool, DataplaneError> {
    let on_bpffs = |p: &Path| {
        let mut p = p.to_path_buf();
        while !p.exists() {
            if !p.pop() {
                return false;
            }
        }
        nix::sys::statfs::statfs(&p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
    };
    if on_bpffs(dir) {
        return Ok(false);
    }
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| pin_err(root, e))?;
        log::warn!(
            "mounted bpffs at /sys/fs/bpf; pins live as long as this mount (under `ip netns exec` that is this process)"
        );
        if on_bpffs(dir) {
            return Ok(true);
        }
    }
    Err(pin_err(dir, "not on a bpffs; set xdp.pin_path to a directory on one"))
}

pub(super) fn aya_mode(mode: XdpMode) -> AyaXdpMode {
    match mode {
        XdpMode::Native => AyaXdpMode::Driver,
        XdpMode::Generic => AyaXdpMode::Skb,
    }
}

/// Removes everything `lb run` pinned under `dir` ([`detach_keeping_host`]) and forgets its
/// host changes without undoing them: for a namespace that is going away. `lb detach` undoes
/// them instead (`changes::undo`).
pub fn detach(dir: &Path) -> Result<Vec<String>, DataplaneError> {
    let removed = detach_keeping_host(dir)?;
    super::changes::forget(dir);
    Ok(removed)
}

/// Removes everything `lb run` pinned under `dir`: links first (which detaches the program
/// from each interface), then maps. Returns what was removed.
pub fn detach_keeping_host(dir: &Path) -> Result<Vec<String>, DataplaneError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(pin_err(dir, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Links before maps: detach first, then drop the state.
    names.sort_by_key(|n| !n.starts_with("link-"));
    for name in names {
        let path = dir.join(&name);
        std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
        removed.push(name);
    }
    std::fs::remove_dir(dir).map_err(|e| pin_err(dir, e))?;
    Ok(removed)
}

/// Loads the do-nothing program and attaches it to `iface` in native mode. The returned handle
/// keeps it attached until dropped.
pub fn attach_pass(iface: &str) -> Result<Ebpf, DataplaneError> {
    let mut ebpf = EbpfLoader::new().load(super::PASS_OBJECT).map_err(DataplaneError::Load)?;
    let prog: &mut Xdp = ebpf
        .program_mut(programs::PASS)
        .ok_or(DataplaneError::Missing(programs::PASS))?
        .try_into()?;
    prog.load()?;
    prog.attach(iface, AyaXdpMode::Driver).map_err(|source| match source {
        ProgramError::UnknownInterface { name } => DataplaneError::NoInterface(name),
        source => DataplaneError::Attach { iface: iface.to_string(), mode: "native", source },
    })?;
    Ok(ebpf)
}
