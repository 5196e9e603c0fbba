"""locedit: is a behaviour of a language model really localized where a heuristic says it is?

Importing locedit registers its edits with PEFT, so `peft.PeftModel.from_pretrained(model, edit_dir)` loads a saved
edit with its heads.
"""

import logging
import warnings

# bitsandbytes warns on import on CPUs without its optional `kernels` package; locedit never runs 4-bit on a CPU.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# With `kernels` installed (bitsandbytes 0.50 pulls it in), its offline notice comes with that same import.
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not record.getMessage().startswith("Skipping publisher trust check")
)
# PEFT and TRL still read transformers' deprecated `is_gradient_checkpointing`, once per model wrap: nothing a user
# of locedit can act on, and it buried every stage's output of the study under repeats.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from .core.errors import EditLoadError, HeadSpecError, LocEditError  # noqa: E402
from .edit import HeadEditConfig, HeadEditLayer, add_edit, edit_layers, edit_norms, load_edit  # noqa: E402
from .heads import HeadSpec, format_heads, resolve_heads  # noqa: E402
from .models import AttentionLayout  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AttentionLayout",
    "EditLoadError",
    "HeadEditConfig",
    "HeadEditLayer",
    "HeadSpecError",
    "LocEditError",
    "add_edit",
    "edit_layers",
    "edit_norms",
    "HeadSpec",
    "format_heads",
    "load_edit",
    "resolve_heads",
]
