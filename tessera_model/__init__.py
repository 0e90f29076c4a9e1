"""TESSERA model: network, losses, sampling, quantisation, checkpoints, training and inference.

Pure torch/numpy/pydantic; knows nothing of tiles, storage or Prefect.
"""

from tessera_model.checkpoint import (
    FORMAT_VERSION,
    build_checkpoint,
    is_own_format,
    load_model,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tessera_model.constants import (
    S1_BANDS,
    S1_MEAN,
    S1_STD,
    S2_BANDS,
    S2_DN_OFFSET,
    S2_MEAN,
    S2_STD,
    decode_s1,
    encode_s1,
)
from tessera_model.data import ArrayShards, PixelShards, TrainingArrays
from tessera_model.errors import (
    CheckpointError,
    InputShapeError,
    SpecError,
    StateDictMismatchError,
    TesseraModelError,
)
from tessera_model.infer import auto_batch_size, embed_pixels
from tessera_model.infer_binned import embed_pixels_binned
from tessera_model.losses import barlow_twins_loss, cross_correlation, mix_regulariser
from tessera_model.model import TesseraModel, inference_state_dict
from tessera_model.quantise import dequantise, quantise
from tessera_model.sampling import sample_indices
from tessera_model.spec import PRESET_NAMES, ModelSpec
from tessera_model.train import TrainResult, TrainSettings, fit

__all__ = [
    "FORMAT_VERSION",
    "PRESET_NAMES",
    "S1_BANDS",
    "S1_MEAN",
    "S1_STD",
    "S2_BANDS",
    "S2_DN_OFFSET",
    "S2_MEAN",
    "S2_STD",
    "ArrayShards",
    "CheckpointError",
    "InputShapeError",
    "ModelSpec",
    "PixelShards",
    "SpecError",
    "StateDictMismatchError",
    "TesseraModel",
    "TesseraModelError",
    "TrainResult",
    "TrainSettings",
    "TrainingArrays",
    "auto_batch_size",
    "barlow_twins_loss",
    "build_checkpoint",
    "cross_correlation",
    "decode_s1",
    "dequantise",
    "embed_pixels",
    "embed_pixels_binned",
    "encode_s1",
    "fit",
    "inference_state_dict",
    "is_own_format",
    "load_model",
    "model_from_checkpoint",
    "mix_regulariser",
    "quantise",
    "read_checkpoint",
    "sample_indices",
    "save_checkpoint",
]
