from ..utils.registry import Registry

# DISTILLER.TYPE -> Distiller subclass
DISTILLER_REGISTRY = Registry("distiller")
