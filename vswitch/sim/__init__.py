"""The in-process simulation: the real Switch and Datapath on a virtual clock.

``engine`` (the event loop, endpoints, expectations, traces, pcap), ``generators``
(traffic sources and the bulk numpy mode, built on the engine's ``ENGINE_PROTOCOL``),
``simulation`` (``Simulation``: the engine with ``generate`` and ``run_bulk``), ``cluster``
(``Cluster``: simulations joined by VXLAN over a virtual underlay), ``frames`` (frame
builders without scapy). Imports point one way: cluster → simulation → generators →
engine → frames. ``docs/simulation.md`` is the guide; the names below are the public API.
"""
from vswitch.sim.engine import ExpectationFailed, External, Mask, Node, Pod, Trace
from vswitch.sim.generators import CBR, BulkResult, OnOff, PcapReplay, Poisson
from vswitch.sim.simulation import Simulation
from vswitch.sim.cluster import Cluster, ClusterNode

__all__ = ["Simulation", "Cluster", "ClusterNode", "Pod", "External", "Node", "Mask", "Trace",
           "ExpectationFailed", "CBR", "Poisson", "OnOff", "PcapReplay", "BulkResult"]
