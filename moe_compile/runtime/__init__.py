"""What the compiled graphs call at run time besides the canonical op.

For ``parallel="aep"`` or ``"ep"``, on every rank:

- :mod:`.dist`: the process group, the world-size check before each call, errors
  with context when a rank dies or hangs, :func:`init_distributed`;
- :mod:`.shards`: each rank's slice of the expert weights, and the release of the
  full weights;
- :mod:`.ep`: what the AllToAll expert-parallel op ``moe_compile::moe_ep`` runs (the baseline).

:mod:`.expert_store`: experts kept off the device (``offload="cpu"``, host memory) or
sharded over the ranks (AEP with a predictor), brought into a ring of two device buffers
ahead or on demand. The ops themselves (schemas and fakes) are in :mod:`moe_compile.ops`.

AEP itself needs no op of its own: its graphs call PyTorch's functional
collectives (``_c10d_functional.all_gather_into_tensor_coalesced`` and
``wait_tensor``) and the canonical ``moe_compile::moe``. See docs/parallel.md.
AEP with a predictor uses the expert-store ops on a store whose source is
:class:`.expert_store.RanksSource` (the union over ranks of the wanted experts, all-gathered).
"""

from __future__ import annotations

from .dist import CollectiveError, World, WorldSizeMismatch, current_world, init_distributed

__all__ = ["CollectiveError", "World", "WorldSizeMismatch", "current_world", "init_distributed"]
