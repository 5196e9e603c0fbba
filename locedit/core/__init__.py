"""The layer below every stage: errors, atomic files, the recipe and its parser, the cache, plugins and W&B."""
