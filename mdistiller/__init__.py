"""mdistiller: a config-driven knowledge-distillation benchmark.

Subpackages: config (the YACS tree), data, models (the zoo), distillers (methods), engine (trainers and hooks).
"""

__version__ = "0.1.0"
