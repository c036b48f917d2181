"""TreeSpec / DynamicTree construction, derived tables and validation messages."""

import numpy as np
import pytest

from jaxspec.speculative import trees


def test_chain_tables():
    t = trees.chain(3)
    assert t.parents == (-1, 0, 1, 2)
    assert t.num_nodes == 4 and t.max_depth == 3 and t.max_children == 1
    np.testing.assert_array_equal(t.depths, [0, 1, 2, 3])
    np.testing.assert_array_equal(t.position_offsets, [0, 1, 2, 3])
    np.testing.assert_array_equal(t.ancestor_mask, np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(t.children, [[1], [2], [3], [-1]])
    np.testing.assert_array_equal(t.child_rank, [-1, 0, 0, 0])
    assert t.paths == ((0, 1, 2, 3),)


def test_root_only_chain():
    t = trees.chain(0)
    assert t.num_nodes == 1 and t.max_depth == 0 and t.max_children == 0
    assert t.children.shape == (1, 0)
    assert t.paths == ((0,),)


def test_small_tree_tables():
    #      0
    #    / | \
    #   1  2  3
    #  / \     \
    # 4   5     6
    #     |
    #     7
    t = trees.from_parents([-1, 0, 0, 0, 1, 1, 3, 5])
    np.testing.assert_array_equal(t.depths, [0, 1, 1, 1, 2, 2, 2, 3])
    assert t.max_depth == 3 and t.max_children == 3
    np.testing.assert_array_equal(
        t.children, [[1, 2, 3], [4, 5, -1], [-1, -1, -1], [6, -1, -1],
                     [-1, -1, -1], [7, -1, -1], [-1, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(t.child_rank, [-1, 0, 1, 2, 0, 1, 0, 0])
    expected = np.zeros((8, 8), bool)
    for i, ancestors in enumerate([[0], [0, 1], [0, 2], [0, 3], [0, 1, 4], [0, 1, 5], [0, 3, 6],
                                   [0, 1, 5, 7]]):
        expected[i, ancestors] = True
    np.testing.assert_array_equal(t.ancestor_mask, expected)
    assert t.paths == ((0, 2), (0, 1, 4), (0, 3, 6), (0, 1, 5, 7))


def test_kary_bfs_order():
    t = trees.kary(2, 2)
    assert t.parents == (-1, 0, 0, 1, 1, 2, 2)
    np.testing.assert_array_equal(t.children, [[1, 2], [3, 4], [5, 6]] + [[-1, -1]] * 4)
    assert trees.kary(3, 3).num_nodes == 1 + 3 + 9 + 27
    assert trees.kary(1, 4) == trees.chain(4)
    assert trees.kary(5, 0) == trees.chain(0)


def test_from_paths_orders_by_depth_then_lexicographically():
    t = trees.from_paths([(1, 0), (0,), (0, 1), (1,), (0, 0), [0, 0, 0]])
    # nodes: 0 root, 1=(0,), 2=(1,), 3=(0,0), 4=(0,1), 5=(1,0), 6=(0,0,0)
    assert t.parents == (-1, 0, 0, 1, 1, 2, 3)
    np.testing.assert_array_equal(t.child_rank, [-1, 0, 1, 0, 1, 0, 0])
    assert trees.from_paths([(0,), (0, 0), (0, 0, 0)]) == trees.chain(3)
    assert trees.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]) == trees.kary(2, 2)


def test_specs_are_hashable_values():
    a, b = trees.from_parents([-1, 0, 0, 1]), trees.from_parents(np.array([-1, 0, 0, 1]))
    assert a == b and hash(a) == hash(b) and isinstance(a.parents[1], int)
    assert len({a, b, trees.chain(3)}) == 2
    with pytest.raises(ValueError, match="read-only"):
        a.depths[0] = 3
    d = trees.dynamic(10, 3, 4)
    assert d == trees.DynamicTree(10, 3, 4) and hash(d) == hash(trees.dynamic(10, 3, 4))


def test_templates():
    m = trees.MEDUSA_63
    assert m.num_nodes == 64 and m.max_depth == 4 and m.max_children == 10
    np.testing.assert_array_equal(np.bincount(m.depths), [1, 10, 28, 23, 2])
    r = trees.TOKEN_RECYCLING_80
    assert r.num_nodes == 81 and r.max_depth == 6 and r.max_children == 8
    assert r.child_rank.max() < 8
    # nodes per level: the root's 8 children fan out near the top, then the levels narrow
    np.testing.assert_array_equal(np.bincount(r.depths), [1, 8, 20, 22, 16, 9, 5])
    assert np.count_nonzero(r.children[0] >= 0) == 8


def test_dynamic():
    d = trees.dynamic(budget=12, max_depth=4, top_k=3)
    assert d.num_nodes == 13 and d.max_depth == 4 and d.max_children == 3
    assert d.max_candidates == 3 + 3 * 9
    assert trees.dynamic(1, 1, 1).num_nodes == 2


@pytest.mark.parametrize("args, message", [
    ((0, 3, 2), "budget >= 1, got budget=0"),
    ((4, 0, 2), "max_depth >= 1, got max_depth=0"),
    ((4, 3, 0), "top_k >= 1, got top_k=0"),
    ((11, 3, 2), r"budget=11 exceeds the 10 nodes that max_depth=3, top_k=2 can produce"),
    ((6, 5, 1), r"budget=6 exceeds the 5 nodes that max_depth=5, top_k=1 can produce"),
])
def test_dynamic_validation(args, message):
    with pytest.raises(ValueError, match=message):
        trees.dynamic(*args)


@pytest.mark.parametrize("parents, message", [
    ([], "at least the root node"),
    ([0, 0], "node 0 is the root and its parent must be -1, got 0"),
    ([-1, 0, -1], r"node 2 has parent -1, but only node 0 \(the root\) may"),
    ([-1, 0, 2], r"node 2 has parent 2, which does not come before it"),
    ([-1, 0, 3, 1], r"node 2 has parent 3, which does not come before it"),
    ([-1, -2], r"node 1 has parent -2"),
])
def test_from_parents_validation(parents, message):
    with pytest.raises(ValueError, match=message):
        trees.from_parents(parents)


@pytest.mark.parametrize("paths, message", [
    ([], "at least one path"),
    ([(0,), ()], r"path \(\) is empty"),
    ([(0,), (0, -1)], r"path \(0, -1\) has a negative child rank"),
    ([(0,), (1,), (0,)], r"duplicate path \(0,\)"),
    ([(0,), (0, 1, 0), (0, 0), (0, 1, 0)], r"duplicate path \(0, 1, 0\)"),
    ([(0,), (0, 0, 0)], r"path \(0, 0, 0\) needs its prefix \(0, 0\)"),
    ([(0,), (0, 1)], r"path \(0, 1\) needs its earlier sibling \(0, 0\)"),
    ([(1,)], r"path \(1,\) needs its earlier sibling \(0,\)"),
    ([(0,), ("a",)], "must be a sequence of integer child ranks"),
])
def test_from_paths_validation(paths, message):
    with pytest.raises(ValueError, match=message):
        trees.from_paths(paths)


@pytest.mark.parametrize("make, message", [
    (lambda: trees.chain(-1), "chain length must be >= 0"),
    (lambda: trees.kary(0, 2), "k >= 1"),
    (lambda: trees.kary(2, -1), "depth >= 0"),
])
def test_constructor_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()
