//! Loads the embedded XDP object, attaches it to interfaces and fills its maps.
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode as AyaXdpMode},
};
use lb_common::{Counter, VipInfo, VipKey, maps, programs, stat};
use thiserror::Error;

use super::{OBJECT, vip_key};
use crate::config::{ServiceConfig, XdpMode};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error(
        "cannot load the XDP program: {0}. lb needs root (or CAP_BPF and CAP_NET_ADMIN) and a kernel with BPF enabled"
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
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("XDP map: {0}")]
    Map(#[from] MapError),
}

/// The loaded program and its attachments; dropping it detaches everything.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<(String, XdpMode)>,
}

impl Dataplane {
    /// Loads the program into the kernel without attaching it anywhere.
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(DataplaneError::Load)?;
        for name in [maps::VIPS, maps::SERVICE_STATS, maps::STATS] {
            if ebpf.map(name).is_none() {
                return Err(DataplaneError::Missing(name));
            }
        }
        let prog: &mut Xdp = ebpf
            .program_mut(programs::BALANCER)
            .ok_or(DataplaneError::Missing(programs::BALANCER))?
            .try_into()?;
        prog.load()?;
        Ok(Self { ebpf, attached: Vec::new() })
    }

    /// Attaches the balancer to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        self.attach_program(programs::BALANCER, iface, mode)
    }

    /// Attaches a named program of the object (the balancer or the do-nothing one) to `iface`.
    pub fn attach_program(
        &mut self,
        program: &'static str,
        iface: &str,
        mode: XdpMode,
    ) -> Result<(), DataplaneError> {
        let prog: &mut Xdp =
            self.ebpf.program_mut(program).ok_or(DataplaneError::Missing(program))?.try_into()?;
        let aya_mode = match mode {
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Generic => AyaXdpMode::Skb,
        };
        prog.attach(iface, aya_mode).map_err(|source| match source {
            ProgramError::UnknownInterface { name } => DataplaneError::NoInterface(name),
            source => {
                DataplaneError::Attach { iface: iface.to_string(), mode: mode.as_str(), source }
            }
        })?;
        self.attached.push((iface.to_string(), mode));
        Ok(())
    }

    /// The interfaces the balancer is attached to, with the mode in use.
    pub fn attached(&self) -> &[(String, XdpMode)] {
        &self.attached
    }

    /// Replaces the set of services the program recognises; ids follow `services`' order.
    pub fn set_services(&mut self, services: &[ServiceConfig]) -> Result<(), DataplaneError> {
        let mut vips: HashMap<_, VipKey, VipInfo> = HashMap::try_from(
            self.ebpf.map_mut(maps::VIPS).ok_or(DataplaneError::Missing(maps::VIPS))?,
        )?;
        let wanted: Vec<VipKey> = services.iter().map(|s| vip_key(s.vip, s.protocol)).collect();
        let stale: Vec<VipKey> =
            vips.keys().filter_map(Result::ok).filter(|k| !wanted.contains(k)).collect();
        for k in stale {
            vips.remove(&k)?;
        }
        for (id, key) in wanted.iter().enumerate() {
            vips.insert(key, VipInfo { service_id: id as u32, flags: 0 }, 0)?;
        }
        Ok(())
    }

    /// Per-service packet and byte counters summed over CPUs, by service id.
    pub fn service_counters(&self, count: usize) -> Result<Vec<Counter>, DataplaneError> {
        let map: PerCpuArray<_, Counter> = PerCpuArray::try_from(
            self.ebpf
                .map(maps::SERVICE_STATS)
                .ok_or(DataplaneError::Missing(maps::SERVICE_STATS))?,
        )?;
        (0..count as u32)
            .map(|i| {
                let mut total = Counter::default();
                for c in map.get(&i, 0)?.iter() {
                    total.add(c);
                }
                Ok(total)
            })
            .collect()
    }

    /// Global reason counters summed over CPUs, as (name, value).
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, DataplaneError> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf.map(maps::STATS).ok_or(DataplaneError::Missing(maps::STATS))?,
        )?;
        (0..stat::COUNT)
            .map(|i| Ok((stat::NAMES[i as usize], map.get(&i, 0)?.iter().sum())))
            .collect()
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
