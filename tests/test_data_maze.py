"""Maze task: generator invariants, dist_min (B10), path_correct / path_optimal, metrics, speed."""

import time

import numpy as np
import pytest

from sigma_jax.data import DataError, load_task
from sigma_jax.data import maze as mz
from sigma_jax.data.sources import example_rng

H, W = 13, 21
HW = H * W


@pytest.fixture(scope="module")
def task():
    return load_task("maze")


@pytest.fixture(scope="module")
def refs(task):
    return np.stack([task.train[i] for i in range(150)])  # [150, 546]


def _grids(seq):
    return seq[:HW].reshape(H, W), seq[HW:].reshape(H, W)


def _cell(grid, token):
    (i,), (j,) = np.nonzero(grid == token)
    return int(i), int(j)


def test_task_fields(task, refs):
    assert (task.vocab_size, task.seq_len, task.prompt_len) == (5, 546, 273)
    assert refs.dtype == np.int32 and refs.min() >= 0 and refs.max() < 5
    assert (len(task.train), len(task.val)) == (100_000, 10_000)
    text = task.decode(refs[0])
    assert text.count("S") == 2 and text.count("G") == 2 and "*" in text


def test_generated_mazes_are_valid_and_shortest(refs):
    for seq in refs:
        maze, path = _grids(seq)
        assert (maze[0] == 1).all() and (maze[-1] == 1).all()
        assert (maze[:, 0] == 1).all() and (maze[:, -1] == 1).all()
        assert (maze == 2).sum() == 1 and (maze == 3).sum() == 1 and (maze == 4).sum() == 0
        assert np.array_equal(path[path != 4], maze[path != 4])  # path map = maze + path cells
        dist = mz.shortest_distance(maze, _cell(maze, 2), _cell(maze, 3))
        assert dist >= 10
        assert (path == 4).sum() == dist - 1
        assert mz.path_correct(seq, seq) and mz.path_optimal(seq, seq)


def test_dist_min_is_honoured():  # defect B10
    task = load_task("maze", dist_min=30, n_train=60)
    dists = []
    for i in range(60):
        maze, _ = _grids(task.train[i])
        dists.append(mz.shortest_distance(maze, _cell(maze, 2), _cell(maze, 3)))
    assert min(dists) >= 30
    default = load_task("maze")
    d0 = []
    for i in range(60):
        maze, _ = _grids(default.train[i])
        d0.append(mz.shortest_distance(maze, _cell(maze, 2), _cell(maze, 3)))
    assert min(d0) < 30  # the option changes the data


def test_bfs_helper_by_hand():
    grid = np.array([[0, 0, 0],
                     [1, 1, 0],
                     [0, 0, 0]])
    want = np.array([[0, 1, 2],
                     [-1, -1, 3],
                     [6, 5, 4]])
    assert np.array_equal(mz.bfs_distances(grid, (0, 0)), want)
    grid[1, 2] = 1
    assert mz.shortest_distance(grid, (0, 0), (2, 0)) == -1


def _path_cells(seq):
    return [divmod(int(k), W) for k in np.flatnonzero(seq[HW:] == 4)]


def _set(seq, cell, value):
    out = seq.copy()
    out[HW + cell[0] * W + cell[1]] = value
    return out


def _far_empty_cell(seq):
    """An empty cell not 4-adjacent to the path, start or goal."""
    _, path = _grids(seq)
    near = {(i + di, j + dj) for i, j in zip(*np.nonzero(path >= 2), strict=True)
            for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))}
    for i, j in zip(*np.nonzero(path == 0), strict=True):
        if (i, j) not in near:
            return int(i), int(j)
    return None


def _adjacent_empty_cell(seq):
    _, path = _grids(seq)
    for i, j in _path_cells(seq):
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if path[i + di, j + dj] == 0:
                return i + di, j + dj
    return None


