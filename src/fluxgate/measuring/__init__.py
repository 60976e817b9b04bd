"""Measuring: build a combo's pipeline, time its denoising steps, sample the GPU, fingerprint the machine.

The only package that runs models (torch, diffusers). Nothing here judges a number.
"""
