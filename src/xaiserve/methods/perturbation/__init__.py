"""Forward-only methods: occlusion, RISE and surrogate fits (LIME, KernelSHAP)."""
