"""mdistiller: a config-driven knowledge-distillation benchmark.

Layers, each importing only those before it: utils, config (the YACS tree, registries), data, models (the zoo),
distillers (methods), engine (builder, loop, hooks, update rules), detection (TASK detection on the same
loop), then bench / reproduce / analysis. Importing
the package imports every component once, which registers each one and its config section.
"""

__version__ = "0.1.0"

from . import data, models, distillers, engine, detection  # noqa: E402,F401  (registration)
