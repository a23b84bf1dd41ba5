"""A fedsilo task for tabular medical data: breast-cancer diagnosis (see task.py)."""
