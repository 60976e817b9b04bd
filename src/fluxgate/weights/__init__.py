"""Weights: what a checkpoint file is (headers, identify, layouts), how one is loaded through diffusers (loading), and
where each profile's weights come from (sources: the tiny fixtures, the synthetic full-size build, the user's real
files; scan writes the real profile's models file). How each precision is written and loaded is `fluxgate.precisions`.
"""
