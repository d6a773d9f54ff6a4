//! Hitless upgrades (issue 14): `lb run --upgrade` under load on every userspace path and the
//! XDP VIP at once (fresh-connection GETs to the VIP, the L7 listener and a userspace L4 TCP
//! relay; keep-alive L7 clients; HTTPS with a handshake per GET; UDP sessions; one relay held
//! open across the upgrades), with the same config, a changed restart-only setting and a copy
//! of the binary: no request fails, no connection is refused. An invalid config, a successor that dies before it is ready, and
//! one that cannot bind, leave the old process serving (and writing the XDP maps).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::net::UnixStream,
    time::Duration,
};

use lb_tests::{
    backends::udp_echo_on,
    client::{connect_in, keepalive_get},
    conf,
    http::{temp_dir, write_cert},
    lb::{Lb, lb_binary},
    load::{KeepAlive, Load},
    rel,
    repeat::{self, Repeat},
    scenario::{L7, Running, Scenario, TIMEOUT, WEB},
};
use lb_user::upgrade::wire::{self, Msg, Reader};
use rustls::pki_types::CertificateDer;

const RELAY: &str = "10.0.0.1:9000";
const DNS: &str = "10.0.0.1:5353";
const TLS: &str = "10.0.0.1:8443";

/// Two backends (HTTP on :80, UDP echo on :53), the XDP service `web`, the L7 listener
/// `public`, the L7 TLS listener `secure` (the certificate's DER is returned), the TCP relay
/// `relay` and the UDP listener `dns`. With `shared`, every listener and the admin API have
/// `reuse_port` and the process has an admin unix socket of its own, for a second process
/// beside it.
fn scenario(shared: bool) -> (Running, CertificateDer<'static>) {
    let cert = write_cert(&temp_dir("upgrade"), "secure", &["secure.test"]);
    let tls = format!("tls = [{{ cert = {:?}, key = {:?} }}]\n", cert.cert, cert.key);
    let reuse = if shared { "reuse_port = true\n" } else { "" };
    let mut body = vec![
        "[http]\nheader_timeout_ms = 5000\n[tcp]\nupgrade_drain_secs = 30\n".to_string(),
        conf::http_listener("secure", TLS, &format!("{tls}{reuse}")),
        conf::route("secure", "app"),
        conf::upstream("dns", &conf::list(["10.1.1.2:53", "10.1.2.2:53"])),
        conf::tcp("relay", RELAY, &format!("upstream = \"app\"\n{reuse}")),
        conf::tcp("dns", DNS, &format!("protocol = \"udp\"\nupstream = \"dns\"\n{reuse}")),
    ];
    let mut s = Scenario::topology(2).xdp_service("");
    if shared {
        // The harness's admin table, shared; the L7 listener `public` written out for its key.
        body.push(format!("{}reuse_port = true\n", conf::admin("127.0.0.1:9901")));
        body.push(conf::http_listener("public", L7, reuse));
        body.push(conf::route("public", "app"));
        body.push(conf::upstream("app", &conf::list(s.backend_addrs())));
    } else {
        s = s.l7("public", L7, "");
    }
    let s = s.config(&body.concat());
    // Ready means every listener is bound (the L4 ones before the admin API).
    let socket = std::env::temp_dir().join(format!("{}.sock", lb_tests::netns::unique("adm")));
    let s = s
        .start_with(|b| {
            if shared { b.env("LB_ADMIN_SOCKET", &socket.display().to_string()) } else { b }
        })
        .expect("lb run");
    for i in 0..2 {
        let ip = s.topo().backends[i].v4;
        let u = s.backend_ns(i).run(move || UdpSocket::bind((ip, 53))).unwrap().unwrap();
        udp_echo_on(u, &format!("u{}", i + 1));
    }
    (s, CertificateDer::from(cert.der))
}

/// Everything the load saw over one phase.
struct Phase {
    fresh: Load,
    keepalive: KeepAlive,
    udp: Repeat,
    tls: Repeat,
    h2: Repeat,
}

