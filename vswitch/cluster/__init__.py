"""Cluster membership through etcd v3: node subnets leased with etcd leases, node records
watched, a ``peers`` callback driven by them (issue 14; the daemon's ``peers`` op is the seam).

Rooms: ``subnets`` (cluster CIDR arithmetic, no I/O), ``records`` (the node record's format
and validation), ``store`` (etcd access through etcd3gw: endpoints, failover, watch stream),
``membership`` (the two threads: lease and watch). Importing this package imports none of
them; the CNI plugin never imports it, and nothing here imports numpy.
"""
