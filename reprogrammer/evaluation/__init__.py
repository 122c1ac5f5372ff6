"""Evaluation: ID accuracy, OOD generalisation and OOD detection metrics, reports and plots."""
