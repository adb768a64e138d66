"""Measuring training speed; tools/benchmark.py is the command line over these pieces.

device (syncs and peak memory), synthetic (stand-in datasets of a real one's shape), phases (where a step's time
goes), variant (one config built as a real run by engine.build_run and timed), cifar_format (CIFAR-100 written in
its published on-disk format), random_teacher (a teacher with random weights, in memory or as a checkpoint file,
for timings and plumbing tests), baseline (the plain torchvision + PyTorch KD loop the engine is compared with).
"""
