"""Models: the log-mel front end, SimplifiedModel (one frame) and SequenceModel (all frames)."""

from model.features import LogMel
from model.models import SequenceModel, SimplifiedModel, build_model

__all__ = ["LogMel", "SimplifiedModel", "SequenceModel", "build_model"]
