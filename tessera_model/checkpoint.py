"""Checkpoint I/O: our format and the official TESSERA v1.0, v1.1 and v2 files, loaded strictly.

Our format (``format_version`` 1) is a dict::

    {"format_version": 1, "model_spec": ModelSpec.model_dump(), "model_state_dict": {...},
     ...optional training state: "optimizer_state_dict", "scheduler_state_dict", "step",
     "rng_state", "train_settings", "losses"}

The official files hold the weights under ``model_state`` or ``model_state_dict`` (keys may
carry the ``_orig_mod.`` prefix left by ``torch.compile``) and no spec: the v1 preset is
assumed unless another is named (``"v1.1"`` / ``"v1.1-aws"`` for the v1.1 encoders, whose
training-only ``projector.*`` and ``segmented_matryoshka_projector.*`` keys are dropped).

The official v2 student files (``shared/reference/tessera-v2.md`` section 5) hold the weights
under ``model`` (no prefix) and the training arguments under ``args``; the size is read from
``args`` (``latent_dim``, ``num_layers``, ``nhead``, ``dim_feedforward``, ``repr_dim``) and
checked against the tensor shapes, never taken from defaults (trap 7 of section 8).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from tessera_model.errors import CheckpointError, StateDictMismatchError
from tessera_model.model import PROJECTOR_PREFIX, TesseraModel, inference_state_dict
from tessera_model.spec import V2_SIZES, ModelSpec

FORMAT_VERSION = 1
_STATE_KEYS = ("model_state_dict", "model_state")
_STRIP_PREFIXES = ("_orig_mod.", "module.")
_TRAINING_ONLY_PREFIXES = (PROJECTOR_PREFIX, "segmented_matryoshka_projector.")
STUDENT_STATE_KEY = "model"
"""Top-level key of the weights in an official v2 student file."""
STUDENT_ARGS = ("latent_dim", "num_layers", "nhead", "dim_feedforward", "repr_dim")
"""``args`` entries that fix a student's architecture (heads cannot be read from shapes)."""

PathOrFile = str | os.PathLike[str] | IO[bytes]


def build_checkpoint(
    model: TesseraModel, inference_only: bool = True, **training_state: Any
) -> dict[str, Any]:
    """Assemble a checkpoint dict in our format.

    Args:
        model: the model; its ``spec`` is stored.
        inference_only: leave out the projector weights.
        **training_state: extra entries (optimizer state, step, ...).
    """
    state = inference_state_dict(model) if inference_only else model.state_dict()
    return {
        "format_version": FORMAT_VERSION,
        "model_spec": model.spec.model_dump(),
        "model_state_dict": state,
        **training_state,
    }


def save_checkpoint(obj: dict[str, Any], file: PathOrFile) -> None:
    """Save a checkpoint dict.

    A path is written atomically (temporary file in the same folder, then rename); a
    file-like object (e.g. an fsspec file) is written as given.
    """
    if hasattr(file, "write"):
        torch.save(obj, file)  # type: ignore[arg-type]
        return
    path = Path(file)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(
    file: PathOrFile, map_location: str | torch.device = "cpu", allow_pickle: bool = False
) -> dict[str, Any]:
    """Read a checkpoint dict from a path or a (possibly non-seekable) binary file object.

    Args:
        file: path or binary file object.
        map_location: device for the tensors.
        allow_pickle: allow arbitrary pickled objects (only for trusted files); by default
            only tensors and plain containers load (``weights_only=True``).
    """
    if hasattr(file, "read"):
        fh = file
        seekable = getattr(fh, "seekable", lambda: False)()
        source: Any = fh if seekable else io.BytesIO(fh.read())  # type: ignore[union-attr]
    else:
        source = os.fspath(file)  # type: ignore[arg-type]
    try:
        obj = torch.load(source, map_location=map_location, weights_only=not allow_pickle)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for bad or unsafe files
        raise CheckpointError(
            f"Expected a torch checkpoint{'' if allow_pickle else ' of tensors and plain data'}. "
            f"Could not read it: {exc}"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"Expected a dict at the checkpoint's top level. Got {type(obj)}.")
    return obj


def _extract_state(obj: dict[str, Any]) -> dict[str, Tensor]:
    for key in _STATE_KEYS:
        if key in obj:
            state = obj[key]
            break
    else:
        raise CheckpointError(
            f"Expected a top-level key in {list(_STATE_KEYS)}. Got keys {sorted(obj)}."
        )
    if not isinstance(state, dict):
        raise CheckpointError(f"Expected the model state to be a dict. Got {type(state)}.")
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        for prefix in _STRIP_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _layer_count(state: dict[str, Tensor], prefix: str) -> int:
    layers = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return len(layers)


