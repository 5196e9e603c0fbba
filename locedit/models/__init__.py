"""Models: where a model's heads are (AttentionLayout), where its weights come from (sources) and loading them.

Its names load on first use (`locedit.core.lazy`): importing one module of the package loads no other.
"""

from ..core.lazy import lazy_exports

# Public name -> the module that defines it.
_EXPORTS = {
    "OUTPUT_PROJECTIONS": ".layout",
    "AttentionLayout": ".layout",
    "config_head_dim": ".loading",
    "load_model_and_tokenizer": ".loading",
    "projection_in_features": ".layout",
    "read_model_config": ".loading",
    "register_model_source": ".sources",
    "resolve_model_path": ".sources",
    "unwrap_model": ".layout",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
