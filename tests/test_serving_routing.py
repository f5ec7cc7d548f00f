"""Prefix cache structure, shared-prefix planning, true-FLOPs costs and prefix-aware routing."""

import pytest

from moe_compile.serving import FlopsModel, Router, simulate
from moe_compile.serving.batching import Row, collate, plan_batches
from moe_compile.serving.prefix_cache import BlockStore, shared_prefixes
from moe_compile.serving.workload import synthetic_prompts
from moe_compile.testing import zoo


@pytest.fixture(scope="module")
def flops():
    return FlopsModel.from_model(zoo.build("qwen3_moe"))


# -- prefix cache ------------------------------------------------------------------------------------------------


def test_block_store_matches_whole_blocks_up_to_the_limit():
    store = BlockStore(capacity_tokens=64, block_size=4)
    store.insert(list(range(10)), ["b0", "b1"])  # 10 tokens: two whole blocks
    assert [v for _, v in store.match(list(range(12)))] == ["b0", "b1"]
    assert [v for _, v in store.match(list(range(12)), limit=7)] == ["b0"]
    assert store.match([0, 1, 2, 9, 4, 5, 6, 7]) == []  # differs inside the first block
    assert [v for _, v in store.match([0, 1, 2, 3, 9, 9, 9, 9])] == ["b0"]


def test_block_store_evicts_leaves_first_and_keeps_chains_whole():
    store = BlockStore(capacity_tokens=3 * 2, block_size=2)  # three blocks
    store.insert([1, 1, 2, 2], ["a0", "a1"])
    store.insert([1, 1, 3, 3], ["b1"], first_block=1)  # shares block 0 with the first prompt
    assert len(store) == 3
    store.match([1, 1, 3, 3])  # b is now more recent than a's leaf
    store.insert([5, 5], ["c0"])  # over capacity: the least recent leaf (a1) goes, not the shared root
    assert len(store) == 3 and store.evicted_blocks == 1
    assert [v for _, v in store.match([1, 1, 2, 2])] == ["a0"]
    assert [v for _, v in store.match([1, 1, 3, 3])] == ["a0", "b1"]


def test_insert_after_an_evicted_prefix_is_dropped():
    store = BlockStore(capacity_tokens=2, block_size=2)
    store.insert([1, 1], ["a0"])
    store.insert([2, 2], ["b0"])  # evicts a0
    store.insert([1, 1, 4, 4], ["a1"], first_block=1)  # its parent is gone: nothing to chain to
    assert store.match([1, 1, 4, 4]) == [] and len(store) == 1


def test_shared_prefixes_are_the_branch_points_in_waves():
    store = BlockStore(capacity_tokens=1000, block_size=2)
    root = [7, 7, 8, 8]
    prompts = [root + [1, 1, 5], root + [1, 1, 6], root + [2, 2, 9], [3, 3, 3]]
    waves = shared_prefixes(prompts, [len(p) - 1 for p in prompts], store)
    # the root (shared by all three) first, then the 3-block prefix that the first two share
    assert waves == [[root], [root + [1, 1]]]
    store.insert(root, [None, None])
    assert shared_prefixes(prompts, [len(p) - 1 for p in prompts], store) == [[root + [1, 1]]]


def test_plan_and_collate_pad_right_with_prefix_slots():
    import torch

    kv = [(torch.ones(1, 4, 2), torch.ones(1, 4, 3))]  # one layer, Hkv=1, 4 cached tokens
    rows = [Row([5, 6, 7, 8, 9, 10], cached=4, prefix=kv), Row([1, 2, 3])]
    assert plan_batches(rows, token_budget=6) == [[0, 1]]
    batch = collate(rows, pad_id=0, kv_template=kv)
    assert batch.input_ids.tolist() == [[9, 10, 0], [1, 2, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[4, 5, 5], [0, 1, 2]]
    k, v = batch.past[0]
    assert k.shape == (2, 1, 4, 2) and v.shape == (2, 1, 4, 3)
    assert k[0].sum() == 8 and k[1].sum() == 0


# -- FLOPs and routing -------------------------------------------------------------------------------------------


def test_flops_model_counts_active_experts_and_the_quadratic_term(flops):
    # qwen3_moe zoo: 2 layers, hidden 32, 2 query heads of 16, 1 KV head, 8 experts of 16, top-2, vocab 128
    attention = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 2 * 16  # q, k, v, o projections; q/k norms
    router_and_norms = 8 * 32 + 2 * 32
    assert flops.dense_params == 2 * (attention + router_and_norms)
    assert flops.expert_params == 2 * 2 * (2 * 16 * 32 + 32 * 16)  # layers * top-k * (gate_up + down)
    assert flops.pair_flops == 2 * 2 * (16 + 16) and flops.attn_layers == 2
    assert flops.cost(4) == 4 * flops.token_flops + 2 * flops.pair_flops * (1 + 2 + 3 + 4)
    # 4 new tokens after 10 cached: each attends to the 10 cached keys too
    assert flops.cost(4, cached=10) - flops.cost(4) == 2 * flops.pair_flops * 4 * 10
    assert FlopsModel.from_config(zoo.build("qwen3_moe").config) == flops


def test_router_prefers_the_prefix_rank_until_it_is_too_loaded(flops):
    router = Router(2, flops, block_size=4, slack=0.5)
    prefix = list(range(3, 43))  # 40 tokens
    first = router.assign(prefix + [50], limit=40)
    second = router.assign(prefix + [51], limit=40)
    assert second.rank == first.rank and second.cached_tokens == 40
    assert second.flops < first.flops
    spill = [router.assign(prefix + [60 + i] * 30, limit=40) for i in range(8)]
    assert {a.rank for a in spill} == {0, 1}  # long suffixes overload the prefix rank: some spill to the other
    loads = router.result().flops
    assert max(loads) <= 1.5 * min(loads) + max(a.flops for a in spill)  # balanced within the slack


@pytest.mark.parametrize("world_size", [2, 4])
def test_prefix_flops_routing_beats_round_robin_and_token_balancing(flops, world_size):
    prompts = synthetic_prompts(400, 128, families=8, prefix_len=(64, 512), suffix_len=(8, 256), seed=0)
    results = {
        policy: simulate(prompts, flops, world_size, policy) for policy in ("prefix_flops", "round_robin", "tokens")
    }
    ours = results.pop("prefix_flops")
    for policy, other in results.items():
        assert ours.computed_flops < other.computed_flops, policy
        assert ours.makespan() < other.makespan(), policy
        assert sum(ours.cached_tokens) > sum(other.cached_tokens), policy


def test_makespan_uses_rank_throughput():
    from moe_compile.serving import RoutingResult

    result = RoutingResult(flops=[10.0, 30.0], tokens=[1, 1], cached_tokens=[0, 0], requests=[1, 1])
    assert result.makespan() == 30.0 and result.makespan([1.0, 3.0]) == 10.0
    with pytest.raises(ValueError, match="2 ranks"):
        result.makespan([1.0])


def test_router_rejects_bad_settings(flops):
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router(2, flops, policy="random")
    with pytest.raises(ValueError, match="world_size"):
        Router(0, flops)
