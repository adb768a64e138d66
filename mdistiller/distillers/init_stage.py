"""Methods with a stage before distillation in the same run (FSP's and AB's initialisation, FT's paraphraser, SSKD's
teacher head): epochs 1..INIT_EPOCHS of the method's config section run the stage, the rest distil. The epoch test,
the INIT_EPOCHS checks, the refusal of a CUDA-graph capture (whose terms would change mid-run) and the note to DDP
that each stage leaves some parameters without a gradient live here once."""

from ..utils.errors import ConfigError
from .base import Distiller


class InitStageDistiller(Distiller):
    """A subclass sets `self.init_epochs` and names its section, the stage, the published stage length (run before
    the 240-epoch CIFAR recipe) and what changes when the stage ends."""

    init_section = None  # the config section holding INIT_EPOCHS
    init_stage = "initialisation stage"
    published_init_epochs = 30
    init_stage_changes = "the loss terms change"

    @classmethod
    def validate_init_epochs(cls, cfg):
        n, epochs, pub = cfg[cls.init_section].INIT_EPOCHS, cfg.SOLVER.EPOCHS, cls.published_init_epochs
        key = f"config key {cls.init_section}.INIT_EPOCHS"
        if n < 0:
            raise ConfigError(f"{key}: must be >= 0, got {n} ({pub} is the published {cls.init_stage}, 0 none)")
        if n >= epochs:
            raise ConfigError(f"{key}: {n} leaves no epoch after the {cls.init_stage} in SOLVER.EPOCHS {epochs}; the "
                              f"published recipe is INIT_EPOCHS {pub} with SOLVER.EPOCHS {pub + 240} ({pub} + 240)")

    def in_init_stage(self, epoch):
        return epoch <= self.init_epochs

    def prepare_capture(self):
        if self.init_epochs > 0:
            return f"{self.init_section}.INIT_EPOCHS: {self.init_stage_changes} when the {self.init_stage} ends"
        return super().prepare_capture()

    def unused_parameters(self):
        # Also with INIT_EPOCHS 0, where FT's paraphraser and SSKD's teacher head get no gradient at all (FSP's and
        # AB's one-stage variants reach every parameter: declaring it costs them DDP's search, not correctness).
        return f"{type(self).__name__}'s {self.init_stage} and the stage after it train different parameters"
