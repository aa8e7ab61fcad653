"""The uplink: a node NIC handed to the switch, and handed back on a clean exit.

Theory of operation
-------------------
With ``--uplink NIC`` the node's traffic goes through the switch: the host port takes the
NIC's MAC and MTU (``nic()``, read before the host port opens), the NIC's addresses and
its gateway routes move to the host port, and an AF_PACKET socket on the NIC becomes
switch port 1 (``vswitch.daemon.ports.open_uplink_socket``). The NIC's own stack must ignore
what arrives on it (the switch hands that to the host port), so the NIC gets
``rp_filter=1``, ``arp_ignore=8`` and ``disable_ipv6=1`` (IPv4 has no switch that stops a
link's stack from taking packets for an address of another link; IPv6 would answer them
too, e.g. a TCP reset to a hostPort SYN); IPv4 forwarding is enabled (remembered like the
gateways', ``vswitch.daemon.gateways``). The NIC's addresses, IPv4 and IPv6 (not the
link-local ones: the host port has the NIC's MAC, so it has the same link-local address),
are also the switch's node addresses (hostPort rules match them). IPv6 gateway routes
usually go via a link-local router address; they move with the NIC's metric and protocol.

Before anything moves, the originals (addresses, gateway routes with metric and protocol,
the three sysctls) are saved in the state file, so a crash can be undone: a restart with
the same ``--uplink`` reuses them; with another NIC, or without ``--uplink``, the saved
NIC is restored first. ``restore`` puts sysctls (``disable_ipv6`` first: the kernel
removes a link's IPv6 addresses and routes while it is 1), addresses and routes back (a
NIC that vanished is logged and skipped); the daemon calls it on SIGTERM/SIGINT. An IPv6
address goes back as ``ip addr add`` adds one: tentative until duplicate address
detection passed (about a second), since the host port no longer has it. Limits: an
address learned from router advertisements moves as a permanent one, and comes back so.
"""
from __future__ import annotations

import ipaddress

from vswitch.daemon import netlink
from vswitch.daemon.ports import UplinkPort, open_uplink_socket

# the NIC's own stack must ignore what arrives on it: the switch hands that to vsw0
UPLINK_SYSCTLS = {"ipv4/conf/{}/rp_filter": "1", "ipv4/conf/{}/arp_ignore": "8",
                  "ipv6/conf/{}/disable_ipv6": "1"}


class Uplink:
    def __init__(self, name: str, host_name: str, state, log):
        self.name = name
        self.host_name = host_name
        self.state = state
        self.log = log

    def nic(self) -> dict:
        """The NIC's link (``mac``, ``mtu``); a missing NIC stops the daemon."""
        up = netlink.link_info(self.name)
        if up is None:
            raise SystemExit(f"vswitchd: --uplink {self.name!r}: no such interface")
        return up

    def up(self, switch) -> UplinkPort:
        """Move the NIC's addresses and routes to the host port; returns switch port 1."""
        name = self.name
        saved = self.state.uplink
        if saved and saved.get("name") != name:
            restore(saved, self.host_name, self.log)
            saved = None
        if not saved:
            saved = {"name": name, "addresses": netlink.addresses_of(name), "routes": netlink.uplink_routes(name),
                     "sysctl": {k: netlink.sysctl(k.format(name)) for k in UPLINK_SYSCTLS}}
            self.state.uplink = saved
        fw = self.state.host.setdefault("forwarding", {})
        fw.setdefault(netlink.FORWARDING[4], netlink.sysctl(netlink.FORWARDING[4]))
        self.state.save()              # before anything moves: a crash now can be undone
        for cidr in saved["addresses"]:
            netlink.address_del(name, cidr)
            netlink.address_add_if_missing(self.host_name, cidr)
        for r in saved["routes"]:
            netlink.route_add(None, self.host_name, r["dst"], r["gw"], r.get("metric"), r.get("proto"))
        for k, v in UPLINK_SYSCTLS.items():
            netlink.sysctl(k.format(name), v)
        netlink.forwarding_on(4, fw)
        sock = open_uplink_socket(name)
        port = UplinkPort(name=name, port_id=1, fd=sock.fileno(), sock=sock)
        switch.add_port(name, "uplink", port_id=1)
        switch.set_node_addresses([str(ipaddress.ip_interface(a).ip) for a in saved["addresses"]])
        self.log("uplink", nic=name, addresses=saved["addresses"], routes=saved["routes"])
        return port


def restore(saved: dict, host_name: str, log):
    """Give the NIC of ``saved`` its sysctls, addresses and gateway routes back."""
    name = saved["name"]
    if netlink.link_info(name) is None:
        log("uplink_gone", level="warning", nic=name)
        return
    for k, v in (saved.get("sysctl") or {}).items():
        if v is not None:
            netlink.sysctl(k.format(name), v)
    for r in saved["routes"]:            # an IPv6 route via a link-local router outlives the addresses
        try:
            netlink.route_del(host_name, r["dst"], r["gw"], r.get("metric"))
        except netlink.NetlinkError as exc:
            log("route_restore_failed", level="warning", route=r, error=str(exc))
    for cidr in saved["addresses"]:
        netlink.address_del(host_name, cidr)
        netlink.address_add_if_missing(name, cidr, nodad=False)
    for r in saved["routes"]:
        try:
            netlink.route_add(None, name, r["dst"], r["gw"], r.get("metric"), r.get("proto"))
        except netlink.NetlinkError as exc:
            log("route_restore_failed", level="warning", route=r, error=str(exc))
    log("uplink_restored", nic=name, addresses=saved["addresses"])
