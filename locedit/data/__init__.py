"""Data: preference pairs and questions from any source, split by question.

Its names load on first use (`locedit.core.lazy`): importing one module of the package loads no other.
"""

from ..core.lazy import lazy_exports

# Public name -> the module that defines it.
_EXPORTS = {
    "DataError": "..core.errors",
    "DataFileNotFoundError": "..core.errors",
    "DataWarning": ".pairs",
    "answer_list": ".pairs",
    "data_layout": ".pairs",
    "draw_by_question": ".pairs",
    "hold_out": ".splits",
    "load_preference_splits": ".pairs",
    "load_prompt_pairs": ".pairs",
    "load_question_details": ".pairs",
    "load_questions": ".pairs",
    "pair_counts": ".pairs",
    "question_counts": ".pairs",
    "register_data_source": ".sources",
    "validate_dataset_arg": ".sources",
    "validate_split_fractions": ".splits",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
