"""Drop-in replacements for the noise loops of existing ZO code (MeZO-derived trainers)."""

from .mezo_trainer import patch_mezo_trainer, unpatch_mezo_trainer

__all__ = ["patch_mezo_trainer", "unpatch_mezo_trainer"]
