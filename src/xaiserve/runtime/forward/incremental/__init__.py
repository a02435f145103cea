"""Incremental occlusion: the stage plan of a traced model (plan), the window rewrite of a stage (rewrite) and its exact run (run)."""
