"""Capacity planning: profile an instance, simulate a layout on a simulated clock, plan the layout.

    pdserve profile   the real engine, timed step by step -> profile JSON   (profiler.py)
    pdserve simulate  a layout under a workload, priced by a profile   (simulator.py, sim_instance.py)
    pdserve plan      every layout of N GPUs, simulated; the best goodput per GPU   (planner.py)

The simulator runs pdserve's own Scheduler, BlockManager and router policies; only the model step is
replaced by its cost from the profile (costs.py), so what it predicts follows what the engine does.
"""
