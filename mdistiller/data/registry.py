from ..config.registry import Registry

# name (DATASET.TYPE) -> loader function `load(cfg) -> DatasetBundle`
DATASET_REGISTRY = Registry("dataset", key="DATASET.TYPE")
