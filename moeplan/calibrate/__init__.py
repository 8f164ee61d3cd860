"""Calibration: real JAX MoE layers and collectives on the local devices, fitted into a profile.

The only package of moeplan that imports jax (extra ``jax``). ``layer`` holds the MoE layer,
``bench`` the timing harness and micro-benchmarks, ``fit`` the model of what was measured and
the least-squares fit, ``run`` the resumable command behind ``moeplan calibrate``.
"""
