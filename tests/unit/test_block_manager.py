"""BlockManager without a model: block ids, refcounts, eviction order and the prefix cache.

Every scenario uses block_size 4 and ends by freeing all its requests and checking the pool is whole.
"""

from __future__ import annotations

from pdserve.engine.block_manager import BlockManager, block_hash
from pdserve.engine.request import Request
from pdserve.engine.sampling import SamplingParams

BS = 4


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams())


def assert_pool_free(bm: BlockManager) -> None:
    """Once every request is freed: all blocks free, unreferenced, and each in the free queue once."""
    assert bm.num_free_blocks == bm.num_blocks
    assert [b.ref_count for b in bm.blocks] == [0] * bm.num_blocks
    assert sorted(bm.free_queue) == list(range(bm.num_blocks))


def admit(bm: BlockManager, request: Request) -> list[int]:
    """What the scheduler does for a waiting request: reuse the cached prefix, allocate the rest."""
    computed = bm.get_computed_blocks(request)
    num_cached = len(computed) * BS
    assert bm.allocate(request, request.num_tokens - num_cached, computed)
    request.num_computed_tokens = num_cached
    return computed


def compute(bm: BlockManager, request: Request) -> None:
    """Pretend the model ran over every known token, then register the full blocks."""
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request)


def run_and_free(bm: BlockManager, request: Request) -> list[int]:
    """Admit, compute and free a request; returns the block ids it held."""
    admit(bm, request)
    compute(bm, request)
    block_ids = list(request.block_ids)
    bm.free(request)
    return block_ids


# --- allocation ---------------------------------------------------------------------------------------


def test_allocate_hands_out_block_ids_in_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))
    b = make_request("b", list(range(100, 104)))
    assert bm.allocate(a, 10)
    assert bm.allocate(b, 4)
    assert a.block_ids == [0, 1, 2]
    assert b.block_ids == [3]
    assert bm.num_free_blocks == 4
    assert [blk.ref_count for blk in bm.blocks] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert list(bm.free_queue) == [4, 5, 6, 7]
    bm.free(a)
    bm.free(b)
    assert_pool_free(bm)


def test_allocate_grows_block_table_only_at_block_boundaries() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    r = make_request("r", list(range(6)))
    assert bm.allocate(r, 3)
    assert r.block_ids == [0]
    r.num_computed_tokens = 3
    assert bm.allocate(r, 1)
    assert r.block_ids == [0]
    r.num_computed_tokens = 4
    assert bm.allocate(r, 1)
    assert r.block_ids == [0, 1]
    assert bm.num_free_blocks == 2
    bm.free(r)
    assert_pool_free(bm)


def test_allocate_exactly_the_remaining_blocks_succeeds() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    r = make_request("r", list(range(12)))
    assert bm.can_allocate(r, 12)
    assert bm.allocate(r, 12)
    assert r.block_ids == [0, 1, 2]
    assert bm.num_free_blocks == 0
    assert bm.usage == 1.0
    bm.free(r)
    assert_pool_free(bm)
    assert bm.usage == 0.0


def test_allocate_when_short_returns_false_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(12)))
    b = make_request("b", list(range(100, 108)))
    assert bm.allocate(a, 12)
    assert not bm.can_allocate(b, 8)
    assert not bm.allocate(b, 8)
    assert b.block_ids == []
    assert a.block_ids == [0, 1, 2]
    assert list(bm.free_queue) == [3]
    assert [blk.ref_count for blk in bm.blocks] == [1, 1, 1, 0]
    assert bm.can_allocate(b, 4)
    bm.free(a)
    assert_pool_free(bm)


# --- free and eviction order --------------------------------------------------------------------------


def test_free_returns_blocks_to_the_pool() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    r = make_request("r", list(range(9)))
    assert bm.allocate(r, 9)
    bm.free(r)
    assert r.block_ids == []
    assert_pool_free(bm)


def test_free_twice_is_a_no_op() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    r = make_request("r", list(range(9)))
    assert bm.allocate(r, 9)
    bm.free(r)
    bm.free(r)
    assert_pool_free(bm)


def test_free_puts_hashed_tail_blocks_first_in_eviction_order() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    r = make_request("r", list(range(12)))
    admit(bm, r)
    compute(bm, r)
    assert [bm.blocks[i].hash is not None for i in r.block_ids] == [True, True, True]
    bm.free(r)
    # Untouched blocks first, then r's blocks tail first: the block deepest in the prefix goes last.
    assert list(bm.free_queue) == [3, 4, 5, 2, 1, 0]
    assert_pool_free(bm)


