"""Shared test setup: one torch thread per test process.

The tests run tiny models whose ops are far too small to gain from a second thread, and on a
shared 2-core machine two threads per process oversubscribe the cores (measured: the PPO toy test
took 36-75 s with the default against 4-7 s with one thread under load)."""

import torch

torch.set_num_threads(1)
