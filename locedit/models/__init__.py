"""Models: where a model's heads are (AttentionLayout), where its weights come from (sources) and loading them."""

from .layout import OUTPUT_PROJECTIONS, AttentionLayout, projection_in_features, unwrap_model
from .loading import config_head_dim, load_model_and_tokenizer, read_model_config
from .sources import register_model_source, resolve_model_path

__all__ = [
    "OUTPUT_PROJECTIONS",
    "AttentionLayout",
    "config_head_dim",
    "load_model_and_tokenizer",
    "projection_in_features",
    "read_model_config",
    "register_model_source",
    "resolve_model_path",
    "unwrap_model",
]
