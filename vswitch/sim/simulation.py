"""``Simulation``: the engine with the traffic generators' two entry points.

Theory of operation
-------------------
The dependency points one way: ``generators`` is built on ``engine`` (through the names in
``engine.ENGINE_PROTOCOL``) and the engine knows nothing of generators. This class joins
them for users: ``sim.generate(port, gen)`` queues a generator's frames as ordinary events
(``generators.schedule``), ``sim.run_bulk(flows)`` pushes generator traffic through the
switch in numpy batches (``generators.run_bulk``). Everything else is ``engine.Engine``.
"""
from __future__ import annotations

from vswitch.sim import generators
from vswitch.sim.engine import Engine

__all__ = ["Simulation"]


class Simulation(Engine):
    """A switch with virtual ports and a virtual clock (``vswitch/sim/engine.py``), plus
    traffic generators (``vswitch/sim/generators.py``)."""

    def generate(self, port, gen, start_ns: int | None = None) -> int:
        """Schedule every frame of a finite generator (``CBR``, ...) as events; returns the count.

        Use for modest rates where replies and records matter; ``run_bulk`` for volume.
        """
        return generators.schedule(self, port, gen, start_ns)

    def run_bulk(self, flows, *, until_ns: int | None = None, batch_size: int = 256,
                 batch_ns: int = 100_000, record: bool = False,
                 chunk_frames: int = generators.CHUNK) -> generators.BulkResult:
        """Push generator traffic [(port, generator), ...] through the switch in numpy batches.

        A batch holds up to ``batch_size`` frames spanning at most ``batch_ns`` and is
        processed at the time of its last frame; outputs are counted, not recorded (unless
        ``record=True``: slow). Returns a ``BulkResult``.
        """
        return generators.run_bulk(self, flows, until_ns=until_ns, batch_size=batch_size,
                                   batch_ns=batch_ns, record=record, chunk_frames=chunk_frames)