def test_free_puts_unhashed_blocks_in_front_of_hashed_ones() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    r = make_request("r", list(range(10)))  # blocks 0 and 1 full, block 2 holds 2 tokens
    admit(bm, r)
    compute(bm, r)
    assert [bm.blocks[i].hash is not None for i in r.block_ids] == [True, True, False]
    bm.free(r)
    assert list(bm.free_queue) == [2, 3, 4, 5, 1, 0]
    assert_pool_free(bm)


def test_free_puts_all_unhashed_blocks_before_untouched_ones() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    r = make_request("r", list(range(12)))
    assert bm.allocate(r, 12)
    r.num_computed_tokens = 12
    bm.cache_full_blocks(r)  # prefix caching off: nothing gets a hash
    bm.free(r)
    queue = list(bm.free_queue)
    assert set(queue[:3]) == {0, 1, 2}
    assert queue[3:] == [3, 4, 5]
    assert_pool_free(bm)


# --- prefix caching: hashes and hits ------------------------------------------------------------------


def test_update_hashes_chains_each_full_block_to_its_parent() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_request("r", list(range(10)))
    bm.update_hashes(r)
    h0 = block_hash(None, [0, 1, 2, 3])
    h1 = block_hash(h0, [4, 5, 6, 7])
    assert r.block_hashes == [h0, h1]
    r.append_token(10)
    r.append_token(11)
    bm.update_hashes(r)
    assert r.block_hashes == [h0, h1, block_hash(h1, [8, 9, 10, 11])]


def test_cache_full_blocks_registers_only_computed_full_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_request("r", list(range(10)))
    admit(bm, r)
    r.num_computed_tokens = 7  # a prefill chunk of 7: only block 0 is full and computed
    bm.cache_full_blocks(r)
    assert bm.cached == {r.block_hashes[0]: 0}
    assert bm.blocks[0].token_ids == (0, 1, 2, 3)
    assert bm.blocks[1].hash is None
    r.num_computed_tokens = 10
    bm.cache_full_blocks(r)
    assert bm.cached == {r.block_hashes[0]: 0, r.block_hashes[1]: 1}
    assert bm.blocks[1].token_ids == (4, 5, 6, 7)
    assert bm.blocks[2].hash is None
    bm.free(r)
    assert_pool_free(bm)


def test_prefix_hit_after_cache_full_blocks_and_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    assert run_and_free(bm, a) == [0, 1, 2]
    b = make_request("b", list(range(8)) + [99])
    assert admit(bm, b) == [0, 1]
    # Block 2 (a's unhashed tail) was put first in line, so it is the one handed out again.
    assert b.block_ids == [0, 1, 2]
    assert b.num_computed_tokens == 8
    assert [blk.ref_count for blk in bm.blocks[:3]] == [1, 1, 1]
    bm.free(b)
    assert_pool_free(bm)