impl Phase {
    fn start(s: &Running, root: &CertificateDer<'static>) -> Self {
        let targets = vec![WEB, L7, RELAY.parse().unwrap()];
        let fresh = Load::builder(s.client(), targets).threads(3).start();
        let keepalive = KeepAlive::start(s.client(), L7, 8);
        let udp = repeat::udp(s.client(), DNS.parse().unwrap(), 4);
        let tls = repeat::tls(s.client(), TLS.parse().unwrap(), "secure.test", root, 2);
        let h2 = repeat::h2(s.client(), L7, 2);
        fresh.wait_for(60);
        lb_tests::wait_until(Duration::from_secs(20), || keepalive.ok() >= 100);
        lb_tests::wait_until(Duration::from_secs(20), || {
            udp.ok() >= 40 && tls.ok() >= 10 && h2.ok() >= 40
        });
        Self { fresh, keepalive, udp, tls, h2 }
    }

    /// Lets the load run on (against the new process) a moment, then stops it: the figures
    /// and whether nothing failed.
    fn finish(self) -> (String, bool) {
        self.fresh.wait_for(60);
        let f = self.fresh.stop();
        let k = self.keepalive.stop();
        let (udp_ok, udp_failed) = self.udp.stop();
        let (tls_ok, tls_failed) = self.tls.stop();
        let (h2_ok, h2_failed) = self.h2.stop();
        let failed =
            f.failed + k.failed + (udp_failed.len() + tls_failed.len() + h2_failed.len()) as u64;
        let observed = format!(
            "fresh connections (XDP VIP, L7, L4 relay): {} ok, {} failed; keep-alive L7 (8 \
             clients): {} ok, {} failed, {} clean closes by Connection: close, {} closed \
             between requests; h2 (2 pooled clients): {} ok, {} failed; UDP (4 sessions): {} \
             ok, {} failed; TLS (a handshake per GET): {} ok, {} failed{}",
            f.ok,
            f.failed,
            k.ok,
            k.failed,
            k.closed_by_header,
            k.closed_idle,
            h2_ok,
            h2_failed.len(),
            udp_ok,
            udp_failed.len(),
            tls_ok,
            tls_failed.len(),
            if failed == 0 {
                String::new()
            } else {
                format!(
                    " (first: {:?} {:?} {:?} {:?} {:?})",
                    f.sample_failures(),
                    k.failures.iter().take(4).collect::<Vec<_>>(),
                    h2_failed.iter().take(4).collect::<Vec<_>>(),
                    udp_failed.iter().take(4).collect::<Vec<_>>(),
                    tls_failed.iter().take(4).collect::<Vec<_>>()
                )
            }
        );
        (observed, failed == 0)
    }
}

/// GET on the held relay connection: answered by a backend through the process that
/// accepted it.
fn held_get(held: &mut TcpStream) -> anyhow::Result<String> {
    keepalive_get(held)
}

