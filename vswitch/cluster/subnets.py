"""Node subnets of a cluster CIDR: validation, key names, and the choice of a free one.

Theory of operation: a cluster has one pod CIDR per address family (IPv4, and IPv6 for dual
stack) and every node leases one node subnet of a fixed prefix length from each. This
module is the pure arithmetic: ``ClusterSpec`` validates the CIDRs and sizes once (a node
subnet larger than its cluster CIDR, a family given twice, a host route as a node subnet are
refused with the value and what is accepted), ``subnet_key`` names a subnet in the store
(``10.244.3.0/24`` → ``10.244.3.0-24``, a key segment without ``/``), and ``pick_free``
chooses a candidate: the caller's previous subnet when it is still free, else a random free
one (random, like flannel, so that nodes registering at the same moment rarely race for the
same key; the store's create-if-absent transaction decides any race that remains). Spaces of
more than 4096 subnets (IPv6) are sampled by index instead of enumerated. No I/O, no etcd.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The longest node subnet prefix accepted per family: a node needs a gateway and pods.
MAX_NODE_PREFIX = {4: 30, 6: 126}
_ENUMERATE_LIMIT = 1 << 12


class ClusterFull(Exception):
    """No free node subnet is left in a cluster CIDR (fatal for the node that asks)."""


def _split(value, what: str) -> list[str]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise ValueError(f"{what} must be a string 'A[,B]' or a list, got {value!r}")
    return items


@dataclass(frozen=True)
class FamilySpec:
    cluster_cidr: IPNetwork
    node_prefix: int

    @property
    def family(self) -> int:
        return self.cluster_cidr.version

    @property
    def subnet_count(self) -> int:
        return 1 << (self.node_prefix - self.cluster_cidr.prefixlen)

    def subnet(self, index: int) -> IPNetwork:
        size = 1 << (self.cluster_cidr.max_prefixlen - self.node_prefix)
        net = ipaddress.ip_network((int(self.cluster_cidr.network_address) + index * size, self.node_prefix))
        return net

    def index(self, subnet: IPNetwork) -> int:
        """The position of a contained subnet (0 is the first)."""
        host_bits = self.cluster_cidr.max_prefixlen - self.node_prefix
        return (int(subnet.network_address) - int(self.cluster_cidr.network_address)) >> host_bits

    def contains(self, subnet: IPNetwork) -> bool:
        return (subnet.version == self.family and subnet.prefixlen == self.node_prefix
                and subnet.subnet_of(self.cluster_cidr))


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster CIDR(s) and node subnet size(s), one ``FamilySpec`` per family, IPv4 first."""
    families: tuple[FamilySpec, ...]

    @classmethod
    def parse(cls, cluster_cidrs, node_subnet_sizes) -> "ClusterSpec":
        """``cluster_cidrs``: "10.244.0.0/16" or "10.244.0.0/16,fd00:10:244::/48" (or a list);
        ``node_subnet_sizes``: prefix lengths in the same order, "24" or "24,64" (or ints)."""
        cidrs = _split(cluster_cidrs, "cluster_cidrs")
        sizes = _split(node_subnet_sizes, "node_subnet_size") if not isinstance(node_subnet_sizes, int) \
            else [str(node_subnet_sizes)]
        if not 1 <= len(cidrs) <= 2:
            raise ValueError(f"cluster_cidrs must be one CIDR or an IPv4 and an IPv6 CIDR, got {cidrs!r}")
        if len(sizes) != len(cidrs):
            raise ValueError(f"node_subnet_size must give one prefix length per cluster CIDR "
                             f"({len(cidrs)}: {cidrs}), got {sizes!r}")
        fams = []
        for cidr_s, size_s in zip(cidrs, sizes):
            try:
                cidr = ipaddress.ip_network(cidr_s, strict=True)
            except ValueError as exc:
                raise ValueError(f"cluster CIDR {cidr_s!r} is not a network address with prefix "
                                 f"length (e.g. 10.244.0.0/16, fd00:10:244::/48): {exc}") from None
            try:
                size = int(size_s)
            except ValueError:
                raise ValueError(f"node subnet size {size_s!r} is not a prefix length (an integer)") from None
            hi = MAX_NODE_PREFIX[cidr.version]
            if size < cidr.prefixlen:
                raise ValueError(f"node subnet size /{size} is larger than cluster CIDR {cidr}: "
                                 f"accepted for it are /{cidr.prefixlen}../{hi}")
            if size > hi:
                raise ValueError(f"node subnet size /{size} for cluster CIDR {cidr} leaves no room for "
                                 f"a gateway and pods: accepted are /{cidr.prefixlen}../{hi}")
            fams.append(FamilySpec(cidr, size))
        if len({f.family for f in fams}) != len(fams):
            raise ValueError(f"cluster_cidrs gives the same address family twice: {cidrs!r}; "
                             f"accepted is one IPv4 and/or one IPv6 CIDR")
        fams.sort(key=lambda f: f.family)
        return cls(tuple(fams))


def subnet_key(subnet: IPNetwork) -> str:
    """The store key segment of a subnet: ``10.244.3.0/24`` → ``10.244.3.0-24``."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(segment: str) -> IPNetwork | None:
    """The subnet of a key segment, or None if it is not one (a foreign key)."""
    addr, sep, plen = segment.rpartition("-")
    if not sep:
        return None
    try:
        return ipaddress.ip_network(f"{addr}/{int(plen)}", strict=True)
    except ValueError:
        return None


def pick_free(spec: FamilySpec, taken: set, previous: IPNetwork | None = None,
              rng: random.Random | None = None) -> IPNetwork:
    """A subnet of ``spec`` not in ``taken``: ``previous`` if it fits and is free, else a
    random free one; ``ClusterFull`` if there is none. Works on subnet indices (integers),
    so a /48 of /64s costs no more than a /16 of /24s."""
    rng = rng or random.Random()
    if previous is not None and spec.contains(previous) and previous not in taken:
        return previous
    n = spec.subnet_count
    used = {spec.index(s) for s in taken if spec.contains(s)}
    if len(used) >= n:
        raise ClusterFull(f"cluster CIDR {spec.cluster_cidr} has no free /{spec.node_prefix} node subnet: "
                          f"all {n} are leased")
    if n <= _ENUMERATE_LIMIT:
        return spec.subnet(rng.choice([i for i in range(n) if i not in used]))
    # More than 4096 subnets: the store holds far fewer keys than that (each is a node), so
    # a random probe is free almost always.
    while True:
        i = rng.randrange(n)
        if i not in used:
            return spec.subnet(i)
