"""ipMasq: masquerade of pod subnets through nftables, one table per IP family.

Theory of operation
-------------------
An attachment with ``ip_masq: true`` (the bridge plugin's ``ipMasq``) asks that its
subnets be masqueraded when traffic leaves them. The daemon keeps up to two nftables
tables, ``ip vswitch_masq`` for the IPv4 subnets and ``ip6 vswitch_masq`` for the IPv6
ones (a dual-stack pod has one of each), each with a ``postrouting`` NAT chain holding one
rule per such subnet, ``ip saddr S ip daddr != S masquerade`` (``ip6 saddr`` ... for
IPv6). With cluster CIDRs (``--cluster-cidr``: every node's pods) the rule is
``ip saddr S ip daddr != { S, CLUSTER } masquerade``: pod-to-pod traffic across nodes
keeps its source address (the Kubernetes model); the set is the union of S and the
cluster CIDRs of its family, collapsed (nftables refuses overlapping intervals). ``subnets`` (loop thread) computes the set from the attachments; ``apply`` (kernel
thread, or at start and shutdown) rewrites both tables with one ``nft -f -`` script —
create-if-missing, delete, recreate — so each table holds exactly its family's subnets,
and a family without any has no table. They are the only iptables/nftables state the
daemon ever creates, and only when asked.
"""
from __future__ import annotations

import errno
import ipaddress
import subprocess

TABLE = "vswitch_masq"
FAMILIES = {4: "ip", 6: "ip6"}          # IP version -> nftables family of its table


class Masq:
    def __init__(self, log, exclude=()):
        self.log = log
        self.exclude = [ipaddress.ip_network(c) for c in exclude]   # cluster CIDRs: never masqueraded to
        self.present: set[int] = set()  # the IP versions whose table we created

    @staticmethod
    def subnets(attachments) -> list[str]:
        """The subnets (both families) of the attachments with ip_masq (records)."""
        nets = {ipaddress.ip_interface(e["address"]).network
                for a in attachments if a.get("ip_masq") for e in a["ips"]}
        return [str(n) for n in sorted(nets, key=lambda n: (n.version, n))]

    def apply(self, subnets: list[str]):
        """Make each family's table hold one masquerade rule per subnet (none: no table)."""
        by_version = {v: [s for s in subnets if ipaddress.ip_network(s).version == v] for v in FAMILIES}
        script = ""
        for v, fam in FAMILIES.items():
            nets = by_version[v]
            if not nets and v not in self.present and not self._table_exists(fam):
                continue
            script += f"table {fam} {TABLE}\ndelete table {fam} {TABLE}\n"
            if nets:
                script += (f"table {fam} {TABLE} {{\n chain postrouting {{\n"
                           "  type nat hook postrouting priority srcnat; policy accept;\n")
                for s in nets:
                    script += f"  {fam} saddr {s} {fam} daddr != {self._daddrs(s)} masquerade\n"
                script += " }\n}\n"
        if not script:
            return
        r = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True)
        if r.returncode != 0:
            self.log("ipmasq_failed", level="error", error=r.stderr.decode().strip(), subnets=subnets)
            raise OSError(errno.EIO, f"ipMasq: nft failed: {r.stderr.decode().strip()}")
        self.present = {v for v in FAMILIES if by_version[v]}
        self.log("ipmasq", subnets=subnets)

    def _daddrs(self, subnet: str) -> str:
        """``S``, or ``{ S, CLUSTER, ... }`` collapsed, for the rule's ``daddr !=``."""
        s = ipaddress.ip_network(subnet)
        nets = list(ipaddress.collapse_addresses([s] + [c for c in self.exclude if c.version == s.version]))
        return str(nets[0]) if len(nets) == 1 and nets[0] == s else "{ " + ", ".join(map(str, nets)) + " }"

    @staticmethod
    def _table_exists(family: str) -> bool:
        try:
            r = subprocess.run(["nft", "list", "table", family, TABLE], capture_output=True)
        except FileNotFoundError:
            return False
        return r.returncode == 0
