"""The in-process simulation: the real Switch and Datapath on a virtual clock.

``engine`` (the event loop, endpoints, expectations, traces, pcap), ``generators``
(traffic sources and the bulk numpy mode), ``frames`` (frame builders without scapy).
``docs/simulation.md`` is the guide; the names below are the public API.
"""
from vswitch.sim.engine import (ExpectationFailed, External, Mask, Node, Pod, Simulation,
                                Trace)
from vswitch.sim.generators import CBR, BulkResult, OnOff, PcapReplay, Poisson

__all__ = ["Simulation", "Pod", "External", "Node", "Mask", "Trace", "ExpectationFailed",
           "CBR", "Poisson", "OnOff", "PcapReplay", "BulkResult"]
