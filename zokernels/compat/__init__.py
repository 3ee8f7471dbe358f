"""Drop-in replacements for the noise loops of existing ZO code (MeZO-derived trainers)."""

from .mezo_trainer import patch_mezo_trainer, unpatch_mezo_trainer
from .protocol import MeZOProtocolError, protocol_findings

__all__ = ["MeZOProtocolError", "patch_mezo_trainer", "protocol_findings", "unpatch_mezo_trainer"]
