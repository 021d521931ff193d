"""`maze`: shortest-path solving on random wall mazes (the σ-GPT paper's maze task, arXiv
2404.09562).

Generator (our implementation of the published description):
  1. The border is wall.
  2. `n_walls` segments are added, each vertical or horizontal with probability 1/2. A segment
     lies on an even interior column (vertical) or row (horizontal); its endpoints are on even
     coordinates i1 < i2 with 1 < i2 - i1 <= H/2 (vertical) or <= W/2 (horizontal), drawn uniformly
     among such pairs. A segment is rejected when the cells it covers already hold > 1 wall cell.
  3. After more than 10 * n_walls rejected segments in total, the maze restarts from step 1.
  4. Start and goal are two distinct empty cells drawn uniformly; the pair is redrawn until the
     goal is reachable and the BFS distance is >= dist_min (honoured here, unlike the published
     generator, which ignores its dist_min flag). After 100 failed pairs the maze restarts.
  5. The path walks from the start down the BFS distance field of the goal, choosing uniformly at
     each cell among the neighbours one step closer: a uniformly tie-broken random shortest path.
Tokens: 0 empty, 1 wall, 2 start, 3 goal, 4 path (V = 5).
Sequence: [maze map (H*W), path map (H*W)]; the path map is the maze with the intermediate path
cells set to 4 (start and goal keep 2 and 3, so path length = BFS distance - 1). Prompt = the maze
map (prompt_len H*W).
Example i of a split is a pure function of (data_seed, split, i): nothing is pre-generated.
"""

from __future__ import annotations

import functools
import random
from collections import deque

import numpy as np

from sigma_jax.checks import check_int
from sigma_jax.data.sources import GeneratedSource, generated_options
from sigma_jax.data.task import DataError, Task, check_options, data_check, token_row

EMPTY, WALL, START, GOAL, PATH = 0, 1, 2, 3, 4
VOCAB_SIZE = 5
OPTIONS = {"height": 13, "width": 21, "n_walls": 15, "dist_min": 10, "n_train": 100_000,
           "n_val": 10_000, "data_seed": 0}
_CHARS = {EMPTY: " ", WALL: "#", START: "S", GOAL: "G", PATH: "*"}
_MAX_PAIR_TRIES = 100
_MAX_RESTARTS = 1000


@functools.lru_cache(maxsize=8)
def _neighbours(height: int, width: int) -> tuple[tuple[int, ...], ...]:
    """4-neighbours of every flat cell index of an H x W grid."""
    out = []
    for c in range(height * width):
        i, j = divmod(c, width)
        nb = []
        if i > 0:
            nb.append(c - width)
        if i < height - 1:
            nb.append(c + width)
        if j > 0:
            nb.append(c - 1)
        if j < width - 1:
            nb.append(c + 1)
        out.append(tuple(nb))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _segment_choices(height: int, width: int) -> tuple[list, list]:
    """All allowed vertical and horizontal segments, each as the tuple of flat cells it covers."""
    def spans(n):  # even endpoint pairs i1 < i2 <= n - 1 with 1 < i2 - i1 <= n / 2
        return [(a, b) for a in range(0, n, 2) for b in range(a + 2, n, 2) if b - a <= n / 2]

    vertical = [tuple(i * width + j for i in range(a, b + 1))
                for j in range(2, width - 2, 2) for a, b in spans(height)]
    horizontal = [tuple(i * width + j for j in range(a, b + 1))
                  for i in range(2, height - 2, 2) for a, b in spans(width)]
    return vertical, horizontal


def _bfs_flat(walkable: list, source: int, nbrs) -> list[int]:
    """Distances (-1 = unreachable) from `source` over walkable flat cells."""
    dist = [-1] * len(walkable)
    dist[source] = 0
    queue = deque([source])
    while queue:
        c = queue.popleft()
        d = dist[c] + 1
        for n in nbrs[c]:
            if dist[n] < 0 and walkable[n]:
                dist[n] = d
                queue.append(n)
    return dist


