//! Control-logic tests of the XDP tables against in-memory maps.
use super::*;
use crate::config::Config;

const SIZE: u32 = 1009;

fn services(toml: &str) -> Vec<ServiceConfig> {
    Config::parse(&format!("[xdp]\ninterfaces = [\"x\"]\n{toml}")).unwrap().xdp.unwrap().services
}

const WEB: &str = r#"
[[xdp.service]]
name = "web"
vip = "10.0.0.100:80"
backends = ["10.1.0.2:80", "10.1.0.3:80", { addr = "10.1.0.4:80", weight = 2 }]
"#;

fn owner_addr(maps: &MemMaps, id: u32) -> SocketAddr {
    backend_addr(&maps.backends[&id])
}

#[test]
fn apply_writes_vip_backends_and_a_full_ring() {
    let mut t = Tables::new(SIZE);
    let mut m = MemMaps::default();
    t.apply(&services(WEB), &mut m).unwrap();
    assert_eq!(m.vips.len(), 1);
    let info = m.vips.values().next().unwrap();
    assert_eq!(info.service_id, 0);
    let ring = &m.rings[&0];
    assert_eq!(ring.len(), SIZE as usize, "every slot written once");
    assert!(ring.values().all(|&id| id != 0 && m.backends[&id].flags & BACKEND_F_ACTIVE != 0));
    let views = t.backends("web").unwrap();
    assert_eq!(views.iter().map(|v| v.slots).sum::<u32>(), SIZE);
    // Weight 2 gets about half the slots.
    assert!((views[2].slots as f64 / SIZE as f64 - 0.5).abs() < 0.02, "{views:?}");
}

#[test]
fn drain_keeps_the_backend_active_but_out_of_the_ring() {
    let mut t = Tables::new(SIZE);
    let mut m = MemMaps::default();
    t.apply(&services(WEB), &mut m).unwrap();
    let a: SocketAddr = "10.1.0.2:80".parse().unwrap();
    let id = t.backends("web").unwrap()[0].id;
    let writes = m.ring_writes;
    let before = m.rings[&0].clone();
    t.set_draining("web", a, true, &mut m).unwrap();
    assert!(m.rings[&0].values().all(|&x| x != id));
    assert_eq!(m.backends[&id].flags, BACKEND_F_ACTIVE, "tracked flows keep their backend");
    // Only the drained backend's slots were rewritten.
    assert!(m.ring_writes - writes < SIZE as usize / 2);
    t.set_draining("web", a, false, &mut m).unwrap();
    assert_eq!(m.rings[&0], before, "undrained: the same ring as before the drain");
}

#[test]
fn a_weight_change_and_a_reload_follow_the_file() {
    let mut t = Tables::new(SIZE);
    let mut m = MemMaps::default();
    t.apply(&services(WEB), &mut m).unwrap();
    let a: SocketAddr = "10.1.0.2:80".parse().unwrap();
    let slots = |t: &Tables| t.backends("web").unwrap()[0].slots;
    let one = slots(&t);
    t.set_weight("web", a, 4, &mut m).unwrap();
    assert!(slots(&t) > 2 * one, "weight 4 takes more slots: {} then {}", one, slots(&t));
    assert!(matches!(t.set_weight("web", a, 0, &mut m), Err(TableError::ZeroWeight)));
    t.set_draining("web", a, true, &mut m).unwrap();
    // A reload puts back the file's weight and ends the runtime drain, and says so.
    assert_eq!(t.apply(&services(WEB), &mut m).unwrap(), [("web".to_string(), a)]);
    let view = &t.backends("web").unwrap()[0];
    assert!(!view.draining && view.weight == 1 && view.slots == one, "{view:?}");
}

#[test]
fn remove_clears_the_backend_and_reuse_bumps_the_generation() {
    let mut t = Tables::new(SIZE);
    let mut m = MemMaps::default();
    t.apply(&services(WEB), &mut m).unwrap();
    let a: SocketAddr = "10.1.0.2:80".parse().unwrap();
    let id = t.backends("web").unwrap()[0].id;
    let gen0 = m.backends[&id].generation;
    t.remove_backend("web", a, &mut m).unwrap();
    assert_eq!(m.backends[&id].flags, 0);
    assert!(m.rings[&0].values().all(|&x| x != id));
    let c: SocketAddr = "10.1.0.9:80".parse().unwrap();
    t.add_backend("web", c, 1, &mut m).unwrap();
    let reused = t.backends("web").unwrap().iter().find(|b| b.addr == c).unwrap().id;
    assert_eq!(reused, id, "lowest free id is reused");
    assert_eq!(m.backends[&id].generation, gen0 + 1, "flows of the old owner are not sent to it");
    assert_eq!(owner_addr(&m, id), c);
}

