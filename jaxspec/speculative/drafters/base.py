"""What every drafter provides, and the checks they share.

A drafter is a small frozen dataclass (a pytree: array fields such as a draft model's params are
leaves, settings are static) with:

  tree                     static TreeSpec (or DynamicTree): the shape of every Draft
  init(target, prompt_tokens [B, Tp], prompt_lengths [B], max_len, state) -> state
  propose(state, ctx, sampling, key) -> (Draft, state)
  commit(state, ctx, draft, verdict, target_logits [B, N, V]) -> state
  cache_slack() -> int     extra target-cache slots one step writes past the committed length
  check_compatible(target) raises ValueError when the drafter cannot serve this target
"""

from __future__ import annotations

from jaxspec.models.transformer import Model

# The drafter protocol above, by name: an attribute and five methods.
PROTOCOL = ("tree", "init", "propose", "commit", "cache_slack", "check_compatible")
_METHODS = PROTOCOL[1:]


def check_drafter(drafter) -> None:
    """Refuse what is not a drafter (a string, a class, a Model) with a ValueError saying what
    would be accepted. Duck-typed on PROTOCOL, so any drafter that provides it passes."""
    accepted = ("drafter must be None or a jaxspec drafter (js.DraftModel, js.PromptLookup, "
                "js.TokenRecycling, ...)")
    if isinstance(drafter, type):
        raise ValueError(f"{accepted}, got the class {drafter.__name__} itself: pass an instance, "
                         f"e.g. {drafter.__name__}(...)")
    if isinstance(drafter, Model):
        raise ValueError(f"{accepted}, got a js.Model: wrap a draft model as "
                         "js.DraftModel(draft_model, num_tokens=...)")
    missing = [name for name in PROTOCOL
               if not hasattr(drafter, name) or (name in _METHODS and not callable(getattr(drafter, name)))]
    if missing:
        raise ValueError(f"{accepted}, got {drafter!r:.80} of type {type(drafter).__name__}, "
                         f"which lacks {', '.join(missing)}")


def check_num_tokens(num_tokens, name: str = "num_tokens", maximum: int = 256) -> None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= maximum:
        raise ValueError(f"{name} must be an integer in [1, {maximum}] (or 'auto' where supported), "
                         f"got {num_tokens!r}")


def _tokenizer_vocab(model: Model):
    tok = model.tokenizer
    return None if tok is None else tok.get_vocab()


def check_same_vocabulary(target: Model, draft: Model) -> None:
    """Refuse a draft whose tokens mean something else than the target's.

    Same tokenizer with a padded embedding (different vocab_size) is accepted: the loop only
    ever compares the first min(V_target, V_draft) logits.
    """
    t_vocab, d_vocab = _tokenizer_vocab(target), _tokenizer_vocab(draft)
    if t_vocab is not None and d_vocab is not None:
        if t_vocab != d_vocab:
            only_t = sorted(set(t_vocab.items()) - set(d_vocab.items()))[:3]
            raise ValueError("the draft's tokenizer differs from the target's (e.g. target has "
                             f"{only_t}); a draft must share the target's tokenizer")
        if len(t_vocab) > min(target.config.vocab_size, draft.config.vocab_size):
            raise ValueError(f"the tokenizer has {len(t_vocab)} tokens but the draft's vocabulary "
                             f"is {draft.config.vocab_size}; the draft cannot propose every token")
        return
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocabulary size {draft.config.vocab_size} differs from the "
                         f"target's {target.config.vocab_size} (and without tokenizers on both "
                         "models jaxspec cannot tell a padded vocabulary from a different one)")
