"""The host port (``vsw0``) and the gateway addresses it holds for the pod subnets.

Theory of operation
-------------------
The host port is a persistent TAP in the daemon's namespace (``--switch``, default
``vsw0``) and switch port 0. ``open`` creates it, or reopens it after a restart (a link
of that name that is not a TAP stops the daemon), gives it its MAC (the saved one, else
one derived from its name; with an uplink, the NIC's MAC and MTU) and sets it up, then
builds the ``Switch`` whose gateway is the host port.

It holds one gateway address (``gw/prefixlen``) per pod subnet while an attachment of
that subnet exists, like the bridge plugin's ``isGateway``, and forwarding of a family is
on while it holds a gateway of that family (``net.ipv4.ip_forward``,
``net.ipv6.conf.all.forwarding``). The value each had before the daemon turned it on is
remembered once in the state (``host.forwarding``, read on the loop thread before the
kernel job writes 1, kept across restarts) and put back by ``restore_forwarding`` when the
daemon removes the host port (a clean exit with no pod left). The bookkeeping (the state's ``host.gateways``, the addresses the
switch binds to port 0) happens on the loop thread in ``take`` / ``release``; the
addresses on the TAP are a kernel-thread job (``kernel``), so adds and removals reach the
kernel in decision order. The switch binds at most ``MAX_GATEWAYS`` addresses to a port:
an attach needing one more subnet fails with code 7 naming the limit and the subnets in
use, changing nothing. An address the uplink moved to the host port is never removed
here. At start, gateways no re-adopted attachment uses (a crash mid-detach) are pruned.
"""
from __future__ import annotations

import errno
import ipaddress
import socket

from vswitch.datapath import consts as C
from vswitch import rpc
from vswitch.daemon import netlink
from vswitch.daemon.attachment import gateways_of, mac_for
from vswitch.config import SwitchConfig
from vswitch.daemon.ports import HostPort
from vswitch.rpc import RpcError
from vswitch.switch import Switch

MAX_GATEWAYS = C.MAX_IPS_PER_PORT   # addresses of the host port in the switch (Switch.add_port)


