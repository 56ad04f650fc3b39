"""The challenge's evaluation: the reference ConvNet (`nets`), DSA
(`augment`), the training loops (`train`: one round, or a dataset's rounds
batched into one model) and device choice (`device`).

One package, so that every speed trick of the scorer (batched rounds, the
compiled step, per-device numerics) lives in one place with one owner, and
other packages (the diffusion trainer, the generators) import the device
choice without importing the scorer's training loop.
"""
