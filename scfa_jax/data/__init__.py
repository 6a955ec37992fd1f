"""Data for the language-model experiments: corpora prepared as flat token arrays on disk."""
