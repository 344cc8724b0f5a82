"""Offline tools over the runtime: the ahead-of-time compiler for pod topologies (aot), the RL
step simulator (sim) and its cost models (costs). Nothing in the runtime imports this package."""