#[test]
fn upgrades_under_load_fail_no_request() {
    lb_tests::privileged!();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let (mut s, root) = scenario(false);
    let relay: SocketAddr = RELAY.parse().unwrap();
    let mut held = connect_in(s.client(), None, relay, TIMEOUT).unwrap();
    held_get(&mut held).expect("held relay before");
    let first_pid = s.lb().pid();

    // A copy of the binary stands for a new build.
    let copy = std::env::temp_dir().join(format!("{}-lb", lb_tests::netns::unique("bin")));
    std::fs::copy(lb_binary().unwrap(), &copy).unwrap();
    let mut replaced = Vec::new();
    let mut all_pass = true;
    for (name, what, binary) in [
        ("same config", "the same config", None),
        ("restart-only setting", "http.header_timeout_ms changed (a reload refuses it)", None),
        ("new binary", "a copy of the binary", Some(copy.as_path())),
    ] {
        let restart_only = what.starts_with("http.header_timeout_ms");
        if restart_only {
            let lb = s.lb();
            let text = std::fs::read_to_string(&lb.config).unwrap();
            let text = text.replace("header_timeout_ms = 5000", "header_timeout_ms = 6000");
            std::fs::write(&lb.config, text).unwrap();
            let out = lb.cli_command(&["reload"]).unwrap().output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains("--upgrade"), "reload: {err}");
        }
        let phase = Phase::start(&s, &root);
        let old = s.lb_mut().upgrade(binary).expect("lb run --upgrade");
        let held_ok = held_get(&mut held);
        let (observed, pass) = phase.finish();
        let pass = pass && held_ok.is_ok();
        let observed =
            format!("{observed}; the relay held since the first process: {held_ok:?} after it");
        rel::record(
            &format!("upgrade: {name}"),
            &format!("`lb run --upgrade` with {what} (pid {} → {})", old.pid(), s.lb().pid()),
            &observed,
            pass,
        );
        all_pass &= pass;
        replaced.push(old);
        if restart_only {
            // The running config is the new one: a reload has nothing restart-only left.
            s.lb().cli(&["reload"]).expect("reload after the upgrade");
        }
    }
    // Every replaced process but the first has exited (nothing of theirs was held open);
    // the first still relays the held connection, and exits once it is closed.
    for r in replaced.iter_mut().skip(1) {
        assert!(r.wait(Duration::from_secs(20)).unwrap().success(), "pid {} exit", r.pid());
    }
    let first = &mut replaced[0];
    assert_eq!(first.pid(), first_pid);
    let still_draining = first.exited().unwrap().is_none();
    held_get(&mut held).expect("held relay at the end");
    drop(held);
    let exit = first.wait(Duration::from_secs(20)).unwrap();
    rel::record(
        "upgrade: a relay held across three",
        "one L4 relay (keep-alive HTTP through `relay`) opened before three upgrades, used \
         after each, then closed",
        &format!(
            "the first process was still draining it after all three: {still_draining}; it \
             exited ({exit}) once the relay closed"
        ),
        still_draining && exit.success(),
    );
    let _ = std::fs::remove_file(&copy);
    assert!(all_pass, "an upgrade failed requests: see the REL lines");
    assert!(still_draining && exit.success());
}