def test_corrupted_paths_fail(refs):
    for seq in refs[:40]:
        cells = _path_cells(seq)
        for cell in (cells[0], cells[len(cells) // 2], cells[-1]):  # a cell removed
            assert not mz.path_correct(_set(seq, cell, 0), seq)
        far = _far_empty_cell(seq)
        if far is not None:  # a disconnected cell added
            assert not mz.path_correct(_set(seq, far, 4), seq)
        start = _cell(_grids(seq)[1], 2)
        moved = _set(_set(seq, start, 0), far or cells[0], 2)  # start moved
        assert not mz.path_correct(moved, seq)
        wall = next(zip(*np.nonzero(_grids(seq)[1][1:-1, 1:-1] == 1), strict=True))
        wall_cell = (int(wall[0]) + 1, int(wall[1]) + 1)
        assert not mz.path_correct(_set(seq, wall_cell, 4), seq)  # a path through a wall
        assert not mz.path_correct(_set(seq, _cell(_grids(seq)[1], 2), 4), seq)  # no start
        adj = _adjacent_empty_cell(seq)
        if adj is not None:  # connected extra cell: still a path, no longer shortest
            assert mz.path_correct(_set(seq, adj, 4), seq)
            assert not mz.path_optimal(_set(seq, adj, 4), seq)


def test_metrics_values(task, refs):
    seq = next(s for s in refs if _adjacent_empty_cell(s) is not None)
    removed = _set(seq, _path_cells(seq)[0], 0)
    longer = _set(seq, _adjacent_empty_cell(seq), 4)
    got = task.metrics(np.stack([seq, seq, removed, longer]), np.stack([seq] * 4))
    assert got == {"accuracy": 0.75, "proportion_optimal": pytest.approx(2 / 3)}
    assert task.metrics(removed[None], seq[None]) == {"accuracy": 0.0, "proportion_optimal": 0.0}


def test_deterministic_per_seed_split_index():
    a, b = load_task("maze"), load_task("maze", data_seed=1)
    assert np.array_equal(a.train[17], load_task("maze").train[17])
    assert not np.array_equal(a.train[17], a.train[18])
    assert not np.array_equal(a.train[17], a.val[17])
    assert not np.array_equal(a.train[17], b.train[17])
    train = {a.train[i].tobytes() for i in range(300)}
    assert sum(a.val[i].tobytes() in train for i in range(100)) <= 1  # published: <= 1% overlap


def test_generation_speed():
    n = 300
    t0 = time.perf_counter()
    for i in range(n):
        mz.generate(example_rng(0, "train", i))
    per_maze = (time.perf_counter() - t0) / n
    print(f"maze generation: {per_maze * 1e3:.3f} ms per maze")
    assert per_maze < 5e-3  # 100k mazes in well under 10 minutes on one core


def test_maze_options_and_errors():
    small = load_task("maze", height=9, width=11, n_walls=4, dist_min=5, n_train=10)
    assert (small.seq_len, small.prompt_len) == (198, 99)
    x = small.train[0]
    assert mz.path_optimal(x, x, 9, 11)
    with pytest.raises(DataError, match="seq_len"):
        load_task("maze", seq_len=100)
    with pytest.raises(DataError, match="odd"):
        load_task("maze", height=12)
    with pytest.raises(DataError, match="dist_min"):
        load_task("maze", height=5, width=5, n_walls=0, dist_min=9)


@pytest.mark.parametrize("options, message", [
    ({"height": "13"}, "height must be an integer; got '13'"),
    ({"width": 21.0}, "width must be an integer; got 21.0"),
    ({"n_walls": -1}, "n_walls must be an integer >= 0; got -1"),
    ({"dist_min": "3"}, "dist_min must be an integer; got '3'"),
    ({"n_train": 0}, "n_train must be an integer >= 1; got 0"),
    ({"data_seed": -1}, "data_seed must be an integer >= 0; got -1"),
    ({"seq_len": True}, "seq_len must be an integer; got True"),
])
def test_maze_bad_options_raise_one_line(options, message):
    with pytest.raises(DataError) as e:
        load_task("maze", **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_maze_decode_takes_integer_ids():
    task = load_task("maze", height=np.int64(5), width=5, n_walls=0, dist_min=1)
    assert type(task.seq_len) is int and task.seq_len == 50
    with pytest.raises(DataError, match=r"^tokens must hold integer token ids; got dtype float64$"):
        task.decode(np.zeros(50))
