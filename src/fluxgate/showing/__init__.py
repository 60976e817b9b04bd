"""Showing: what people read from records — the terminal table, the PR summary with trends and image grids, the
decision report, the detection card. Imports neither torch nor diffusers.
"""
