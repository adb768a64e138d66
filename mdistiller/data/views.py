"""Several augmented views of each training image, for methods whose published code feeds extra copies.

A Distiller names a recipe in its class attribute `train_views`; the engine passes that name to build_dataloaders
(the data layer does not import distillers), and the training loader then yields images as a float tensor
B x V x C x H x W, normalised like the plain images; labels and index stay (B,), the test loader is unchanged.

  "weak_strong" (MLKD, V=2): view 0 the standard crop (padding 4) + flip, view 1 an independent crop + flip then
      RandAugment(2) + Cutout (randaugment.py), as MLKD's `get_cifar100_train_transform_strong`.
  "rotations4" (SSKD, V=4): view k = rot90(crop_k, k) counter-clockwise (torch.rot90 over (H, W), like
      np.rot90 on H x W x C), with the horizontal flip drawn once per image and each copy its own crop, as SSKD's
      cifar.py (flip on the raw array, rot90, then RandomCrop per copy).

In-memory datasets (InMemoryLoader): a recipe draws its random numbers for every position of the epoch's
permutation from the (seed, epoch) generator after the plain loader's crop/flip draws, so view 0 is the plain
loader's image, and resumed runs and any number of ranks see the same views. Folder datasets (FolderLoader): the
recipe wraps the dataset's own PIL transform (a Compose whose ops before ToTensor are the geometric part) and draws
from torch's RNG, which the loader seeds per sample as for plain batches.
"""

import torch
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..utils.errors import ConfigError, DataError
from .augment import crop_flip
from .randaugment import draw_params, rand_augment


class ViewRecipe:
    """How one image becomes `num_views` training views (see the module docstring)."""

    name = None
    num_views = 1

    def draw(self, n, generator, pad):
        """{name: CPU tensor with first dim n}: the random numbers of n positions, beyond the plain crop/flip."""
        raise NotImplementedError

    def tensor_views(self, images, shifts, flips, params, pad):
        """uint8 B x V x C x H x W from the uint8 batch, its plain crop `shifts`/`flips` and `params` (draw's rows)."""
        raise NotImplementedError

    def pil_views(self, image, transform):
        """float V x C x H x W from one PIL image and the dataset's training `transform` (torch's RNG, seeded)."""
        raise NotImplementedError


def split_transform(transform):
    """(geometric ops, finishing ops) of a torchvision Compose, cut at its first ToTensor / PILToTensor."""
    ops = getattr(transform, "transforms", None)
    finishers = (T.ToTensor, T.PILToTensor, v2.ToImage, v2.PILToTensor)
    cut = next((i for i, op in enumerate(ops or ()) if isinstance(op, finishers)), None)
    if cut is None:
        raise DataError(f"train views need the training transform as a torchvision Compose of PIL ops followed by "
                        f"ToTensor (+ Normalize); got {transform!r}")
    return list(ops[:cut]), T.Compose(ops[cut:])


class WeakStrong(ViewRecipe):
    name, num_views = "weak_strong", 2

    def draw(self, n, generator, pad):
        return {"shifts": torch.randint(0, 2 * pad + 1, (n, 2), generator=generator),
                "flips": torch.rand(n, generator=generator) < 0.5, **draw_params(n, generator)}

    def tensor_views(self, images, shifts, flips, params, pad):
        weak = crop_flip(images, shifts, flips, pad)
        strong = crop_flip(images, params["shifts"], params["flips"], pad)
        strong = rand_augment(strong, params["ops"], params["unit"], params["cutout"])
        return torch.stack([weak, strong], dim=1)

    def pil_views(self, image, transform):
        geometric, finish = split_transform(transform)
        weak = transform(image)  # first, so the weak view is what the plain loader gives for this sample
        strong = T.Compose(geometric)(image)
        strong = rand_augment(TF.pil_to_tensor(strong)[None], **draw_params(1))[0]
        return torch.stack([weak, finish(TF.to_pil_image(strong))])


class Rotations4(ViewRecipe):
    name, num_views = "rotations4", 4

    def draw(self, n, generator, pad):
        return {"shifts": torch.randint(0, 2 * pad + 1, (n, self.num_views - 1, 2), generator=generator)}

    def tensor_views(self, images, shifts, flips, params, pad):
        if images.shape[-1] != images.shape[-2]:
            raise DataError(f"train views 'rotations4' need square images, got {tuple(images.shape[-2:])}")
        crops = [shifts] + list(params["shifts"].unbind(1))  # view 0 takes the plain crop; one flip for all
        return torch.stack([torch.rot90(crop_flip(images, s, flips, pad), k, dims=(-2, -1))
                            for k, s in enumerate(crops)], dim=1)

    def pil_views(self, image, transform):
        geometric, finish = split_transform(transform)
        crop = T.Compose([op for op in geometric if not isinstance(op, (T.RandomHorizontalFlip,
                                                                        v2.RandomHorizontalFlip))])
        if torch.rand(1).item() < 0.5:
            image = TF.horizontal_flip(image)
        views = [torch.rot90(finish(crop(image)), k, dims=(-2, -1)) for k in range(self.num_views)]
        if views[0].shape[-1] != views[0].shape[-2]:
            raise DataError(f"train views 'rotations4' need square crops, got {tuple(views[0].shape[-2:])}")
        return torch.stack(views)


VIEW_RECIPES = {r.name: r for r in (WeakStrong(), Rotations4())}


def view_recipe(name):
    """The recipe registered as `name` (a Distiller's `train_views`); None for None."""
    if name is None:
        return None
    if name not in VIEW_RECIPES:
        raise ConfigError(f"train views '{name}' (a distiller's train_views) is not a view recipe; available: "
                          f"{', '.join(sorted(VIEW_RECIPES))} (mdistiller/data/views.py)")
    return VIEW_RECIPES[name]


class ViewTransform:
    """A dataset transform giving a recipe's stacked views of one PIL image (picklable for DataLoader workers)."""

    def __init__(self, recipe, transform):
        self.recipe, self.transform = recipe, transform
        split_transform(transform)  # refuse an unusable transform when the loader is built, not in a worker

    def __call__(self, image):
        return self.recipe.pil_views(image, self.transform)
