"""Evaluation helpers: few-shot linear evaluation, model inspection (paper Figs 6 and 7), report figures."""
