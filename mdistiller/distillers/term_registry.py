"""Loss-term name -> the term a builder adds to a method (the dino term of "X++"), with its config section.

A registered term is built from config beside the method it joins (`from_config`) and reads that method's
StepOutput, so the same term serves every method that returns what it needs.
"""

from ..config.registry import Registry

TERM_REGISTRY = Registry("loss term", sections=True)