class Gateways:
    def __init__(self, name: str, state, log):
        self.name = name            # the host TAP's name
        self.state = state
        self.log = log
        self.index = 0              # its ifindex
        self.switch: Switch | None = None

    # ----------------------------------------------------------------- the host port

    def open(self, max_ports: int, nic: dict | None = None, conntrack_size: int | None = None,
             mac_learn_rate_per_s: int | None = None, queues: int = 1) -> HostPort:
        """Create or reopen the host TAP (``queues`` queues: one per packet worker, as pods'
        TAPs) and build the Switch with it as port 0.

        ``nic`` (the uplink's link: ``mac``, ``mtu``) gives the host port its MAC and MTU.
        """
        hs = self.state.host
        name = self.name
        info = netlink.link_info(name)
        mac = hs.get("mac") or mac_for("host", name)
        mtu = None
        if nic is not None:
            mac, mtu = nic["mac"], nic["mtu"]
        if info is not None and info.get("kind") != "tun":
            raise SystemExit(f"vswitchd: --switch {name!r} exists and is not a TAP ({info.get('kind')})")
        fds = netlink.tap_open_queues(name, queues, create=info is None, persist=True)   # one per packet worker
        netlink.link_set_up(name, mac=mac, mtu=mtu)
        self.index = socket.if_nametoindex(name)
        hs.update(name=name, mac=mac)
        gateways = hs.setdefault("gateways", [])
        for g in gateways:
            netlink.address_add_if_missing(name, g)
        for version in _families(gateways):
            netlink.forwarding_on(version, self.forwarding)
        self.switch = _make_switch(mac, gateways, max_ports, conntrack_size, mac_learn_rate_per_s)
        self.switch.add_port(name, "host", mac=mac, ips=_ips(gateways) or (), port_id=0)
        return HostPort(name=name, port_id=0, fd=fds[0], queue_fds=fds[1:])

    def _refresh(self):
        """Re-add the switch's host port with the current gateways (its datapath binding)."""
        sw = self.switch
        old = sw.host_port
        if old is not None:
            sw.remove_port(self.name)
        try:
            sw.add_port(self.name, "host", mac=self.state.host["mac"], ips=_ips(self.state.host["gateways"]) or (),
                        port_id=0)
        except BaseException:
            if old is not None:
                sw.add_port(self.name, "host", mac=old.mac, ips=old.ips or (), port_id=0)
            raise

    @property
    def forwarding(self) -> dict:
        """The node's forwarding sysctls as they were before the daemon changed them."""
        return self.state.host.setdefault("forwarding", {})

    def restore_forwarding(self):
        """Put the remembered forwarding sysctls back and forget them (the host port goes)."""
        done = netlink.forwarding_restore(self.forwarding)
        self.state.host["forwarding"] = {}
        if done:
            self.log("forwarding_restored", sysctl=done)

    # ----------------------------------------------------------------- bookkeeping (loop thread)

    def in_use(self) -> set[str]:
        return {g for a in self.state.attachments.values() for g in gateways_of(a)}

    def take(self, rec: dict) -> list[str]:
        """Add the gateways ``rec`` needs to the state and the switch; returns the new ones.

        The switch binds at most MAX_GATEWAYS addresses to the host port: one more subnet
        is refused with an error naming the limit and the subnets in use; nothing changes.
        """
        hs = self.state.host
        new = [g for g in gateways_of(rec) if g not in hs["gateways"]]
        if not new:
            return []
        if len(hs["gateways"]) + len(new) > MAX_GATEWAYS:
            raise RpcError(rpc.E_INVALID_CONFIG,
                           f"gateway {', '.join(new)}: the host port {self.name} holds at most "
                           f"{MAX_GATEWAYS} gateway addresses (one per pod subnet) and has "
                           f"{len(hs['gateways'])}: {', '.join(hs['gateways'])}; detach the pods of a "
                           f"subnet no longer used, or use fewer subnets on this node")
        fw = self.forwarding
        for version in _families(new):       # remembered before the kernel job turns it on
            key = netlink.FORWARDING[version]
            if key not in fw:
                fw[key] = netlink.sysctl(key)
        old = list(hs["gateways"])
        hs["gateways"] = old + new
        try:
            self._refresh()
        except BaseException:
            hs["gateways"] = old
            raise
        return new

    def release(self, rec: dict) -> list[str]:
        """Drop the gateways of ``rec`` that no attachment uses any more; returns them.

        Call after ``rec`` left the attachments. The caller removes them from the kernel
        (``kernel``)."""
        hs = self.state.host
        used = self.in_use()
        gone = [g for g in gateways_of(rec) if g in hs["gateways"] and g not in used]
        if gone:
            hs["gateways"] = [g for g in hs["gateways"] if g not in gone]
            self._refresh()
        return gone

    def prune(self):
        """At start: gateways no re-adopted attachment uses (a crash mid-detach) go away."""
        hs = self.state.host
        used = self.in_use()
        gone = [g for g in hs.get("gateways", []) if g not in used]
        if gone:
            hs["gateways"] = [g for g in hs["gateways"] if g in used]
            self._refresh()
            self.kernel([], gone)
            self.log("gateways_pruned", gateways=gone)

    # ----------------------------------------------------------------- the kernel side

    def kernel(self, add: list[str], remove: list[str]):
        """Kernel thread: gateway addresses on the host TAP (an uplink's address stays)."""
        keep = set((self.state.uplink or {}).get("addresses") or [])
        msgs = [(f"add {g}", netlink.msg_addr(self.index, g, replace=True)) for g in add]
        msgs += [(f"del {g}", netlink.msg_addr(self.index, g, add=False)) for g in remove if g not in keep]
        if not msgs:
            return
        for version in _families(add):
            netlink.forwarding_on(version, self.forwarding)
        with netlink.RtnlSocket() as nl:
            for label, m in msgs:       # one by one: a gateway already gone is not an error
                try:
                    nl.run(f"gateway on {self.name}", [(label, m)])
                except netlink.NetlinkError as exc:
                    if label.startswith("add") or exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                        raise


def _families(gateways: list[str]) -> list[int]:
    """The IP versions of ``gw/prefixlen`` addresses (4, 6), each once."""
    return sorted({ipaddress.ip_interface(g).version for g in gateways})


def _ips(gateways: list[str]) -> list[str]:
    """``gw/prefixlen`` -> the bare addresses the switch binds to the host port."""
    return [str(ipaddress.ip_interface(g).ip) for g in gateways]


def _make_switch(host_mac: str, gateways: list[str], max_ports: int, conntrack_size: int | None = None,
                 mac_learn_rate_per_s: int | None = None) -> Switch:
    """The Switch, its gateway (and subnet) per family from the first gateway of each."""
    kw = {"gateway_mac": host_mac, "vnet_hdr_len": netlink.VNET_HDR_LEN, "max_ports": max_ports}
    if conntrack_size is not None:
        kw["conntrack_size"] = conntrack_size
    if mac_learn_rate_per_s is not None:
        kw["mac_learn_rate_per_s"] = mac_learn_rate_per_s
    for g in gateways:
        i = ipaddress.ip_interface(g)
        if i.version == 4 and "gateway" not in kw:
            kw.update(subnet=str(i.network), gateway=str(i.ip))
        elif i.version == 6 and "gateway6" not in kw:
            kw.update(subnet6=str(i.network), gateway6=str(i.ip))
    return Switch(SwitchConfig(**kw))