def student_spec(args: Any, state: dict[str, Tensor]) -> ModelSpec:
    """The spec of an official v2 student file from its ``args``, checked against shapes.

    Args:
        args: the file's ``args`` (a dict; an ``argparse.Namespace`` is read with ``vars``).
        state: its state dict (``model``).

    Returns:
        The matching ``v2-{size}`` preset, or a spec of the same family for another size.

    Raises:
        CheckpointError: an ``args`` entry missing, QK-norm enabled, or an entry that the
            tensor shapes contradict (names the entry and both values).
    """
    if args is not None and not isinstance(args, dict):
        args = vars(args) if hasattr(args, "__dict__") else None
    if not isinstance(args, dict):
        raise CheckpointError(
            "Expected a dict 'args' in the v2 student checkpoint (the size is read from it). "
            f"Got {type(args).__name__}."
        )
    missing = [k for k in STUDENT_ARGS if k not in args]
    if missing:
        raise CheckpointError(
            f"Expected args {list(STUDENT_ARGS)} in the v2 student checkpoint. Missing: "
            f"{missing} (the reference would silently build the small size)."
        )
    if str(args.get("enable_qk_norm", False)).lower() in ("true", "1"):
        raise CheckpointError("Expected args enable_qk_norm false (official students). Got true.")
    want = {k: int(args[k]) for k in STUDENT_ARGS}
    emb = "s2_backbone.embedding.0.weight"
    lin1 = "s2_backbone.transformer_encoder.layers.0.linear1.weight"
    head = "dim_reducer.4.weight"
    for key in (emb, lin1, head):
        if key not in state:
            raise CheckpointError(f"Expected key {key!r} in the v2 student state dict. Got none.")
    shapes = {
        "latent_dim": int(state[emb].shape[0]) // 4,
        "num_layers": _layer_count(state, "s2_backbone.transformer_encoder.layers."),
        "dim_feedforward": int(state[lin1].shape[0]),
        "repr_dim": int(state[head].shape[0]),
    }
    for k, v in shapes.items():
        if want[k] != v:
            raise CheckpointError(
                f"Expected args {k}={want[k]} to fit the tensor shapes. Got shapes that say {v}."
            )
    dims = (want["latent_dim"], want["num_layers"], want["nhead"], want["dim_feedforward"])
    for size, preset_dims in V2_SIZES.items():
        if dims == preset_dims and want["repr_dim"] == 128:
            return ModelSpec.preset(f"v2-{size}")
    return ModelSpec.preset("v2-small").model_copy(
        update={
            "version": f"v2.0-L{dims[0]}",
            "size": f"L{dims[0]}",
            "d_model": 4 * dims[0],
            "n_layers": dims[1],
            "n_heads": dims[2],
            "ffn_dim": dims[3],
            "latent_dim": want["repr_dim"],
            "embed_dim": want["repr_dim"],
        }
    )


def check_state_dict(expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    """Raise :class:`StateDictMismatchError` naming every missing/unexpected/mis-shaped key."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = {
        k: (tuple(expected[k].shape), tuple(found[k].shape))
        for k in expected
        if k in found and tuple(expected[k].shape) != tuple(found[k].shape)
    }
    if missing or unexpected or shapes:
        raise StateDictMismatchError(missing, unexpected, shapes)


def load_model(
    file_or_path: PathOrFile,
    preset: str | None = None,
    inference_only: bool = True,
    map_location: str | torch.device = "cpu",
    allow_pickle: bool = False,
    spec: ModelSpec | None = None,
) -> tuple[TesseraModel, ModelSpec]:
    """Load a model from our checkpoint format or an official TESSERA file.

    Args:
        file_or_path: path or binary file object (fsspec files work).
        preset: spec to use when the file stores none (official v1.0/v1.1 files; default
            ``"v1"``); if the file stores or implies a spec (ours, or a v2 student's ``args``)
            that differs from this preset, :class:`CheckpointError` is raised.
        inference_only: build without the projector and ignore ``projector.*`` keys; the
            model is returned in eval mode. Otherwise the projector must be present.
        map_location: device to load onto.
        allow_pickle: see :func:`read_checkpoint`.
        spec: the spec of an official v1.0/v1.1 file of a size no preset names (instead of
            ``preset``).

    Returns:
        ``(model, spec)``.

    Raises:
        StateDictMismatchError: missing, unexpected or mis-shaped keys (all named).
        CheckpointError: unreadable file or unknown layout.
    """
    obj = read_checkpoint(file_or_path, map_location=map_location, allow_pickle=allow_pickle)
    return model_from_checkpoint(obj, preset, inference_only, map_location, spec)


def is_own_format(obj: dict[str, Any]) -> bool:
    """Whether a checkpoint dict is in our format (it stores its ``model_spec``)."""
    return "model_spec" in obj


def model_from_checkpoint(
    obj: dict[str, Any],
    preset: str | None = None,
    inference_only: bool = True,
    map_location: str | torch.device = "cpu",
    spec: ModelSpec | None = None,
) -> tuple[TesseraModel, ModelSpec]:
    """Build and strictly load a model from a checkpoint dict (:func:`load_model`'s rules)."""
    version = obj.get("format_version")
    if version is not None and version != FORMAT_VERSION:
        raise CheckpointError(
            f"Expected checkpoint format_version {FORMAT_VERSION}. Got {version!r} "
            "(written by another version of tessera_model)."
        )
    given = spec
    student = "model_spec" not in obj and STUDENT_STATE_KEY in obj
    if student:
        state = obj[STUDENT_STATE_KEY]
        if not isinstance(state, dict):
            raise CheckpointError(f"Expected the model state to be a dict. Got {type(state)}.")
        spec = student_spec(obj.get("args"), state)
    elif "model_spec" in obj:
        spec = ModelSpec.model_validate(obj["model_spec"])
        state = _extract_state(obj)
    else:
        spec = given or ModelSpec.preset(preset or "v1")
        state = _extract_state(obj)
    if given is None and preset is not None and ModelSpec.preset(preset) != spec:
        got = spec.model_dump(include={"version", "family", "d_model", "n_layers", "ffn_dim"})
        raise CheckpointError(
            f"Expected a checkpoint of preset {preset!r} "
            f"({ModelSpec.preset(preset).version}). Got a file of {got}."
        )
    if spec.family != "v1.0":
        state = {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY_PREFIXES)}
    if inference_only:
        state = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    model = TesseraModel(spec, with_projector=not inference_only)
    check_state_dict(model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    if inference_only:
        model.eval()
    return model.to(map_location), spec
