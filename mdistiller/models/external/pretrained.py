"""Where a library model's pretrained weights live on this machine, found without touching the network.

A run never downloads library weights: every rank of a multi-process run would race for the same file, and an
offline machine would wait on network timeouts. The weights are read from the libraries' own caches, and a missing
file is one error naming the file, the folder it belongs in and the one-line command that fills it:
  - timm: the Hugging Face hub cache (<HF_HUB_CACHE or HF_HOME/hub>/models--timm--<name>.<tag>/snapshots/<rev>/
    model.safetensors, or pytorch_model.bin), else timm's URL cache (<torch hub dir>/checkpoints/<file of the url>);
  - torchvision: the default weights' file in <torch hub dir>/checkpoints (TORCH_HOME decides the hub dir).
The environment is read on every call, so HF_HOME / TORCH_HOME set after import are honoured.
"""

import os

import torch

from ...utils.errors import CheckpointError, ConfigError

HF_FILES = ("model.safetensors", "pytorch_model.bin")


def split_library_name(name):
    """("timm" | "torchvision", the library's own model name) of a prefixed name."""
    library, _, model = name.partition(":")
    if library not in ("timm", "torchvision") or not model:
        raise ConfigError(f"'{name}' is not a library model name; write timm:<name> or torchvision:<name>")
    return library, model


def hf_hub_cache():
    """The Hugging Face hub cache folder, as huggingface_hub resolves it from the environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def torch_hub_checkpoints():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _no_weights(name, key):
    return ConfigError(f"{name} has no pretrained weights in its library; set {key} False (random initialisation)")


def _timm_cfg(model, name, key):
    import timm.models

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise _no_weights(name, key)
    return cfg


def _timm_hf_candidates(cfg):
    """(repo id, revision, file names to try) of a timm pretrained config's hub weights, or None."""
    if not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    if cfg.hf_hub_filename:
        stem, ext = os.path.splitext(cfg.hf_hub_filename)
        files = (stem + ".safetensors", cfg.hf_hub_filename) if ext == ".bin" else (cfg.hf_hub_filename,)
    else:
        files = HF_FILES
    return repo, revision or None, files


def timm_weights_file(model, name, key):
    """(path of the cached file or None, whether it is the hub's file, a description of where it is expected)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _timm_cfg(model, name, key)
    where = []
    hf = _timm_hf_candidates(cfg)
    if hf is not None:
        repo, revision, files = hf
        for filename in files:
            found = try_to_load_from_cache(repo, filename, cache_dir=hf_hub_cache(), revision=revision)
            if isinstance(found, str) and os.path.isfile(found):
                return found, True, ""
        folder = os.path.join(hf_hub_cache(), "models--" + repo.replace("/", "--"))
        where.append(f"{' or '.join(files)} under {folder}/snapshots/<revision>/ (Hugging Face hub cache)")
    if cfg.url:
        path = os.path.join(torch_hub_checkpoints(), os.path.basename(cfg.url))
        if os.path.isfile(path):
            return path, False, ""
        where.append(f"{path} (timm's URL cache)")
    return None, False, " or ".join(where)


def _torchvision_weights(model, name, key):
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(model).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise _no_weights(name, key) from None
    return weights


def torchvision_weights(model, name, key):
    """(the default weights enum member, the path its file has in torch's hub cache)."""
    weights = _torchvision_weights(model, name, key)
    return weights, os.path.join(torch_hub_checkpoints(), os.path.basename(weights.url))


def pretrained_num_classes(name, key="MODEL.STUDENT_PRETRAINED"):
    """How many classes the library's pretrained weights classify."""
    library, model = split_library_name(name)
    if library == "timm":
        return int(_timm_cfg(model, name, key).num_classes)
    return len(_torchvision_weights(model, name, key).meta["categories"])


def fetch_command(name):
    """The one-line command that puts `name`'s pretrained weights in its library's cache (run with internet)."""
    library, model = split_library_name(name)
    if library == "timm":
        return f"python -c \"import timm; timm.create_model('{model}', pretrained=True)\""
    return f"python -c \"import torchvision; torchvision.models.get_model('{model}', weights='DEFAULT')\""


def pretrained_weights_file(name, key="MODEL.STUDENT_PRETRAINED"):
    """Path of `name`'s pretrained weights in its library's local cache; CheckpointError (one line) when absent.
    `key`: the config key that asked for them, named in the error as the way to do without."""
    library, model = split_library_name(name)
    if library == "timm":
        path, _, where = timm_weights_file(model, name, key)
        cache = hf_hub_cache() if "Hugging Face" in where else torch_hub_checkpoints()
    else:
        _, path = torchvision_weights(model, name, key)
        where, cache = path, torch_hub_checkpoints()
        path = path if os.path.isfile(path) else None
    if path is None:
        raise CheckpointError(
            f"pretrained weights of {name} are not in this machine's cache (runs never download them): expected "
            f"{where}; on a machine with internet run `{fetch_command(name)}` and copy its cache folder to {cache} "
            f"here, or set {key} False")
    return path


def timm_pretrained_file(model, name, key):
    """(cached weights file, timm's custom_load flag for it): the hub's files are state dicts; a URL-cache file
    keeps the loader timm's config names for it (e.g. a ViT's .npz)."""
    path = pretrained_weights_file(name, key)
    from_hub = os.path.abspath(path).startswith(os.path.abspath(hf_hub_cache()) + os.sep)
    return path, bool(_timm_cfg(model, name, key).custom_load) and not from_hub
