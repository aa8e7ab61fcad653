"""vswitchd, the node daemon: it owns the TAP devices, the Switch and all node state.

``main`` (the packet loop, the ops table, the command line), ``control`` (the control
socket), ``worker`` (kernel work off the packet thread), ``pods`` / ``attachment`` /
``state`` (attach, detach, re-adoption), ``gateways`` (the host port), ``uplink``,
``masq`` (nftables), ``metrics``, ``debug`` (captures, trace), ``log``, ``ports`` (TAP,
host and uplink I/O), ``netlink`` (the only pyroute2 user). ``docs/daemon.md`` is the guide.
"""
