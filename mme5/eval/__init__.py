"""Evaluation on MMEB and XTD: readers, scoring, encoding, command and training callbacks."""
