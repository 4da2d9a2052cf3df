"""Data formats, the synthetic world, vocabularies, answers, downloads, the processed layout."""