def bfs_distances(grid: np.ndarray, source: tuple[int, int]) -> np.ndarray:
    """Shortest 4-connected step counts from `source` on `grid[H, W]` (cells == 1 are walls).

    Returns int32[H, W], -1 where unreachable (walls included).
    """
    grid = np.asarray(grid)
    h, w = grid.shape
    walkable = (grid != WALL).ravel().tolist()
    dist = _bfs_flat(walkable, source[0] * w + source[1], _neighbours(h, w))
    return np.asarray(dist, dtype=np.int32).reshape(h, w)


def shortest_distance(grid: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> int:
    """BFS distance between cells a and b of `grid[H, W]`; -1 if b is unreachable from a."""
    return int(bfs_distances(grid, a)[b])


def _walls(rng: random.Random, height: int, width: int, n_walls: int) -> list[int] | None:
    """Steps 1-3: a flat wall map, or None if too many segments were rejected."""
    cells = [EMPTY] * (height * width)
    for c in range(height * width):
        i, j = divmod(c, width)
        if i in (0, height - 1) or j in (0, width - 1):
            cells[c] = WALL
    vertical, horizontal = _segment_choices(height, width)
    placed = failures = 0
    while placed < n_walls:
        choices = vertical if rng.random() < 0.5 else horizontal
        segment = choices[int(rng.random() * len(choices))]
        if sum(cells[c] for c in segment) > 1:
            failures += 1
            if failures > 10 * n_walls:
                return None
            continue
        for c in segment:
            cells[c] = WALL
        placed += 1
    return cells


def generate(rng: random.Random, height: int = 13, width: int = 21, n_walls: int = 15,
             dist_min: int = 10) -> np.ndarray:
    """One example: `np.int32[2 * H * W]` = [maze map, path map] (see the module docstring)."""
    nbrs = _neighbours(height, width)
    for _ in range(_MAX_RESTARTS):
        cells = _walls(rng, height, width, n_walls)
        if cells is None:
            continue
        empty = [c for c, v in enumerate(cells) if v == EMPTY]
        walkable = [v == EMPTY for v in cells]
        for _ in range(_MAX_PAIR_TRIES):
            k = int(rng.random() * len(empty))
            m = int(rng.random() * (len(empty) - 1))
            start, goal = empty[k], empty[m + (m >= k)]  # two distinct cells
            dist = _bfs_flat(walkable, goal, nbrs)
            if dist[start] >= dist_min:
                break
        else:
            continue
        maze = list(cells)
        maze[start], maze[goal] = START, GOAL
        path = list(maze)
        cur, d = start, dist[start]
        while d > 1:
            closer = [n for n in nbrs[cur] if dist[n] == d - 1]
            cur = closer[int(rng.random() * len(closer))]
            path[cur] = PATH
            d -= 1
        return np.asarray(maze + path, dtype=np.int32)
    raise DataError(f"no {height}x{width} maze with {n_walls} walls and start-goal distance >= "
                    f"{dist_min} after {_MAX_RESTARTS} restarts; lower dist_min or n_walls")


def _flood_from_start(pred: np.ndarray) -> tuple[set, bool]:
    """Cells reached from the single start through path cells, and whether one touches the goal."""
    h, w = pred.shape
    flat = pred.ravel().tolist()
    nbrs = _neighbours(h, w)
    start = flat.index(START)
    seen = {start}
    stack = [start]
    touches_goal = False
    while stack:
        c = stack.pop()
        for n in nbrs[c]:
            if flat[n] == GOAL:
                touches_goal = True
            elif flat[n] == PATH and n not in seen:
                seen.add(n)
                stack.append(n)
    return seen, touches_goal


def path_correct(pred: np.ndarray, ref: np.ndarray, height: int = 13, width: int = 21) -> bool:
    """Whether the generated path map of `pred` is a valid start-to-goal path for the maze of `ref`.

    pred, ref: `[2 * H * W]` sequences; the maze is `ref`'s first half, the prediction `pred`'s
    second half. Correct means all of: every non-path cell of the prediction equals the maze; path
    cells lie only on empty maze cells (our addition: a path through a wall is not a path);
    exactly one start; a flood fill from the start through path cells reaches a neighbour of the
    goal; no path cell is left unreached.
    """
    hw = height * width
    maze = np.asarray(ref)[:hw].reshape(height, width)
    out = np.asarray(pred)[hw:].reshape(height, width)
    is_path = out == PATH
    if not np.array_equal(out[~is_path], maze[~is_path]) or (maze[is_path] != EMPTY).any():
        return False
    if np.count_nonzero(out == START) != 1:
        return False
    reached, touches_goal = _flood_from_start(out)
    return touches_goal and len(reached) - 1 == int(is_path.sum())


def path_length(seq: np.ndarray, height: int = 13, width: int = 21) -> int:
    """Number of path cells (token 4) in the path map of a `[2 * H * W]` sequence."""
    return int(np.count_nonzero(np.asarray(seq)[height * width:] == PATH))


def path_optimal(pred: np.ndarray, ref: np.ndarray, height: int = 13, width: int = 21) -> bool:
    """Correct, and exactly as long as the reference (shortest) path."""
    return (path_correct(pred, ref, height, width)
            and path_length(pred, height, width) == path_length(ref, height, width))


def maze_metrics(samples: np.ndarray, references: np.ndarray, height: int = 13,
                 width: int = 21) -> dict[str, float]:
    """samples, references: `[B, 2*H*W]`. accuracy = fraction with a correct path;
    proportion_optimal = among correct paths, the fraction as long as the reference (0 if none)."""
    correct = optimal = 0
    for s, r in zip(np.asarray(samples), np.asarray(references), strict=True):
        if path_correct(s, r, height, width):
            correct += 1
            optimal += path_length(s, height, width) == path_length(r, height, width)
    n = len(samples)
    return {"accuracy": correct / n if n else 0.0,
            "proportion_optimal": optimal / correct if correct else 0.0}


def decode(tokens, height: int = 13, width: int = 21) -> str:
    """The maze and path maps of integer ids [2 * H * W] side by side: ' ' empty, '#' wall,
    'S' start, 'G' goal, '*' path."""
    t = token_row(tokens).tolist()
    hw = height * width

    def row(part, i):
        lo = part * hw + i * width
        return "".join(_CHARS.get(v, "?") for v in t[lo:lo + width])

    return "\n".join(f"{row(0, i)}   {row(1, i)}" for i in range(height))


def build(seq_len=None, data_path=None, **options) -> Task:
    opts = generated_options(check_options("maze", options, OPTIONS))
    for name, minimum in (("height", None), ("width", None), ("n_walls", 0), ("dist_min", None)):
        opts[name] = data_check(check_int, name, opts[name], minimum)
    h, w = opts["height"], opts["width"]
    if data_path is not None:
        raise DataError("task 'maze' is generated and reads no file; drop data_path")
    if h < 5 or w < 5 or h % 2 == 0 or w % 2 == 0:
        raise DataError(f"height={h} and width={w} must be odd and >= 5")
    if not 0 <= opts["dist_min"] <= (h - 2) * (w - 2) - 1:
        raise DataError(f"dist_min={opts['dist_min']} must lie in [0, {(h - 2) * (w - 2) - 1}], "
                        f"the longest possible path inside a {h}x{w} maze")
    if seq_len is not None and data_check(check_int, "seq_len", seq_len) != 2 * h * w:
        raise DataError(f"maze seq_len is 2*height*width = {2 * h * w}; got seq_len={seq_len}, "
                        "change height/width instead")
    make = functools.partial(generate, height=h, width=w, n_walls=opts["n_walls"],
                             dist_min=opts["dist_min"])
    return Task(
        name="maze",
        vocab_size=VOCAB_SIZE,
        seq_len=2 * h * w,
        prompt_len=h * w,
        train=GeneratedSource(make, opts["n_train"], opts["data_seed"], "train"),
        val=GeneratedSource(make, opts["n_val"], opts["data_seed"], "val"),
        decode=functools.partial(decode, height=h, width=w),
        metrics=functools.partial(maze_metrics, height=h, width=w),
    )
