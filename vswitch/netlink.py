"""Kernel plumbing for vswitchd: TAP devices, network namespaces, links, addresses, routes.

This is the only module that imports pyroute2 (netlink); everything else calls it.

Theory of operation
-------------------
A pod port is a TAP device opened on ``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR``: every read returns, and every write takes, a 12-byte virtio-net header
(``TUNSETVNETHDRSZ``) before the Ethernet frame. ``TUNSETOFFLOAD`` with CSUM, TSO4, TSO6
and TSO_ECN lets the pod's kernel hand us 64 KiB TCP segments with a partial checksum, and
lets us hand them back unsegmented: the switch never segments or checksums anything.
``TUNSETPERSIST`` keeps the device when our fd closes (daemon restart, kill -9).

Creation follows the reference bridge plugin's order: the TAP is created in the node's
namespace under a unique temporary name (the switch port name), moved into the pod's
namespace (its fd stays valid: the fd names the device, not the namespace), renamed there
to the requested ifname, given its MAC, MTU, addresses and routes, and set up with the
namespace's ``lo``. A restarted daemon reopens a persistent TAP *by name inside its
namespace*: TUNSETIFF attaches to an existing device of the calling thread's namespace,
so we ``setns`` the calling thread into the pod's namespace for that one ioctl and back.

Netlink sockets for another namespace come from ``IPRoute(netns=path)`` (pyroute2 opens
the socket inside the namespace and passes its fd back); they are short-lived.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = [
    "NetlinkError", "VNET_HDR_LEN", "TapError",
    "netns_entered", "tap_open", "tap_set_persist", "ipr_for",
    "link_info", "link_exists", "link_delete", "link_move_to_netns", "link_configure",
    "addresses_add", "routes_add", "addresses_of", "routes_via", "address_add_if_missing",
    "address_del", "route_add", "link_set_up", "parse_cidr",
]

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
VNET_HDR_LEN = 12          # struct virtio_net_hdr_mrg_rxbuf (flags, gso_type, hdr_len,
                           # gso_size, csum_start, csum_offset, num_buffers)
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class TapError(OSError):
    """A TAP or namespace operation failed; the message names the device and the step."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise TapError(err, f"setns into network namespace fd {fd} failed: {os.strerror(err)}")


