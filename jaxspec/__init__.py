"""jaxspec: JAX-native speculative decoding.

Generation from a language model becomes faster and stays exactly what the model would have
produced: a drafter proposes tokens, the target scores them in one pass, a lossless rule keeps
the longest correct prefix.
"""

from jaxspec.api import GenerateOutput, generate
from jaxspec.api import BeamSearchOutput, beam_search
from jaxspec import search
from jaxspec.autoregressive import autoregressive_tokens
from jaxspec.loading import load
from jaxspec.models import KVCache, Model, ModelConfig, forward, save
from jaxspec.models.default import load_default
from jaxspec.sampling import Sampling
from jaxspec.constraints import Constraint
from jaxspec import speculative
from jaxspec.speculative import trees
from jaxspec.speculative.drafters import DraftModel, Eagle, Hybrid, Medusa, PromptLookup, TokenRecycling
from jaxspec.speculative.default import default_drafter
from jaxspec import sharding
from jaxspec.sharding import make_mesh, shard

__all__ = ["Constraint", "BeamSearchOutput", "beam_search", "search", "DraftModel", "Eagle", "Hybrid", "Medusa", "default_drafter", "TokenRecycling", "GenerateOutput", "PromptLookup", "speculative", "trees", "KVCache", "Model", "ModelConfig", "Sampling",
           "autoregressive_tokens", "forward", "generate", "load", "make_mesh", "shard", "sharding", "load_default", "save"]
