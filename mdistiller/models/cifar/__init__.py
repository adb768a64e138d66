"""Models for 32x32 inputs (CIFAR-100, and Fashion-MNIST brought to 32x32). Every module here registers itself
under "cifar/<name>" when imported; new architectures are one new file, no edit here."""

from ...utils.autoimport import import_submodules

import_submodules(__name__, __path__)
