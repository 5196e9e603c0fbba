"""Edit: the optimal localized edit as a PEFT adapter (head-masked rank-1 LoRA), and ITI's edit as the same kind."""

from .adapter import HeadEditConfig, HeadEditLayer, check_edit_fits, head_mask, initial_read_vector, register_with_peft
from .iti import add_iti_edit, iti_vectors
from .model import add_edit, edit_head_norms, edit_layers, edit_norms, load_edit

__all__ = [
    "HeadEditConfig",
    "HeadEditLayer",
    "add_edit",
    "add_iti_edit",
    "check_edit_fits",
    "edit_layers",
    "edit_head_norms",
    "edit_norms",
    "head_mask",
    "initial_read_vector",
    "iti_vectors",
    "load_edit",
    "register_with_peft",
]
