"""Weights: what a checkpoint file is (identify), how each precision is written and loaded (precisions, layouts),
and where each profile's weights come from (tiny fixtures, synthetic full-size, the user's real files).
"""
