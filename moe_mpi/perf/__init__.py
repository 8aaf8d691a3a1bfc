"""The performance model of the front/expert deployment (DESIGN.md section 8).

- ``hardware``: device and link profiles (presets and JSON, calibratable from measurements);
- ``costs``: FLOP, bytes and memory of every piece of the model, pure arithmetic;
- ``analytic``: the steady-state model (``plan``) and alternative placements;
- ``simulate``: a discrete-event simulator of the pipeline, checked against ``analytic``;
- ``report``: PNG figures (timeline, expert load, scaling);
- ``cli``: the ``plan`` and ``report`` commands (``register(group)``).
"""
from .analytic import Layout, Plan, placements, plan
from .hardware import Hardware
from .hardware import load as load_hardware

__all__ = ["Hardware", "Layout", "Plan", "load_hardware", "placements", "plan"]
