"""The rank arithmetic of megagpt.parallel.state, without processes."""
import pytest

from megagpt.parallel import state
from megagpt.parallel.state import RankLayout


def test_tp_is_fastest_then_dp_then_pp():
    layout = RankLayout(world_size=8, tp=2, pp=2)
    assert layout.dp == 2
    assert [layout.coords(r) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert all(layout.rank(*layout.coords(r)) == r for r in range(8))


def test_groups_partition_the_world():
    layout = RankLayout(world_size=16, tp=2, pp=4)
    for groups, size in [(layout.tp_groups(), 2), (layout.pp_groups(), 4), (layout.dp_groups(), 2),
                         (layout.model_parallel_groups(), 8)]:
        assert sorted(r for g in groups for r in g) == list(range(16))
        assert all(len(g) == size for g in groups)
    assert layout.tp_groups()[0] == [0, 1]
    assert layout.dp_groups()[0] == [0, 2]
    assert layout.pp_groups()[0] == [0, 4, 8, 12]
    assert layout.embedding_groups()[0] == [0, 12]


def test_single_stage_embedding_group_is_one_rank():
    assert RankLayout(world_size=4, tp=2, pp=1).embedding_groups() == [[0], [1], [2], [3]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, tp=4, pp=1), "world_size=6 is not a multiple of tp x pp = 4 x 1"),
    (dict(world_size=4, tp=0, pp=1), "tp=0 must be at least 1"),
])
def test_bad_layouts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankLayout(**kwargs)


def test_getters_fail_clearly_before_initialisation():
    state.destroy_parallel()
    with pytest.raises(RuntimeError, match="parallel state is not initialised"):
        state.get_tensor_parallel_group()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        state.initialize_parallel(2, 1)


def test_a_ranks_place_in_the_layout():
    layout = RankLayout(world_size=16, tp=2, pp=4)
    stages = []
    for rank in (0, 5, 15):
        pp_ranks = next(g for g in layout.pp_groups() if rank in g)
        s = state.ParallelState(layout=layout, rank=rank, tp_group=None, dp_group=None,
                                pp_group=None, embedding_group=None, model_parallel_group=None,
                                pp_ranks=pp_ranks)
        stages.append((s.tp_rank, s.dp_rank, s.pp_rank, s.is_first_stage, s.is_last_stage))
        assert (s.tp_world_size, s.dp_world_size, s.pp_world_size) == (2, 2, 4)
    assert stages == [(0, 0, 0, True, False), (1, 0, 1, False, False), (1, 1, 3, False, True)]


def _getters(rank, world):
    ps = state.initialize_parallel(2, 2)
    got = [state.get_tensor_parallel_rank(), state.get_tensor_parallel_world_size(),
           state.get_data_parallel_rank(), state.get_data_parallel_world_size(),
           state.get_pipeline_parallel_rank(), state.get_pipeline_parallel_world_size()]
    groups = [state.get_tensor_parallel_group() is ps.tp_group,
              state.get_data_parallel_group() is ps.dp_group,
              state.get_pipeline_parallel_group() is ps.pp_group,
              state.get_embedding_group() is ps.embedding_group, state.get_state() is ps]
    return got, groups


def test_the_getters_give_this_ranks_place_and_groups():
    from megagpt.testing import run_distributed
    results = run_distributed(_getters, 8)
    assert [got for got, _ in results] == [
        [rank % 2, 2, rank // 2 % 2, 2, rank // 4, 2] for rank in range(8)]
    assert all(all(groups) for _, groups in results)
