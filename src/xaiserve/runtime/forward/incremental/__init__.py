"""Incremental occlusion: what a window changes (geometry), where to cut the network (plan),
the stage modules (rewrite), the occluder that runs them (run, boxes) and its making (build)."""
