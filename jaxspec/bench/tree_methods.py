"""Tree-drafting methods for `jaxspec bench` (joined into `harness.method_table`)."""

from __future__ import annotations


def _sparse_tree_paths() -> list[tuple[int, ...]]:
    """28 draft nodes over 6 levels (4, 7, 7, 5, 4, 1): wide near the root, a deep top-1 spine."""
    fanout = {
        (): 4,
        (0,): 3, (1,): 2, (2,): 1, (3,): 1,
        (0, 0): 3, (0, 1): 2, (1, 0): 1, (2, 0): 1,
        (0, 0, 0): 2, (0, 0, 1): 1, (0, 1, 0): 1, (1, 0, 0): 1,
        (0, 0, 0, 0): 2, (0, 0, 0, 1): 1, (0, 0, 1, 0): 1,
        (0, 0, 0, 0, 0): 1,
    }
    return [prefix + (r,) for prefix, n in fanout.items() for r in range(n)]


def tree_method_table(draft) -> dict:
    """Method name -> tree drafter. Draft-model trees only when a draft model is given."""
    import jaxspec as js

    methods = {}
    if draft is not None:
        methods["draft_model_tree28"] = js.DraftModel(
            draft, tree=js.trees.from_paths(_sparse_tree_paths()))
        methods["draft_model_dynamic32"] = js.DraftModel(
            draft, tree=js.trees.dynamic(budget=32, max_depth=6, top_k=4))
    methods["token_recycling_80"] = js.TokenRecycling(k=8, tree=js.trees.TOKEN_RECYCLING_80)
    methods["prompt_lookup_tree"] = js.PromptLookup(ngram=3, num_tokens=8, num_candidates=4)
    return methods
