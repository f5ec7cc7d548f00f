"""Loading checkpoints onto their device: whole, or each rank's expert shards only.

- :func:`load_model` (:mod:`.model`): a transformers checkpoint directory as a model on its
  device and dtype, ready for :class:`moe_compile.serving.PrefillEngine` or
  ``torch.compile(model, backend="moe_prefill")``; with ``parallel="aep"``/``"ep"`` each rank
  reads only its 1/W of every expert tensor.
- :mod:`.checkpoint`: the safetensors files (:class:`Checkpoint`), which parameters are expert
  tensors (:func:`expert_parameters`), where each comes from (:func:`sources`), reading a rank's
  rows by ``safe_open(...).get_slice``.
"""

from .checkpoint import Checkpoint, CheckpointError, Source, expert_parameters, sources
from .model import LoadInfo, load_model

__all__ = ["Checkpoint", "CheckpointError", "LoadInfo", "Source", "expert_parameters", "load_model", "sources"]