def test_prefix_hit_stops_at_first_differing_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_and_free(bm, make_request("a", list(range(13))))
    b = make_request("b", [0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12])
    assert bm.get_computed_blocks(b) == [0]
    c = make_request("c", [99, 1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.get_computed_blocks(c) == []
    assert_pool_free(bm)


def test_same_block_tokens_under_different_parent_do_not_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_and_free(bm, a)
    b = make_request("b", [0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert bm.get_computed_blocks(b) == []
    assert b.block_hashes[1] != a.block_hashes[1]
    assert b.block_hashes[1] not in bm.cached
    assert_pool_free(bm)


def test_hash_collision_with_different_tokens_does_not_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_and_free(bm, make_request("a", [1, 2, 3, 4, 5]))
    b = make_request("b", [9, 9, 9, 9, 5])
    bm.update_hashes(b)
    bm.cached[b.block_hashes[0]] = 0  # pretend b's first block hashes to a's block 0
    assert bm.get_computed_blocks(b) == []
    assert_pool_free(bm)


def test_tampered_block_tokens_do_not_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_and_free(bm, a)
    bm.blocks[1].token_ids = (5, 6, 7, 99)
    again = make_request("again", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.get_computed_blocks(again) == [0]
    assert_pool_free(bm)


def test_hash_collision_with_same_tokens_but_different_prefix_does_not_hit() -> None:
    """A colliding chained hash must not hand out a block whose KV was computed after another prefix.

    Block y holds tokens 5..8 computed after the prefix 9 9 9 9; b asks for tokens 5..8 after 1 2 3 4.
    Comparing only the block's own tokens cannot tell the two apart.
    """
    bm = BlockManager(num_blocks=8, block_size=BS)
    c = make_request("c", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    y = run_and_free(bm, c)[1]
    x = run_and_free(bm, make_request("a", [1, 2, 3, 4, 0]))[0]
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    bm.update_hashes(b)
    del bm.cached[c.block_hashes[1]]  # pretend hash((h_b0, (5,6,7,8))) == hash((h_c0, (5,6,7,8)))
    bm.cached[b.block_hashes[1]] = y
    bm.blocks[y].hash = b.block_hashes[1]
    assert bm.get_computed_blocks(b) == [x]
    assert_pool_free(bm)


def test_fully_cached_prompt_leaves_last_block_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_and_free(bm, make_request("a", list(range(12))))
    again = make_request("again", list(range(12)))
    assert bm.get_computed_blocks(again) == [0, 1]
    assert admit(bm, again) == [0, 1]
    assert again.num_computed_tokens == 8
    assert again.num_tokens - again.num_computed_tokens == 4
    assert again.block_ids == [0, 1, 3]
    bm.free(again)
    assert_pool_free(bm)


def test_prompt_one_token_past_cached_blocks_hits_them_all() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_and_free(bm, make_request("a", list(range(8))))
    longer = make_request("longer", list(range(9)))
    assert bm.get_computed_blocks(longer) == [0, 1]
    assert_pool_free(bm)


def test_shared_prefix_has_refcount_two_while_both_requests_live() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(bm, a)
    compute(bm, a)
    b = make_request("b", list(range(8)) + [50, 51])
    assert admit(bm, b) == [0, 1]
    assert a.block_ids == [0, 1, 2]
    assert b.block_ids == [0, 1, 3]
    assert [blk.ref_count for blk in bm.blocks[:4]] == [2, 2, 1, 1]
    assert bm.num_free_blocks == 4
    bm.free(a)
    assert [blk.ref_count for blk in bm.blocks[:4]] == [1, 1, 0, 1]
    assert list(bm.free_queue) == [2, 4, 5, 6, 7]
    bm.free(b)
    assert_pool_free(bm)


def test_duplicate_content_blocks_keep_the_first_cache_entry() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    b = make_request("b", list(range(9)))
    admit(bm, a)
    admit(bm, b)  # both admitted before either is computed: no hit
    compute(bm, a)
    compute(bm, b)
    assert b.block_ids == [3, 4, 5]
    assert bm.cached == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    bm.free(b)
    # Evicting b's duplicates must not drop a's cache entries.
    filler = make_request("filler", list(range(100, 120)))
    assert bm.allocate(filler, 20)
    assert filler.block_ids == [5, 6, 7, 4, 3]
    bm.free(filler)
    bm.free(a)
    probe = make_request("probe", list(range(9)))
    assert bm.get_computed_blocks(probe) == [0, 1]
    assert_pool_free(bm)


# --- prefix caching: eviction, revival, reset ---------------------------------------------------------


def test_lru_evicts_the_earliest_freed_cached_block_and_forgets_its_hash() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_request("a", [1, 1, 1, 1])
    b = make_request("b", [2, 2, 2, 2])
    c = make_request("c", [3, 3, 3, 3])
    assert run_and_free(bm, a) == [0]
    assert run_and_free(bm, b) == [1]
    assert run_and_free(bm, c) == [2]
    assert list(bm.free_queue) == [0, 1, 2]
    new = make_request("new", [7, 7, 7, 7])
    assert bm.allocate(new, 4)
    assert new.block_ids == [0]
    assert bm.blocks[0].hash is None
    assert bm.blocks[0].token_ids == ()
    assert a.block_hashes[0] not in bm.cached
    assert bm.get_computed_blocks(make_request("a2", [1, 1, 1, 1, 0])) == []
    assert bm.get_computed_blocks(make_request("b2", [2, 2, 2, 2, 0])) == [1]
    bm.free(new)
    assert_pool_free(bm)


def test_cache_hit_moves_block_to_back_of_eviction_order() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    run_and_free(bm, make_request("a", [1, 1, 1, 1]))
    run_and_free(bm, make_request("b", [2, 2, 2, 2]))
    assert list(bm.free_queue) == [2, 0, 1]
    a2 = make_request("a2", [1, 1, 1, 1, 0])
    assert admit(bm, a2) == [0]
    assert a2.block_ids == [0, 2]
    bm.free(a2)
    assert list(bm.free_queue) == [2, 1, 0]
    filler = make_request("filler", list(range(100, 108)))
    assert bm.allocate(filler, 8)
    assert filler.block_ids == [2, 1]  # b's block goes before the recently used a
    assert bm.get_computed_blocks(make_request("a3", [1, 1, 1, 1, 0])) == [0]
    bm.free(filler)
    assert_pool_free(bm)


def test_can_allocate_counts_revived_cached_blocks() -> None:
    bm = BlockManager(num_blocks=5, block_size=BS)
    prefix = list(range(8))
    assert run_and_free(bm, make_request("a", prefix + [8])) == [0, 1, 2]
    other = make_request("other", [100, 101, 102, 103])
    assert bm.allocate(other, 4)
    assert other.block_ids == [2]
    assert list(bm.free_queue) == [3, 4, 1, 0]
    # 17 tokens: 2 cached blocks (free, ref 0) + 3 new blocks = 5 taken from a free queue of 4.
    too_big = make_request("too_big", prefix + [7] * 9)
    computed = bm.get_computed_blocks(too_big)
    assert computed == [0, 1]
    assert not bm.can_allocate(too_big, 9, computed)
    assert not bm.allocate(too_big, 9, computed)
    assert too_big.block_ids == []
    assert list(bm.free_queue) == [3, 4, 1, 0]
    assert [blk.ref_count for blk in bm.blocks] == [0, 0, 1, 0, 0]
    # 13 tokens: 2 revived + 2 new = 4 fits exactly.
    fits = make_request("fits", prefix + [7] * 5)
    computed = bm.get_computed_blocks(fits)
    assert bm.can_allocate(fits, 5, computed)
    assert bm.allocate(fits, 5, computed)
    assert fits.block_ids == [0, 1, 3, 4]
    assert bm.num_free_blocks == 0
    bm.free(fits)
    bm.free(other)
    assert_pool_free(bm)


def test_can_allocate_does_not_count_shared_live_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(bm, a)
    compute(bm, a)
    assert bm.num_free_blocks == 1
    b = make_request("b", list(range(8)) + [50])
    computed = bm.get_computed_blocks(b)
    assert computed == [0, 1]
    assert bm.can_allocate(b, 1, computed)
    assert bm.allocate(b, 1, computed)
    assert b.block_ids == [0, 1, 3]
    assert bm.num_free_blocks == 0
    bm.free(a)
    bm.free(b)
    assert_pool_free(bm)


def test_reset_prefix_cache_forgets_free_blocks_and_keeps_live_ones() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    old = make_request("old", list(range(100, 109)))
    assert run_and_free(bm, old) == [0, 1, 2]
    live = make_request("live", list(range(9)))
    admit(bm, live)
    compute(bm, live)
    assert live.block_ids == [2, 3, 4]
    bm.reset_prefix_cache()
    assert bm.cached == {live.block_hashes[0]: 2, live.block_hashes[1]: 3}
    assert bm.blocks[0].hash is None and bm.blocks[1].hash is None
    assert bm.blocks[0].token_ids == () and bm.blocks[1].token_ids == ()
    assert bm.get_computed_blocks(make_request("old2", list(range(100, 109)))) == []
    assert bm.get_computed_blocks(make_request("live2", list(range(9)))) == [2, 3]
    bm.free(live)
    assert_pool_free(bm)


def test_prefix_caching_disabled_never_hashes_or_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    assert bm.allocate(a, 9)
    compute(bm, a)
    assert bm.cached == {}
    assert all(blk.hash is None for blk in bm.blocks)
    bm.free(a)
    assert bm.get_computed_blocks(make_request("b", list(range(9)))) == []
    assert_pool_free(bm)


def test_cache_full_blocks_visits_each_block_once_per_allocation() -> None:
    """Registration resumes where it stopped (a step costs the blocks that filled, not the whole
    context), and starts over once the request's blocks are freed (preemption by recompute)."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    admit(bm, r)
    compute(bm, r)
    assert r.num_registered_blocks == 2
    first = [bm.blocks[b].hash for b in r.block_ids[:2]]
    bm.blocks[r.block_ids[0]].hash = None  # were block 0 visited again, it would get its hash back
    for t in (10, 11):  # two decode steps fill block 2
        r.append_token(t)
        assert bm.allocate(r, 1)
        compute(bm, r)
    assert r.num_registered_blocks == 3 and bm.blocks[r.block_ids[0]].hash is None
    assert bm.blocks[r.block_ids[2]].hash == block_hash(first[1], [8, 9, 10, 11])
    bm.free(r)  # preempted: its next allocation registers from block 0 again
    assert r.num_registered_blocks == 0
    r.num_computed_tokens = 0
    admit(bm, r)
    compute(bm, r)
    assert r.num_registered_blocks == 3 and all(bm.blocks[b].hash is not None for b in r.block_ids[:3])
    bm.free(r)
    assert_pool_free(bm)