#[test]
fn failed_upgrades_leave_the_old_process_serving() {
    lb_tests::privileged!();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let (s, root) = scenario(false);
    let lb = s.lb();
    let pid = lb.pid();
    let text = std::fs::read_to_string(&lb.config).unwrap();
    let mut all_pass = true;
    let mut check = |name: &str, what: &str, outcome: String, phase: Phase| {
        // Still the old process, and it still owns the XDP maps (a reload is refused while a
        // successor does).
        let status = lb.json(&["status"]).unwrap();
        let reload = lb.cli(&["reload"]);
        let (observed, pass) = phase.finish();
        let pass = pass && status["pid"] == pid && reload.is_ok();
        rel::record(
            &format!("upgrade refused: {name}"),
            what,
            &format!(
                "{outcome}; pid {pid} still serves: {}, still writes the XDP maps (reload): \
                 {}; {observed}",
                status["pid"] == pid,
                reload.is_ok()
            ),
            pass,
        );
        all_pass &= pass;
    };

    let phase = Phase::start(&s, &root);
    let bad = text
        .replace("upstream = \"app\"\n[[tcp.listener]]", "upstream = \"nope\"\n[[tcp.listener]]");
    assert_ne!(bad, text);
    let out = lb.run_beside(&bad, &["--upgrade"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("nope"), "{err}");
    let first = err.lines().take(2).collect::<Vec<_>>().join(" ");
    check(
        "invalid config",
        "`lb run --upgrade` with an invalid config",
        format!("it exited: {first}"),
        phase,
    );

    // A successor that takes the sockets and dies before it is ready (the test speaks the
    // protocol and hangs up, as a killed process's socket does).
    let phase = Phase::start(&s, &root);
    let sock = UnixStream::connect(lb.upgrade_socket()).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = Reader::new(sock);
    wire::send(reader.sock(), &Msg::Hello { pid: std::process::id(), upgrade: true }, &[]).unwrap();
    let mut taken = Vec::new();
    loop {
        match reader.recv().unwrap() {
            (Msg::Socket { kind, .. }, Some(fd)) => taken.push((kind, fd)),
            (Msg::Done { .. }, _) => break,
            other => panic!("unexpected {:?}", other.0),
        }
    }
    let n = taken.len();
    // While the successor is starting it owns the XDP maps: the old process writes none.
    let extra = "10.1.9.9:80";
    let paused = lb.cli(&["backend", "add", "web", extra]);
    assert!(
        paused.as_ref().is_err_and(|e| e.to_string().contains("writes the XDP maps")),
        "{paused:?}"
    );
    drop((reader, taken));
    lb_tests::wait_until(Duration::from_secs(10), || lb.cli(&["reload"]).is_ok());
    let resumed = lb.cli(&["backend", "add", "web", extra]).is_ok()
        && lb.cli(&["backend", "remove", "web", extra]).is_ok();
    check(
        "successor died before ready",
        "a successor took the listening sockets, then died before it was ready",
        format!(
            "it had received {n} sockets; meanwhile `lb backend add` on the XDP service was \
             refused (503); after it died XDP backend changes applied again: {resumed}"
        ),
        phase,
    );
    assert!(resumed);

    // A real successor that cannot bind a new listener (the address is taken) exits.
    let phase = Phase::start(&s, &root);
    let busy = s.balancer().run(|| std::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let taken = busy.local_addr().unwrap();
    let more = format!("{text}{}", conf::http_listener("extra", taken, ""));
    let out = lb.run_beside(&more, &["--upgrade"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    lb_tests::wait_until(Duration::from_secs(10), || lb.cli(&["reload"]).is_ok());
    check(
        "new listener cannot bind",
        "`lb run --upgrade` whose new listener cannot bind (exits before ready)",
        format!("it exited: {}", err.lines().last().unwrap_or_default()),
        phase,
    );
    drop(busy);
    assert!(all_pass, "see the REL lines");
}

/// A plain second `lb run` beside a running one whose listeners lack `reuse_port` is refused
/// with the running one's pid.
#[test]
fn a_second_lb_run_names_the_running_one_and_upgrade() {
    lb_tests::privileged!();
    let s = Scenario::loopback(1).l7("web", "127.0.0.1:18090".parse().unwrap(), "");
    let s = s.start().expect("lb run");
    let lb: &Lb = s.lb();
    let text = std::fs::read_to_string(&lb.config).unwrap();
    let out = lb.run_beside(&text, &[]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("pid {}", lb.pid())) && err.contains("--upgrade"), "{err}");
    // It also says how to run beside it instead, and which listener lacks what that needs.
    assert!(err.contains("reuse_port = true on http listener \"web\""), "{err}");
    let mut one =
        connect_in(s.balancer(), None, "127.0.0.1:18090".parse().unwrap(), TIMEOUT).unwrap();
    one.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    one.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// Kills a process the harness does not own (the successor SIGUSR2 started) on drop.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a pid this test learned from the process's own notification.
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
        let gone = || !std::path::Path::new(&format!("/proc/{}", self.0)).exists();
        lb_tests::wait_until(Duration::from_secs(15), gone);
    }
}

/// The systemd upgrade action (`systemctl kill -s USR2`): SIGUSR2 makes lb start its own
/// successor, which takes over without a failed request and tells the service manager
/// (`NOTIFY_SOCKET`, a datagram socket of the test's here) that it is the main process now.
#[test]
fn sigusr2_starts_a_successor_that_notifies_systemd() {
    lb_tests::privileged!();
    let notify_path =
        std::env::temp_dir().join(format!("{}.notify", lb_tests::netns::unique("sd")));
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let listen: SocketAddr = "127.0.0.1:18090".parse().unwrap();
    let s = Scenario::loopback(1).l7("web", listen, "");
    let s = s.start_with(|b| b.env("NOTIFY_SOCKET", &notify_path.display().to_string()));
    let s = s.expect("lb run");
    let recv = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert_eq!(first, "READY=1\n");

    let fresh = Load::builder(s.balancer(), vec![listen]).threads(2).start();
    let keepalive = KeepAlive::start(s.balancer(), listen, 4);
    fresh.wait_for(50);
    let old = s.lb().pid();
    s.lb().signal(libc::SIGUSR2);
    let msg = recv();
    let pid: u32 = msg
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {msg:?}"));
    let _successor = KillOnDrop(pid);
    let serving = lb_tests::wait_until(Duration::from_secs(10), || {
        s.lb().json(&["status"]).is_ok_and(|st| st["pid"] == pid)
    });
    fresh.wait_for(50);
    let (f, k) = (fresh.stop(), keepalive.stop());
    let pass = msg.contains("READY=1") && pid != old && serving && f.failed == 0 && k.failed == 0;
    rel::record(
        "upgrade: systemd SIGUSR2",
        "SIGUSR2 (`systemctl kill --signal=SIGUSR2 --kill-whom=main lb`) under load on an L7 \
         listener",
        &format!(
            "notified {msg:?} (pid {old} → {pid}); the admin API answered from the successor: \
             {serving}; fresh GETs {} ok, {} failed; keep-alive (4 clients) {} ok, {} failed, \
             {} closes by Connection: close, {} between requests",
            f.ok, f.failed, k.ok, k.failed, k.closed_by_header, k.closed_idle
        ),
        pass,
    );
    let _ = std::fs::remove_file(&notify_path);
    assert!(pass, "{msg:?} {:?} {:?}", f.sample_failures(), k.failures);
}

/// Two overlapping processes (a DaemonSet rolling update with `maxSurge: 1` on one node):
/// a second plain `lb run` with the same config binds beside the first (every listener
/// `reuse_port`), each answers for itself on its own admin unix socket, the first keeps the
/// XDP maps until SIGTERM, then the second takes them; under load on every path, nothing
/// fails.
#[test]
fn overlapping_processes_sigterm_to_the_older_fails_no_request() {
    lb_tests::privileged!();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let (mut s, root) = scenario(true);
    let phase = Phase::start(&s, &root);
    let mut old = s.lb_mut().start_beside().expect("a second lb run beside the first");
    let new_pid = s.lb().pid();
    let (old_says, new_says) = (old.own_status().unwrap(), s.lb().own_status().unwrap());
    let own = old_says["pid"] == old.pid() && new_says["pid"] == new_pid;
    let one_writer = old_says["xdp_writer"] == "this process"
        && new_says["xdp_writer"] == format!("pid {}", old.pid());
    // Both serve for a moment, then the kubelet stops the old pod.
    std::thread::sleep(Duration::from_secs(1));
    old.terminate();
    let took = lb_tests::wait_until(Duration::from_secs(15), || {
        s.lb().own_status().is_ok_and(|v| v["xdp_writer"] == "this process")
    });
    let exit = old.wait(Duration::from_secs(40)).expect("the old process exits");
    let (observed, pass) = phase.finish();
    // The maps are the new process's now: a reload (which writes them) applies.
    let reload = s.lb().cli(&["reload"]).map(|_| ()).map_err(|e| e.to_string());
    let pass = pass && own && one_writer && took && exit.success() && reload.is_ok();
    rel::record(
        "upgrade: overlapping processes",
        "a second plain `lb run` beside the first (reuse_port on every listener and the admin \
         API), SIGTERM to the older under load",
        &format!(
            "{observed}; each process answered for itself on its own admin socket: {own}; one \
             XDP writer (the first until SIGTERM): {one_writer}; the second took the maps \
             over: {took}; the first exited ({exit}); a reload on the second then: {reload:?}"
        ),
        pass,
    );
    assert!(pass, "see the REL line");
}
