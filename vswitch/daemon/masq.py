"""ipMasq: masquerade of pod subnets through one nftables table.

Theory of operation
-------------------
An attachment with ``ip_masq: true`` (the bridge plugin's ``ipMasq``) asks that its IPv4
subnet be masqueraded when traffic leaves it. The daemon keeps one nftables table,
``ip vswitch_masq``, with a ``postrouting`` NAT chain holding one rule per such subnet,
``ip saddr S ip daddr != S masquerade``. ``subnets`` (loop thread) computes the set from
the attachments; ``apply`` (kernel thread, or at start and shutdown) rewrites the whole
table with one ``nft -f -`` script — create-if-missing, delete, recreate — so the table
always holds exactly that set, and deletes it when the set is empty. It is the only
iptables/nftables state the daemon ever creates, and only when asked.
"""
from __future__ import annotations

import errno
import ipaddress
import subprocess

TABLE = "vswitch_masq"


class Masq:
    def __init__(self, log):
        self.log = log
        self.table_present = False      # we created the table (else: look before deleting)

    @staticmethod
    def subnets(attachments) -> list[str]:
        """The IPv4 subnets of the attachments with ip_masq (records)."""
        return sorted({str(ipaddress.ip_interface(e["address"]).network)
                       for a in attachments if a.get("ip_masq")
                       for e in a["ips"] if ipaddress.ip_interface(e["address"]).version == 4})

    def apply(self, subnets: list[str]):
        """Make the table hold one masquerade rule per subnet (none: no table)."""
        if not subnets and not self.table_present and not self._table_exists():
            return
        script = f"table ip {TABLE}\ndelete table ip {TABLE}\n"
        if subnets:
            script += (f"table ip {TABLE} {{\n chain postrouting {{\n"
                       "  type nat hook postrouting priority srcnat; policy accept;\n")
            for s in subnets:
                script += f"  ip saddr {s} ip daddr != {s} masquerade\n"
            script += " }\n}\n"
        r = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True)
        if r.returncode != 0:
            self.log("ipmasq_failed", level="error", error=r.stderr.decode().strip(), subnets=subnets)
            raise OSError(errno.EIO, f"ipMasq: nft failed: {r.stderr.decode().strip()}")
        self.table_present = bool(subnets)
        self.log("ipmasq", subnets=subnets)

    @staticmethod
    def _table_exists() -> bool:
        try:
            r = subprocess.run(["nft", "list", "table", "ip", TABLE], capture_output=True)
        except FileNotFoundError:
            return False
        return r.returncode == 0
