"""Storing: the history record (its typed form and schema) and where runs are kept. Imports neither torch nor
diffusers: reading, merging and publishing history work on a machine without them.
"""
