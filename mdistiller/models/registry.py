from ..config.registry import Registry

# "<family>/<name>" -> constructor `fn(num_classes) -> nn.Module`; see models/__init__.py for families.
MODEL_REGISTRY = Registry("model")
