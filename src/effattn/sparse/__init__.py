"""Class 3 of the survey, sparse attention: fixed patterns, dynamic block selection, LSH, low rank."""