@contextlib.contextmanager
def netns_entered(netns: str | None):
    """Run the calling thread inside the network namespace at path ``netns`` (None: stay)."""
    if netns is None:
        yield
        return
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(exc.errno, f"cannot open network namespace {netns!r}: {exc.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def tap_open(name: str, create: bool = True, persist: bool = True, netns: str | None = None) -> int:
    """Open (creating it when ``create``) the TAP ``name`` with a vnet header and offloads.

    Returns a non-blocking fd. ``create=True`` fails if a device of that name exists
    (IFF_TUN_EXCL); ``create=False`` attaches to an existing persistent TAP (in ``netns``).
    """
    if not name or len(name) > 15:
        raise TapError(errno.EINVAL, f"TAP name {name!r} must be 1..15 characters")
    with netns_entered(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_TUN_EXCL if create else 0)
            ifr = struct.pack("16sH22x", name.encode(), flags)
            try:
                fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as exc:
                what = "create" if create else "reopen"
                raise TapError(exc.errno, f"cannot {what} TAP {name!r}"
                               f"{' in ' + netns if netns else ''}: {exc.strerror}") from None
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
            if persist:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except BaseException:
            os.close(fd)
            raise
    return fd


def tap_set_persist(fd: int, persist: bool) -> None:
    """Clear persistence before closing the last fd to make the TAP disappear."""
    fcntl.ioctl(fd, TUNSETPERSIST, 1 if persist else 0)


def ipr_for(netns: str | None = None) -> IPRoute:
    """An IPRoute socket inside ``netns`` (a path) or the daemon's own namespace."""
    if netns is None:
        return IPRoute()
    if not os.path.exists(netns):
        raise TapError(errno.ENOENT, f"network namespace {netns!r} does not exist")
    return IPRoute(netns=netns)


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def link_info(name: str, netns: str | None = None) -> dict | None:
    """{index, mac, mtu, up} of a link, or None when it does not exist."""
    with ipr_for(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return None
        link = ipr.get_links(idx)[0]
        return {"index": idx, "mac": link.get("IFLA_ADDRESS"), "mtu": link.get("IFLA_MTU"),
                "up": bool(link["flags"] & 1), "kind": _link_kind(link)}


def _link_kind(link) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


def link_exists(name: str, netns: str | None = None) -> bool:
    with ipr_for(netns) as ipr:
        return _index(ipr, name) is not None


def link_delete(name: str, netns: str | None = None) -> bool:
    """Delete a link; True if it existed. A gone namespace counts as gone."""
    try:
        with ipr_for(netns) as ipr:
            idx = _index(ipr, name)
            if idx is None:
                return False
            ipr.link("del", index=idx)
            return True
    except TapError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


def link_set_up(name: str, netns: str | None = None, mac: str | None = None,
                mtu: int | None = None) -> None:
    with ipr_for(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            raise TapError(errno.ENODEV, f"no link {name!r}{' in ' + netns if netns else ''}")
        kw = {}
        if mac:
            kw["address"] = mac
        if mtu:
            kw["mtu"] = mtu
        if kw:
            ipr.link("set", index=idx, **kw)
        ipr.link("set", index=idx, state="up")


def link_move_to_netns(name: str, netns: str) -> None:
    """Move link ``name`` of our namespace into the namespace at path ``netns``."""
    nsfd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ipr_for(None) as ipr:
            idx = _index(ipr, name)
            if idx is None:
                raise TapError(errno.ENODEV, f"no link {name!r} to move into {netns}")
            ipr.link("set", index=idx, net_ns_fd=nsfd)
    finally:
        os.close(nsfd)


def link_configure(netns: str, old_name: str, ifname: str, mac: str, mtu: int) -> dict:
    """Inside ``netns``: rename ``old_name`` to ``ifname``, set MAC and MTU, bring it and lo up."""
    with ipr_for(netns) as ipr:
        idx = _index(ipr, old_name)
        if idx is None:
            raise TapError(errno.ENODEV, f"no link {old_name!r} in {netns}")
        if old_name != ifname:
            ipr.link("set", index=idx, ifname=ifname)
        ipr.link("set", index=idx, address=mac, mtu=mtu)
        ipr.link("set", index=idx, state="up")
        lo = _index(ipr, "lo")
        if lo is not None:
            ipr.link("set", index=lo, state="up")
        link = ipr.get_links(idx)[0]
        return {"name": ifname, "mac": link.get("IFLA_ADDRESS"), "mtu": link.get("IFLA_MTU")}


def parse_cidr(text: str):
    """'10.0.0.5/24' -> IPv4Interface; raises ValueError naming the value."""
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"not an address with prefix: {text!r} (expected like 10.0.0.5/24)") from None


def addresses_add(netns: str | None, ifname: str, cidrs: list[str]) -> None:
    with ipr_for(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            raise TapError(errno.ENODEV, f"no link {ifname!r} in {netns}")
        for cidr in cidrs:
            iface = parse_cidr(cidr)
            kw = {}
            if iface.version == 6:
                kw["flags"] = 0x02  # IFA_F_NODAD: usable at once, like the bridge plugin's settle
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)


def address_add_if_missing(ifname: str, cidr: str, netns: str | None = None) -> bool:
    """Add ``cidr`` to ``ifname`` unless that address is there already; True if added."""
    iface = parse_cidr(cidr)
    with ipr_for(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            raise TapError(errno.ENODEV, f"no link {ifname!r}")
        for a in ipr.get_addr(index=idx):
            if a.get("IFA_ADDRESS") == str(iface.ip):
                return False
        kw = {"flags": 0x02} if iface.version == 6 else {}
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)
        return True


def address_del(ifname: str, cidr: str, netns: str | None = None) -> bool:
    iface = parse_cidr(cidr)
    with ipr_for(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return False
        try:
            ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            return True
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT):
                return False
            raise


def route_add(netns: str | None, ifname: str, dst: str, gw: str | None = None) -> None:
    net = ipaddress.ip_network(dst, strict=False)
    with ipr_for(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            raise TapError(errno.ENODEV, f"no link {ifname!r}")
        kw = {"dst": str(net.network_address), "dst_len": net.prefixlen, "oif": idx,
              "family": 10 if net.version == 6 else 2}
        if gw:
            kw["gateway"] = gw
        ipr.route("replace", **kw)


def routes_add(netns: str, ifname: str, routes: list[dict]) -> None:
    for r in routes:
        route_add(netns, ifname, r["dst"], r.get("gw"))


def addresses_of(ifname: str, netns: str | None = None) -> list[str]:
    """Global (non link-local) addresses of a link as 'a.b.c.d/len', IPv4 first."""
    out = []
    with ipr_for(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return out
        for a in ipr.get_addr(index=idx):
            ip = a.get("IFA_ADDRESS")
            if ip is None:
                continue
            iface = ipaddress.ip_interface(f"{ip}/{a['prefixlen']}")
            if iface.ip.is_link_local:
                continue
            out.append(str(iface))
    out.sort(key=lambda c: (":" in c, c))
    return out


def routes_via(ifname: str, netns: str | None = None) -> list[dict]:
    """Routes of the main table through ``ifname`` that have a gateway: [{dst, gw}]."""
    out = []
    with ipr_for(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return out
        for family in (2, 10):
            for r in ipr.get_routes(family=family, table=254):
                if r.get("RTA_OIF") != idx or not r.get("RTA_GATEWAY"):
                    continue
                dst = r.get("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
                out.append({"dst": f"{dst}/{r['dst_len']}", "gw": r.get("RTA_GATEWAY")})
    return out