#[test]
fn runtime_errors_name_the_problem() {
    let mut t = Tables::new(SIZE);
    let mut m = MemMaps::default();
    t.apply(&services(WEB), &mut m).unwrap();
    let a: SocketAddr = "10.1.0.2:80".parse().unwrap();
    assert!(matches!(t.add_backend("nope", a, 1, &mut m), Err(TableError::NoService(_))));
    assert!(matches!(t.add_backend("web", a, 1, &mut m), Err(TableError::Exists { .. })));
    assert!(matches!(t.add_backend("web", a, 0, &mut m), Err(TableError::ZeroWeight)));
    let v6: SocketAddr = "[::1]:80".parse().unwrap();
    assert!(matches!(t.add_backend("web", v6, 1, &mut m), Err(TableError::Family { .. })));
    let missing: SocketAddr = "10.9.9.9:80".parse().unwrap();
    assert!(matches!(t.remove_backend("web", missing, &mut m), Err(TableError::NoBackend { .. })));
}

#[test]
fn recovery_keeps_ids_and_retires_what_the_config_dropped() {
    let mut t = Tables::new(SIZE);
    let mut m = MemMaps::default();
    t.apply(&services(WEB), &mut m).unwrap();
    let before = t.backends("web").unwrap();
    // A new daemon adopts the maps, with one backend fewer in its config.
    let vips: Vec<_> = m.vips.iter().map(|(k, v)| (*k, *v)).collect();
    let backends: Vec<_> = m.backends.iter().map(|(k, v)| (*k, *v)).collect();
    let mut t2 = Tables::new(SIZE);
    t2.recover(&vips, &backends);
    let fewer = WEB.replace("\"10.1.0.3:80\", ", "");
    t2.apply(&services(&fewer), &mut m).unwrap();
    let after = t2.backends("web").unwrap();
    for b in &after {
        let old = before.iter().find(|o| o.addr == b.addr).unwrap();
        assert_eq!(b.id, old.id, "same id for {}", b.addr);
    }
    let dropped = before.iter().find(|o| o.addr.to_string() == "10.1.0.3:80").unwrap();
    assert_eq!(m.backends[&dropped.id].flags, 0);
    assert!(m.rings[&0].values().all(|&x| x != dropped.id));
}

#[test]
fn recovered_backends_are_the_adopted_services_until_apply() {
    let mut t = Tables::new(SIZE);
    let mut m = MemMaps::default();
    t.apply(&services(WEB), &mut m).unwrap();
    let vips: Vec<_> = m.vips.iter().map(|(k, v)| (*k, *v)).collect();
    let backends: Vec<_> = m.backends.iter().map(|(k, v)| (*k, *v)).collect();
    let mut t2 = Tables::new(SIZE);
    t2.recover(&vips, &backends);
    let vip: SocketAddr = "10.0.0.100:80".parse().unwrap();
    let addrs: Vec<String> =
        t2.recovered_backends(vip, Protocol::Tcp).iter().map(|a| a.to_string()).collect();
    assert_eq!(addrs, ["10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80"]);
    assert!(t2.recovered_backends(vip, Protocol::Udp).is_empty(), "another VIP key");
    // Written back as the service's list (what a backends_from service does), the ids stay.
    let before = t.backends("web").unwrap();
    let list = addrs.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    let same = format!("[[xdp.service]]\nname = \"web\"\nvip = \"{vip}\"\nbackends = [{list}]\n");
    t2.apply(&services(&same), &mut m).unwrap();
    let ids = |v: &[BackendView]| v.iter().map(|b| (b.addr, b.id)).collect::<Vec<_>>();
    assert_eq!(ids(&t2.backends("web").unwrap()), ids(&before));
    assert!(t2.recovered_backends(vip, Protocol::Tcp).is_empty(), "apply consumed them");
}

#[test]
fn removing_a_service_clears_its_vip_ring_and_backends() {
    let mut t = Tables::new(SIZE);
    let mut m = MemMaps::default();
    t.apply(&services(WEB), &mut m).unwrap();
    t.apply(&[], &mut m).unwrap();
    assert!(m.vips.is_empty());
    assert!(m.rings[&0].values().all(|&x| x == 0));
    assert!(m.backends.values().all(|b| b.flags == 0));
}
