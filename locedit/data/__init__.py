"""Data: preference pairs and questions from any source, split by question."""

from ..core.errors import DataError, DataFileNotFoundError
from .pairs import (
    DataWarning,
    draw_by_question,
    load_preference_splits,
    load_question_details,
    load_questions,
    pair_counts,
    question_counts,
)
from .sources import register_data_source, validate_dataset_arg
from .splits import hold_out, validate_split_fractions

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "DataWarning",
    "draw_by_question",
    "hold_out",
    "load_preference_splits",
    "load_question_details",
    "load_questions",
    "pair_counts",
    "question_counts",
    "register_data_source",
    "validate_dataset_arg",
    "validate_split_fractions",
]
